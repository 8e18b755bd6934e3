package controller_test

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"testing"

	"segmap/internal/controller"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// TestFlatten flattens a clone while an agent writes to it: afterwards the
// clone shares nothing, holds its data and every write made meanwhile, its
// origin's snapshot reads as before, and deleting that snapshot would free
// every slot it holds.
func TestFlatten(t *testing.T) {
	ctx := context.Background()
	for _, pol := range []table.Policy{table.Forward, table.Reverse} {
		t.Run(pol.String(), func(t *testing.T) {
			c := newCluster(t)
			const segs = 8
			createDisk(t, c, "a", segs, pol)
			h := openDisk(t, c, 0, "a")
			base := pattern(segs*seg, 1)
			write(t, h, base, 0)
			for _, o := range []controller.SnapshotOptions{
				{Sources: []string{"a"}, Names: []string{"gold"}},
				{Sources: []string{"gold"}, Names: []string{"vm"}, Writable: true},
			} {
				if _, err := c.Ctrl.Snapshot(ctx, o); err != nil {
					t.Fatal(err)
				}
			}
			vm := openDisk(t, c, 1, "vm")
			want := bytes.Clone(base)
			small := pattern(4096, 2)
			write(t, vm, small, 3*seg+8192) // a partial segment
			copy(want[3*seg+8192:], small)

			// A writer to every segment while the flatten runs.
			var wg sync.WaitGroup
			start := make(chan struct{})
			wg.Go(func() {
				<-start
				for s := range uint64(segs) {
					p := pattern(512, byte(10+s))
					if err := vm.WriteAt(ctx, p, s*seg+seg/2, false); err != nil {
						t.Errorf("write during the flatten: %v", err)
						return
					}
				}
			})
			var last, total uint64
			close(start)
			if err := c.Ctrl.Flatten(ctx, "vm", func(done, n uint64) { last, total = done, n }); err != nil {
				t.Fatal(err)
			}
			wg.Wait()
			for s := range uint64(segs) {
				copy(want[s*seg+seg/2:], pattern(512, byte(10+s)))
			}
			if last != segs || total != segs {
				t.Errorf("progress ended at %d of %d, want %d of %d", last, total, segs, segs)
			}
			expect(t, vm, 0, want)
			expect(t, openDisk(t, c, 0, "gold"), 0, base)
			if u := usage(t, c, "vm"); u.Shared != 0 || u.Allocated != segs*seg {
				t.Errorf("after the flatten vm has %+v, want all exclusive", u)
			}
			if n, err := c.Ctrl.DeleteFrees(ctx, "vm"); err != nil || n != segs*seg {
				t.Errorf("deleting vm would free %d bytes (%v), want all %d", n, err, segs*seg)
			}
			d, err := c.Ctrl.Disk(ctx, "vm")
			if err != nil || d.Origin != 0 {
				t.Errorf("vm after the flatten: %+v, %v: want no origin", d, err)
			}
			checkClean(t, c)
			// Again: nothing left to copy.
			before := used(t, c)
			if err := c.Ctrl.Flatten(ctx, "vm", nil); err != nil {
				t.Fatal(err)
			}
			if used(t, c) != before {
				t.Errorf("a second flatten used %d slots, the first left %d", used(t, c), before)
			}
		})
	}
}

func TestFlattenRefused(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	createDisk(t, c, "a", 2, table.Forward)
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"a"}, Names: []string{"s"}}); err != nil {
		t.Fatal(err)
	}
	if err := c.Ctrl.Flatten(ctx, "s", nil); !errors.Is(err, protocol.ErrReadOnly) {
		t.Errorf("flatten a snapshot: %v, want ErrReadOnly", err)
	}
	if err := c.Ctrl.Flatten(ctx, "nope", nil); !errors.Is(err, protocol.ErrNotFound) {
		t.Errorf("flatten a missing disk: %v, want ErrNotFound", err)
	}
}
