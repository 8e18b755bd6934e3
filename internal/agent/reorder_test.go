package agent

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// TestOlderFaultReplyDropped: two faults on one segment are out at once, a
// read (answered first, with the entry of then: No-write at the shared
// slot) and a write (answered after a copy on write, writable at the
// copy). If the read's reply comes back last it must not be installed
// over the write's: the write has landed in the copy and been
// acknowledged, and a read after it would be served from the old slot.
// (Found by TestLinearizable in internal/e2e: a client read back, after
// its acknowledged write, the value before it.)
func TestOlderFaultReplyDropped(t *testing.T) {
	for _, tc := range []struct {
		name  string
		older table.Entry // the reply computed first, delivered last
	}{
		{"No-write at the old slot", table.At(table.Location{Container: 1, Slot: 5}, true)},
		{"Zero", table.ZeroEntry},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			oldLoc, newLoc := table.Location{Container: 1, Slot: 5}, table.Location{Container: 1, Slot: 2}
			old := bytesOf(tSeg, 3)
			if _, err := e.mem.WriteAt(old, int64(oldLoc.Slot)*tSeg); err != nil {
				t.Fatal(err)
			}
			if _, err := e.mem.WriteAt(old, int64(newLoc.Slot)*tSeg); err != nil { // the copy
				t.Fatal(err)
			}
			readFaulted := make(chan struct{})
			release := make(chan struct{})
			e.fc.setFault(func(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
				if f.Op == protocol.FaultRead {
					select {
					case <-readFaulted: // a later read fault: the entry of now
						return protocol.Reply{First: f.Segment, Entries: []table.Entry{table.At(newLoc, false)}}, nil
					default:
					}
					// Answered with the entry of now, delivered late.
					close(readFaulted)
					select {
					case <-release:
					case <-ctx.Done():
						return protocol.Reply{}, ctx.Err()
					}
					return protocol.Reply{First: f.Segment, Entries: []table.Entry{tc.older}}, nil
				}
				return protocol.Reply{First: f.Segment, Entries: []table.Entry{table.At(newLoc, false)}}, nil
			})

			const off, n = 4096, 4096
			first := make([]byte, n)
			read := async(func() error { return e.d.ReadAt(e.ctx, first, off) })
			select {
			case <-readFaulted:
			case <-time.After(mustFinish):
				t.Fatal("the read did not fault")
			}
			p := bytesOf(n, 9)
			if err := await(t, async(func() error { return e.d.WriteAt(e.ctx, p, off, false) }), "write"); err != nil {
				t.Fatal(err)
			}
			close(release)
			if err := await(t, read, "read"); err != nil {
				t.Fatal(err)
			}
			// The first read overlapped the write: either value will do.
			before := old[off : off+n]
			if tc.older == table.ZeroEntry {
				before = make([]byte, n)
			}
			if !bytes.Equal(first, p) && !bytes.Equal(first, before) {
				t.Errorf("the read overlapping the write returned %x..., neither the old data nor the write", first[:8])
			}
			if got := e.entry(0); got != table.At(newLoc, false) {
				t.Errorf("entry 0 is %v after the older reply came back, want the write's %v", got, table.At(newLoc, false))
			}
			again := make([]byte, n)
			if err := await(t, async(func() error { return e.d.ReadAt(e.ctx, again, off) }), "read after the write"); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(again, p) {
				t.Errorf("a read after the acknowledged write returned %x..., want the write's %x...", again[:8], p[:8])
			}
		})
	}
}

