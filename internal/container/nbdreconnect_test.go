package container_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"segmap/internal/backoff"
	"segmap/internal/container"
	"segmap/internal/nbd"
	"segmap/internal/nbd/nbdclient"
	"segmap/internal/nbd/nbdwire"
	"segmap/internal/storage"
)

// node is a storage node in this process, serving the files of dir with
// leases on a fixed loopback address, which a test kills (its listener
// and connections closed at once, as by a crash of the process) and
// starts again on the same address.
type node struct {
	t *testing.T
	// cacheID is the identity of the write cache served (zero: none);
	// a test changes it before restart to stand for a reboot.
	cacheID [nbdwire.CacheIDSize]byte
	dir     string
	addr    string
	srv     *nbd.Server
	served  chan error
}

func startNode(t *testing.T) *node {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &node{t: t, dir: t.TempDir(), addr: l.Addr().String()}
	n.serve(l)
	t.Cleanup(n.kill)
	return n
}

func (n *node) serve(l net.Listener) {
	backend, err := storage.NewDir(n.dir, "")
	if err != nil {
		n.t.Fatal(err)
	}
	n.srv = nbd.NewServer(nbd.Config{Backend: backend, Errno: storage.Errno, Logger: slog.New(slog.DiscardHandler), Leases: true, CacheID: n.cacheID})
	n.served = make(chan error, 1)
	go func() { n.served <- n.srv.Serve(l) }()
}

// kill closes the listener and every connection at once.
func (n *node) kill() {
	if n.srv == nil {
		return
	}
	n.srv.Close()
	if err := <-n.served; !errors.Is(err, nbd.ErrServerClosed) {
		n.t.Errorf("Serve: %v", err)
	}
	n.srv = nil
}

// restart serves again on the same address. The port was the test's
// until kill; rebinding it can only fail if another process took it in
// between, which the test reports.
func (n *node) restart() {
	n.t.Helper()
	l, err := net.Listen("tcp", n.addr)
	if err != nil {
		n.t.Fatalf("rebinding %s after the kill: %v", n.addr, err)
	}
	n.serve(l)
}

func (n *node) uri(name string) string { return "nbd://" + n.addr + "/" + name }

// logBuffer collects log lines.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.b.String(), s)
}

// fastReconnect redials every 20 ms at most, so that tests do not wait
// for the default schedule's 2 s steps.
var fastReconnect = backoff.Policy{Initial: 5 * time.Millisecond, Max: 20 * time.Millisecond}

const slot = 64 << 10

