package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"testing"
	"time"

	"segmap/internal/nbd/nbdwire"
)

// gatedBackend is a memBackend whose Open waits until release is closed
// (or its context ends), telling waiting when it starts to wait; then it
// fails with fail, if set.
type gatedBackend struct {
	*memBackend
	release chan struct{}
	waiting chan struct{}
	fail    error
}

func (b *gatedBackend) Open(ctx context.Context, name string) (Export, io.Closer, error) {
	select {
	case b.waiting <- struct{}{}:
	default:
	}
	select {
	case <-b.release:
	case <-ctx.Done():
		return nil, nil, ctx.Err()
	}
	if b.fail != nil {
		return nil, nil, b.fail
	}
	return b.memBackend.Open(ctx, name)
}

// startGated serves one 4 KiB export through a gatedBackend.
func startGated(t *testing.T, handshakeTimeout time.Duration, fail error) (*harness, *gatedBackend) {
	t.Helper()
	var g *gatedBackend
	h := startServer(t, func(c *Config) {
		c.HandshakeTimeout = handshakeTimeout
		g = &gatedBackend{memBackend: c.Backend.(*memBackend), release: make(chan struct{}), waiting: make(chan struct{}, 1), fail: fail}
		c.Backend = g
	}, newMem("disk", 4096))
	return h, g
}

// finalReply reads option replies up to the final one.
func (c *client) finalReply() optReply {
	c.t.Helper()
	for {
		r := c.readOptReply()
		if r.typ == nbdwire.RepAck || r.typ&nbdwire.RepErr != 0 {
			return r
		}
	}
}

// TestHandshakeClockStopsInOpen: the time the server waits in Backend.Open
// (an agent's Open waits for a restarting controller) does not count
// against the client's handshake deadline; the time left runs again after
// it. Found by the e2e kill storm (TestKillStormController): fio
// connecting to an agent during a controller outage longer than
// HandshakeTimeout was dropped although the agent would have served it.
func TestHandshakeClockStopsInOpen(t *testing.T) {
	checkGoroutines(t)
	const timeout = 300 * time.Millisecond
	h, g := startGated(t, timeout, nil)
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle|nbdwire.CFlagNoZeroes)
	c.sendOpt(nbdwire.OptGo, infoData("disk"))
	<-g.waiting
	time.Sleep(3 * timeout)
	close(g.release)
	if r := c.finalReply(); r.typ != nbdwire.RepAck {
		t.Fatalf("NBD_OPT_GO after a slow Open: %v (%q), want ACK", r.typ, r.data)
	}
	tc := c.transmission(4096, transmissionFlags(false, false), false)
	tc.read(0, 512)
}

// TestHandshakeClockResumesAfterOpen: after a slow Open that fails, the
// handshake goes on with the time it had left: a client that then stalls
// is dropped.
func TestHandshakeClockResumesAfterOpen(t *testing.T) {
	checkGoroutines(t)
	const timeout = 300 * time.Millisecond
	h, g := startGated(t, timeout, fmt.Errorf("controller away: %w", errors.ErrUnsupported))
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle|nbdwire.CFlagNoZeroes)
	c.sendOpt(nbdwire.OptGo, infoData("disk"))
	<-g.waiting
	time.Sleep(3 * timeout)
	close(g.release)
	if r := c.finalReply(); r.typ&nbdwire.RepErr == 0 {
		t.Fatalf("NBD_OPT_GO with a failing Open: %v, want an error", r.typ)
	}
	start := time.Now()
	c.expectClosed() // the client sends nothing more
	if d := time.Since(start); d > timeout+2*time.Second {
		t.Errorf("a stalled client was dropped %v after a failed Open (handshake timeout %v)", d, timeout)
	}
}

// TestShutdownCancelsOpen: Shutdown does not wait for a handshake whose
// Open waits on the backend: the Open's context is cancelled.
func TestShutdownCancelsOpen(t *testing.T) {
	checkGoroutines(t)
	h, g := startGated(t, 10*time.Second, nil)
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle|nbdwire.CFlagNoZeroes)
	c.sendOpt(nbdwire.OptGo, infoData("disk"))
	<-g.waiting
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	if err := h.srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown with an Open waiting: %v after %v", err, time.Since(start))
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Shutdown took %v", d)
	}
	c.expectClosed()
}
