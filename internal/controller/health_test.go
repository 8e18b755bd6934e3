package controller_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"
	"testing"

	"segmap/internal/container"
	"segmap/internal/rpc/protocol"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// TestFailContainer: a failed container's segments fail I/O with EIO on
// every agent at once (also for an agent that loads them afresh), the
// others go on, disk info lists them; once online again they read back
// intact; failed again and cleared, they read zeros and take writes.
func TestFailContainer(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, standalone.PoolSpec{SlotSize: seg, Slots: 16, Count: 2})
	createDisk(t, c, "d", 8, table.Forward)
	h0, h1 := openDisk(t, c, 0, "d"), openDisk(t, c, 1, "d")
	data := pattern(8*seg, 7)
	write(t, h0, data, 0)
	expect(t, h1, 0, data)
	var on1, on2 []uint64
	for s := range uint64(8) {
		if entry(t, c, "d", s).Loc.Container == 1 {
			on1 = append(on1, s)
		} else {
			on2 = append(on2, s)
		}
	}
	if len(on1) == 0 || len(on2) == 0 {
		t.Fatalf("segments on container 1: %v, on 2: %v; want some on each", on1, on2)
	}
	if err := c.Ctrl.FailContainer(ctx, 1, errors.New("test")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 512)
	for i, h := range []interface {
		ReadAt(context.Context, []byte, uint64) error
	}{h0, h1} {
		for _, s := range on1 {
			if err := h.ReadAt(ctx, buf, s*seg); !errors.Is(err, protocol.ErrIO) {
				t.Errorf("agent %d read of segment %d on the failed container: %v, want EIO", i, s, err)
			}
		}
		for _, s := range on2 {
			expect(t, h0, s*seg, data[s*seg:(s+1)*seg])
		}
	}
	exts, err := c.Ctrl.ErrorExtents(ctx, "d")
	if err != nil || len(exts) == 0 {
		t.Fatalf("error extents: %v %v", exts, err)
	}
	var n uint64
	for _, x := range exts {
		n += x.Len
	}
	if n != uint64(len(on1))*seg {
		t.Errorf("error extents %v cover %d bytes, want %d", exts, n, uint64(len(on1))*seg)
	}
	// An agent that loads the entries afresh gets Error too.
	if err := c.RestartAgent(ctx, 1); err != nil {
		t.Fatal(err)
	}
	h1 = openDisk(t, c, 1, "d")
	if err := h1.ReadAt(ctx, buf, on1[0]*seg); !errors.Is(err, protocol.ErrIO) {
		t.Errorf("read after a restart of segment %d on the failed container: %v, want EIO", on1[0], err)
	}
	if _, err := c.Ctrl.OnlineContainer(ctx, 2); !errors.Is(err, protocol.ErrBadRequest) {
		t.Errorf("online of a container that is online: %v, want a refusal", err)
	}

	if _, err := c.Ctrl.OnlineContainer(ctx, 1); err != nil {
		t.Fatal(err)
	}
	expect(t, h0, 0, data)
	expect(t, h1, 0, data)
	checkClean(t, c)

	if err := c.Ctrl.FailContainer(ctx, 1, errors.New("test")); err != nil {
		t.Fatal(err)
	}
	cleared, err := c.Ctrl.ClearErrors(ctx, "d")
	if err != nil || cleared != uint64(len(on1))*seg {
		t.Fatalf("clear errors: %d %v, want %d", cleared, err, uint64(len(on1))*seg)
	}
	for _, s := range on1 {
		expect(t, h1, s*seg, make([]byte, seg))
		copy(data[s*seg:], pattern(seg, byte(s)))
		write(t, h0, data[s*seg:(s+1)*seg], s*seg)
	}
	expect(t, h1, 0, data)
	for s := range uint64(8) {
		if e := entry(t, c, "d", s); e.Loc.Container == 1 {
			t.Errorf("segment %d allocated on the failed container: %v", s, e)
		}
	}
	checkClean(t, c)
}

// brokenContainer fails every read and write with EIO while broken is
// set, as storage that died does.
type brokenContainer struct {
	container.Container
	broken *atomic.Bool
}

func (b brokenContainer) ReadAt(p []byte, off int64) (int, error) {
	if b.broken.Load() {
		return 0, fmt.Errorf("read: %w", syscall.EIO)
	}
	return b.Container.ReadAt(p, off)
}

func (b brokenContainer) WriteAt(p []byte, off int64) (int, error) {
	if b.broken.Load() {
		return 0, fmt.Errorf("write: %w", syscall.EIO)
	}
	return b.Container.WriteAt(p, off)
}

// TestProbeFailsContainer: probes that fail probeFailures times in a row
// mark the container failed (persistently: a restarted controller still
// answers Error); one that succeeds in between does not.
func TestProbeFailsContainer(t *testing.T) {
	ctx := context.Background()
	var broken atomic.Bool
	c := newClusterOpts(t, standalone.Options{
		Pool: []standalone.PoolSpec{{SlotSize: seg, Slots: 16, Count: 2}},
		WrapControllerContainer: func(ct container.Container) container.Container {
			if ct.ID() != 1 {
				return ct
			}
			return brokenContainer{Container: ct, broken: &broken}
		},
	})
	createDisk(t, c, "d", 8, table.Forward)
	h := openDisk(t, c, 0, "d")
	write(t, h, pattern(8*seg, 1), 0)
	state := func() string {
		cs, err := c.Ctrl.ListContainers(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, ct := range cs {
			if ct.ID == 1 {
				return ct.State.String()
			}
		}
		return "gone"
	}
	broken.Store(true)
	c.Ctrl.ProbeContainers(ctx)
	c.Ctrl.ProbeContainers(ctx)
	broken.Store(false)
	c.Ctrl.ProbeContainers(ctx)
	broken.Store(true)
	c.Ctrl.ProbeContainers(ctx)
	c.Ctrl.ProbeContainers(ctx)
	if s := state(); s != "online" {
		t.Fatalf("after 2 failed probes, 1 good, 2 failed: %s, want online", s)
	}
	c.Ctrl.ProbeContainers(ctx)
	if s := state(); s != "failed" {
		t.Fatalf("after 3 failed probes in a row: %s, want failed", s)
	}
	var on1 uint64
	for s := range uint64(8) {
		if entry(t, c, "d", s).Loc.Container == 1 {
			on1 = s
			break
		}
	}
	buf := make([]byte, 512)
	if err := h.ReadAt(ctx, buf, on1*seg); !errors.Is(err, protocol.ErrIO) {
		t.Fatalf("read on the failed container: %v, want EIO", err)
	}
	if err := c.RestartController(ctx); err != nil {
		t.Fatal(err)
	}
	h = openDisk(t, c, 1, "d")
	if err := h.ReadAt(ctx, buf, on1*seg); !errors.Is(err, protocol.ErrIO) {
		t.Fatalf("read on the failed container after a controller restart: %v, want EIO", err)
	}
	if s := state(); s != "failed" {
		t.Fatalf("after a restart: %s, want failed", s)
	}
}