// openOn formats a container of 16 slots on a new export of n and opens
// it again with opts (fast reconnection unless set, logs into the
// returned buffer).
func openOn(t *testing.T, n *node, id uint32, opts container.NBDOptions) (*container.NBD, *logBuffer, string) {
	t.Helper()
	name := newExport(t, n.dir, container.HeaderSize+16*slot)
	formatNBD(t, n.uri(name), id, slot).Close()
	logs := &logBuffer{}
	opts.Logger = slog.New(slog.NewTextHandler(logs, nil))
	if opts.Reconnect == (backoff.Policy{}) {
		opts.Reconnect = fastReconnect
	}
	c, err := container.OpenNBDWith(context.Background(), n.uri(name), &container.Header{ID: id, SlotSize: slot}, nbdclient.ClientConfig{}, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, logs, name
}

func pattern(worker, round int) []byte {
	return bytes.Repeat([]byte(fmt.Sprintf("w%02d r%06d|", worker, round)), 4096/12+1)[:4096]
}

// TestNBDReconnect kills the storage node in the middle of concurrent
// writes and reads and restarts it on the same address: every request
// completes, every read returns what was written, and the outage is
// logged once, its end once.
func TestNBDReconnect(t *testing.T) {
	n := startNode(t)
	c, logs, _ := openOn(t, n, 21, container.NBDOptions{FailTimeout: 20 * time.Second})

	const workers = 8
	var wg sync.WaitGroup
	stopAt := make(chan struct{})
	errs := make(chan error, workers)
	progress := make(chan struct{}, workers*1000)
	for w := range workers {
		wg.Go(func() {
			off := int64(w) * slot
			got := make([]byte, 4096)
			for r := 0; ; r++ {
				select {
				case <-stopAt:
					return
				default:
				}
				p := pattern(w, r)
				if _, err := c.WriteAt(p, off); err != nil {
					errs <- fmt.Errorf("worker %d round %d: write: %w", w, r, err)
					return
				}
				if _, err := c.ReadAt(got, off); err != nil {
					errs <- fmt.Errorf("worker %d round %d: read: %w", w, r, err)
					return
				}
				if !bytes.Equal(got, p) {
					errs <- fmt.Errorf("worker %d round %d: read %q, wrote %q", w, r, got[:12], p[:12])
					return
				}
				select {
				case progress <- struct{}{}:
				default:
				}
			}
		})
	}
	waitProgress := func(k int) {
		t.Helper()
		for range k {
			select {
			case <-progress:
			case err := <-errs:
				t.Fatal(err)
			case <-time.After(10 * time.Second):
				t.Fatal("no progress in 10s")
			}
		}
	}
	waitProgress(workers * 5)
	for round := range 3 {
		n.kill()
		// Requests wait meanwhile; the keeper has seen the break
		// long before the end of it.
		time.Sleep(200 * time.Millisecond)
		if st := c.Status(); st.State != container.NBDReconnecting || st.Since.IsZero() {
			t.Errorf("outage %d: status %v since %v, want reconnecting", round, st.State, st.Since)
		}
		n.restart()
		for len(progress) > 0 {
			<-progress
		}
		waitProgress(workers * 5)
	}
	close(stopAt)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if st := c.Status(); st.State != container.NBDConnected {
		t.Errorf("status after the restarts: %v (%v)", st.State, st.Err)
	}
	if got := logs.count(`msg="container storage connection lost`); got != 3 {
		t.Errorf("%d lines about a lost connection for 3 outages:\n%s", got, logs.b.String())
	}
	if got := logs.count(`msg="container storage connection back`); got != 3 {
		t.Errorf("%d lines about the connection back for 3 outages:\n%s", got, logs.b.String())
	}
}

// TestNBDFlushAcrossReconnect: a flush after a reconnection fails with
// ErrWritesLost, once, if writes acknowledged on the broken connection
// had not been flushed and the new connection's server does not report
// the same write cache (it reports none, or another: a reboot); it
// succeeds if they had been flushed, or if the write cache is the same
// (the storage node's process restarted, its machine did not).
func TestNBDFlushAcrossReconnect(t *testing.T) {
	p := bytes.Repeat([]byte{7}, 4096)
	// outage writes to c, kills and restarts n (with cache id next),
	// and returns what the next flush says; flushFirst flushes before
	// the kill.
	outage := func(c *container.NBD, n *node, flushFirst bool, next byte) error {
		t.Helper()
		if _, err := c.WriteAt(p, 0); err != nil {
			t.Fatal(err)
		}
		if flushFirst {
			if err := c.Flush(); err != nil {
				t.Fatal(err)
			}
			if _, err := c.ReadAt(make([]byte, 10), 0); err != nil {
				t.Fatal(err)
			}
		}
		n.kill()
		n.cacheID[0] = next
		n.restart()
		err := c.Flush()
		if err2 := c.Flush(); err2 != nil {
			t.Fatalf("the flush after the first one after a reconnection: %v", err2)
		}
		// Writes made after the reconnection are flushed as usual.
		if _, err := c.WriteAt(p, slot); err != nil {
			t.Fatal(err)
		}
		if err := c.Flush(); err != nil {
			t.Fatal(err)
		}
		return err
	}
	for _, tt := range []struct {
		name        string
		before      byte // the cache id's first byte; 0: none
		after       byte
		flushFirst  bool
		wantLostErr bool
	}{
		{"no cache id, unflushed", 0, 0, false, true},
		{"no cache id, flushed", 0, 0, true, false},
		{"same cache, unflushed", 1, 1, false, false},
		{"other cache, unflushed", 1, 2, false, true},
		{"other cache, flushed", 1, 2, true, false},
		{"cache id gone, unflushed", 1, 0, false, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			n := startNode(t)
			if tt.before != 0 {
				n.kill()
				n.cacheID[0] = tt.before
				n.restart()
			}
			c, _, _ := openOn(t, n, 22, container.NBDOptions{})
			err := outage(c, n, tt.flushFirst, tt.after)
			if tt.wantLostErr != errors.Is(err, container.ErrWritesLost) || !tt.wantLostErr && err != nil {
				t.Fatalf("flush spanning the reconnection: %v; want ErrWritesLost %v", err, tt.wantLostErr)
			}
		})
	}
}

