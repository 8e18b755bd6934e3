package container_test

import (
	"bytes"
	"path/filepath"
	"testing"

	"segmap/internal/container"
)

// TestFileReadAtNoWait: a cached read is served and matches ReadAt; a read
// out of range or after Close is refused, for ReadAt to report.
func TestFileReadAtNoWait(t *testing.T) {
	c, err := container.Create(filepath.Join(t.TempDir(), "c"), container.Header{ID: 1, SlotSize: 1 << 20, Slots: 4})
	if err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{3}, 4096)
	if _, err := c.WriteAt(want, 8192); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if !c.ReadAtNoWait(got, 8192) {
		t.Skip("preadv2 RWF_NOWAIT refused a cached read (kernel or file system without it)")
	}
	if !bytes.Equal(got, want) {
		t.Fatal("ReadAtNoWait returned other bytes than written")
	}
	if n := testing.AllocsPerRun(100, func() { c.ReadAtNoWait(got, 8192) }); n != 0 {
		t.Errorf("%v allocations per ReadAtNoWait", n)
	}
	for _, off := range []int64{-1, c.Size() - 100, c.Size()} {
		if c.ReadAtNoWait(got, off) {
			t.Errorf("read at %d outside the container served", off)
		}
	}
	c.Close()
	if c.ReadAtNoWait(got, 8192) {
		t.Error("read after Close served")
	}
}

// BenchmarkFileReadAtNoWait compares a cached 4 KiB read through
// ReadAtNoWait (preadv2 with RWF_NOWAIT) with ReadAt (pread).
func BenchmarkFileReadAtNoWait(b *testing.B) {
	c, err := container.Create(filepath.Join(b.TempDir(), "c"), container.Header{ID: 1, SlotSize: 1 << 20, Slots: 4})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	p := make([]byte, 4096)
	c.WriteAt(p, 0)
	b.Run("nowait", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if !c.ReadAtNoWait(p, 0) {
				b.Fatal("refused")
			}
		}
	})
	b.Run("readat", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := c.ReadAt(p, 0); err != nil {
				b.Fatal(err)
			}
		}
	})
}
