package controller_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"segmap/internal/agent"
	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// breakable fails every I/O of the replica files named in broken.
type breakable struct {
	container.Container
	path   string
	broken *sync.Map
}

var errReplicaDown = errors.New("replica storage down")

func (b breakable) down() bool {
	_, ok := b.broken.Load(b.path)
	return ok
}

func (b breakable) ReadAt(p []byte, off int64) (int, error) {
	if b.down() {
		return 0, errReplicaDown
	}
	return b.Container.ReadAt(p, off)
}

func (b breakable) WriteAt(p []byte, off int64) (int, error) {
	if b.down() {
		return 0, errReplicaDown
	}
	return b.Container.WriteAt(p, off)
}

func (b breakable) Punch(off, n int64) error {
	if b.down() {
		return errReplicaDown
	}
	return b.Container.Punch(off, n)
}

func (b breakable) Flush() error {
	if b.down() {
		return errReplicaDown
	}
	return b.Container.Flush()
}

// mirrorFixture is a cluster whose only container of seg-sized slots is
// a mirror of two replica files, whose I/O can be broken.
type mirrorFixture struct {
	c      *standalone.Cluster
	id     uint32
	paths  []string
	broken *sync.Map
}

const mirrorSlots = 32

func newMirrorFixture(t *testing.T) *mirrorFixture {
	t.Helper()
	f := &mirrorFixture{broken: &sync.Map{}}
	wrap := func(ct container.Container) container.Container {
		if fc, ok := ct.(*container.File); ok {
			return breakable{Container: ct, path: fc.Path(), broken: f.broken}
		}
		return ct
	}
	// The default pool has other slots: disks of seg-sized segments
	// land on the mirror only.
	f.c = newClusterOpts(t, standalone.Options{
		Pool:                    []standalone.PoolSpec{{SlotSize: 2 * seg, Slots: 8, Count: 1}},
		WrapAgentContainer:      func(_ string, ct container.Container) container.Container { return wrap(ct) },
		WrapControllerContainer: wrap,
	})
	t.Cleanup(func() { f.broken.Clear() }) // before the cluster closes
	ctx := context.Background()
	id, err := f.c.Ctrl.NextContainerID(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var uris []string
	for _, n := range []string{"r1", "r2", "r3"} {
		p := filepath.Join(dir, n)
		f.paths = append(f.paths, p)
		if err := container.CreateFile(p, id, seg, mirrorSlots); err != nil {
			t.Fatal(err)
		}
		uris = append(uris, container.FileURI(p))
	}
	rec, err := f.c.Ctrl.AddMirror(ctx, uris[:2])
	if err != nil {
		t.Fatal(err)
	}
	f.id = rec.ID
	return f
}

// record returns the mirror's record, as stored (map changes kept in
// memory are not flushed: with every replica broken they cannot be).
func (f *mirrorFixture) record(t *testing.T) meta.Container {
	t.Helper()
	var ct meta.Container
	if err := f.c.Store.View(context.Background(), func(tx *meta.Tx) error {
		var err error
		ct, err = tx.Container(f.id)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return ct
}

// data returns replica file i's data area.
func (f *mirrorFixture) data(t *testing.T, i int) []byte {
	t.Helper()
	fh, err := os.Open(f.paths[i])
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	b := make([]byte, mirrorSlots*seg)
	if _, err := fh.ReadAt(b, container.HeaderSize); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	return b
}

// intents returns the container's write-intent record.
func (f *mirrorFixture) intents(t *testing.T) []uint32 {
	t.Helper()
	var out []uint32
	if err := f.c.Store.View(context.Background(), func(tx *meta.Tx) error {
		var err error
		out, err = tx.Intents(f.id)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestMirrorFailAndCatchUp writes through a mirror, breaks one replica
// (writes go on), brings it back and catches it up from the write-intent
// record, then replaces the other by a new replica: at each step the
// disk reads what was written and the healthy replicas hold the same
// bytes.
func TestMirrorFailAndCatchUp(t *testing.T) {
	ctx := context.Background()
	f := newMirrorFixture(t)
	createDisk(t, f.c, "d", 8, table.Forward)
	h := openDisk(t, f.c, 0, "d")
	want := pattern(8*seg, 1)
	write(t, h, want, 0)
	if err := h.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(f.data(t, 0), f.data(t, 1)) {
		t.Fatal("replicas differ after mirrored writes")
	}

	// Replica 2 breaks: a write still succeeds, and marks it failed.
	f.broken.Store(f.paths[1], true)
	p := pattern(2*seg, 2)
	write(t, h, p, 3*seg)
	copy(want[3*seg:], p)
	rec := f.record(t)
	if rec.Replicas[1].State != meta.ReplicaFailed || rec.Epoch != 2 {
		t.Fatalf("after the failure: %+v", rec)
	}
	p = pattern(100, 3)
	write(t, h, p, 6*seg+10)
	copy(want[6*seg+10:], p)
	expect(t, h, 0, want)
	got := f.intents(t)
	if len(got) < 3 || len(got) > 4 {
		t.Fatalf("write intents %v: want the 3 slots written while degraded (and maybe one more)", got)
	}

	// It comes back: only the recorded slots are copied.
	f.broken.Delete(f.paths[1])
	if err := f.c.Ctrl.RebuildReplica(ctx, f.id, nil); err != nil {
		t.Fatal(err)
	}
	rec = f.record(t)
	if rec.Replicas[1].State != meta.ReplicaHealthy || rec.Healthy() != 2 {
		t.Fatalf("after the catch-up: %+v", rec)
	}
	if !bytes.Equal(f.data(t, 0), f.data(t, 1)) {
		t.Fatal("replicas differ after the catch-up")
	}
	if n := len(f.intents(t)); n != 0 {
		t.Fatalf("%d write intents left with every replica healthy", n)
	}
	if err := f.c.Ctrl.RebuildReplica(ctx, f.id, nil); !errors.Is(err, controller.ErrNothingToRebuild) {
		t.Fatalf("rebuild of a healthy mirror: %v", err)
	}

	// Replica 1 is replaced by a new file: a full copy.
	snap(t, f.c, "d", "s")
	if err := f.c.Ctrl.ReplaceReplica(ctx, f.id, container.FileURI(f.paths[0]), container.FileURI(f.paths[2]), nil); err != nil {
		t.Fatal(err)
	}
	rec = f.record(t)
	if rec.Replicas[0].URI != container.FileURI(f.paths[2]) || rec.Healthy() != 2 {
		t.Fatalf("after the replacement: %+v", rec)
	}
	if !bytes.Equal(f.data(t, 1), f.data(t, 2)) {
		t.Fatal("the new replica differs")
	}
	// The old one is gone for good: reads come from the others.
	f.broken.Store(f.paths[0], true)
	expect(t, h, 0, want)
	expect(t, openDisk(t, f.c, 1, "s"), 0, want)

	// The last healthy replica failing fails the container, not the
	// replica: its data stays whole for when it is back.
	f.broken.Store(f.paths[2], true)
	if err := h.WriteAt(ctx, pattern(seg, 9), 0, false); err != nil {
		t.Fatal(err)
	}
	f.broken.Store(f.paths[1], true)
	if err := h.WriteAt(ctx, pattern(seg, 9), seg, true); err == nil {
		t.Fatal("a write succeeded with every replica broken")
	}
	rec = f.record(t)
	if rec.State != meta.ContainerFailed || rec.Healthy() != 1 {
		t.Fatalf("with every replica broken: %+v", rec)
	}
}

// TestMirrorRebuildUnderWrites replaces a replica while two agents keep
// writing the disk: once the rebuild ends, the new replica holds the
// same bytes as the old healthy one, and the disk reads the last write
// of every block.
func TestMirrorRebuildUnderWrites(t *testing.T) {
	ctx := context.Background()
	f := newMirrorFixture(t)
	const segs = 16
	createDisk(t, f.c, "d", segs, table.Forward)
	hs := []*agent.Disk{openDisk(t, f.c, 0, "d"), openDisk(t, f.c, 1, "d")}
	want := pattern(segs*seg, 1)
	write(t, hs[0], want, 0)
	snap(t, f.c, "d", "s")
	snapWant := bytes.Clone(want)

	// Each writer owns every other 4 KiB block, so the final content
	// is known whatever the interleaving.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	for w := range 2 {
		wg.Go(func() {
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				blk := uint64((n*7919+w)%(segs*seg/4096))&^1 | uint64(w)
				p := pattern(4096, byte(n*2+w))
				if err := hs[w].WriteAt(ctx, p, blk*4096, false); err != nil {
					t.Errorf("writer %d: %v", w, err)
					return
				}
				mu.Lock()
				copy(want[blk*4096:], p)
				mu.Unlock()
			}
		})
	}
	err := f.c.Ctrl.ReplaceReplica(ctx, f.id, container.FileURI(f.paths[1]), container.FileURI(f.paths[2]), nil)
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hs {
		if err := h.Flush(ctx); err != nil {
			t.Fatal(err)
		}
	}
	expect(t, hs[0], 0, want)
	expect(t, hs[1], 0, want)
	expect(t, openDisk(t, f.c, 0, "s"), 0, snapWant)
	a, b := f.data(t, 0), f.data(t, 2)
	for s := range mirrorSlots {
		if !bytes.Equal(a[s*seg:(s+1)*seg], b[s*seg:(s+1)*seg]) {
			t.Errorf("slot %d differs between the old and the rebuilt replica", s)
		}
	}
	// The rebuilt replica alone serves the data.
	f.broken.Store(f.paths[0], true)
	expect(t, hs[1], 0, want)
}
