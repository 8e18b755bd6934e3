package transport_test

import (
	"errors"
	"testing"
	"time"

	"segmap/internal/agent"
	"segmap/internal/rpc/protocol"
)

// TestGetStatus: get_status round-trips over gRPC, from the controller's
// AgentStatus to a remote agent and back, with the agent's figures and its
// lease; a disk the agent has no table for comes back as ErrNoTable, and
// an agent whose traffic is held is reported as not answering within the
// timeout instead of being waited for.
func TestGetStatus(t *testing.T) {
	checkGoroutines(t)
	ctx := testContext(t, time.Minute)
	const lease = 2 * time.Second
	s := newStack(t, stackOptions{lease: lease})
	p := newProxy(t, s.addr)
	t.Cleanup(p.close)
	a := s.startAgent("a", p.addr())
	d := s.createDisk(ctx, "d", 4)
	s.createDisk(ctx, "e", 2)
	disk := a.open(ctx, "d")
	if err := disk.WriteAt(ctx, []byte("hello"), 2*segSize, false); err != nil {
		t.Fatal(err)
	}
	// Mapped to a by the controller, but a has made no table for it.
	if _, err := s.ctrl.Open(ctx, "a", "e"); err != nil {
		t.Fatal(err)
	}

	as, err := s.ctrl.AgentStatus(ctx, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(as) != 1 || as[0].Name != "a" || len(as[0].Disks) != 2 {
		t.Fatalf("agent status %+v, want agent a with disks d and e", as)
	}
	got, e := as[0].Disks[0], as[0].Disks[1]
	if got.Name != "d" || got.Err != nil {
		t.Fatalf("status of d: %+v", got)
	}
	st := got.Status
	if !st.Leased || st.LeaseLeft <= 0 || st.LeaseLeft > lease {
		t.Errorf("lease: leased %v, %v left, want up to %v", st.Leased, st.LeaseLeft, lease)
	}
	st.Leased, st.LeaseLeft = false, 0
	want := protocol.DiskStatus{Disk: protocol.DiskID(d.ID), Segments: 4, Loaded: 1, Invalid: 3, Mapped: 1}
	if st != want {
		t.Errorf("status of d after one write: %+v, want %+v", st, want)
	}
	if e.Name != "e" || !errors.Is(e.Err, agent.ErrNoTable) {
		t.Errorf("status of e, which a has no table for: %+v, want ErrNoTable", e)
	}

	p.hold()
	start := time.Now()
	as, err = s.ctrl.AgentStatus(ctx, 200*time.Millisecond)
	took := time.Since(start)
	p.resume()
	if err != nil {
		t.Fatal(err)
	}
	if took > time.Second {
		t.Errorf("AgentStatus took %v for an agent that does not answer, with a 200ms timeout", took)
	}
	if len(as) != 1 || len(as[0].Disks) != 2 || !errors.Is(as[0].Disks[0].Err, protocol.ErrUnavailable) {
		t.Errorf("held agent's status %+v, want ErrUnavailable", as)
	}
}
