package controller_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// newMirrorCluster starts a cluster whose only pool of seg-byte slots
// is a mirrored container of two replica files, and returns their paths.
// (The standalone pool has 128 KiB slots: no disk of these tests uses
// it.)
func newMirrorCluster(t *testing.T) (*standalone.Cluster, uint32, []string) {
	t.Helper()
	c := newClusterOpts(t, standalone.Options{Pool: []standalone.PoolSpec{{SlotSize: 2 * seg, Slots: 8, Count: 1}}})
	ctx := context.Background()
	id, err := c.Ctrl.NextContainerID(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var paths, uris []string
	for _, name := range []string{"r0", "r1"} {
		p := filepath.Join(dir, name)
		if err := container.CreateFile(p, id, seg, 64); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
		uris = append(uris, container.FileURI(p))
	}
	if _, err := c.Ctrl.AddMirror(ctx, uris); err != nil {
		t.Fatal(err)
	}
	return c, id, paths
}

// scribble writes garbage straight into slot sl of the container file at
// path, below the mirror.
func scribble(t *testing.T, path string, sl uint32, at int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("garbage!"), container.HeaderSize+int64(sl)*seg+at); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// slotOf reads slot sl of the replica file at path.
func slotOf(t *testing.T, path string, sl uint32) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := make([]byte, seg)
	if _, err := f.ReadAt(p, container.HeaderSize+int64(sl)*seg); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestScrub corrupts one replica of a mirror below it, in a used slot
// (shared by a disk and its snapshot) and in a free one, and checks
// that a scrub names both, that a scrub with repair rewrites the used
// slot from the other replica and punches the free one, and that a
// third scrub is clean.
func TestScrub(t *testing.T) {
	c, id, paths := newMirrorCluster(t)
	ctx := context.Background()
	createDisk(t, c, "d", 4, table.Forward)
	d := openDisk(t, c, 0, "d")
	want := pattern(4*seg, 7)
	write(t, d, want, 0)
	snap(t, c, "d", "s")

	scrub := func(repair bool) controller.ScrubResult {
		t.Helper()
		var last, total uint64
		res, err := c.Ctrl.Scrub(ctx, repair, func(done, tot uint64) { last, total = done, tot })
		if err != nil {
			t.Fatalf("scrub (repair %v): %v", repair, err)
		}
		if res.Containers != 1 || last != total || total != 64 {
			t.Errorf("scrub (repair %v): %d containers, progress %d of %d; want 1, 64 of 64", repair, res.Containers, last, total)
		}
		if res.Slots != 64 {
			t.Errorf("scrub (repair %v): %d slots compared, want 64", repair, res.Slots)
		}
		return res
	}
	if res := scrub(false); len(res.Problems) != 0 || len(res.Repaired) != 0 {
		t.Fatalf("scrub of a sound mirror: %+v", res)
	}

	used := entry(t, c, "d", 1).Loc
	if used.Container != id {
		t.Fatalf("segment 1 maps %v, not on the mirror %d", used, id)
	}
	free := uint32(40)
	if n := refs(t, c, table.Location{Container: id, Slot: free}); n != 0 {
		t.Fatalf("slot %d has %d references; want a free one", free, n)
	}
	// Hosts read the first replica: the other one rots.
	read, rot := paths[0], paths[1]
	scribble(t, rot, used.Slot, 100)
	scribble(t, paths[0], free, 0)

	res := scrub(false)
	if len(res.Repaired) != 0 || len(res.Problems) != 2 {
		t.Fatalf("scrub of a damaged mirror: %+v; want 2 problems", res)
	}
	p := res.Problems[0]
	if p.Kind != controller.ReplicaMismatch || p.Loc != used || p.Disk != "d" || p.Segment != 1 ||
		!strings.Contains(p.Detail, "first at byte 100") || !strings.Contains(p.Detail, "disks d, s") || !strings.Contains(p.Detail, "hosts read the slot from") {
		t.Errorf("used slot: %v", p)
	}
	p = res.Problems[1]
	if p.Kind != controller.FreeNotZero || p.Loc != (table.Location{Container: id, Slot: free}) || !strings.Contains(p.Detail, "r0") {
		t.Errorf("free slot: %v", p)
	}
	t.Logf("found: %v; %v", res.Problems[0], res.Problems[1])

	res = scrub(true)
	if len(res.Problems) != 0 || len(res.Repaired) != 2 ||
		res.Repaired[0].Kind != controller.ReplicaMismatch || !strings.Contains(res.Repaired[0].Detail, "rewritten from "+container.FileURI(read)) ||
		res.Repaired[1].Kind != controller.FreeNotZero || !strings.Contains(res.Repaired[1].Detail, "punched") {
		t.Fatalf("scrub --repair: %+v", res)
	}
	if !bytes.Equal(slotOf(t, paths[0], used.Slot), slotOf(t, paths[1], used.Slot)) || !bytes.Equal(slotOf(t, paths[1], used.Slot), want[seg:2*seg]) {
		t.Errorf("slot %d: replicas not rewritten from the sound one", used.Slot)
	}
	if !bytes.Equal(slotOf(t, paths[0], free), make([]byte, seg)) {
		t.Errorf("free slot %d not punched", free)
	}
	if res := scrub(false); len(res.Problems) != 0 || len(res.Repaired) != 0 {
		t.Fatalf("scrub after the repair: %+v", res)
	}
	// Hosts go on writing and reading the mirror.
	expect(t, d, 0, want)
	write(t, d, pattern(seg, 9), seg)
	expect(t, openDisk(t, c, 1, "s"), 0, want)
	checkClean(t, c)
}
