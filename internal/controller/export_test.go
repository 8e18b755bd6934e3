package controller_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"slices"
	"testing"

	"segmap/internal/controller"
	"segmap/internal/rpc/protocol"
	"segmap/internal/standalone"
	"segmap/internal/stream"
	"segmap/internal/table"
)

// contents reads the whole of disk name through agent 0.
func contents(t *testing.T, cl *standalone.Cluster, name string) []byte {
	t.Helper()
	d := openDisk(t, cl, 0, name)
	return read(t, d, 0, d.Size())
}

// export writes the stream of snap (from base, if set) of cluster c.
func export(t *testing.T, c *standalone.Cluster, snap, base string) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := c.Ctrl.Export(context.Background(), controller.ExportOptions{Snapshot: snap, Base: base}, &b); err != nil {
		t.Fatalf("export %s from %q: %v", snap, base, err)
	}
	return b.Bytes()
}

// diskNames returns the names of c's disks.
func diskNames(t *testing.T, c *standalone.Cluster) []string {
	t.Helper()
	ds, err := c.Ctrl.Disks(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, d := range ds {
		out = append(out, d.Name)
	}
	slices.Sort(out)
	return out
}

// TestExportImportRoundTrip exports a full stream and a chain of
// incremental ones (random whole and sub-block writes, a trim, a grow)
// from one cluster into another: every snapshot reads the same on both
// sides, each incremental stream carries about the bytes written since
// its base, and a stream flipped, truncated, applied to the wrong base
// or to a disk written since is refused and changes nothing.
func TestExportImportRoundTrip(t *testing.T) {
	ctx := context.Background()
	src := newCluster(t)
	dst := newCluster(t)
	createDisk(t, src, "vm1", 16, table.Forward)
	d := openDisk(t, src, 0, "vm1")
	rng := rand.New(rand.NewPCG(1, 2))
	write(t, d, pattern(3*seg, 1), 2*seg)
	write(t, d, pattern(4096, 2), 9*seg+8192)
	snap(t, src, "vm1", "vm1@s0")
	full := export(t, src, "vm1@s0", "")
	if _, err := dst.Ctrl.Import(ctx, controller.ImportOptions{Disk: "vm1"}, bytes.NewReader(full)); err != nil {
		t.Fatalf("import full: %v", err)
	}
	if !bytes.Equal(contents(t, dst, "vm1@s0"), contents(t, src, "vm1@s0")) {
		t.Fatal("vm1@s0 differs after the full import")
	}
	if n, limit := len(full), 4*seg+8192; n > limit {
		t.Errorf("full stream of %d bytes, want at most %d (holes skipped)", n, limit)
	}
	checkClean(t, dst)
	if _, err := dst.Ctrl.Import(ctx, controller.ImportOptions{Disk: "vm1"}, bytes.NewReader(full)); !errors.Is(err, controller.ErrExists) {
		t.Fatalf("full import into an existing disk: %v, want ErrExists", err)
	}

	prev := "vm1@s0"
	var streams [][]byte
	for i := 1; i <= 4; i++ {
		written := 0
		for range 3 {
			n := 4096 * (1 + rng.IntN(8))
			off := uint64(rng.IntN(int(d.Size())-n)) &^ 4095
			write(t, d, pattern(n, byte(i)), off)
			written += n
		}
		if i == 2 {
			if err := d.Trim(ctx, 2*seg, seg); err != nil {
				t.Fatal(err)
			}
		}
		if i == 3 {
			if _, err := src.Ctrl.ResizeDisk(ctx, "vm1", 20*seg, false); err != nil {
				t.Fatal(err)
			}
			d = openDisk(t, src, 0, "vm1")
			write(t, d, pattern(seg, 9), 18*seg)
			written += seg
		}
		name := "vm1@s" + string(rune('0'+i))
		snap(t, src, "vm1", name)
		s := export(t, src, name, prev)
		streams = append(streams, s)
		// Sub-block writes: at most one sub-block more per write
		// at each end; the trim is one zero record.
		if limit := written + 3*2*4096 + 512; len(s) > limit {
			t.Errorf("stream %s from %s: %d bytes for %d written, want at most %d", name, prev, len(s), written, limit)
		}
		t.Logf("stream %s from %s: %d bytes, %d written", name, prev, len(s), written)
		if _, err := dst.Ctrl.Import(ctx, controller.ImportOptions{Disk: "vm1"}, bytes.NewReader(s)); err != nil {
			t.Fatalf("import %s: %v", name, err)
		}
		if !bytes.Equal(contents(t, dst, name), contents(t, src, name)) {
			t.Fatalf("%s differs after the import", name)
		}
		if !bytes.Equal(contents(t, dst, "vm1"), contents(t, src, name)) {
			t.Fatalf("vm1 differs from %s after the import", name)
		}
		checkClean(t, dst)
		prev = name
	}

	// Refused streams change nothing.
	names := diskNames(t, dst)
	want := contents(t, dst, "vm1")
	snap(t, src, "vm1", "vm1@s5")
	s5 := export(t, src, "vm1@s5", prev)
	flipped := slices.Clone(s5)
	flipped[len(flipped)/2] ^= 0x10
	for _, tc := range []struct {
		what string
		b    []byte
		err  error
	}{
		{"flipped", flipped, stream.ErrCorrupt},
		{"truncated", s5[:len(s5)-10], stream.ErrTruncated},
		{"wrong base", streams[1], controller.ErrWrongBase},
	} {
		_, err := dst.Ctrl.Import(ctx, controller.ImportOptions{Disk: "vm1"}, bytes.NewReader(tc.b))
		if !errors.Is(err, tc.err) {
			t.Errorf("%s stream: %v, want %v", tc.what, err, tc.err)
		}
		if got := diskNames(t, dst); !slices.Equal(got, names) {
			t.Errorf("%s stream: disks %v, want %v", tc.what, got, names)
		}
		if !bytes.Equal(contents(t, dst, "vm1"), want) {
			t.Errorf("%s stream changed vm1", tc.what)
		}
		checkClean(t, dst)
	}

	// Written since its newest snapshot: refused unless forced.
	write(t, openDisk(t, dst, 1, "vm1"), pattern(4096, 7), 0)
	if _, err := dst.Ctrl.Import(ctx, controller.ImportOptions{Disk: "vm1"}, bytes.NewReader(s5)); !errors.Is(err, controller.ErrWrittenSince) {
		t.Fatalf("import into a disk written since: %v, want ErrWrittenSince", err)
	}
	checkClean(t, dst)
	if _, err := dst.Ctrl.Import(ctx, controller.ImportOptions{Disk: "vm1", Force: true}, bytes.NewReader(s5)); err != nil {
		t.Fatalf("forced import: %v", err)
	}
	if !bytes.Equal(contents(t, dst, "vm1@s5"), contents(t, src, "vm1@s5")) ||
		!bytes.Equal(contents(t, dst, "vm1"), contents(t, src, "vm1@s5")) {
		t.Fatal("vm1@s5 differs after the forced import")
	}
	checkClean(t, dst)

	// What the imports made (partial entries over the base's slots)
	// exports back: in full, and incrementally at about the size the
	// source's stream had.
	back := export(t, dst, "vm1@s5", "")
	if _, err := src.Ctrl.Import(ctx, controller.ImportOptions{Disk: "back"}, bytes.NewReader(back)); err != nil {
		t.Fatalf("import back: %v", err)
	}
	if !bytes.Equal(contents(t, src, "back@s5"), contents(t, src, "vm1@s5")) {
		t.Fatal("vm1@s5 exported back from the target differs")
	}
	if n, m := len(export(t, dst, "vm1@s4", "vm1@s3")), len(streams[3]); n > m+m/10 {
		t.Errorf("the target's stream vm1@s4 from vm1@s3 is %d bytes, the source's %d", n, m)
	}
	checkClean(t, src)

	// Export refuses a writable disk and a base of another lineage.
	createDisk(t, src, "other", 4, table.Forward)
	snap(t, src, "other", "other@a")
	var b bytes.Buffer
	if err := src.Ctrl.Export(ctx, controller.ExportOptions{Snapshot: "vm1"}, &b); !errors.Is(err, controller.ErrNotSnapshot) {
		t.Errorf("export of a writable disk: %v, want ErrNotSnapshot", err)
	}
	if err := src.Ctrl.Export(ctx, controller.ExportOptions{Snapshot: "vm1@s5", Base: "other@a"}, &b); !errors.Is(err, controller.ErrOtherLineage) {
		t.Errorf("export from another lineage: %v, want ErrOtherLineage", err)
	}
}

// TestExportDuringChanges: an export locks the family segment by segment,
// so a snapshot of the live disk goes on while it runs; a delete of the
// snapshot under export fails the export rather than letting it read the
// slots the delete frees, and what it wrote so far is refused by an import.
func TestExportDuringChanges(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	createDisk(t, c, "vm1", 16, table.Forward)
	d := openDisk(t, c, 0, "vm1")
	for i := range 8 {
		write(t, d, pattern(seg, byte(i)), uint64(2*i)*seg)
	}
	snap(t, c, "vm1", "vm1@a")
	// vm1 moves on: the snapshot alone holds the old slots, which its
	// delete would free.
	for i := range 8 {
		write(t, d, pattern(seg, byte(0x40+i)), uint64(2*i)*seg)
	}
	pr, pw := io.Pipe()
	exported := make(chan error, 1)
	go func() {
		err := c.Ctrl.Export(ctx, controller.ExportOptions{Snapshot: "vm1@a"}, pw)
		pw.CloseWithError(err)
		exported <- err
	}()
	// The export has started (its first bytes are here) and blocks on
	// the pipe, between segments: a snapshot of vm1 and then a delete
	// of the snapshot under export go through.
	var b bytes.Buffer
	if _, err := io.CopyN(&b, pr, 4096); err != nil {
		t.Fatal(err)
	}
	snap(t, c, "vm1", "vm1@b")
	if err := c.Ctrl.DeleteDisk(ctx, "vm1@a"); err != nil {
		t.Fatalf("delete: %v", err)
	}
	_, copyErr := io.Copy(&b, pr)
	if err := <-exported; !errors.Is(err, protocol.ErrNotFound) || copyErr == nil {
		t.Fatalf("export of a snapshot deleted meanwhile: %v (reader: %v), want ErrNotFound", err, copyErr)
	}
	dst := newCluster(t)
	if _, err := dst.Ctrl.Import(ctx, controller.ImportOptions{Disk: "copy"}, &b); err == nil {
		t.Fatal("the stream of an export that failed was imported")
	}
	checkClean(t, c)
	checkClean(t, dst)
}
