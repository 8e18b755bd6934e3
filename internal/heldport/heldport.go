// Package heldport gives server processes started by tests their listening
// sockets, so that no test ever picks a port that was free a moment ago and
// hands it to a child that may find it taken.
//
// The test binds 127.0.0.1:0 itself and keeps the socket (a Port) for as
// long as the test runs. Each run of the server inherits a copy of it: as
// an fd:N listen address for segmap's own servers, or by systemd's socket
// activation protocol (Activate) for qemu-nbd and nbdkit. The port stays
// bound while a server is down, so a server killed and started again comes
// back on the same address; in between, the Port accepts connections and
// closes them at once (Refuse), so that clients see the server gone instead
// of waiting in the listen queue.
package heldport

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Port is a loopback TCP port held by the test process.
type Port struct {
	l *net.TCPListener

	mu struct {
		sync.Mutex
		// refusing is closed when the loop that refuses connections
		// has stopped; nil while a server holds the port.
		refusing chan struct{}
	}
}

// New binds a port on 127.0.0.1 chosen by the kernel. It refuses
// connections until File hands it to a server, and is closed when t ends.
func New(t testing.TB) *Port {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Port{l: l.(*net.TCPListener)}
	p.Refuse()
	t.Cleanup(p.close)
	return p
}

// Addr returns the port's address, host:port.
func (p *Port) Addr() string { return p.l.Addr().String() }

// File stops refusing connections and returns a copy of the listening
// socket for a server process to inherit (exec.Cmd.ExtraFiles). The caller
// closes it once the process has started. Connections that arrive before
// the server accepts wait in the listen queue.
func (p *Port) File() (*os.File, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stopRefusingLocked()
	f, err := p.l.File()
	if err != nil {
		return nil, fmt.Errorf("heldport %s: %w", p.Addr(), err)
	}
	return f, nil
}

// Refuse makes the port accept and close every connection, as no server
// holds it: call it when the server process has exited.
func (p *Port) Refuse() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.refusing != nil {
		return
	}
	// The socket's file status flags are shared with every process
	// that inherited it, and a server may have made it blocking
	// (qemu-nbd does): a blocking accept here could not be woken by a
	// deadline. Make it non-blocking again before accepting.
	if rc, err := p.l.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) { _ = syscall.SetNonblock(int(fd), true) }) // fails only on a closed socket, whose Accept fails at once
	}
	done := make(chan struct{})
	p.mu.refusing = done
	go func() {
		defer close(done)
		for {
			c, err := p.l.Accept()
			if err != nil {
				return // stopped by File (a deadline) or closed
			}
			c.Close()
		}
	}()
}

func (p *Port) stopRefusingLocked() {
	if p.mu.refusing == nil {
		return
	}
	// A deadline in the past wakes the pending Accept.
	p.l.SetDeadline(time.Unix(1, 0))
	<-p.mu.refusing
	p.l.SetDeadline(time.Time{})
	p.mu.refusing = nil
}

func (p *Port) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stopRefusingLocked()
	p.l.Close()
}

// Activate makes cmd receive f as its listening socket by systemd's socket
// activation protocol (descriptor 3, LISTEN_FDS=1 and LISTEN_PID set to the
// server's own process id), which qemu-nbd and nbdkit understand. The
// server must not also be told a port to bind (qemu-nbd -p/-b, nbdkit
// -p/-i). It must be called before cmd.Start.
func Activate(cmd *exec.Cmd, f *os.File) {
	// LISTEN_PID must be the server's pid, known only once it runs: a
	// shell sets it to its own pid and execs the server in its place.
	args := append([]string{"sh", "-c", `LISTEN_PID=$$ exec "$0" "$@"`, cmd.Path}, cmd.Args[1:]...)
	cmd.Path, cmd.Args = "/bin/sh", args
	cmd.ExtraFiles = []*os.File{f}
	env := cmd.Env
	if env == nil {
		env = os.Environ()
	}
	cmd.Env = append(env, "LISTEN_FDS=1")
}

// Serve starts the server program path with args on a new Port by socket
// activation (see Activate) and returns the port's address. The server is
// killed when t ends; its output is logged if t failed.
func Serve(t testing.TB, path string, args ...string) string {
	t.Helper()
	p := New(t)
	f, err := p.File()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(path, args...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	Activate(cmd, f)
	err = cmd.Start()
	f.Close()
	if err != nil {
		t.Fatalf("start %s: %v", path, err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait() // the test judges the child by what it did, not how it exited
		p.Refuse()
		close(exited)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("output of %s:\n%s", path, out.String())
		}
	})
	return p.Addr()
}

type syncBuffer struct {
	mu struct {
		sync.Mutex
		b []byte
	}
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mu.b = append(s.mu.b, p...)
	return len(p), nil
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return string(s.mu.b)
}
