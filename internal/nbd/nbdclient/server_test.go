package nbdclient

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"segmap/internal/leaktest"
	"segmap/internal/nbd"
	"segmap/internal/nbd/nbdwire"
	"segmap/internal/tlsconf"
)

// The NBD server (package nbd) these tests run the client against, and
// the test helpers around it, as the server's own tests have them.

// checkGoroutines fails t if, after its cleanups, goroutines it started
// are still running 2 s later. Call it first, so its cleanup runs last.
func checkGoroutines(t testing.TB) {
	t.Helper()
	leaktest.Check(t, leaktest.Within(2*time.Second))
}

// memExport is an in-memory Export. hook, if set, runs first in every
// method (op is "read", "write", "flush", "trim", "zero") and may sleep,
// block, panic or fail the call.
type memExport struct {
	name, desc string
	ro         bool
	hook       func(ctx context.Context, op string, off, n uint64) error
	// try, if set, answers TryReadAt; otherwise reads are served inline
	// unless hook is set (a hook may block).
	try func(p []byte, off uint64) (bool, error)

	mu   sync.RWMutex
	data []byte

	flushes, fuaWrites, noHoles atomic.Int64
}

func newMem(name string, size int) *memExport {
	return &memExport{name: name, desc: "test disk " + name, data: make([]byte, size)}
}

func (m *memExport) Size() uint64 { return uint64(len(m.data)) }

func (m *memExport) ReadOnly() bool { return m.ro }

func (m *memExport) run(ctx context.Context, op string, off, n uint64) error {
	if m.hook == nil {
		return nil
	}
	return m.hook(ctx, op, off, n)
}

func (m *memExport) ReadAt(ctx context.Context, p []byte, off uint64) error {
	if err := m.run(ctx, "read", off, uint64(len(p))); err != nil {
		return err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	copy(p, m.data[off:])
	return nil
}

func (m *memExport) TryReadAt(ctx context.Context, p []byte, off uint64) (bool, error) {
	if m.try != nil {
		return m.try(p, off)
	}
	if m.hook != nil {
		return false, nil
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	copy(p, m.data[off:])
	return true, nil
}

func (m *memExport) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	if err := m.run(ctx, "write", off, uint64(len(p))); err != nil {
		return err
	}
	if fua {
		m.fuaWrites.Add(1)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	return nil
}

func (m *memExport) Flush(ctx context.Context) error {
	if err := m.run(ctx, "flush", 0, 0); err != nil {
		return err
	}
	m.flushes.Add(1)
	return nil
}

func (m *memExport) Trim(ctx context.Context, off, n uint64) error {
	if err := m.run(ctx, "trim", off, n); err != nil {
		return err
	}
	m.zero(off, n)
	return nil
}

func (m *memExport) WriteZeroes(ctx context.Context, off, n uint64, noHole bool) error {
	if err := m.run(ctx, "zero", off, n); err != nil {
		return err
	}
	if noHole {
		m.noHoles.Add(1)
	}
	m.zero(off, n)
	return nil
}

func (m *memExport) zero(off, n uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+n])
}

func (m *memExport) snapshot(off, n int) []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return slices.Clone(m.data[off : off+n])
}

// memBackend serves memExports by name and counts opens and closes.
type memBackend struct {
	exports        []*memExport
	opens, closes  atomic.Int64
	listErr        error
	openErrForName map[string]error
}

func (b *memBackend) List(ctx context.Context) ([]nbd.ExportInfo, error) {
	if b.listErr != nil {
		return nil, b.listErr
	}
	var out []nbd.ExportInfo
	for _, e := range b.exports {
		out = append(out, nbd.ExportInfo{Name: e.name, Description: e.desc, Size: e.Size(), ReadOnly: e.ro})
	}
	return out, nil
}

func (b *memBackend) Open(ctx context.Context, name string) (nbd.Export, io.Closer, error) {
	if err := b.openErrForName[name]; err != nil {
		return nil, nil, err
	}
	for _, e := range b.exports {
		if e.name == name {
			b.opens.Add(1)
			return e, closerFunc(func() error { b.closes.Add(1); return nil }), nil
		}
	}
	return nil, nil, fmt.Errorf("export %q: %w", name, nbdwire.ErrUnknownExport)
}

type closerFunc func() error

func (f closerFunc) Close() error { return f() }

type harness struct {
	t       testing.TB
	srv     *nbd.Server
	addr    string
	backend *memBackend
	logs    *syncBuffer
	served  chan error
}

