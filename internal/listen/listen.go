// Package listen opens the listening sockets of segmap's servers from the
// address a user gives on the command line.
//
// Three forms are accepted:
//
//	host:port   a TCP address; port 0 lets the kernel choose, and the
//	            server reports the address it got
//	unix:PATH   a Unix socket at PATH (a stale socket file is removed)
//	fd:N        a listening socket the process inherited as descriptor N
//	            (N >= 3), from a supervisor (systemd socket activation,
//	            s6, a test harness) that holds the port across restarts
//
// The fd form is what makes a restart race-free: the socket stays bound in
// the parent while the server is down, so no other process can take its
// port in between, and clients find the restarted server on the same
// address.
package listen

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
)

// Listen opens the listener that addr names (see the package comment).
func Listen(addr string) (net.Listener, error) {
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		if p == "" {
			return nil, fmt.Errorf("listen %q: empty socket path", addr)
		}
		// A socket file left by a previous run would make bind fail.
		if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
			return nil, fmt.Errorf("listen %q: %w", addr, err)
		}
		return net.Listen("unix", p)
	}
	if s, ok := strings.CutPrefix(addr, "fd:"); ok {
		return inherited(addr, s)
	}
	return net.Listen("tcp", addr)
}

// inherited returns the listening socket at descriptor s.
func inherited(addr, s string) (net.Listener, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 3 {
		return nil, fmt.Errorf("listen %q: want fd:N with N a descriptor number of at least 3", addr)
	}
	f := os.NewFile(uintptr(n), addr)
	if f == nil {
		return nil, fmt.Errorf("listen %q: no such descriptor", addr)
	}
	// FileListener duplicates the descriptor; the original is closed here
	// so that the process holds one copy, closed with the listener.
	l, err := net.FileListener(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("listen %q: not a listening socket: %w", addr, err)
	}
	return l, nil
}

// Local reports whether a listener's address can be reached only from
// this machine: a Unix socket, or TCP on a loopback address (127.0.0.0/8,
// ::1). A wildcard address (0.0.0.0, ::) is not local: it takes
// connections from every network the machine is on.
func Local(a net.Addr) bool {
	switch a := a.(type) {
	case *net.UnixAddr:
		return true
	case *net.TCPAddr:
		return a.IP.IsLoopback()
	}
	return false
}