// TestNBDUnreachable: a storage node that stays away beyond the failure
// timeout makes waiting and new requests fail with ErrUnreachable within
// the timeout plus a second; once it is back, requests work again.
func TestNBDUnreachable(t *testing.T) {
	n := startNode(t)
	const timeout = 500 * time.Millisecond
	c, logs, _ := openOn(t, n, 23, container.NBDOptions{FailTimeout: timeout})
	want := bytes.Repeat([]byte{9}, 4096)
	if _, err := c.WriteAt(want, 3*slot); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	n.kill()
	t0 := time.Now()
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			var err error
			if i%2 == 0 {
				_, err = c.ReadAt(make([]byte, 4096), 3*slot)
			} else {
				_, err = c.WriteAt(want, 3*slot)
			}
			took := time.Since(t0)
			if !errors.Is(err, container.ErrUnreachable) || errors.Is(err, container.ErrClosed) {
				t.Errorf("request %d while the storage is away: %v, want ErrUnreachable", i, err)
			}
			if took > timeout+time.Second {
				t.Errorf("request %d failed after %v, timeout %v", i, took, timeout)
			}
		})
	}
	wg.Wait()
	if st := c.Status(); st.State != container.NBDUnreachable || st.Err == nil {
		t.Errorf("status: %v (%v), want unreachable", st.State, st.Err)
	}
	t1 := time.Now()
	if err := c.Flush(); !errors.Is(err, container.ErrUnreachable) || time.Since(t1) > 100*time.Millisecond {
		t.Errorf("a new request while unreachable: %v after %v, want ErrUnreachable at once", err, time.Since(t1))
	}
	n.restart()
	got := make([]byte, 4096)
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := c.ReadAt(got, 3*slot)
		if err == nil {
			break
		}
		if !errors.Is(err, container.ErrUnreachable) || time.Now().After(deadline) {
			t.Fatalf("read after the storage came back: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read back %x..., want %x...", got[:4], want[:4])
	}
	if st := c.Status(); st.State != container.NBDConnected {
		t.Errorf("status once back: %v", st.State)
	}
	if logs.count("unreachable beyond the failure timeout") != 1 {
		t.Errorf("the failure timeout was not logged once:\n%s", logs.b.String())
	}
}

// TestNBDReconnectLeased: a leased connection is granted the lease again
// before its first request on the new connection (the storage node
// refuses any request without one, which would fail with ErrLeaseOver).
func TestNBDReconnectLeased(t *testing.T) {
	n := startNode(t)
	end := time.Now().Add(time.Minute)
	c, _, _ := openOn(t, n, 24, container.NBDOptions{Lease: func() time.Time { return end }})
	p := bytes.Repeat([]byte{3}, 4096)
	for round := range 3 {
		if _, err := c.WriteAt(p, int64(round)*slot); err != nil {
			t.Fatalf("round %d: write: %v", round, err)
		}
		n.kill()
		n.restart()
		got := make([]byte, 4096)
		if _, err := c.ReadAt(got, int64(round)*slot); err != nil || !bytes.Equal(got, p) {
			t.Fatalf("round %d: read on the new connection: %v", round, err)
		}
	}
	// The renewer works on the new connection.
	c.RenewLease()
	if _, err := c.WriteAt(p, 4*slot); err != nil {
		t.Fatal(err)
	}
}