// syncBuffer is a log sink safe for concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startServer serves exports on 127.0.0.1:0. edit, if set, changes the
// config first. Cleanup closes the server and checks Serve's result.
func startServer(t testing.TB, edit func(*nbd.Config), exports ...*memExport) *harness {
	t.Helper()
	h := &harness{t: t, backend: &memBackend{exports: exports}, logs: &syncBuffer{}, served: make(chan error, 1)}
	cfg := nbd.Config{
		Backend: h.backend,
		Logger:  slog.New(slog.NewTextHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if edit != nil {
		edit(&cfg)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h.addr = l.Addr().String()
	h.srv = nbd.NewServer(cfg)
	go func() { h.served <- h.srv.Serve(l) }()
	t.Cleanup(func() {
		if err := h.srv.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := <-h.served; !errors.Is(err, nbd.ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
		if t.Failed() {
			t.Logf("server log:\n%s", h.logs.String())
		}
	})
	return h
}

// waitFor polls cond for up to 5s.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func pattern(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = seed + byte(i*7) + byte(i>>9)
	}
	return p
}

// gate blocks export calls at offset 0 until released, honouring ctx.
type gate struct {
	entered chan struct{}
	release chan struct{}
}

func newGate() *gate { return &gate{entered: make(chan struct{}, 16), release: make(chan struct{})} }

func (g *gate) hook(ctx context.Context, op string, off, n uint64) error {
	if off != 0 || op == "flush" {
		return nil
	}
	g.entered <- struct{}{}
	select {
	case <-g.release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// needTool returns the path of a client tool.
func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	if os.Getenv("CI") == "" {
		t.Skipf("%s not installed", name)
	}
	t.Fatalf("%s not installed (CI=%q): %v", name, os.Getenv("CI"), err)
	return ""
}

// testPKI is a cluster CA with a storage server and its clients, made by
// tlsconf as 'segmap certs init' does.
type testPKI struct {
	dir                             string
	storage, agent, controller, adm *tlsconf.Material
}

func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	dir := t.TempDir()
	err := tlsconf.Init(dir, tlsconf.InitOptions{
		Controllers: []string{"controller"},
		Agents:      []string{"a1"},
		Storage:     []string{"s1"},
		Admin:       true,
	})
	if err != nil {
		t.Fatal(err)
	}
	load := func(role, name string) *tlsconf.Material {
		m, err := tlsconf.DirFiles(dir, role, name).Load()
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	return &testPKI{
		dir:        dir,
		storage:    load(tlsconf.RoleStorage, "s1"),
		agent:      load(tlsconf.RoleAgent, "a1"),
		controller: load(tlsconf.RoleController, "controller"),
		adm:        load(tlsconf.RoleAdmin, tlsconf.RoleAdmin),
	}
}

// serverTLS is how a storage node configures TLS: agents and the
// controller may connect.
func (p *testPKI) serverTLS(required bool) func(*nbd.Config) {
	return func(c *nbd.Config) {
		c.TLS = p.storage.Server(tlsconf.RoleAgent, tlsconf.RoleController)
		c.TLSRequired = required
	}
}

// scriptConn is a net.Conn whose reads replay a script and then return
// io.EOF, and whose writes are discarded (counted). Unlike net.Pipe, it
// lets the client's side end without breaking the server's replies, so
// every input byte is processed; nothing waits on a clock.
type scriptConn struct {
	mu      sync.Mutex
	r       *bytes.Reader
	written int
	closed  bool
	out     *bytes.Buffer // if set, records what the server wrote
}

func newScriptConn(script []byte) *scriptConn { return &scriptConn{r: bytes.NewReader(script)} }

func (c *scriptConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, net.ErrClosed
	}
	return c.r.Read(p)
}

func (c *scriptConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, net.ErrClosed
	}
	c.written += len(p)
	if c.out != nil {
		c.out.Write(p)
	}
	return len(p), nil
}

func (c *scriptConn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	return nil
}

func (c *scriptConn) LocalAddr() net.Addr { return scriptAddr{} }

func (c *scriptConn) RemoteAddr() net.Addr { return scriptAddr{} }

func (c *scriptConn) SetDeadline(t time.Time) error { return nil }

func (c *scriptConn) SetReadDeadline(t time.Time) error { return nil }

func (c *scriptConn) SetWriteDeadline(t time.Time) error { return nil }

type scriptAddr struct{}

func (scriptAddr) Network() string { return "script" }

func (scriptAddr) String() string { return "script" }

// requestHeader is the decoded fixed part of a transmission request.
type requestHeader struct {
	flags  uint16
	typ    nbdwire.Command
	cookie uint64
	off    uint64
	length uint32
}

// decodeRequest decodes a request header; ok is false on a bad magic.
func decodeRequest(b *[nbdwire.RequestSize]byte) (h requestHeader, ok bool) {
	if be.Uint32(b[0:]) != nbdwire.MagicRequest {
		return h, false
	}
	return requestHeader{
		flags:  be.Uint16(b[4:]),
		typ:    nbdwire.Command(be.Uint16(b[6:])),
		cookie: be.Uint64(b[8:]),
		off:    be.Uint64(b[16:]),
		length: be.Uint32(b[24:]),
	}, true
}
