package meta_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"segmap/internal/meta"
)

// TestDamaged damages every record under each key prefix in each way of
// mutations and checks that Damaged reports exactly those records, by key,
// telling truncated records (too short for their layout) from the others.
func TestDamaged(t *testing.T) {
	truncating := map[string]bool{"TruncateOne": true, "TruncateTo3": true, "Empty": true, "ResealedTruncated": true, "ResealedVersionOnly": true}
	n := 0
	for _, prefix := range []string{"d/", "n/", "t/", "p/", "q/", "r/", "c/", "s/"} {
		for _, m := range mutations {
			t.Run(prefix[:1]+"/"+m.name, func(t *testing.T) {
				path := filepath.Join(t.TempDir(), "meta.db")
				writeCorruptFixture(t, path)
				keys := damage(t, path, prefix, func(_ string, v []byte) []byte { return m.fn(v) })
				s := openBolt(t, path)
				defer s.Close()
				var got []*meta.RecordError
				if err := s.View(t.Context(), func(tx *meta.Tx) error {
					var err error
					got, err = tx.Damaged()
					return err
				}); err != nil {
					t.Fatal(err)
				}
				var gotKeys []string
				for _, e := range got {
					gotKeys = append(gotKeys, string(e.Key))
					if e.Truncated != truncating[m.name] {
						t.Errorf("record %s: truncated %v, want %v (%v)", meta.KeyName(e.Key), e.Truncated, truncating[m.name], e)
					}
				}
				slices.Sort(keys)
				if !slices.Equal(gotKeys, keys) {
					t.Errorf("Damaged reported %q, want the damaged %q", gotKeys, keys)
				}
				n += len(got)
			})
		}
	}
	t.Logf("summary: damaged records reported %d", n)
}

// TestDamagedClean: a store as the transactions leave it has no damaged
// record; names and disk records that do not point at each other are.
func TestDamagedClean(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meta.db")
	writeCorruptFixture(t, path)
	damaged := func() []string {
		t.Helper()
		s := openBolt(t, path)
		defer s.Close()
		var out []string
		if err := s.View(t.Context(), func(tx *meta.Tx) error {
			es, err := tx.Damaged()
			for _, e := range es {
				out = append(out, meta.KeyName(e.Key)+": "+e.Reason)
			}
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return out
	}
	if got := damaged(); len(got) != 0 {
		t.Fatalf("clean store: %q", got)
	}
	// n/vol names disk 2 (vol2), so n/vol2 and n/vol name the same
	// disk and disk 1 has no name.
	var vol2 []byte
	damage(t, path, "n/vol2", func(_ string, v []byte) []byte { vol2 = v; return v })
	damage(t, path, "n/vol", func(k string, v []byte) []byte { return vol2 })
	want := []string{`d/1: disk "vol" has no name record pointing at it`, `n/vol: names disk 2, which is called "vol2"`}
	if got := damaged(); !slices.Equal(got, want) {
		t.Errorf("swapped name: %q, want %q", got, want)
	}
}

func TestKeyName(t *testing.T) {
	for _, tt := range []struct {
		key  string
		want string
	}{
		{"d/\x00\x00\x00\x00\x00\x00\x00\x03", "d/3"},
		{"p/\x00\x00\x00\x00\x00\x00\x01\x00", "p/256"},
		{"q/\x00\x00\x00\x00\x00\x00\x00\x00", "q/0"},
		{"g/\x00\x00\x00\x00\x00\x00\x00\x07", "g/7"},
		{"t/\x00\x00\x00\x00\x00\x00\x00\x03/\x00\x00\x00\x00\x00\x00\x00\x01", "t/3/1"},
		{"c/\x00\x00\x00\x02", "c/2"},
		{"r/\x00\x00\x00\x02/\x00\x00\x00\x00\x00\x00\x00\x05", "r/2/5"},
		{"n/vol", "n/vol"},
		{"s/user/epoch", "s/user/epoch"},
		{"a/", "a/"},
		{"d/\x01", `"d/\x01"`},
		{"n/a b", `"n/a b"`},
		{"zz", `"zz"`},
	} {
		if got := meta.KeyName([]byte(tt.key)); got != tt.want {
			t.Errorf("KeyName(%q) = %s, want %s", tt.key, got, tt.want)
		}
	}
}

// TestBoltDamagedPages overwrites the header of each page of a bbolt file
// in turn: reading the store (every record, and through the Tx methods)
// fails with ErrCorrupt or succeeds, and never panics.
func TestBoltDamagedPages(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meta.db")
	writeCorruptFixture(t, path)
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	const page = 4096
	failed, recovered := 0, 0
	for i := 2; i < len(orig)/page; i++ { // the meta pages are CheckFile's
		b := bytes.Clone(orig)
		for j := i * page; j < i*page+16; j++ {
			b[j] ^= 0xa5
		}
		p := filepath.Join(t.TempDir(), "meta.db")
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := meta.OpenBoltReadOnly(p)
		if err != nil {
			if !errors.Is(err, meta.ErrCorrupt) {
				t.Errorf("page %d damaged: open: %v", i, err)
			}
			failed++
			continue
		}
		err = s.View(t.Context(), func(tx *meta.Tx) error {
			if _, err := tx.Damaged(); err != nil {
				return err
			}
			ds, err := tx.Disks()
			for _, d := range ds {
				if _, err := tx.Entries(d.ID, 0, 8); err != nil {
					return err
				}
			}
			return err
		})
		if err != nil && !errors.Is(err, meta.ErrCorrupt) {
			t.Errorf("page %d damaged: %v", i, err)
		}
		if err != nil {
			failed++
			if strings.Contains(err.Error(), "bbolt file damaged") {
				recovered++
			}
		}
		s.Close()
	}
	if recovered == 0 {
		t.Errorf("no bbolt panic recovered: the test no longer damages what it means to")
	}
	t.Logf("summary: pages damaged %d, reads failed with ErrCorrupt %d, bbolt panics recovered %d", len(orig)/page-2, failed, recovered)
}

// TestBoltPanicNotBolt: a panic of the transaction's own function is not
// taken for a damaged file.
func TestBoltPanicNotBolt(t *testing.T) {
	s := openBolt(t, filepath.Join(t.TempDir(), "meta.db"))
	defer s.Close()
	defer func() {
		if r := recover(); r != "mine" {
			t.Errorf("recovered %v, want the function's own panic", r)
		}
	}()
	s.View(t.Context(), func(*meta.Tx) error { panic("mine") })
}