// TestStagedCommitAfterCommand: a command changes the segment's entry while
// a staged whole-segment write is on its way (a snapshot's No-write at the
// old slot), so the commit's reply cannot be installed; the write is
// acknowledged all the same, and the entry must then be loaded afresh, not
// left at the command's old slot, which no longer holds the disk's data.
func TestStagedCommitAfterCommand(t *testing.T) {
	e := newEnv(t)
	oldLoc, stageLoc := table.Location{Container: 1, Slot: 5}, table.Location{Container: 1, Slot: 3}
	if err := e.a.SetEntry(e.ctx, protocol.SetEntry{Disk: tDisk, First: 0, Entries: []table.Entry{table.At(oldLoc, true)}}); err != nil {
		t.Fatal(err)
	}
	old := bytesOf(tSeg, 3)
	if _, err := e.mem.WriteAt(old, int64(oldLoc.Slot)*tSeg); err != nil {
		t.Fatal(err)
	}
	e.fc.setFault(func(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
		switch {
		case f.Op == protocol.FaultWrite && f.Whole:
			return protocol.Reply{First: f.Segment, Stage: &protocol.Stage{Loc: stageLoc, Token: 1}}, nil
		case f.Op == protocol.FaultCommit, f.Op == protocol.FaultRead:
			return protocol.Reply{First: f.Segment, Entries: []table.Entry{table.At(stageLoc, false)}}, nil
		}
		return protocol.Reply{}, fmt.Errorf("unexpected fault %+v: %w", f, protocol.ErrIO)
	})
	p := bytesOf(tSeg, 9)
	e.gate.hold.Store(true)
	write := async(func() error { return e.d.WriteAt(e.ctx, p, 0, false) })
	rel := e.entered() // the staged write, held
	e.gate.hold.Store(false)
	if err := e.a.SetEntry(e.ctx, protocol.SetEntry{Disk: tDisk, First: 0, Entries: []table.Entry{table.At(oldLoc, true)}}); err != nil {
		t.Fatal(err)
	}
	close(rel)
	if err := await(t, write, "staged write"); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if err := await(t, async(func() error { return e.d.ReadAt(e.ctx, got, 8192) }), "read"); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, p[8192:8192+4096]) {
		t.Errorf("a read after the acknowledged staged write returned %x..., want the write's %x... (entry now %v)", got[:8], p[8192:8200], e.entry(0))
	}
}

// TestReplyKeptAcrossOtherCommand: a command that changes other segments
// while a fault is out (another segment's allocation, sent to every agent
// mapping the disk) leaves the fault's reply good: it is installed, and
// the I/O does not fault again. A command that changes the faulting
// segment makes the reply stale: it is dropped, and the I/O faults again.
// (Found in review: with one stream of allocating writes, reads on a disk
// kept faulting again, up to a second each.)
func TestReplyKeptAcrossOtherCommand(t *testing.T) {
	for _, tc := range []struct {
		name       string
		cmdSeg     uint64
		wantFaults int
	}{
		{"other segment", 3, 1},
		{"same segment", 0, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			loc := table.Location{Container: 1, Slot: 4}
			want := bytesOf(4096, 7)
			if _, err := e.mem.WriteAt(want, int64(loc.Slot)*tSeg); err != nil {
				t.Fatal(err)
			}
			faulted := make(chan struct{})
			release := make(chan struct{})
			var faults int
			e.fc.setFault(func(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
				faults++
				if faults == 1 {
					close(faulted)
					select {
					case <-release:
					case <-ctx.Done():
						return protocol.Reply{}, ctx.Err()
					}
				}
				return protocol.Reply{First: f.Segment, Entries: []table.Entry{table.At(loc, false)}}, nil
			})
			got := make([]byte, 4096)
			read := async(func() error { return e.d.ReadAt(e.ctx, got, 0) })
			select {
			case <-faulted:
			case <-time.After(mustFinish):
				t.Fatal("the read did not fault")
			}
			if err := e.d.setEntry(e.ctx, protocol.SetEntry{Disk: tDisk, First: tc.cmdSeg, Entries: []table.Entry{table.InvalidEntry}}); err != nil {
				t.Fatal(err)
			}
			close(release)
			if err := await(t, read, "read"); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("read %x..., want %x...", got[:8], want[:8])
			}
			if faults != tc.wantFaults {
				t.Errorf("%d faults, want %d", faults, tc.wantFaults)
			}
		})
	}
}
