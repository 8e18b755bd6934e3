package meta_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"segmap/internal/meta"
	"segmap/internal/meta/metatest"
	"segmap/internal/table"
)

func openBolt(t *testing.T, path string) *meta.Bolt {
	t.Helper()
	s, err := meta.OpenBolt(path)
	if err != nil {
		t.Fatalf("OpenBolt: %v", err)
	}
	return s
}

func TestBolt(t *testing.T) {
	metatest.Run(t, func(t *testing.T) meta.Store {
		s := openBolt(t, filepath.Join(t.TempDir(), "meta.db"))
		t.Cleanup(func() {
			if err := s.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		})
		return s
	})
}

func TestBoltGroupCommit(t *testing.T) {
	metatest.RunGroupCommit(t, func(t *testing.T) meta.Store {
		s := openBolt(t, filepath.Join(t.TempDir(), "meta.db"))
		t.Cleanup(func() {
			if err := s.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		})
		return s
	})
}

func TestBoltPersistence(t *testing.T) {
	metatest.RunPersistence(t, func(t *testing.T, dir string) meta.Store {
		return openBolt(t, filepath.Join(dir, "meta.db"))
	})
}

// TestBoltLocked checks that a second OpenBolt of an open file fails
// promptly, naming the file, instead of waiting for the first to close.
func TestBoltLocked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meta.db")
	first := openBolt(t, path)

	type result struct {
		s   *meta.Bolt
		err error
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		s, err := meta.OpenBolt(path)
		done <- result{s, err}
	}()
	var r result
	select {
	case r = <-done:
	case <-time.After(10 * time.Second):
		// Release the lock so the goroutine ends, then fail.
		first.Close()
		r = <-done
		if r.s != nil {
			r.s.Close()
		}
		t.Fatal("second OpenBolt of a locked file still waiting after 10s")
	}
	elapsed := time.Since(start)
	if r.err == nil {
		r.s.Close()
		first.Close()
		t.Fatal("second OpenBolt of an open file succeeded")
	}
	t.Logf("second OpenBolt after %v: %v", elapsed.Round(time.Millisecond), r.err)
	if elapsed > 5*time.Second {
		t.Errorf("second OpenBolt took %v to fail", elapsed)
	}
	if !strings.Contains(r.err.Error(), path) {
		t.Errorf("error %q does not name the file %s", r.err, path)
	}

	// The first store still works, and once it is closed the file opens.
	if err := first.View(t.Context(), func(*meta.Tx) error { return nil }); err != nil {
		t.Errorf("first store after a refused second open: %v", err)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	if err := openBolt(t, path).Close(); err != nil {
		t.Fatal(err)
	}
}

// boltKeys returns the keys of the store's bucket, read with bbolt itself.
func boltKeys(t *testing.T, path string) []string {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var keys []string
	if err := db.View(func(btx *bolt.Tx) error {
		b := btx.Bucket([]byte("segmap"))
		if b == nil {
			return errors.New(`no bucket "segmap"`)
		}
		return b.ForEach(func(k, _ []byte) error {
			keys = append(keys, string(k))
			return nil
		})
	}); err != nil {
		t.Fatal(err)
	}
	return keys
}