// TestNBDReconnectHeaderChanged: an export that holds another container
// when the connection comes back fails the container for good.
func TestNBDReconnectHeaderChanged(t *testing.T) {
	n := startNode(t)
	c, _, name := openOn(t, n, 25, container.NBDOptions{})
	n.kill()
	f, err := container.Format(filepath.Join(n.dir, name), 26, slot, true)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	n.restart()
	if _, err := c.ReadAt(make([]byte, 10), 0); !errors.Is(err, container.ErrWrongContainer) {
		t.Fatalf("read from a container whose header changed: %v, want ErrWrongContainer", err)
	}
	if st := c.Status(); st.State != container.NBDFailed || !errors.Is(st.Err, container.ErrWrongContainer) {
		t.Errorf("status: %v (%v), want failed", st.State, st.Err)
	}
	if _, err := c.WriteAt(make([]byte, 10), 0); !errors.Is(err, container.ErrWrongContainer) {
		t.Fatalf("write: %v, want ErrWrongContainer", err)
	}
}

// TestNBDCloseWhileDown: Close ends requests waiting for the connection
// with ErrClosed and stops reconnecting (the package's leak check sees
// that no goroutine is left).
func TestNBDCloseWhileDown(t *testing.T) {
	n := startNode(t)
	c, _, _ := openOn(t, n, 27, container.NBDOptions{})
	n.kill()
	done := make(chan error, 1)
	go func() {
		_, err := c.ReadAt(make([]byte, 10), 0)
		done <- err
	}()
	time.Sleep(100 * time.Millisecond)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, container.ErrClosed) {
			t.Fatalf("read waiting at Close: %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("read still waiting 5s after Close")
	}
	if st := c.Status(); st.State != container.NBDClosed {
		t.Errorf("status: %v", st.State)
	}
}

// TestNBDOpenWhileDown: opening a registered container (its header known)
// whose node is down waits for the node, up to the failure timeout, as a
// broken connection does; beyond it, it fails with ErrUnreachable. An
// unknown container (no header to expect) fails at once.
func TestNBDOpenWhileDown(t *testing.T) {
	n := startNode(t)
	c, _, name := openOn(t, n, 7, container.NBDOptions{})
	c.Close()
	want := &container.Header{ID: 7, SlotSize: slot}
	n.kill()
	go func() {
		time.Sleep(300 * time.Millisecond)
		n.restart()
	}()
	opts := container.NBDOptions{Reconnect: fastReconnect, FailTimeout: 10 * time.Second, Logger: slog.New(slog.DiscardHandler)}
	t0 := time.Now()
	c, err := container.OpenNBDWith(context.Background(), n.uri(name), want, nbdclient.ClientConfig{}, opts)
	if err != nil {
		t.Fatalf("open while the node restarts: %v", err)
	}
	c.Close()
	t.Logf("opened %v after the node went down", time.Since(t0).Round(time.Millisecond))

	n.kill()
	opts.FailTimeout = 300 * time.Millisecond
	t0 = time.Now()
	if _, err := container.OpenNBDWith(context.Background(), n.uri(name), want, nbdclient.ClientConfig{}, opts); !errors.Is(err, container.ErrUnreachable) {
		t.Fatalf("open of a node down beyond the failure timeout: %v, want ErrUnreachable", err)
	}
	if took := time.Since(t0); took > 300*time.Millisecond+time.Second {
		t.Errorf("gave up after %v, failure timeout 300ms", took)
	}
	if _, err := container.OpenNBDWith(context.Background(), n.uri(name), nil, nbdclient.ClientConfig{}, opts); err == nil || errors.Is(err, container.ErrUnreachable) {
		t.Fatalf("open of an unknown container on a node down: %v, want a dial error at once", err)
	}
	n.restart()
}
