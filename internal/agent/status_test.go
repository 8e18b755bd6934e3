package agent

import (
	"context"
	"errors"
	"testing"
	"time"

	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// TestGetStatus follows a disk's status through loads, a write held in
// flight, a fault held out, a quiesce and a lease.
func TestGetStatus(t *testing.T) {
	e := newEnv(t)
	status := func() protocol.DiskStatus {
		t.Helper()
		st, err := e.a.GetStatus(e.ctx, tDisk)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	want := protocol.DiskStatus{Disk: tDisk, Segments: tSegs, Invalid: tSegs}
	if got := status(); got != want {
		t.Fatalf("new table: %+v, want %+v", got, want)
	}

	loc := func(s uint32) table.Location { return table.Location{Container: 1, Slot: s} }
	if err := e.a.SetEntry(e.ctx, protocol.SetEntry{Disk: tDisk, Entries: []table.Entry{
		table.At(loc(0), false), table.At(loc(1), true), table.ZeroEntry, table.ErrorEntry,
	}}); err != nil {
		t.Fatal(err)
	}
	want = protocol.DiskStatus{Disk: tDisk, Segments: tSegs, Loaded: 4, Invalid: tSegs - 4, Error: 1, Zero: 1, NoWrite: 1, Mapped: 2}
	if got := status(); got != want {
		t.Fatalf("after set_entry: %+v, want %+v", got, want)
	}

	// A write held in the container is in flight.
	e.gate.hold.Store(true)
	w := async(func() error { return e.d.WriteAt(e.ctx, bytesOf(10, 1), 0, false) })
	rel := e.entered()
	want.InFlight = 1
	if got := status(); got != want {
		t.Fatalf("write in flight: %+v, want %+v", got, want)
	}

	// A read of an Invalid segment whose fault the controller holds has
	// a fault out and is not in flight.
	faulted, answer := make(chan struct{}), make(chan struct{})
	e.fc.setFault(func(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
		close(faulted)
		<-answer
		return identity(f), nil
	})
	r := async(func() error { return e.d.ReadAt(e.ctx, make([]byte, 10), 5*tSeg) })
	<-faulted
	want.FaultsOut = 1
	if got := status(); got != want {
		t.Fatalf("fault out: %+v, want %+v", got, want)
	}
	close(answer)
	if err := await(t, r, "read"); err != nil {
		t.Fatal(err)
	}
	want.FaultsOut, want.Loaded, want.Invalid, want.Mapped = 0, 5, tSegs-5, 3
	if got := status(); got != want {
		t.Fatalf("fault answered: %+v, want %+v", got, want)
	}

	// A quiesce holds new I/O at once and waits for the write.
	q := async(func() error { return e.a.Quiesce(e.ctx, tDisk, 0) })
	deadline := time.Now().Add(mustFinish)
	for !status().Quiesced {
		if time.Now().After(deadline) {
			t.Fatal("the disk never showed quiesced")
		}
		time.Sleep(time.Millisecond)
	}
	want.Quiesced = true
	if got := status(); got != want {
		t.Fatalf("quiescing: %+v, want %+v", got, want)
	}
	close(rel)
	for _, ch := range []<-chan error{w, q} {
		if err := await(t, ch, "write and quiesce"); err != nil {
			t.Fatal(err)
		}
	}
	want.InFlight = 0
	if got := status(); got != want {
		t.Fatalf("quiesced: %+v, want %+v", got, want)
	}
	if err := e.a.Activate(e.ctx, tDisk); err != nil {
		t.Fatal(err)
	}
	want.Quiesced = false
	if got := status(); got != want {
		t.Fatalf("activated: %+v, want %+v", got, want)
	}

	e.a.SetLease(time.Now().Add(time.Minute))
	got := status()
	if !got.Leased || got.LeaseLeft <= 50*time.Second || got.LeaseLeft > time.Minute {
		t.Errorf("with a minute's lease: leased %v, %v left", got.Leased, got.LeaseLeft)
	}
	e.a.SetLease(time.Now().Add(-time.Second))
	if got := status(); !got.Leased || got.LeaseLeft != 0 {
		t.Errorf("with a lapsed lease: leased %v, %v left", got.Leased, got.LeaseLeft)
	}
	e.a.SetLease(time.Time{})

	if _, err := e.a.GetStatus(e.ctx, tDisk+1); !errors.Is(err, ErrNoTable) {
		t.Errorf("status of a disk the agent does not map: %v, want ErrNoTable", err)
	}
}
