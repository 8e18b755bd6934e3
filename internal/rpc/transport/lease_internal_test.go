package transport

import (
	"testing"
	"time"
)

// TestRenewAfterLeaseOver: once a command has found an agent's lease over
// and ended its session (the controller then goes on without the agent),
// no renewal extends the lease again; a renewal that came first, while the
// lease held, makes the command wait for the new end instead. (Found in
// review: the renewal's check and its extension were two steps, and a
// command could end the session between them and the grant still go out.)
func TestRenewAfterLeaseOver(t *testing.T) {
	now := time.Unix(1000, 0)
	s := NewServer(ServerConfig{Lease: time.Second, Now: func() time.Time { return now }})
	newAgent := func(leaseEnd time.Time) *remoteAgent {
		ra := &remoteAgent{s: s, name: "a", done: make(chan struct{})}
		ra.mu.leaseEnd = leaseEnd
		return ra
	}

	ra := newAgent(now.Add(-time.Millisecond))
	if _, over := ra.endIfLeaseOver(); !over {
		t.Fatal("a lapsed lease is not over")
	}
	if ra.renew() {
		t.Fatal("a renewal after the session ended extended the lease")
	}
	select {
	case <-ra.done:
	default:
		t.Fatal("the session did not end with its lease")
	}

	ra = newAgent(now.Add(time.Millisecond))
	if !ra.renew() {
		t.Fatal("a renewal while the lease held was refused")
	}
	until, over := ra.endIfLeaseOver()
	if over || !until.Equal(now.Add(time.Second)) {
		t.Fatalf("after a renewal: over %v until %v, want the lease to run to %v", over, until, now.Add(time.Second))
	}
	now = now.Add(time.Second)
	if _, over := ra.endIfLeaseOver(); !over {
		t.Fatal("the renewed lease did not run out at its end")
	}
	if ra.renew() {
		t.Fatal("a renewal at the end of the lease extended it")
	}
}
