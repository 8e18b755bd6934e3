package e2e

import (
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// proxy forwards TCP connections to a target; blackholed, it stops
// forwarding in both directions without closing anything, as a network
// partition does.
type proxy struct {
	l      net.Listener
	target string
	cut    atomic.Bool
	mu     sync.Mutex
	conns  []net.Conn
	wg     sync.WaitGroup
}

func newProxy(t *testing.T, target string) *proxy {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{l: l, target: target}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			p.wg.Add(2)
			go p.pipe(c, u)
			go p.pipe(u, c)
		}
	}()
	t.Cleanup(func() {
		p.cut.Store(false)
		l.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

func (p *proxy) addr() string { return p.l.Addr().String() }

// pipe copies src to dst, holding the bytes while the link is cut.
func (p *proxy) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		for p.cut.Load() {
			time.Sleep(10 * time.Millisecond)
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			// Pass the end on: a FIN as a FIN (the other way may
			// still carry data), anything else as a close.
			if tc, ok := dst.(*net.TCPConn); ok && errors.Is(err, io.EOF) {
				tc.CloseWrite()
			} else {
				dst.Close()
			}
			return
		}
	}
}

// TestClusterPartition: an agent cut off from the controller stops its I/O
// within its lease; the controller completes a snapshot only after that
// lease has run out; when the link comes back the agent re-attaches and
// its I/O resumes with the current data.
func TestClusterPartition(t *testing.T) {
	requireTools(t, "qemu-io")
	c := newCluster(t, "host-b")
	p := newProxy(t, c.ctlAddr)
	// host-a reaches the controller through the proxy.
	if _, errOut, code := runBin(t, "certs", "issue", c.certs, "--role", "agent", "--name", "host-a"); code != 0 {
		t.Fatal(errOut)
	}
	a := c.startAgentVia("host-a", p.addr())
	c.cli("disk", "create", "d", "--size", "64M")
	run(t, time.Minute, "qemu-io", "-f", "raw", c.uri("host-a", "d"), "-c", "write -P 0x0a 0 4M")
	run(t, time.Minute, "qemu-io", "-f", "raw", c.uri("host-b", "d"), "-c", "read -P 0x0a 0 4M")

	const lease = 3 * time.Second // the cluster's --lease
	p.cut.Store(true)
	cutAt := time.Now()
	// The controller cannot reach host-a: a snapshot of d must wait until
	// host-a's lease has run out.
	if out, errOut, code := runBin(t, "--controller", c.ctlAddr, "--certs", c.certs, "snapshot", "d", "--name", "d@cut"); code != 0 {
		t.Fatalf("snapshot during the cut: exit %d: %s%s", code, out, errOut)
	}
	tookSnap := time.Since(cutAt)
	t.Logf("snapshot completed %v after the cut (lease %v)", tookSnap, lease)
	if tookSnap < lease-lease/3 {
		t.Errorf("the snapshot completed %v after the cut, before host-a's lease (%v) could have run out", tookSnap, lease)
	}
	// By now host-a has fenced itself: its I/O waits.
	out, err := runErr(2*time.Second, "qemu-io", "-f", "raw", c.uri("host-a", "d"), "-c", "read -P 0x0a 0 4k")
	if err == nil {
		t.Errorf("host-a served I/O while cut off:\n%s", out)
	}
	if !strings.Contains(a.out.String(), "fencing") {
		t.Errorf("host-a did not fence itself:\n%s", a.out)
	}
	// Writes go on through host-b (copy-on-write against the snapshot).
	run(t, time.Minute, "qemu-io", "-f", "raw", c.uri("host-b", "d"), "-c", "write -P 0x0b 0 4M")

	p.cut.Store(false)
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := runErr(10*time.Second, "qemu-io", "-f", "raw", c.uri("host-a", "d"), "-c", "read -P 0x0b 0 4M")
		if err == nil && !strings.Contains(out, "failed") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("host-a did not come back after the link did:\n%s\n%s", out, a.out)
		}
		time.Sleep(300 * time.Millisecond)
	}
	run(t, time.Minute, "qemu-io", "-r", "-f", "raw", c.uri("host-a", "d@cut"), "-c", "read -P 0x0a 0 4M")
	if out := c.cli("check"); !strings.Contains(out, "clean") {
		t.Errorf("check:\n%s", out)
	}
}
