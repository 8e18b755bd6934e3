package transport_test

import (
	"errors"
	"testing"
	"time"

	"segmap/internal/rpc/protocol"
	"segmap/internal/rpc/transport"
)

// TestOpenDuringControllerRestart: an agent asked to open a disk while its
// controller is down (a host connecting during a controller restart)
// waits, and opens the disk once the controller is back, rather than
// telling the host the export does not exist. Found by the e2e kill storm
// (TestKillStormController): fio connecting between a kill and the restart
// failed with "server has no export named 'live'". A disk that does not
// exist is still refused at once.
func TestOpenDuringControllerRestart(t *testing.T) {
	checkGoroutines(t)
	ctx := testContext(t, transport.FaultPatience+30*time.Second)
	s := newStack(t, stackOptions{})
	a := s.startAgent("a", s.addr)
	s.createDisk(ctx, "d", 4)

	s.stopController()
	type result struct {
		err  error
		size uint64
	}
	opened := make(chan result, 1)
	go func() {
		d, err := a.agent.Open(ctx, "d")
		if err != nil {
			opened <- result{err: err}
			return
		}
		size := d.Info().Size
		opened <- result{err: d.Close(ctx), size: size}
	}()
	time.Sleep(300 * time.Millisecond)
	select {
	case r := <-opened:
		t.Fatalf("open during the outage returned at once: %v", r.err)
	default:
	}

	start := time.Now()
	s.startController()
	s.serve()
	select {
	case r := <-opened:
		if r.err != nil {
			t.Fatalf("open during the outage: %v", r.err)
		}
		if r.size != 4*segSize {
			t.Errorf("opened d of %d bytes, want %d", r.size, 4*segSize)
		}
	case <-time.After(transport.FaultPatience):
		t.Fatal("an open started during the outage did not complete")
	}
	t.Logf("open completed %v after the controller came back", time.Since(start))

	t0 := time.Now()
	if _, err := a.agent.Open(ctx, "nope"); !errors.Is(err, protocol.ErrNotFound) {
		t.Errorf("open of a disk that does not exist: %v, want ErrNotFound", err)
	}
	if took := time.Since(t0); took > 5*time.Second {
		t.Errorf("open of a disk that does not exist took %v", took)
	}
}
