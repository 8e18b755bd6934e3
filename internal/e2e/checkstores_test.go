package e2e

// The hand-corrupted stores of testdata/check: a generator and the tests
// that run 'segmap check' on them.
//
// Each directory testdata/check/<name>/ holds
//
//	meta.db     a bbolt store: a clean one, then one kind of damage
//	damage.txt  what was damaged, and the rows check must print for it
//	            ("want KIND WHERE" lines: WHERE is the slot cC/sS or the
//	            record key)
//	check.txt   the exact output of 'segmap check --data' (golden)
//
// The container files are not kept: check reads only the metadata. To
// regenerate every store (after a change of the record layout, say):
//
//	go test ./internal/e2e -run TestCheckStoresGenerate -update-check-stores
//
// Without the flag, TestCheckStoresGenerate builds the stores in a
// temporary directory and requires that check finds in each what it finds
// in the committed one, so the generator and the committed files cannot
// drift apart unnoticed.

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

var updateCheckStores = flag.Bool("update-check-stores", false, "regenerate the hand-corrupted stores in testdata/check")

// checkStoresDir is where the committed stores live.
const checkStoresDir = "testdata/check"

// genSeg is the segment and slot size of the generated stores.
const genSeg = 64 << 10

// cleanStore is what makeCleanStore built, for the damage functions.
type cleanStore struct {
	vm, snap, clone meta.Disk
	// own is a slot only vm maps (count 1); shared one that vm@1 and
	// vm-clone map through their shared table page (count 1: one page)
	// and that vm maps through its own copy of that page (count 2).
	own, shared table.Location
	// vmPage is vm's own table page; sharedPage the page vm@1 and
	// vm-clone share (count 2).
	vmPage, sharedPage uint64
	container          meta.Container
}

// makeCleanStore builds a store with the real controller and agent in one
// process: a disk "vm" of 16 segments written in part, a snapshot "vm@1",
// more writes to vm (copy on write), and a writable clone "vm-clone" of
// the snapshot. It returns the path of its meta.db.
func makeCleanStore(t *testing.T, dir string) string {
	t.Helper()
	ctx := context.Background()
	c, err := standalone.Open(ctx, dir, standalone.Options{Pool: []standalone.PoolSpec{{SlotSize: genSeg, Slots: 64, Count: 2}}, CommandTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "vm", Size: 16 * genSeg, SegmentSize: genSeg}); err != nil {
		t.Fatal(err)
	}
	write := func(disk string, segs ...int) {
		t.Helper()
		h, err := c.Agents[0].Open(ctx, disk)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range segs {
			if err := h.WriteAt(ctx, bytes.Repeat([]byte{byte(s + 1)}, 4096), uint64(s)*genSeg, false); err != nil {
				t.Fatal(err)
			}
		}
		if err := h.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		if err := h.Close(ctx); err != nil {
			t.Fatal(err)
		}
	}
	write("vm", 0, 1, 2, 3, 4, 5)
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"vm"}, Names: []string{"vm@1"}}); err != nil {
		t.Fatal(err)
	}
	write("vm", 0, 6)
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"vm@1"}, Names: []string{"vm-clone"}, Writable: true}); err != nil {
		t.Fatal(err)
	}
	if ps, err := c.Ctrl.Check(ctx); err != nil || len(ps) != 0 {
		t.Fatalf("the clean store is not clean: %v %v", ps, err)
	}
	return filepath.Join(dir, "meta.db")
}

