package e2e

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"segmap/internal/meta"
	"segmap/internal/table"
)

// TestCheckData: 'segmap check --data DIR' on the store of a stopped
// 'segmap up': clean after real use; refused while the process runs; a
// leaked slot found (exit 3) and reclaimed by --repair; a record whose
// bytes were damaged reported with its key (exit 3), and --repair refused
// (exit 4).
func TestCheckData(t *testing.T) {
	t.Parallel()
	requireTools(t, "qemu-io")
	dir := filepath.Join(t.TempDir(), "data")
	u := startUp(t, dir)
	u.cli("disk", "create", "d", "--size", "64M")
	run(t, time.Minute, "qemu-io", "-f", "raw", u.uri("d"), "-c", "write -P 0x33 0 4M", "-c", "flush")
	u.cli("snapshot", "d", "--name", "d@1")
	if out, errOut, code := runBin(t, "check", "--data", dir); code != 1 || !strings.Contains(errOut, "in use by a running controller") {
		t.Errorf("check --data on a running store: exit %d\n%s%s", code, out, errOut)
	}
	u.stop()

	check := func(args ...string) (string, int) {
		t.Helper()
		out, errOut, code := runBin(t, append([]string{"check", "--data", dir}, args...)...)
		return out + errOut, code
	}
	if out, code := check(); code != 0 || !strings.Contains(out, "clean") {
		t.Fatalf("check --data after use: exit %d\n%s", code, out)
	}

	// A leak: a free slot counted as used.
	path := filepath.Join(dir, "meta.db")
	st, err := meta.OpenBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	err = st.Update(context.Background(), func(tx *meta.Tx) error {
		cs, err := tx.Containers()
		if err != nil {
			return err
		}
		slot, ok, err := tx.FindFree(cs[0].ID, 0)
		if err != nil || !ok {
			t.Fatalf("no free slot: %v", err)
		}
		_, err = meta.AddRefs(tx, locOf(cs[0].ID, slot), 1)
		return err
	})
	st.Close()
	if err != nil {
		t.Fatal(err)
	}
	if out, code := check(); code != 3 || !strings.Contains(out, "leaked-slot") {
		t.Errorf("check --data with a leak: exit %d\n%s", code, out)
	}
	if out, code := check("--repair"); code != 0 || !strings.Contains(out, "repaired 1") || !strings.Contains(out, "clean") {
		t.Errorf("check --data --repair: exit %d\n%s", code, out)
	}

	// A damaged record: one byte of the disk record flipped.
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	var damaged string
	err = db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("segmap"))
		return b.ForEach(func(k, v []byte) error {
			if damaged == "" && bytes.HasPrefix(k, []byte("d/")) {
				damaged = string(k)
				nv := bytes.Clone(v)
				nv[len(nv)/2] ^= 0x40
				return b.Put(bytes.Clone(k), nv)
			}
			return nil
		})
	})
	db.Close()
	if err != nil || damaged == "" {
		t.Fatalf("damage a disk record: %v", err)
	}
	out, code := check()
	if code != 3 || !strings.Contains(out, "corrupt-record") || !strings.Contains(out, "d/1") || !strings.Contains(out, "checksum mismatch") {
		t.Errorf("check --data with a damaged record: exit %d\n%s", code, out)
	}
	if out2, code2 := check("--repair"); code2 != 4 || !strings.Contains(out2, "corrupt-record") || !strings.Contains(out2, "repair refused") {
		t.Errorf("check --data --repair with a damaged record: exit %d (it must refuse: 4)\n%s", code2, out2)
	}
	t.Logf("damaged %q: %s", damaged, strings.TrimSpace(out))
}

func locOf(c, s uint32) table.Location { return table.Location{Container: c, Slot: s} }
