package controller_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"segmap/internal/agent"
	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// stormSegs is the size of the disks of the storm tests, in segments.
const stormSegs = 8

// TestFaultStorm runs many faults at once through both agents and checks
// every byte afterwards:
//
//   - one goroutine per segment of a forward and of a reverse-delta disk
//     writes 4 KiB pieces of its segment (copies on write of many
//     segments of one family at once), while snapshots of both are taken
//     and read at once: a snapshot must read the same when read again at
//     the end;
//   - a churn creates a disk, fills it and deletes it, freeing its slots,
//     again and again, while another disk allocates a segment at a time
//     with a one-byte write: each must read that byte and zeros (a slot
//     freed by a delete is never handed out before it is punched);
//   - a preallocated disk is created meanwhile: it reads as zeros.
//
// At the end every disk reads as the writers left it, through both agents,
// and Check finds nothing: no leaked or double-referenced slot.
func TestFaultStorm(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, standalone.PoolSpec{SlotSize: seg, Slots: 160, Count: 2})
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	f := createDisk(t, c, "f", stormSegs, table.Forward)
	r := createDisk(t, c, "r", stormSegs, table.Reverse)
	createDisk(t, c, "z", 2*stormSegs, table.Forward)
	want := map[string][]byte{}
	for i, d := range []meta.Disk{f, r} {
		want[d.Name] = pattern(stormSegs*seg, byte(10+i))
		write(t, openDisk(t, c, i, d.Name), want[d.Name], 0)
	}

	var wg sync.WaitGroup
	errs := make(chan error, 64)
	fail := func(format string, args ...any) { errs <- fmt.Errorf(format, args...) }
	handles := [2]map[string]*agent.Disk{{}, {}}
	for i := range 2 {
		for _, n := range []string{"f", "r", "z"} {
			handles[i][n] = openDisk(t, c, i, n)
		}
	}

	// Writers: one per segment of f and r.
	for _, d := range []meta.Disk{f, r} {
		for s := range uint64(stormSegs) {
			rng := rand.New(rand.NewPCG(seed, uint64(d.ID)<<8|s))
			h := handles[s%2][d.Name]
			data := want[d.Name][s*seg : (s+1)*seg]
			wg.Go(func() {
				for k := range 4 {
					off := rng.Uint64N(seg - 4096)
					p := pattern(4096, byte(rng.Uint32()))
					if k == 3 && rng.IntN(2) == 0 {
						off, p = 0, pattern(seg, byte(rng.Uint32())) // staged
					}
					if err := h.WriteAt(ctx, p, s*seg+off, false); err != nil {
						fail("write %s segment %d: %v", d.Name, s, err)
						return
					}
					copy(data[off:], p)
				}
			})
		}
	}

	// Snapshots of f and r, read as soon as they exist.
	type snap struct {
		name  string
		early []byte
	}
	var snaps []snap
	var snapsMu sync.Mutex
	wg.Go(func() {
		for k := range 3 {
			names := []string{fmt.Sprintf("f@%d", k), fmt.Sprintf("r@%d", k)}
			if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"f", "r"}, Names: names}); err != nil {
				fail("snapshot: %v", err)
				return
			}
			for i, n := range names {
				h, err := c.Agents[(k+i)%2].Open(ctx, n)
				if err != nil {
					fail("open %s: %v", n, err)
					return
				}
				p := make([]byte, stormSegs*seg)
				if err := h.ReadAt(ctx, p, 0); err != nil {
					fail("read %s: %v", n, err)
					return
				}
				snapsMu.Lock()
				snaps = append(snaps, snap{n, p})
				snapsMu.Unlock()
			}
		}
	})

	// Churn: fill a disk and delete it, freeing its slots.
	wg.Go(func() {
		for k := range 4 {
			name := fmt.Sprintf("v%d", k)
			if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: name, Size: stormSegs * seg, SegmentSize: seg}); err != nil {
				fail("create %s: %v", name, err)
				return
			}
			h, err := c.Agents[k%2].Open(ctx, name)
			if err == nil {
				err = h.WriteAt(ctx, pattern(stormSegs*seg, 0xee), 0, false)
			}
			if err == nil {
				err = c.Ctrl.DeleteDisk(ctx, name)
			}
			if err != nil {
				fail("churn %s: %v", name, err)
				return
			}
		}
	})

	// Allocations of single segments: each must read as zeros but for
	// its one byte.
	wg.Go(func() {
		for s := range uint64(2 * stormSegs) {
			h := handles[s%2]["z"]
			if err := h.WriteAt(ctx, []byte{byte(s + 1)}, s*seg, false); err != nil {
				fail("write z segment %d: %v", s, err)
				return
			}
			p := make([]byte, seg)
			if err := handles[(s+1)%2]["z"].ReadAt(ctx, p, s*seg); err != nil {
				fail("read z segment %d: %v", s, err)
				return
			}
			if p[0] != byte(s+1) || !bytes.Equal(p[1:], make([]byte, seg-1)) {
				fail("z segment %d: a newly allocated slot does not read as zeros", s)
			}
		}
	})

	// A preallocated disk made meanwhile reads as zeros.
	wg.Go(func() {
		if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "p", Size: stormSegs * seg, SegmentSize: seg, Preallocate: true}); err != nil {
			fail("create preallocated: %v", err)
			return
		}
		h, err := c.Agents[1].Open(ctx, "p")
		p := make([]byte, stormSegs*seg)
		if err == nil {
			err = h.ReadAt(ctx, p, 0)
		}
		if err != nil {
			fail("read preallocated: %v", err)
		} else if !bytes.Equal(p, make([]byte, len(p))) {
			fail("a preallocated disk does not read as zeros")
		}
	})

	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	for i := range 2 {
		for _, d := range []meta.Disk{f, r} {
			expect(t, handles[i][d.Name], 0, want[d.Name])
		}
		for _, s := range snaps {
			expect(t, openDisk(t, c, i, s.name), 0, s.early)
		}
	}
	checkClean(t, c)
}

