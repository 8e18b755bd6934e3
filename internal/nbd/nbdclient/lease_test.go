package nbdclient

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"segmap/internal/nbd"
)

// TestLease: on a leased connection the server serves nothing before the
// client grants a lease, everything while it holds, and refuses every
// request, writes included (which then change nothing), once it has run
// out, until the client grants more.
func TestLease(t *testing.T) {
	checkGoroutines(t)
	disk := newMem("disk", 1<<20)
	h := startServer(t, func(c *nbd.Config) { c.Leases = true }, disk)
	c := dialClient(t, h.addr, "disk", ClientConfig{Lease: true})
	if !c.Leased() {
		t.Fatal("the server did not take the lease")
	}
	buf := make([]byte, 4096)
	if err := c.ReadAt(bg, buf, 0); !errors.Is(err, ErrEPERM) {
		t.Fatalf("read before any lease: %v, want EPERM", err)
	}
	const span = 300 * time.Millisecond
	if err := c.Lease(bg, time.Now().Add(span)); err != nil {
		t.Fatal(err)
	}
	granted := time.Now()
	if err := c.WriteAt(bg, pattern(4096, 1), 0, false); err != nil {
		t.Fatalf("write under the lease: %v", err)
	}
	time.Sleep(time.Until(granted.Add(span)))
	for _, op := range []struct {
		name string
		do   func() error
	}{
		{"read", func() error { return c.ReadAt(bg, buf, 0) }},
		{"write", func() error { return c.WriteAt(bg, pattern(4096, 2), 0, false) }},
		{"flush", func() error { return c.Flush(bg) }},
		{"zero", func() error { return c.WriteZeroes(bg, 0, 4096, false) }},
	} {
		if err := op.do(); !errors.Is(err, ErrEPERM) {
			t.Errorf("%s after the lease ran out: %v, want EPERM", op.name, err)
		}
	}
	if err := c.Lease(bg, time.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := c.ReadAt(bg, buf, 0); err != nil || !bytes.Equal(buf, pattern(4096, 1)) {
		t.Fatalf("read under the new lease: %v; the refused write or zeroing landed: %v", err, !bytes.Equal(buf, pattern(4096, 1)))
	}
}

// TestLeaseRefused: a server that does not offer leases serves the
// connection without one, and Lease says so.
func TestLeaseRefused(t *testing.T) {
	checkGoroutines(t)
	disk := newMem("disk", 1<<20)
	h := startServer(t, nil, disk)
	c := dialClient(t, h.addr, "disk", ClientConfig{Lease: true})
	if c.Leased() {
		t.Fatal("leased against a server without leases")
	}
	if err := c.Lease(bg, time.Now().Add(time.Minute)); !errors.Is(err, ErrNotLeased) {
		t.Fatalf("Lease: %v, want ErrNotLeased", err)
	}
	if err := c.WriteAt(bg, pattern(4096, 1), 0, false); err != nil {
		t.Fatal(err)
	}
}

// TestLeaseNeverLaterThanClient: the server's end of a lease is the
// client's or earlier: it counts from when it sent the reply the client
// counts from.
func TestLeaseNeverLaterThanClient(t *testing.T) {
	checkGoroutines(t)
	disk := newMem("disk", 1<<20)
	h := startServer(t, func(c *nbd.Config) { c.Leases = true }, disk)
	for range 5 {
		c := dialClient(t, h.addr, "disk", ClientConfig{Lease: true})
		end := time.Now().Add(100 * time.Millisecond)
		if err := c.Lease(bg, end); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Until(end))
		if err := c.ReadAt(bg, make([]byte, 512), 0); !errors.Is(err, ErrEPERM) {
			t.Fatalf("read at the client's end of the lease: %v, want EPERM", err)
		}
	}
}
