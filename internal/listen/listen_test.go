package listen

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestTCP(t *testing.T) {
	l, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if a := l.Addr().(*net.TCPAddr); a.Port == 0 {
		t.Fatalf("port 0 not resolved: %v", a)
	}
}

func TestUnixRemovesStaleSocket(t *testing.T) {
	p := filepath.Join(t.TempDir(), "s")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := Listen("unix:" + p)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

func TestBadAddresses(t *testing.T) {
	for _, addr := range []string{"fd:", "fd:x", "fd:0", "fd:2", "fd:-1", "fd:999", "unix:"} {
		if l, err := Listen(addr); err == nil {
			l.Close()
			t.Errorf("Listen(%q) succeeded", addr)
		} else if !strings.Contains(err.Error(), addr) {
			t.Errorf("Listen(%q): %v: the error does not name the address", addr, err)
		}
	}
}

// TestNotAListener: a descriptor that is open but not a listening socket is
// refused with an error, not served.
func TestNotAListener(t *testing.T) {
	if os.Getenv("LISTEN_TEST_CHILD") == "1" {
		l, err := Listen("fd:3")
		if err == nil {
			l.Close()
			os.Exit(1)
		}
		os.Exit(0)
	}
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^TestNotAListener$")
	cmd.Env = append(os.Environ(), "LISTEN_TEST_CHILD=1")
	cmd.ExtraFiles = []*os.File{f}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("a non-socket descriptor was accepted as a listener: %v\n%s", err, out)
	}
}

// TestInherited: a child process serves on a socket its parent bound and
// passed as fd 3, on the parent's port, and the parent's copy keeps the
// port after the child is gone.
func TestInherited(t *testing.T) {
	if os.Getenv("LISTEN_TEST_CHILD") == "2" {
		l, err := Listen("fd:3")
		if err != nil {
			os.Stderr.WriteString(err.Error())
			os.Exit(1)
		}
		c, err := l.Accept()
		if err != nil {
			os.Exit(1)
		}
		c.Write([]byte(l.Addr().String()))
		c.Close()
		os.Exit(0)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	f, err := l.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestInherited$")
	cmd.Env = append(os.Environ(), "LISTEN_TEST_CHILD=2")
	cmd.ExtraFiles = []*os.File{f}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, _ := c.Read(buf)
	c.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("child: %v: %s", err, stderr.String())
	}
	if got := string(buf[:n]); got != l.Addr().String() {
		t.Fatalf("child served on %q, want %q", got, l.Addr())
	}
	// The port is still bound here: binding it again fails.
	if l2, err := net.Listen("tcp", l.Addr().String()); err == nil {
		l2.Close()
		t.Fatalf("the port was free after the child exited")
	}
}

func TestLocal(t *testing.T) {
	for _, tc := range []struct {
		addr string
		want bool
	}{
		{"127.0.0.1:0", true},
		{"127.3.4.5:0", true},
		{"[::1]:0", true},
		{"0.0.0.0:0", false},
		{"[::]:0", false},
	} {
		l, err := Listen(tc.addr)
		if err != nil {
			if strings.Contains(tc.addr, "::") {
				continue // no IPv6 on this machine
			}
			t.Fatal(err)
		}
		if got := Local(l.Addr()); got != tc.want {
			t.Errorf("Local(%s) = %v, want %v", l.Addr(), got, tc.want)
		}
		l.Close()
	}
	l, err := Listen("unix:" + filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if !Local(l.Addr()) {
		t.Errorf("Local(%s) = false for a Unix socket", l.Addr())
	}
}