// TestZeroingRacesAllocations: after a restart, the free slots of every
// container are zeroed before their first allocation (a crash may have
// left data in them). Allocations from two containers at once, through
// both agents, must each read as zeros, and none may wait for the other
// container's zeroing to hand out a slot zeroed by neither.
func TestZeroingRacesAllocations(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, standalone.PoolSpec{SlotSize: seg, Slots: 24, Count: 2})
	// Junk in every slot: what a crash between freeing and punching
	// leaves, in the worst case.
	junk := pattern(seg, 0x5a)
	cs, err := c.Ctrl.ListContainers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, ct := range cs {
		for s := range uint32(ct.Slots) {
			writeSlot(t, c, table.Location{Container: ct.ID, Slot: s}, junk)
		}
	}
	for k := range 2 {
		createDisk(t, c, fmt.Sprintf("z%d", k), 20, table.Forward)
	}
	if err := c.RestartController(ctx); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 80)
	for k := range 2 {
		for i := range 2 {
			h := openDisk(t, c, i, fmt.Sprintf("z%d", k))
			wg.Go(func() {
				for s := uint64(i); s < 20; s += 2 {
					b := byte(k*64 + int(s) + 1)
					if err := h.WriteAt(ctx, []byte{b}, s*seg+100, false); err != nil {
						errs <- err
						return
					}
					p := make([]byte, seg)
					if err := h.ReadAt(ctx, p, s*seg); err != nil {
						errs <- err
						return
					}
					w := make([]byte, seg)
					w[100] = b
					if !bytes.Equal(p, w) {
						errs <- fmt.Errorf("z%d segment %d: not zeros around the byte written", k, s)
					}
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	checkClean(t, c)
}

// TestStagedRacesCopy: on every segment of a snapshotted disk at once,
// one agent writes the whole segment (staged: a fresh slot, then a
// commit) while the other writes 4 KiB of it (a copy on write). Both are
// acknowledged, in some order: the segment must read as the whole write
// with or without the piece on top, never as the piece over the old data
// (the staged write lost) or as anything else; the snapshot keeps the old
// data.
func TestStagedRacesCopy(t *testing.T) {
	ctx := context.Background()
	for _, p := range []table.Policy{table.Forward, table.Reverse} {
		t.Run(p.String(), func(t *testing.T) {
			c := newCluster(t)
			createDisk(t, c, "d", stormSegs, p)
			old := pattern(stormSegs*seg, 3)
			h0, h1 := openDisk(t, c, 0, "d"), openDisk(t, c, 1, "d")
			write(t, h0, old, 0)
			if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"d@1"}}); err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			errs := make(chan error, 2*stormSegs)
			whole := make([][]byte, stormSegs)
			piece := make([]byte, 4096)
			for i := range piece {
				piece[i] = 0xa5
			}
			for s := range uint64(stormSegs) {
				whole[s] = pattern(seg, byte(40+s))
				wg.Go(func() {
					if err := h0.WriteAt(ctx, whole[s], s*seg, false); err != nil {
						errs <- err
					}
				})
				wg.Go(func() {
					if err := h1.WriteAt(ctx, piece, s*seg+8192, false); err != nil {
						errs <- err
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			for i, h := range []*agent.Disk{h0, h1} {
				for s := range uint64(stormSegs) {
					got := read(t, h, s*seg, seg)
					over := bytes.Clone(whole[s])
					copy(over[8192:], piece)
					if !bytes.Equal(got, whole[s]) && !bytes.Equal(got, over) {
						t.Errorf("agent %d segment %d: neither the whole write nor the whole write with the piece over it", i, s)
					}
				}
				expect(t, openDisk(t, c, i, "d@1"), 0, old)
			}
			checkClean(t, c)
		})
	}
}

// punchGated holds the first Punch made through it once its gate is
// armed, until the test opens the gate.
type punchGated struct {
	container.Container
	g *gate
}

func (c punchGated) Punch(off, n int64) error {
	c.g.mu.Lock()
	hold := c.g.armed
	c.g.armed = false
	c.g.mu.Unlock()
	if hold {
		close(c.g.entered)
		<-c.g.open
	}
	return c.Container.Punch(off, n)
}

// TestFreedSlotNotReusedBeforePunch: a delete frees the pool's one slot
// and its punch hangs; an allocation meanwhile must not be handed that
// slot with the deleted disk's data in it: it fails for want of space,
// or waits, or gets a slot that reads as zeros.
func TestFreedSlotNotReusedBeforePunch(t *testing.T) {
	ctx := context.Background()
	g := newGate()
	c, err := standalone.Open(ctx, t.TempDir(), standalone.Options{
		Agents: []string{"host-a", "host-b"},
		Pool:   []standalone.PoolSpec{{SlotSize: seg, Slots: 1, Count: 1}},
		WrapControllerContainer: func(ct container.Container) container.Container {
			return punchGated{ct, g}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("close cluster: %v", err)
		}
	})
	t.Cleanup(g.release)
	createDisk(t, c, "a", 1, table.Forward)
	createDisk(t, c, "z", 1, table.Forward)
	write(t, openDisk(t, c, 0, "a"), pattern(seg, 7), 0)
	z := openDisk(t, c, 1, "z")
	g.arm()
	deleted := make(chan error, 1)
	go func() { deleted <- c.Ctrl.DeleteDisk(ctx, "a") }()
	select {
	case <-g.entered:
	case err := <-deleted:
		t.Fatalf("the delete ended (%v) before its punch was held", err)
	}
	wrote := make(chan error, 1)
	go func() { wrote <- z.WriteAt(ctx, []byte{1}, 0, false) }()
	var werr error
	select {
	case werr = <-wrote:
		if werr == nil {
			// It got a slot while the punch was held: it must read as
			// zeros but for the byte.
			want := append([]byte{1}, make([]byte, seg-1)...)
			expect(t, z, 0, want)
		} else if !errors.Is(werr, protocol.ErrNoSpace) {
			t.Errorf("write during the punch: %v", werr)
		}
	case <-time.After(200 * time.Millisecond):
		// Waiting for the punch is right too.
		werr = errors.New("waiting")
	}
	g.release()
	if err := <-deleted; err != nil {
		t.Fatal(err)
	}
	if werr != nil && werr.Error() == "waiting" {
		if err := <-wrote; err != nil && !errors.Is(err, protocol.ErrNoSpace) {
			t.Errorf("write after the punch: %v", err)
		}
	}
	write(t, z, []byte{1}, 0)
	expect(t, z, 0, append([]byte{1}, make([]byte, seg-1)...))
	checkClean(t, c)
}