// describe reads what the damage functions need from a clean store.
func describe(t *testing.T, path string) cleanStore {
	t.Helper()
	st, err := meta.OpenBoltReadOnly(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var cs cleanStore
	err = st.View(context.Background(), func(tx *meta.Tx) error {
		var err error
		if cs.vm, err = tx.Disk("vm"); err != nil {
			return err
		}
		if cs.snap, err = tx.Disk("vm@1"); err != nil {
			return err
		}
		if cs.clone, err = tx.Disk("vm-clone"); err != nil {
			return err
		}
		cts, err := tx.Containers()
		if err != nil {
			return err
		}
		cs.container = cts[0]
		vp, err := tx.TablePages(cs.vm.ID)
		if err != nil {
			return err
		}
		sp, err := tx.TablePages(cs.snap.ID)
		if err != nil {
			return err
		}
		if len(vp) != 1 || len(sp) != 1 {
			return fmt.Errorf("table pages: vm %v, vm@1 %v", vp, sp)
		}
		cs.vmPage, cs.sharedPage = vp[0].ID, sp[0].ID
		ve, err := tx.Entries(cs.vm.ID, 0, 16)
		if err != nil {
			return err
		}
		se, err := tx.Entries(cs.snap.ID, 0, 16)
		if err != nil {
			return err
		}
		// Segment 0 was rewritten after the snapshot: vm's own slot.
		// Segment 1 was not: vm and vm@1 share it.
		cs.own, cs.shared = ve[0].Loc, se[1].Loc
		for _, x := range []struct {
			loc  table.Location
			want uint32
		}{{cs.own, 1}, {cs.shared, 2}} {
			if n, err := tx.Refs(x.loc); err != nil || n != x.want {
				return fmt.Errorf("slot %v: count %d, want %d (%v)", x.loc, n, x.want, err)
			}
		}
		if n, err := tx.PageRefs(cs.sharedPage); err != nil || n != 2 {
			return fmt.Errorf("page %d: count %d, want 2 (%v)", cs.sharedPage, n, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

func slotName(l table.Location) string { return fmt.Sprintf("c%d/s%d", l.Container, l.Slot) }

// A checkDamage damages a copy of the clean store at path and says what it
// did and which rows check must print (kind and where).
type checkDamage struct {
	name string
	fn   func(t *testing.T, path string, cs cleanStore) (what string, want [][2]string)
}

// metaUpdate runs fn in a transaction of the store at path.
func metaUpdate(t *testing.T, path string, fn func(tx *meta.Tx) error) {
	t.Helper()
	st, err := meta.OpenBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := st.Update(context.Background(), fn); err != nil {
		t.Fatal(err)
	}
}

// rawUpdate replaces the value under key with fn's result (nil deletes
// it), with bbolt directly: below the record layer, as damage would.
func rawUpdate(t *testing.T, path string, key []byte, fn func(v []byte) []byte) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(func(btx *bolt.Tx) error {
		b := btx.Bucket([]byte("segmap"))
		v := b.Get(key)
		if v == nil {
			return fmt.Errorf("no record %q", key)
		}
		nv := fn(bytes.Clone(v))
		if nv == nil {
			return b.Delete(key)
		}
		return b.Put(key, nv)
	}); err != nil {
		t.Fatal(err)
	}
}

// reseal replaces the CRC-32C at the end of a record with the right one,
// as a hand edit that knows the format would.
func reseal(v []byte) []byte {
	body := v[:len(v)-4]
	return binary.LittleEndian.AppendUint32(body, crc32.Checksum(body, crc32.MakeTable(crc32.Castagnoli)))
}

// Keys of the layout in the meta package doc.
func diskKey(id meta.DiskID) []byte {
	return binary.BigEndian.AppendUint64([]byte("d/"), uint64(id))
}
func pageKey(pid uint64) []byte { return binary.BigEndian.AppendUint64([]byte("p/"), pid) }
func pageRefsKey(pid uint64) []byte {
	return binary.BigEndian.AppendUint64([]byte("q/"), pid/meta.PageSlots)
}
func containerKey(id uint32) []byte { return binary.BigEndian.AppendUint32([]byte("c/"), id) }
func dirKey(id meta.DiskID, dn uint64) []byte {
	k := binary.BigEndian.AppendUint64([]byte("t/"), uint64(id))
	return binary.BigEndian.AppendUint64(append(k, '/'), dn)
}
func slotRefsKey(cid uint32, pg uint64) []byte {
	k := binary.BigEndian.AppendUint32([]byte("r/"), cid)
	return binary.BigEndian.AppendUint64(append(k, '/'), pg)
}

// setPageCount sets table page pid's count in its q/ record.
func setPageCount(t *testing.T, path string, pid uint64, n uint32) {
	rawUpdate(t, path, pageRefsKey(pid), func(v []byte) []byte {
		binary.LittleEndian.PutUint32(v[1+4*(pid%meta.PageSlots):], n)
		return reseal(v)
	})
}

// checkDamages is one store per kind of damage check names, and one with
// several damaged records.
var checkDamages = []checkDamage{
	{"leaked-slot", func(t *testing.T, path string, cs cleanStore) (string, [][2]string) {
		var l table.Location
		metaUpdate(t, path, func(tx *meta.Tx) error {
			slot, ok, err := tx.FindFree(cs.container.ID, 40)
			if err != nil || !ok {
				return fmt.Errorf("no free slot: %v", err)
			}
			l = table.Location{Container: cs.container.ID, Slot: slot}
			return tx.SetRefs(l, 1)
		})
		return fmt.Sprintf("count of free slot %s set to 1 (Used kept in step): no entry maps it", slotName(l)), [][2]string{{"leaked-slot", slotName(l)}}
	}},
	{"referenced-free-slot", func(t *testing.T, path string, cs cleanStore) (string, [][2]string) {
		metaUpdate(t, path, func(tx *meta.Tx) error { return tx.SetRefs(cs.own, 0) })
		return fmt.Sprintf("count of slot %s, which vm segment 0 maps, set to 0 (Used kept in step)", slotName(cs.own)), [][2]string{{"referenced-free-slot", slotName(cs.own)}}
	}},
	{"wrong-reference-count", func(t *testing.T, path string, cs cleanStore) (string, [][2]string) {
		metaUpdate(t, path, func(tx *meta.Tx) error { return tx.SetRefs(cs.shared, 3) })
		return fmt.Sprintf("count of slot %s, which two table pages map, set from 2 to 3", slotName(cs.shared)), [][2]string{{"wrong-reference-count", slotName(cs.shared)}}
	}},
	{"shared-slot-writable", func(t *testing.T, path string, cs cleanStore) (string, [][2]string) {
		metaUpdate(t, path, func(tx *meta.Tx) error { return tx.SetRefs(cs.shared, 1) })
		return fmt.Sprintf("count of slot %s, which two table pages map, set from 2 to 1: the controller would hand out a writable entry for it", slotName(cs.shared)), [][2]string{{"shared-slot-writable", slotName(cs.shared)}}
	}},
	{"location-out-of-range", func(t *testing.T, path string, cs cleanStore) (string, [][2]string) {
		l := table.Location{Container: cs.container.ID, Slot: uint32(cs.container.Slots) + 100}
		metaUpdate(t, path, func(tx *meta.Tx) error { return tx.SetEntries(cs.vm.ID, 10, []table.Entry{table.At(l, false)}) })
		return fmt.Sprintf("vm segment 10 set to slot %s, past the container's %d slots", slotName(l), cs.container.Slots), [][2]string{{"location-out-of-range", slotName(l)}}
	}},
	{"wrong-used-count", func(t *testing.T, path string, cs cleanStore) (string, [][2]string) {
		k := containerKey(cs.container.ID)
		rawUpdate(t, path, k, func(v []byte) []byte {
			off := 1 + 4 + 4 + len(cs.container.URI) + 8 + 8
			binary.LittleEndian.PutUint64(v[off:], cs.container.Used+1)
			return reseal(v)
		})
		return fmt.Sprintf("container %d record: used-slot count set from %d to %d, checksum recomputed", cs.container.ID, cs.container.Used, cs.container.Used+1), [][2]string{{"wrong-used-count", meta.KeyName(k)}}
	}},
	{"wrong-page-reference-count", func(t *testing.T, path string, cs cleanStore) (string, [][2]string) {
		setPageCount(t, path, cs.sharedPage, 3)
		return fmt.Sprintf("count of table page %d (held by vm@1 and vm-clone) set from 2 to 3 in record %s, checksum recomputed", cs.sharedPage, meta.KeyName(pageRefsKey(cs.sharedPage))),
			[][2]string{{"wrong-page-reference-count", meta.KeyName(pageKey(cs.sharedPage))}}
	}},
	{"leaked-table-page", func(t *testing.T, path string, cs cleanStore) (string, [][2]string) {
		const pid = 1000 // never handed out: the store has a few pages
		setPageCount(t, path, pid, 1)
		return fmt.Sprintf("count of table page %d, which no table holds and is not stored, set to 1, checksum recomputed", pid), [][2]string{{"leaked-table-page", meta.KeyName(pageKey(pid))}}
	}},
	{"missing-table-page", func(t *testing.T, path string, cs cleanStore) (string, [][2]string) {
		var locs []table.Location
		var counts []uint32
		metaUpdate(t, path, func(tx *meta.Tx) error {
			es, err := tx.Page(cs.vmPage)
			for _, e := range es {
				// Every slot an entry names: a partial one's layers too.
				e.Slots(func(l table.Location) {
					n, rerr := tx.Refs(l)
					if rerr != nil {
						err = rerr
						return
					}
					locs = append(locs, l)
					counts = append(counts, n)
				})
			}
			return err
		})
		rawUpdate(t, path, pageKey(cs.vmPage), func([]byte) []byte { return nil })
		want := [][2]string{{"missing-table-page", meta.KeyName(pageKey(cs.vmPage))}}
		for i, l := range locs {
			// A slot only vm's page mapped now looks leaked; one it
			// shared with the other page looks over-counted.
			kind := "leaked-slot"
			if counts[i] > 1 {
				kind = "wrong-reference-count"
			}
			want = append(want, [2]string{kind, slotName(l)})
		}
		return fmt.Sprintf("record of vm's table page %d deleted: the slots only it mapped look leaked (and --repair must not free them), the others over-counted", cs.vmPage), want
	}},
	{"corrupt-record", func(t *testing.T, path string, cs cleanStore) (string, [][2]string) {
		k := diskKey(cs.snap.ID)
		rawUpdate(t, path, k, func(v []byte) []byte { v[len(v)/2] ^= 0x40; return v })
		return fmt.Sprintf("one bit of the middle byte of vm@1's disk record %s flipped", meta.KeyName(k)), [][2]string{{"corrupt-record", meta.KeyName(k)}}
	}},
	{"truncated-record", func(t *testing.T, path string, cs cleanStore) (string, [][2]string) {
		k := pageKey(cs.sharedPage)
		rawUpdate(t, path, k, func(v []byte) []byte { return v[:len(v)/2] })
		return fmt.Sprintf("table page record %s cut to half its length", meta.KeyName(k)), [][2]string{{"truncated-record", meta.KeyName(k)}}
	}},
	{"damaged-records", func(t *testing.T, path string, cs cleanStore) (string, [][2]string) {
		name := append([]byte("n/"), cs.clone.Name...)
		dk := dirKey(cs.clone.ID, 0)
		rk := slotRefsKey(cs.container.ID, 0)
		rawUpdate(t, path, name, func(v []byte) []byte { v[0] ^= 0xff; return v })
		rawUpdate(t, path, dk, func(v []byte) []byte { v[len(v)-1] ^= 0x01; return v })
		rawUpdate(t, path, rk, func(v []byte) []byte { return v[:3] })
		return fmt.Sprintf("three records damaged: %s (version byte flipped), %s (checksum byte flipped), %s (cut to 3 bytes); check reports each", meta.KeyName(name), meta.KeyName(dk), meta.KeyName(rk)),
			[][2]string{{"corrupt-record", meta.KeyName(name)}, {"corrupt-record", meta.KeyName(dk)}, {"truncated-record", meta.KeyName(rk)}}
	}},
	{"damaged-file", func(t *testing.T, path string, cs cleanStore) (string, [][2]string) {
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 64)
		if _, err := f.ReadAt(b, 0); err != nil {
			t.Fatal(err)
		}
		for i := range b {
			b[i] ^= 0x5a
		}
		if _, err := f.WriteAt(b, 0); err != nil {
			t.Fatal(err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		return "the first 64 bytes of the file (bbolt's first meta page: its page header and most of the meta) XORed with 0x5a: bbolt opens the file from its other meta page; check reports the damaged meta page, and bbolt's own file check the damaged page header",
			[][2]string{{"damaged-file", "-"}, {"damaged-file", "-"}}
	}},
}

// generateCheckStores writes every store of checkDamages under out.
func generateCheckStores(t *testing.T, out string) {
	t.Helper()
	clean := makeCleanStore(t, t.TempDir())
	cs := describe(t, clean)
	for _, d := range checkDamages {
		dir := filepath.Join(out, d.name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "meta.db")
		copyFile(t, clean, path)
		what, want := d.fn(t, path, cs)
		var b strings.Builder
		fmt.Fprintf(&b, "%s\n", what)
		for _, w := range want {
			fmt.Fprintf(&b, "want %s %s\n", w[0], w[1])
		}
		if err := os.WriteFile(filepath.Join(dir, "damage.txt"), []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
		stdout, _, _ := runBin(t, "check", "--data", dir)
		if err := os.WriteFile(filepath.Join(dir, "check.txt"), []byte(stdout), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// copyFile copies from to to (mode 0600), making to's directory; the test
// fails if it cannot.
func copyFile(t *testing.T, from, to string) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if err := os.MkdirAll(filepath.Dir(to), 0o700); err != nil {
		t.Fatal(err)
	}
	dst, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}

// storeProblems checks the store at path in process.
func storeProblems(t *testing.T, path string) []controller.Problem {
	t.Helper()
	st, err := meta.OpenBoltReadOnly(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ps, err := controller.New(controller.Config{Store: st}).Check(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return ps
}

// TestCheckStoresGenerate regenerates the stores with -update-check-stores;
// without it, it generates them in a temporary directory and requires that
// check finds the same problems there as in the committed stores.
func TestCheckStoresGenerate(t *testing.T) {
	if *updateCheckStores {
		if err := os.RemoveAll(checkStoresDir); err != nil {
			t.Fatal(err)
		}
		generateCheckStores(t, checkStoresDir)
		return
	}
	tmp := t.TempDir()
	generateCheckStores(t, tmp)
	for _, d := range checkDamages {
		got := storeProblems(t, filepath.Join(tmp, d.name, "meta.db"))
		want := storeProblems(t, filepath.Join(checkStoresDir, d.name, "meta.db"))
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: the generator makes a store where check finds\n%v\nbut in the committed one\n%v\n(regenerate: go test ./internal/e2e -run TestCheckStoresGenerate -update-check-stores)", d.name, got, want)
		}
	}
	t.Logf("summary: stores generated %d, each matching its committed copy", len(checkDamages))
}

// checkStore is one committed store, read for the tests.
type checkStore struct {
	name   string
	dir    string // a copy of the store, for the test to change
	want   [][2]string
	golden string
	sum    []byte // the store's bytes before the test
}

// loadCheckStore copies testdata/check/name into a temporary directory.
func loadCheckStore(t *testing.T, name string) checkStore {
	t.Helper()
	src := filepath.Join(checkStoresDir, name)
	s := checkStore{name: name, dir: filepath.Join(t.TempDir(), name)}
	if err := os.Mkdir(s.dir, 0o700); err != nil {
		t.Fatal(err)
	}
	copyFile(t, filepath.Join(src, "meta.db"), filepath.Join(s.dir, "meta.db"))
	dmg, err := os.ReadFile(filepath.Join(src, "damage.txt"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(dmg), "\n") {
		if f := strings.Fields(l); len(f) == 3 && f[0] == "want" {
			s.want = append(s.want, [2]string{f[1], f[2]})
		}
	}
	if len(s.want) == 0 {
		t.Fatalf("%s: no want lines in damage.txt", name)
	}
	g, err := os.ReadFile(filepath.Join(src, "check.txt"))
	if err != nil {
		t.Fatal(err)
	}
	s.golden = string(g)
	s.sum = s.bytes(t)
	return s
}

func (s checkStore) bytes(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(s.dir, "meta.db"))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// rowRE matches a row of check's table: kind, where, disk, segment, detail.
var rowRE = regexp.MustCompile(`(?m)^([a-z-]+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(.*)$`)

// rows returns the (kind, where) of every problem row of check's output.
func rows(out string) [][2]string {
	var rs [][2]string
	for _, m := range rowRE.FindAllStringSubmatch(out, -1) {
		if m[1] == "check" || m[1] == "repaired" || strings.ToUpper(m[1]) == m[1] {
			continue
		}
		rs = append(rs, [2]string{m[1], m[2]})
	}
	return rs
}

// sameRows says whether a and b hold the same rows, in any order.
func sameRows(a, b [][2]string) bool {
	key := func(r [2]string) string { return r[0] + " " + r[1] }
	as, bs := make([]string, len(a)), make([]string, len(b))
	for i := range a {
		as[i] = key(a[i])
	}
	for i := range b {
		bs[i] = key(b[i])
	}
	slices.Sort(as)
	slices.Sort(bs)
	return slices.Equal(as, bs)
}

// jsonProblem is a problem of 'check --json'.
type jsonProblem struct {
	Kind      string `json:"kind"`
	Container uint32 `json:"container"`
	Slot      uint32 `json:"slot"`
	Key       string `json:"key"`
	Detail    string `json:"detail"`
}

func (p jsonProblem) where() string {
	switch {
	case p.Key != "":
		return p.Key
	case p.Container == 0:
		return "-"
	}
	return fmt.Sprintf("c%d/s%d", p.Container, p.Slot)
}

// TestCheckStores runs the real binary on a copy of every committed store:
// 'check --data' prints exactly the rows damage.txt wants (kind and slot or
// record key) and the golden check.txt, exits 3, and changes nothing;
// '--json' gives the same problems; '--repair' reclaims the leak of the
// leaked-slot store (a second check is clean, exit 0) and refuses on every
// other store (exit 4), leaving the file byte for byte as it was.
func TestCheckStores(t *testing.T) {
	t.Parallel()
	var checks, refusals, repairs int
	for _, d := range checkDamages {
		t.Run(d.name, func(t *testing.T) {
			s := loadCheckStore(t, d.name)
			out, errOut, code := runBin(t, "check", "--data", s.dir)
			checks++
			if code != 3 {
				t.Errorf("check --data: exit %d, want 3\n%s%s", code, out, errOut)
			}
			if got := rows(out); !sameRows(got, s.want) {
				t.Errorf("check --data rows %q, want %q\n%s", got, s.want, out)
			}
			if out != s.golden {
				t.Errorf("check --data output differs from check.txt:\n%s\nwant:\n%s", out, s.golden)
			}
			if !bytes.Equal(s.bytes(t), s.sum) {
				t.Errorf("check --data changed the store")
			}

			jout, errOut, code := runBin(t, "check", "--data", s.dir, "--json")
			var r struct {
				Problems []jsonProblem `json:"problems"`
			}
			if err := json.Unmarshal([]byte(jout), &r); err != nil || code != 3 {
				t.Fatalf("check --json: exit %d, %v\n%s%s", code, err, jout, errOut)
			}
			var jrows [][2]string
			for _, p := range r.Problems {
				jrows = append(jrows, [2]string{p.Kind, p.where()})
				if p.Detail == "" {
					t.Errorf("check --json: problem %+v without detail", p)
				}
			}
			if !sameRows(jrows, s.want) {
				t.Errorf("check --json problems %q, want %q", jrows, s.want)
			}

			out, errOut, code = runBin(t, "check", "--data", s.dir, "--repair")
			if d.name == "leaked-slot" {
				repairs++
				if code != 0 || !strings.Contains(out, "repaired 1 problem:") || !strings.Contains(out, "check: clean") {
					t.Errorf("check --repair on a leak: exit %d\n%s%s", code, out, errOut)
				}
				if out, errOut, code := runBin(t, "check", "--data", s.dir); code != 0 || out != "check: clean\n" {
					t.Errorf("check after --repair: exit %d\n%s%s", code, out, errOut)
				}
				return
			}
			refusals++
			if code != 4 || !strings.Contains(errOut, "repair refused") || !strings.Contains(errOut, "nothing was changed") {
				t.Errorf("check --repair: exit %d, want 4 and a refusal\n%s%s", code, out, errOut)
			}
			if out != s.golden {
				t.Errorf("check --repair output differs from check.txt:\n%s\nwant:\n%s", out, s.golden)
			}
			if !bytes.Equal(s.bytes(t), s.sum) {
				t.Errorf("check --repair changed the store though it refused")
			}
		})
	}
	t.Logf("summary: stores %d, checks %d, repairs refused %d, leaks repaired %d", len(checkDamages), checks, refusals, repairs)
}

// TestCheckStoresOnline starts 'segmap controller' on a copy of each
// committed store and checks through it: the same output as the offline
// check, exit 3; '--repair' refused (exit 4) but on the leaked-slot store,
// which it repairs. The damaged-file store is the exception: the
// controller's first commit rewrites the damaged meta page.
func TestCheckStoresOnline(t *testing.T) {
	var n atomic.Int32
	t.Cleanup(func() { t.Logf("summary: stores checked through a controller %d", n.Load()) })
	for _, d := range checkDamages {
		t.Run(d.name, func(t *testing.T) {
			t.Parallel()
			s := loadCheckStore(t, d.name)
			// A short lease: a new controller holds off changes (here
			// the repair) until agents of an earlier one have expired.
			ctl := start(t, s.dir, "controller", "--listen", "127.0.0.1:0", "--data", s.dir, "--insecure", "--lease", "500ms")
			out, errOut, code := ctl.cliResult("check")
			if d.name == "damaged-file" {
				// The controller's first commit (its epoch) rewrote
				// the damaged meta page: bbolt writes its two meta
				// pages in turn.
				if code != 0 || out != "check: clean\n" {
					t.Errorf("check through a controller on a store whose damaged meta page it rewrote: exit %d\n%s%s", code, out, errOut)
				}
				ctl.stop()
				n.Add(1)
				return
			}
			if code != 3 || out != s.golden {
				t.Errorf("check through the controller: exit %d, want 3 and the offline output\n%s%s\nwant:\n%s", code, out, errOut, s.golden)
			}
			out, errOut, code = ctl.cliResult("check", "--repair")
			switch {
			case d.name == "leaked-slot":
				if code != 0 || !strings.Contains(out, "repaired 1 problem:") || !strings.Contains(out, "check: clean") {
					t.Errorf("check --repair through the controller on a leak: exit %d\n%s%s", code, out, errOut)
				}
			case code != 4 || out != s.golden || !strings.Contains(errOut, "repair refused"):
				t.Errorf("check --repair through the controller: exit %d, want 4\n%s%s", code, out, errOut)
			}
			// The controller still serves: status works, or fails with
			// a clear error when it needs a damaged record.
			if _, errOut, code := ctl.cliResult("status"); code != 0 && !strings.Contains(errOut, "corrupt metadata") {
				t.Errorf("status after check: exit %d\n%s", code, errOut)
			}
			ctl.stop()
			n.Add(1)
		})
	}
}

// TestCheckDamagedPages overwrites the start of each 4 KiB page of a
// store in turn (bbolt's page header and the first bytes after it) and
// runs 'check --data' on it: whatever the page held (a meta page, the free
// list, a branch or leaf of the records, a record value, nothing), check
// reports damage (exit 3), never panics, and the store stays as it was.
func TestCheckDamagedPages(t *testing.T) {
	t.Parallel()
	src := filepath.Join(checkStoresDir, "leaked-slot", "meta.db")
	orig, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	const page = 4096
	kinds := map[string]int{}
	runs := 0
	// Where in the page, how many bytes: the page header and what
	// follows it; only what follows it (a meta page's fields, a leaf's
	// first elements). Damage to record values is TestCheckRandomDamage's.
	for _, at := range [][2]int{{0, 64}, {16, 48}} {
		for i := 0; i < len(orig)/page; i++ {
			runs++
			dir := filepath.Join(t.TempDir(), fmt.Sprint(i))
			if err := os.Mkdir(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			b := bytes.Clone(orig)
			for j := i*page + at[0]; j < i*page+at[0]+at[1]; j++ {
				b[j] ^= 0x5a
			}
			path := filepath.Join(dir, "meta.db")
			if err := os.WriteFile(path, b, 0o600); err != nil {
				t.Fatal(err)
			}
			out, errOut, code := runBin(t, "check", "--data", dir)
			if code != 3 || strings.Contains(errOut, "goroutine ") {
				t.Errorf("page %d damaged at +%d: exit %d, want 3\n%s%s", i, at[0], code, out, errOut)
			}
			for _, r := range rows(out) {
				kinds[r[0]]++
			}
			if after, err := os.ReadFile(path); err != nil || !bytes.Equal(after, b) {
				t.Errorf("page %d damaged: check changed the store (%v)", i, err)
			}
		}
	}
	t.Logf("summary: pages damaged %d, problems by kind %v", runs, kinds)
}