// TestBoltSparse checks that a new disk stores one record and no table, and
// that reading its entries and counts anywhere stores nothing either.
func TestBoltSparse(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meta.db")
	s := openBolt(t, path)
	err := s.Update(t.Context(), func(tx *meta.Tx) error {
		d, err := tx.CreateDisk(meta.Disk{Name: "vol", Size: 1 << 60, SegmentSize: 1 << 20, Policy: table.Forward, Created: time.Unix(1700000000, 0).UTC()})
		if err != nil {
			return err
		}
		c, err := tx.AddContainer(meta.Container{URI: "c", SlotSize: 1 << 20, Slots: 1 << 20})
		if err != nil {
			return err
		}
		for _, seg := range []uint64{0, meta.PageEntries, 1 << 40} {
			if _, err := tx.Entries(d.ID, seg, 3); err != nil {
				return err
			}
		}
		if _, err := tx.Refs(table.Location{Container: c.ID, Slot: 5000}); err != nil {
			return err
		}
		if _, _, err := tx.FindFree(c.ID, 0); err != nil {
			return err
		}
		return tx.ForEachMapped(d.ID, func(uint64, table.Entry) error { return nil })
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	for _, k := range boltKeys(t, path) {
		if strings.HasPrefix(k, "t/") || strings.HasPrefix(k, "r/") {
			t.Errorf("reads stored page %q", k)
		}
	}
}

// seal appends the CRC-32C the package doc says every value ends in.
func seal(body []byte) []byte {
	return binary.LittleEndian.AppendUint32(body, crc32.Checksum(body, crc32.MakeTable(crc32.Castagnoli)))
}

// mutations damage a stored value. The resealed ones carry a valid checksum,
// so they reach the decoding behind it.
var mutations = []struct {
	name string
	fn   func(v []byte) []byte
}{
	{"FlipVersion", func(v []byte) []byte { v[0] ^= 0xff; return v }},
	{"FlipMiddle", func(v []byte) []byte { v[len(v)/2] ^= 0x01; return v }},
	{"FlipChecksum", func(v []byte) []byte { v[len(v)-1] ^= 0x80; return v }},
	{"TruncateOne", func(v []byte) []byte { return v[:len(v)-1] }},
	{"TruncateTo3", func(v []byte) []byte { return v[:3] }},
	{"Empty", func(v []byte) []byte { return v[:0] }},
	{"ResealedVersion", func(v []byte) []byte {
		// A version no record has (a page's next one, 2, exists).
		body := v[:len(v)-4]
		body[0] |= 0x80
		return seal(body)
	}},
	{"ResealedTruncated", func(v []byte) []byte { return seal(v[:len(v)-5]) }},
	{"ResealedTrailing", func(v []byte) []byte { return seal(append(v[:len(v)-4:len(v)-4], 0)) }},
	{"ResealedVersionOnly", func(v []byte) []byte { return seal(v[:1]) }},
}

// corruptFixture is what TestBoltCorrupt stores before damaging it.
type corruptFixture struct {
	disk, disk2 meta.Disk
	cont        meta.Container
}

func writeCorruptFixture(t *testing.T, path string) corruptFixture {
	t.Helper()
	var f corruptFixture
	s := openBolt(t, path)
	err := s.Update(t.Context(), func(tx *meta.Tx) error {
		var err error
		if f.disk, err = tx.CreateDisk(meta.Disk{Name: "vol", Size: 1 << 40, SegmentSize: 1 << 20, Policy: table.Forward, Created: time.Unix(1700000000, 0).UTC()}); err != nil {
			return err
		}
		if f.disk2, err = tx.CreateDisk(meta.Disk{Name: "vol2", Size: 1 << 40, SegmentSize: 1 << 20, Policy: table.Reverse, Created: time.Unix(1700000000, 0).UTC()}); err != nil {
			return err
		}
		if f.cont, err = tx.AddContainer(meta.Container{URI: "c", SlotSize: 1 << 20, Slots: 2 * meta.PageSlots}); err != nil {
			return err
		}
		l := table.Location{Container: f.cont.ID, Slot: 3}
		if err := tx.SetEntries(f.disk.ID, 3, []table.Entry{table.At(l, false)}); err != nil {
			return err
		}
		return tx.SetRefs(l, 1)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return f
}

// damage rewrites, with bbolt directly, every value whose key starts with
// prefix, and returns the keys it changed.
func damage(t *testing.T, path, prefix string, fn func(k string, v []byte) []byte) []string {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var keys []string
	if err := db.Update(func(btx *bolt.Tx) error {
		b := btx.Bucket([]byte("segmap"))
		if b == nil {
			return errors.New(`no bucket "segmap"`)
		}
		vals := map[string][]byte{}
		c := b.Cursor()
		for k, v := c.Seek([]byte(prefix)); k != nil && bytes.HasPrefix(k, []byte(prefix)); k, v = c.Next() {
			keys = append(keys, string(k))
			vals[string(k)] = bytes.Clone(v)
		}
		for _, k := range keys {
			if err := b.Put([]byte(k), fn(k, vals[k])); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(keys) == 0 {
		t.Fatalf("no key with prefix %q to damage", prefix)
	}
	return keys
}

// corruptRead is one access that must report a damaged record.
type corruptRead struct {
	name  string
	write bool
	fn    func(tx *meta.Tx, f corruptFixture) error
}

func ignore2[A any](_ A, err error) error { return err }

func ignore3[A, B any](_ A, _ B, err error) error { return err }

// corruptReads lists, per key prefix, the accesses that read those records.
var corruptReads = map[string][]corruptRead{
	"d/": {
		{"DiskByID", false, func(tx *meta.Tx, f corruptFixture) error { return ignore2(tx.DiskByID(f.disk.ID)) }},
		{"Disk", false, func(tx *meta.Tx, f corruptFixture) error { return ignore2(tx.Disk("vol")) }},
		{"Disks", false, func(tx *meta.Tx, f corruptFixture) error { return ignore2(tx.Disks()) }},
		{"PutDisk", true, func(tx *meta.Tx, f corruptFixture) error {
			d := f.disk
			d.Name = "renamed"
			return tx.PutDisk(d)
		}},
		{"DeleteDisk", true, func(tx *meta.Tx, f corruptFixture) error { return ignore2(tx.DeleteDisk(f.disk.ID)) }},
	},
	"n/": {
		{"Disk", false, func(tx *meta.Tx, f corruptFixture) error { return ignore2(tx.Disk("vol")) }},
	},
	"t/": {
		{"Entries", false, func(tx *meta.Tx, f corruptFixture) error { return ignore2(tx.Entries(f.disk.ID, 0, 5)) }},
		{"ForEachMapped", false, func(tx *meta.Tx, f corruptFixture) error {
			return tx.ForEachMapped(f.disk.ID, func(uint64, table.Entry) error { return nil })
		}},
		{"SetEntries", true, func(tx *meta.Tx, f corruptFixture) error {
			return tx.SetEntries(f.disk.ID, 7, []table.Entry{table.ErrorEntry})
		}},
		{"CopyTable", true, func(tx *meta.Tx, f corruptFixture) error { return tx.CopyTable(f.disk.ID, f.disk2.ID) }},
		{"TablePages", false, func(tx *meta.Tx, f corruptFixture) error { return ignore2(tx.TablePages(f.disk.ID)) }},
		{"PageShared", false, func(tx *meta.Tx, f corruptFixture) error { return ignore2(tx.PageShared(f.disk.ID, 3)) }},
	},
	"p/": {
		{"Entries", false, func(tx *meta.Tx, f corruptFixture) error { return ignore2(tx.Entries(f.disk.ID, 0, 5)) }},
		{"ForEachMapped", false, func(tx *meta.Tx, f corruptFixture) error {
			return tx.ForEachMapped(f.disk.ID, func(uint64, table.Entry) error { return nil })
		}},
		{"SetEntries", true, func(tx *meta.Tx, f corruptFixture) error {
			return tx.SetEntries(f.disk.ID, 7, []table.Entry{table.ErrorEntry})
		}},
		{"DeleteDisk", true, func(tx *meta.Tx, f corruptFixture) error { return ignore2(tx.DeleteDisk(f.disk.ID)) }},
	},
	"q/": {
		{"PageShared", false, func(tx *meta.Tx, f corruptFixture) error { return ignore2(tx.PageShared(f.disk.ID, 3)) }},
		{"SetEntries", true, func(tx *meta.Tx, f corruptFixture) error {
			return tx.SetEntries(f.disk.ID, 7, []table.Entry{table.ErrorEntry})
		}},
		{"CopyTable", true, func(tx *meta.Tx, f corruptFixture) error { return tx.CopyTable(f.disk.ID, f.disk2.ID) }},
		{"DeleteDisk", true, func(tx *meta.Tx, f corruptFixture) error { return ignore2(tx.DeleteDisk(f.disk.ID)) }},
		{"ForEachStoredPage", false, func(tx *meta.Tx, f corruptFixture) error {
			return tx.ForEachStoredPage(func(uint64, uint32, bool) error { return nil })
		}},
	},
	"r/": {
		{"Refs", false, func(tx *meta.Tx, f corruptFixture) error {
			return ignore2(tx.Refs(table.Location{Container: f.cont.ID, Slot: 3}))
		}},
		{"ForEachRef", false, func(tx *meta.Tx, f corruptFixture) error {
			return tx.ForEachRef(f.cont.ID, func(uint32, uint32) error { return nil })
		}},
		{"FindFree", false, func(tx *meta.Tx, f corruptFixture) error { return ignore3(tx.FindFree(f.cont.ID, 0)) }},
		{"SetRefs", true, func(tx *meta.Tx, f corruptFixture) error {
			return tx.SetRefs(table.Location{Container: f.cont.ID, Slot: 4}, 1)
		}},
		{"AddRefs", true, func(tx *meta.Tx, f corruptFixture) error {
			return ignore2(meta.AddRefs(tx, table.Location{Container: f.cont.ID, Slot: 3}, -1))
		}},
	},
	"c/": {
		{"Container", false, func(tx *meta.Tx, f corruptFixture) error { return ignore2(tx.Container(f.cont.ID)) }},
		{"Containers", false, func(tx *meta.Tx, f corruptFixture) error { return ignore2(tx.Containers()) }},
		{"FindFree", false, func(tx *meta.Tx, f corruptFixture) error { return ignore3(tx.FindFree(f.cont.ID, 0)) }},
		{"SetRefs", true, func(tx *meta.Tx, f corruptFixture) error {
			return tx.SetRefs(table.Location{Container: f.cont.ID, Slot: 4}, 1)
		}},
	},
	"s/": {
		{"CreateDisk", true, func(tx *meta.Tx, f corruptFixture) error {
			return ignore2(tx.CreateDisk(meta.Disk{Name: "new", SegmentSize: 1 << 20, Policy: table.Forward, Created: time.Unix(1700000000, 0).UTC()}))
		}},
		{"AddContainer", true, func(tx *meta.Tx, f corruptFixture) error {
			return ignore2(tx.AddContainer(meta.Container{URI: "new", SlotSize: 1 << 20, Slots: 1}))
		}},
	},
}

// TestBoltCorrupt damages each kind of record in the bbolt file and checks
// that every access to it reports ErrCorrupt naming the key, without
// panicking, and that writes touching a damaged record do not overwrite it.
func TestBoltCorrupt(t *testing.T) {
	for _, prefix := range []string{"d/", "n/", "t/", "r/", "c/", "s/"} {
		for _, m := range mutations {
			t.Run(prefix[:1]+"/"+m.name, func(t *testing.T) {
				path := filepath.Join(t.TempDir(), "meta.db")
				f := writeCorruptFixture(t, path)
				keys := damage(t, path, prefix, func(_ string, v []byte) []byte { return m.fn(v) })
				checkCorrupt(t, path, f, keys, corruptReads[prefix])
			})
		}
	}
}

// TestBoltCorruptSwapped stores valid records under each other's keys: a
// record must hold the id its key names.
func TestBoltCorruptSwapped(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meta.db")
	f := writeCorruptFixture(t, path)
	// A second container, so that there are two container records to swap.
	s := openBolt(t, path)
	if err := s.Update(t.Context(), func(tx *meta.Tx) error {
		_, err := tx.AddContainer(meta.Container{URI: "c2", SlotSize: 1 << 20, Slots: 1})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	for _, prefix := range []string{"d/", "c/"} {
		var vals []string
		for _, k := range boltKeys(t, path) {
			if strings.HasPrefix(k, prefix) {
				vals = append(vals, k)
			}
		}
		if len(vals) != 2 {
			t.Fatalf("%d keys with prefix %q, want 2", len(vals), prefix)
		}
		// Read both values, then write each under the other key.
		got := map[string][]byte{}
		damage(t, path, prefix, func(k string, v []byte) []byte { got[k] = v; return v })
		damage(t, path, prefix, func(k string, v []byte) []byte {
			if k == vals[0] {
				return got[vals[1]]
			}
			return got[vals[0]]
		})
	}
	s = openBolt(t, path)
	defer s.Close()
	err := s.View(t.Context(), func(tx *meta.Tx) error {
		_, err := tx.DiskByID(f.disk.ID)
		wantCorrupt(t, "DiskByID of a swapped record", err, []string{string(diskKeyOf(f.disk.ID))})
		_, err = tx.Disk("vol")
		wantCorrupt(t, "Disk of a swapped record", err, []string{string(diskKeyOf(f.disk.ID))})
		_, err = tx.Container(f.cont.ID)
		wantCorrupt(t, "Container of a swapped record", err, []string{string(containerKeyOf(f.cont.ID))})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// diskKeyOf and containerKeyOf spell the keys of the layout in the package
// doc, for error messages.
func diskKeyOf(id meta.DiskID) []byte { return binary.BigEndian.AppendUint64([]byte("d/"), uint64(id)) }

func containerKeyOf(id uint32) []byte { return binary.BigEndian.AppendUint32([]byte("c/"), id) }

func checkCorrupt(t *testing.T, path string, f corruptFixture, keys []string, reads []corruptRead) {
	t.Helper()
	s := openBolt(t, path)
	defer s.Close()
	for _, r := range reads {
		run := s.View
		if r.write {
			run = s.Update
		}
		called := false
		err := run(t.Context(), func(tx *meta.Tx) error {
			called = true
			return r.fn(tx, f)
		})
		if !called {
			t.Fatalf("%s: transaction not run: %v", r.name, err)
		}
		wantCorrupt(t, r.name, err, keys)
	}
	// Nothing above overwrote the damaged records: they still fail.
	for _, r := range reads {
		if r.write {
			continue
		}
		err := s.View(t.Context(), func(tx *meta.Tx) error { return r.fn(tx, f) })
		wantCorrupt(t, r.name+" after the writes", err, keys)
	}
}

// wantCorrupt checks that err is ErrCorrupt and names one of keys.
func wantCorrupt(t *testing.T, what string, err error, keys []string) {
	t.Helper()
	if !errors.Is(err, meta.ErrCorrupt) {
		t.Errorf("%s: error %v, want ErrCorrupt", what, err)
		return
	}
	for _, k := range keys {
		if strings.Contains(err.Error(), fmt.Sprintf("%q", k)) {
			return
		}
	}
	t.Errorf("%s: error %q names none of the damaged keys %q", what, err, keys)
}

// TestBoltCheckFileWhileWriting: the file check of a store in use (segmap
// check through a running controller) meets commits: it must neither
// report the pages they free as damage nor race with them (-race).
func TestBoltCheckFileWhileWriting(t *testing.T) {
	b, err := meta.OpenBolt(filepath.Join(t.TempDir(), "meta.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx := t.Context()
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			if err := b.Update(ctx, func(tx *meta.Tx) error {
				return tx.SetAgents([]string{fmt.Sprintf("agent-%d", i), "x" + strings.Repeat("y", i%100)})
			}); err != nil {
				done <- err
				return
			}
		}
	}()
	deadline := time.Now().Add(500 * time.Millisecond)
	checks := 0
	for ; time.Now().Before(deadline); checks++ {
		if errs := b.CheckFile(); len(errs) > 0 {
			close(stop)
			<-done
			t.Fatalf("check %d of a sound store being written: %v", checks, errs)
		}
	}
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	t.Logf("%d file checks beside the commits", checks)
}
