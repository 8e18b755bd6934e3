package nbd

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"segmap/internal/leaktest"
	"segmap/internal/nbd/nbdwire"
)

// ---- leak checks ----

// TestMain fails the package if goroutines started by its code are still
// running a few seconds after the last test. Only goroutines with this
// package's functions on their stack count: the fuzzing engine starts
// goroutines of its own.
func TestMain(m *testing.M) {
	leaktest.VerifyTestMain(m, leaktest.Matching("segmap/internal/nbd."))
}

// checkGoroutines fails t if, after its cleanups, goroutines it started
// are still running 2 s later. Call it first, so its cleanup runs last.
func checkGoroutines(t testing.TB) {
	t.Helper()
	leaktest.Check(t, leaktest.Within(2*time.Second))
}

// ---- in-memory export and backend ----

// memExport is an in-memory Export. hook, if set, runs first in every
// method (op is "read", "write", "flush", "trim", "zero") and may sleep,
// block, panic or fail the call.
type memExport struct {
	name, desc string
	ro         bool
	// noExtents: Open returns it without its ExtentLister.
	noExtents bool
	hook      func(ctx context.Context, op string, off, n uint64) error
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

func (m *memExport) Size() uint64   { return uint64(len(m.data)) }
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

// Extents reports each 512-byte block (the last may be shorter) that is
// all zeroes as a hole, the others as data, one block per call, so that the
// server has to merge. (A real export must not read data to find holes.)
func (m *memExport) Extents(ctx context.Context, off, n uint64, fn func(uint64, ExtentFlags) bool) error {
	if err := m.run(ctx, "extents", off, n); err != nil {
		return err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	end := off + n
	for off < end {
		blk := off / 512 * 512
		next := min(blk+512, uint64(len(m.data)))
		var f ExtentFlags
		if !slices.ContainsFunc(m.data[blk:next], func(b byte) bool { return b != 0 }) {
			f = ExtentHole | ExtentZero
		}
		if !fn(next-off, f) {
			return nil
		}
		off = next
	}
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

func (b *memBackend) List(ctx context.Context) ([]ExportInfo, error) {
	if b.listErr != nil {
		return nil, b.listErr
	}
	var out []ExportInfo
	for _, e := range b.exports {
		out = append(out, ExportInfo{Name: e.name, Description: e.desc, Size: e.Size(), ReadOnly: e.ro})
	}
	return out, nil
}

func (b *memBackend) Open(ctx context.Context, name string) (Export, io.Closer, error) {
	if err := b.openErrForName[name]; err != nil {
		return nil, nil, err
	}
	for _, e := range b.exports {
		if e.name == name {
			b.opens.Add(1)
			var exp Export = e
			if e.noExtents {
				exp = struct{ Export }{e} // hides Extents
			}
			return exp, closerFunc(func() error { b.closes.Add(1); return nil }), nil
		}
	}
	return nil, nil, fmt.Errorf("export %q: %w", name, nbdwire.ErrUnknownExport)
}

type closerFunc func() error

func (f closerFunc) Close() error { return f() }

// ---- server harness ----

type harness struct {
	t       testing.TB
	srv     *Server
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
func startServer(t testing.TB, edit func(*Config), exports ...*memExport) *harness {
	t.Helper()
	h := &harness{t: t, backend: &memBackend{exports: exports}, logs: &syncBuffer{}, served: make(chan error, 1)}
	cfg := Config{
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
	h.srv = NewServer(cfg)
	go func() { h.served <- h.srv.Serve(l) }()
	t.Cleanup(func() {
		if err := h.srv.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := <-h.served; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
		if t.Failed() {
			t.Logf("server log:\n%s", h.logs.String())
		}
	})
	return h
}

// numConns is the number of connections the server tracks.
func (s *Server) numConns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.mu.conns)
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

// ---- test client: handshake ----

type client struct {
	t  testing.TB
	nc net.Conn
	rd *bufio.Reader
}

// dial connects and reads the server's greeting.
func dial(t testing.TB, addr string) *client {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	c := &client{t: t, nc: nc, rd: bufio.NewReader(nc)}
	var g [18]byte
	c.readFull(g[:])
	if be.Uint64(g[0:]) != nbdwire.MagicNBD || be.Uint64(g[8:]) != nbdwire.MagicOpts {
		t.Fatalf("bad greeting % x", g)
	}
	if f := be.Uint16(g[16:]); f != nbdwire.HFlagFixedNewstyle|nbdwire.HFlagNoZeroes {
		t.Fatalf("handshake flags %#x", f)
	}
	return c
}

// dialFlags connects and sends the client flags.
func dialFlags(t testing.TB, addr string, flags uint32) *client {
	c := dial(t, addr)
	c.write(be.AppendUint32(nil, flags))
	return c
}

func (c *client) readFull(p []byte) {
	c.t.Helper()
	if _, err := io.ReadFull(c.rd, p); err != nil {
		c.t.Fatalf("read: %v", err)
	}
}

func (c *client) write(p []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(p); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// expectClosed checks that the server hangs up.
func (c *client) expectClosed() {
	c.t.Helper()
	c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	// A reset counts: closing a socket with unread input sends an RST.
	n, err := io.Copy(io.Discard, c.rd)
	if err != nil && !isReset(err) {
		c.t.Fatalf("want the server to close the connection; got %v after %d bytes", err, n)
	}
}

func optHeader(opt nbdwire.Option, n uint32) []byte {
	b := be.AppendUint64(nil, nbdwire.MagicOpts)
	b = be.AppendUint32(b, uint32(opt))
	return be.AppendUint32(b, n)
}

func (c *client) sendOpt(opt nbdwire.Option, data []byte) {
	c.t.Helper()
	c.write(append(optHeader(opt, uint32(len(data))), data...))
}

type optReply struct {
	opt  nbdwire.Option
	typ  nbdwire.RepType
	data []byte
}

func (c *client) readOptReply() optReply {
	c.t.Helper()
	var h [20]byte
	c.readFull(h[:])
	if m := be.Uint64(h[0:]); m != nbdwire.MagicOptReply {
		c.t.Fatalf("option reply magic %#x", m)
	}
	r := optReply{opt: nbdwire.Option(be.Uint32(h[8:])), typ: nbdwire.RepType(be.Uint32(h[12:]))}
	n := be.Uint32(h[16:])
	if n > 1<<20 {
		c.t.Fatalf("option reply of %d bytes", n)
	}
	r.data = make([]byte, n)
	c.readFull(r.data)
	return r
}

// opt sends an option and reads its replies up to the final one (ACK or an
// error); it checks that each reply names the option.
func (c *client) opt(opt nbdwire.Option, data []byte) (infos []optReply, final optReply) {
	c.t.Helper()
	c.sendOpt(opt, data)
	for {
		r := c.readOptReply()
		if r.opt != opt {
			c.t.Fatalf("reply to %v names %v", opt, r.opt)
		}
		if r.typ == nbdwire.RepAck || r.typ&nbdwire.RepErr != 0 {
			return infos, r
		}
		infos = append(infos, r)
	}
}

// expectFinal sends an option and checks its final reply type.
func (c *client) expectFinal(opt nbdwire.Option, data []byte, want nbdwire.RepType) []optReply {
	c.t.Helper()
	infos, final := c.opt(opt, data)
	if final.typ != want {
		c.t.Fatalf("%v: got %v (%q), want %v", opt, final.typ, final.data, want)
	}
	return infos
}

func infoData(name string, reqs ...uint16) []byte {
	b := be.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = be.AppendUint16(b, uint16(len(reqs)))
	for _, r := range reqs {
		b = be.AppendUint16(b, r)
	}
	return b
}

// metaData is the data of LIST_META_CONTEXT and SET_META_CONTEXT.
func metaData(name string, queries ...string) []byte {
	b := be.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = be.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = be.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// exportInfo is what NBD_REP_INFO replies said.
type exportInfo struct {
	size                 uint64
	flags                uint16
	minBS, prefBS, maxBS uint32
	name, desc           *string
}

func parseInfos(t testing.TB, rs []optReply) exportInfo {
	t.Helper()
	var ei exportInfo
	seen := false
	for _, r := range rs {
		if r.typ != nbdwire.RepInfo || len(r.data) < 2 {
			t.Fatalf("unexpected reply %v % x", r.typ, r.data)
		}
		d := r.data[2:]
		switch be.Uint16(r.data) {
		case nbdwire.InfoExport:
			if len(d) != 10 {
				t.Fatalf("NBD_INFO_EXPORT of %d bytes", len(d))
			}
			ei.size, ei.flags, seen = be.Uint64(d), be.Uint16(d[8:]), true
		case nbdwire.InfoBlockSize:
			if len(d) != 12 {
				t.Fatalf("NBD_INFO_BLOCK_SIZE of %d bytes", len(d))
			}
			ei.minBS, ei.prefBS, ei.maxBS = be.Uint32(d), be.Uint32(d[4:]), be.Uint32(d[8:])
		case nbdwire.InfoName:
			s := string(d)
			ei.name = &s
		case nbdwire.InfoDescription:
			s := string(d)
			ei.desc = &s
		}
	}
	if !seen {
		t.Fatal("no NBD_INFO_EXPORT")
	}
	return ei
}

// goExport selects an export with NBD_OPT_GO after optionally negotiating
// structured replies, and returns a transmission client.
func (c *client) goExport(name string, structured bool) *txClient {
	c.t.Helper()
	if structured {
		c.expectFinal(nbdwire.OptStructuredReply, nil, nbdwire.RepAck)
	}
	infos := c.expectFinal(nbdwire.OptGo, infoData(name, nbdwire.InfoBlockSize), nbdwire.RepAck)
	ei := parseInfos(c.t, infos)
	return c.transmission(ei.size, ei.flags, structured)
}

// connect dials and enters transmission on the export.
func connect(t testing.TB, addr, name string, structured bool) *txClient {
	return dialFlags(t, addr, nbdwire.CFlagFixedNewstyle|nbdwire.CFlagNoZeroes).goExport(name, structured)
}

// ---- test client: transmission ----

type txClient struct {
	t          testing.TB
	nc         net.Conn
	rd         *bufio.Reader
	size       uint64
	flags      uint16
	structured bool

	wmu sync.Mutex

	mu struct {
		sync.Mutex
		next     uint64
		pending  map[uint64]*call
		order    []uint64 // cookies in completion order
		protoErr error
	}
	readerDone chan struct{}
	readErr    error // set before readerDone is closed
}

// call is one request and, once done is closed, its reply.
type call struct {
	cookie uint64
	typ    nbdwire.Command
	off    uint64
	length uint32
	data   []byte   // READ result
	status [][]byte // BLOCK_STATUS chunk payloads, one per context
	errno  uint32
	msg    string
	chunks int
	done   chan struct{}
}

func (c *client) transmission(size uint64, flags uint16, structured bool) *txClient {
	tc := &txClient{t: c.t, nc: c.nc, rd: c.rd, size: size, flags: flags, structured: structured, readerDone: make(chan struct{})}
	tc.mu.pending = make(map[uint64]*call)
	c.nc.SetDeadline(time.Time{})
	go tc.readReplies()
	c.t.Cleanup(tc.close)
	return tc
}

// close hangs up and reports protocol errors the reader saw.
func (tc *txClient) close() {
	tc.nc.Close()
	<-tc.readerDone
	tc.mu.Lock()
	defer tc.mu.Unlock()
	if tc.mu.protoErr != nil {
		tc.t.Errorf("client saw a protocol error: %v", tc.mu.protoErr)
	}
}

func (tc *txClient) protocolError(format string, args ...any) {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	if tc.mu.protoErr == nil {
		tc.mu.protoErr = fmt.Errorf(format, args...)
	}
}

func (tc *txClient) readReplies() {
	defer close(tc.readerDone)
	tc.readErr = tc.readLoop()
}

func (tc *txClient) readLoop() error {
	var h [20]byte
	for {
		if _, err := io.ReadFull(tc.rd, h[:4]); err != nil {
			return err
		}
		switch m := be.Uint32(h[:]); m {
		case nbdwire.MagicSimpleReply:
			if _, err := io.ReadFull(tc.rd, h[4:16]); err != nil {
				return err
			}
			cl := tc.lookup(be.Uint64(h[8:]))
			if cl == nil {
				return nil
			}
			if tc.structured && cl.typ == nbdwire.CmdRead {
				tc.protocolError("simple reply to a READ after structured replies")
			}
			cl.errno = be.Uint32(h[4:])
			if cl.typ == nbdwire.CmdRead && cl.errno == 0 {
				cl.data = make([]byte, cl.length)
				if _, err := io.ReadFull(tc.rd, cl.data); err != nil {
					return err
				}
			}
			tc.complete(cl)
		case nbdwire.MagicChunk:
			if !tc.structured {
				tc.protocolError("structured reply without negotiation")
			}
			if _, err := io.ReadFull(tc.rd, h[4:20]); err != nil {
				return err
			}
			flags, typ, n := be.Uint16(h[4:]), be.Uint16(h[6:]), be.Uint32(h[16:])
			cl := tc.lookup(be.Uint64(h[8:]))
			if cl == nil {
				return nil
			}
			if n > nbdwire.MaxPayload+8 {
				tc.protocolError("chunk of %d bytes", n)
				return nil
			}
			p := make([]byte, n)
			if _, err := io.ReadFull(tc.rd, p); err != nil {
				return err
			}
			cl.chunks++
			switch typ {
			case nbdwire.ChunkNone:
				if n != 0 || flags&nbdwire.ReplyFlagDone == 0 {
					tc.protocolError("bad NONE chunk len %d flags %#x", n, flags)
				}
			case nbdwire.ChunkOffsetData:
				off := be.Uint64(p)
				if cl.typ != nbdwire.CmdRead || n < 9 || off < cl.off || off-cl.off+uint64(n-8) > uint64(cl.length) {
					tc.protocolError("bad OFFSET_DATA chunk for %v", cl.typ)
					return nil
				}
				if cl.data == nil {
					cl.data = make([]byte, cl.length)
				}
				copy(cl.data[off-cl.off:], p[8:])
			case nbdwire.ChunkBlockStatus:
				if cl.typ != nbdwire.CmdBlockStatus || n < 12 || (n-4)%8 != 0 {
					tc.protocolError("bad BLOCK_STATUS chunk of %d bytes for %v", n, cl.typ)
					return nil
				}
				cl.status = append(cl.status, p)
			case nbdwire.ChunkError:
				if n < 6 || int(be.Uint16(p[4:])) != int(n)-6 || be.Uint32(p) == 0 {
					tc.protocolError("bad ERROR chunk % x", p)
					return nil
				}
				cl.errno, cl.msg = be.Uint32(p), string(p[6:])
			default:
				tc.protocolError("unexpected chunk type %d", typ)
				return nil
			}
			if flags&nbdwire.ReplyFlagDone != 0 {
				tc.complete(cl)
			}
		default:
			tc.protocolError("reply magic %#x", m)
			return nil
		}
	}
}

func (tc *txClient) lookup(cookie uint64) *call {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	cl := tc.mu.pending[cookie]
	if cl == nil {
		if tc.mu.protoErr == nil {
			tc.mu.protoErr = fmt.Errorf("reply to unknown cookie %d", cookie)
		}
	}
	return cl
}

func (tc *txClient) complete(cl *call) {
	tc.mu.Lock()
	delete(tc.mu.pending, cl.cookie)
	tc.mu.order = append(tc.mu.order, cl.cookie)
	tc.mu.Unlock()
	close(cl.done)
}

func requestBytes(typ nbdwire.Command, flags uint16, cookie, off uint64, length uint32) []byte {
	b := be.AppendUint32(make([]byte, 0, nbdwire.RequestSize), nbdwire.MagicRequest)
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, uint16(typ))
	b = be.AppendUint64(b, cookie)
	b = be.AppendUint64(b, off)
	return be.AppendUint32(b, length)
}

// start sends a request (with payload for a WRITE) and returns its call.
func (tc *txClient) start(typ nbdwire.Command, flags uint16, off uint64, length uint32, payload []byte) *call {
	tc.mu.Lock()
	tc.mu.next++
	cl := &call{cookie: tc.mu.next<<8 | 0x5a, typ: typ, off: off, length: length, done: make(chan struct{})}
	if typ != nbdwire.CmdDisc {
		tc.mu.pending[cl.cookie] = cl
	}
	tc.mu.Unlock()
	tc.wmu.Lock()
	defer tc.wmu.Unlock()
	if _, err := tc.nc.Write(append(requestBytes(typ, flags, cl.cookie, off, length), payload...)); err != nil {
		tc.t.Errorf("send %v: %v", typ, err)
	}
	return cl
}

// wait waits for the reply.
func (cl *call) wait(t testing.TB) *call {
	t.Helper()
	select {
	case <-cl.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("no reply to %v at %d", cl.typ, cl.off)
	}
	return cl
}

func (tc *txClient) do(typ nbdwire.Command, flags uint16, off uint64, length uint32, payload []byte) *call {
	tc.t.Helper()
	return tc.start(typ, flags, off, length, payload).wait(tc.t)
}

func (tc *txClient) read(off uint64, n uint32) []byte {
	tc.t.Helper()
	cl := tc.do(nbdwire.CmdRead, 0, off, n, nil)
	if cl.errno != 0 {
		tc.t.Fatalf("read %d+%d: errno %d (%s)", off, n, cl.errno, cl.msg)
	}
	return cl.data
}

func (tc *txClient) write(off uint64, p []byte, flags uint16) {
	tc.t.Helper()
	if cl := tc.do(nbdwire.CmdWrite, flags, off, uint32(len(p)), p); cl.errno != 0 {
		tc.t.Fatalf("write %d+%d: errno %d (%s)", off, len(p), cl.errno, cl.msg)
	}
}

func (tc *txClient) expectErrno(cl *call, want uint32) {
	tc.t.Helper()
	if cl.errno != want {
		tc.t.Fatalf("%v %d+%d: errno %d (%q), want %d", cl.typ, cl.off, cl.length, cl.errno, cl.msg, want)
	}
	if want != 0 && tc.structured && cl.msg == "" {
		tc.t.Errorf("%v: structured error without a message", cl.typ)
	}
}

// expectClosed waits for the server to hang up.
func (tc *txClient) expectClosed() {
	tc.t.Helper()
	select {
	case <-tc.readerDone:
		if tc.readErr != io.EOF && !errors.Is(tc.readErr, net.ErrClosed) && !isReset(tc.readErr) { //nolint:errorlint // the reader returns io.EOF itself, unwrapped
			tc.t.Fatalf("reader ended with %v, want EOF", tc.readErr)
		}
	case <-time.After(5 * time.Second):
		tc.t.Fatal("server did not close the connection")
	}
}

func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

func (tc *txClient) order() []uint64 {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	return slices.Clone(tc.mu.order)
}

func pattern(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = seed + byte(i*7) + byte(i>>9)
	}
	return p
}

func modes(t *testing.T, f func(t *testing.T, structured bool)) {
	for _, s := range []bool{false, true} {
		name := "simple"
		if s {
			name = "structured"
		}
		t.Run(name, func(t *testing.T) { f(t, s) })
	}
}

// ---- handshake tests ----

func TestHandshakeExportName(t *testing.T) {
	for _, noZeroes := range []bool{false, true} {
		t.Run(fmt.Sprintf("noZeroes=%v", noZeroes), func(t *testing.T) {
			checkGoroutines(t)
			disk := newMem("disk", 1<<20)
			h := startServer(t, nil, disk)
			flags := nbdwire.CFlagFixedNewstyle
			if noZeroes {
				flags |= nbdwire.CFlagNoZeroes
			}
			c := dialFlags(t, h.addr, flags)
			c.sendOpt(nbdwire.OptExportName, []byte("disk"))
			var b [10]byte
			c.readFull(b[:])
			size, tflags := be.Uint64(b[:]), be.Uint16(b[8:])
			if size != 1<<20 {
				t.Fatalf("size %d", size)
			}
			if want := transmissionFlags(false, false); tflags != want {
				t.Fatalf("flags %#x, want %#x", tflags, want)
			}
			if !noZeroes {
				var z [nbdwire.ZeroPadSize]byte
				c.readFull(z[:])
				if z != [nbdwire.ZeroPadSize]byte{} {
					t.Fatal("padding is not zero")
				}
			}
			tc := c.transmission(size, tflags, false)
			tc.write(4096, []byte("hello"), 0)
			if got := tc.read(4096, 5); string(got) != "hello" {
				t.Fatalf("read %q", got)
			}
		})
	}
}

func TestHandshakeExportNameUnknownCloses(t *testing.T) {
	checkGoroutines(t)
	h := startServer(t, nil, newMem("disk", 4096))
	for _, name := range []string{"nope", ""} {
		c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
		c.sendOpt(nbdwire.OptExportName, []byte(name))
		c.expectClosed()
	}
	if n := h.backend.opens.Load(); n != 0 {
		t.Fatalf("%d opens", n)
	}
}

func TestHandshakeInfoThenGo(t *testing.T) {
	checkGoroutines(t)
	disk := newMem("disk", 3<<20)
	h := startServer(t, nil, disk)
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle|nbdwire.CFlagNoZeroes)

	infos := c.expectFinal(nbdwire.OptInfo, infoData("disk", nbdwire.InfoName, nbdwire.InfoDescription, nbdwire.InfoBlockSize), nbdwire.RepAck)
	ei := parseInfos(t, infos)
	if ei.size != 3<<20 || ei.flags != transmissionFlags(false, false) {
		t.Fatalf("info %+v", ei)
	}
	if ei.minBS != 1 || ei.prefBS != 4096 || ei.maxBS != 32<<20 {
		t.Fatalf("block sizes %d/%d/%d", ei.minBS, ei.prefBS, ei.maxBS)
	}
	if ei.name == nil || *ei.name != "disk" || ei.desc == nil || *ei.desc != "test disk disk" {
		t.Fatalf("name %v desc %v", ei.name, ei.desc)
	}
	if n := h.backend.opens.Load(); n != 0 {
		t.Fatalf("INFO opened the export %d times", n)
	}

	// Without requests: the export and block sizes, no name.
	ei = parseInfos(t, c.expectFinal(nbdwire.OptInfo, infoData("disk"), nbdwire.RepAck))
	if ei.name != nil || ei.desc != nil || ei.maxBS != nbdwire.MaxPayload {
		t.Fatalf("unrequested info %+v", ei)
	}

	c.expectFinal(nbdwire.OptStructuredReply, nil, nbdwire.RepAck)
	infos = c.expectFinal(nbdwire.OptGo, infoData("disk", nbdwire.InfoDescription), nbdwire.RepAck)
	ei = parseInfos(t, infos)
	if ei.flags != transmissionFlags(false, true) || ei.flags&nbdwire.TFlagSendDF == 0 {
		t.Fatalf("GO flags %#x", ei.flags)
	}
	if ei.desc == nil || *ei.desc != disk.desc {
		t.Fatalf("GO description %v", ei.desc)
	}
	tc := c.transmission(ei.size, ei.flags, true)
	tc.write(0, []byte("abc"), 0)
	if got := tc.read(0, 3); string(got) != "abc" {
		t.Fatalf("read %q", got)
	}
	if n := h.backend.opens.Load(); n != 1 {
		t.Fatalf("%d opens", n)
	}
	tc.close()
	waitFor(t, "export closed", func() bool { return h.backend.closes.Load() == 1 })
}

func TestHandshakeList(t *testing.T) {
	checkGoroutines(t)
	exps := []*memExport{newMem("disk", 1<<20), newMem("ro", 4096), newMem("third", 512)}
	exps[1].ro = true
	h := startServer(t, nil, exps...)
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle|nbdwire.CFlagNoZeroes)
	replies := c.expectFinal(nbdwire.OptList, nil, nbdwire.RepAck)
	if len(replies) != len(exps) {
		t.Fatalf("%d replies for %d exports", len(replies), len(exps))
	}
	for i, r := range replies {
		if r.typ != nbdwire.RepServer || len(r.data) < 4 {
			t.Fatalf("reply %v % x", r.typ, r.data)
		}
		n := be.Uint32(r.data)
		if int(n) > len(r.data)-4 {
			t.Fatalf("name length %d in %d bytes", n, len(r.data))
		}
		name, desc := string(r.data[4:4+n]), string(r.data[4+n:])
		if name != exps[i].name || desc != exps[i].desc {
			t.Fatalf("entry %d: %q %q", i, name, desc)
		}
	}
	// The connection goes on.
	connectOn(t, c, "third")
}

// connectOn enters transmission on an open handshake connection and checks
// one read.
func connectOn(t testing.TB, c *client, name string) {
	t.Helper()
	tc := c.goExport(name, false)
	tc.read(0, 1)
}

func TestHandshakeListError(t *testing.T) {
	checkGoroutines(t)
	h := startServer(t, nil, newMem("disk", 4096))
	h.backend.listErr = errors.New("backend down")
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	c.expectFinal(nbdwire.OptList, nil, nbdwire.RepErrPolicy)
	c.expectFinal(nbdwire.OptInfo, infoData("disk"), nbdwire.RepErrUnknown)
	connectOn(t, c, "disk")
}

func TestHandshakeGoUnknownThenGood(t *testing.T) {
	checkGoroutines(t)
	h := startServer(t, nil, newMem("disk", 1<<20))
	h.backend.openErrForName = map[string]error{"broken": errors.New("disk offline")}
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle|nbdwire.CFlagNoZeroes)
	for _, name := range []string{"nope", "", "broken"} {
		if infos := c.expectFinal(nbdwire.OptGo, infoData(name, nbdwire.InfoBlockSize), nbdwire.RepErrUnknown); len(infos) != 0 {
			t.Fatalf("GO %q: %d info replies before the error", name, len(infos))
		}
		c.expectFinal(nbdwire.OptInfo, infoData(name), nbdwire.RepErrUnknown)
	}
	connectOn(t, c, "disk")
	if n := h.backend.opens.Load(); n != 1 {
		t.Fatalf("%d opens", n)
	}
}

func TestHandshakeAbort(t *testing.T) {
	checkGoroutines(t)
	h := startServer(t, nil, newMem("disk", 4096))
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	c.expectFinal(nbdwire.OptAbort, nil, nbdwire.RepAck)
	c.expectClosed()

	// A client that aborts and hangs up without reading the reply.
	c = dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	c.sendOpt(nbdwire.OptAbort, []byte("ignored"))
	c.nc.Close()
	waitFor(t, "connections to end", func() bool { return h.srv.numConns() == 0 })
}

func TestHandshakeStartTLSRefused(t *testing.T) {
	checkGoroutines(t)
	h := startServer(t, nil, newMem("disk", 4096))
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	c.expectFinal(nbdwire.OptStartTLS, nil, nbdwire.RepErrPolicy)
	c.expectFinal(nbdwire.OptStartTLS, []byte{1}, nbdwire.RepErrInvalid)
	connectOn(t, c, "disk")
}

func TestHandshakeUnsupportedOptions(t *testing.T) {
	checkGoroutines(t)
	h := startServer(t, nil, newMem("disk", 4096))
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	for _, o := range []struct {
		opt  nbdwire.Option
		data []byte
	}{
		{nbdwire.OptPeekExport, nil},
		{nbdwire.OptExtendedHeaders, nil},
		{0, nil},
		{12, []byte("whatever data")},
		{0xffffffff, nil},
	} {
		c.expectFinal(o.opt, o.data, nbdwire.RepErrUnsup)
	}
	connectOn(t, c, "disk")
}

func TestHandshakeMalformedOptions(t *testing.T) {
	checkGoroutines(t)
	h := startServer(t, nil, newMem("disk", 4096))
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	longName := strings.Repeat("n", nbdwire.MaxString+1)
	for _, tt := range []struct {
		name string
		opt  nbdwire.Option
		data []byte
		want nbdwire.RepType
	}{
		{"list with data", nbdwire.OptList, []byte{0}, nbdwire.RepErrInvalid},
		{"structured reply with data", nbdwire.OptStructuredReply, []byte{1, 2}, nbdwire.RepErrInvalid},
		{"info too short", nbdwire.OptInfo, []byte{0, 0, 0}, nbdwire.RepErrInvalid},
		{"info name past the end", nbdwire.OptInfo, []byte{0, 0, 0, 9, 'd', 'i', 's', 'k', 0, 0}, nbdwire.RepErrInvalid},
		{"go name length huge", nbdwire.OptGo, []byte{0xff, 0xff, 0xff, 0xff, 0, 0}, nbdwire.RepErrInvalid},
		{"info count too big", nbdwire.OptGo, append(infoData("disk")[:8], 0, 2, 0, 1), nbdwire.RepErrInvalid},
		{"info trailing byte", nbdwire.OptInfo, append(infoData("disk", nbdwire.InfoName), 0), nbdwire.RepErrInvalid},
		{"name with NUL", nbdwire.OptGo, infoData("di\x00sk"), nbdwire.RepErrInvalid},
		{"name not UTF-8", nbdwire.OptInfo, infoData("\xff\xfe"), nbdwire.RepErrInvalid},
		{"name too long", nbdwire.OptGo, infoData(longName), nbdwire.RepErrInvalid},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c.t = t
			c.expectFinal(tt.opt, tt.data, tt.want)
		})
	}
	c.t = t
	connectOn(t, c, "disk")
	if n := h.backend.opens.Load(); n != 1 {
		t.Fatalf("%d opens", n)
	}
}

func TestHandshakeOversizedOption(t *testing.T) {
	checkGoroutines(t)
	h := startServer(t, nil, newMem("disk", 4096))

	// Above the bound: skipped and refused, the connection goes on.
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	c.expectFinal(nbdwire.OptInfo, make([]byte, maxOptionData+1), nbdwire.RepErrTooBig)
	c.expectFinal(nbdwire.OptList, nil, nbdwire.RepAck)
	connectOn(t, c, "disk")

	// Absurd: the server hangs up without reading (or allocating) it.
	c = dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	c.write(optHeader(nbdwire.OptInfo, 0xfffffff0))
	c.expectClosed()

	// An export name too long to read cannot be refused: hang up.
	c = dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	c.sendOpt(nbdwire.OptExportName, make([]byte, maxOptionData+1))
	c.expectClosed()
}

func TestHandshakeProtocolViolations(t *testing.T) {
	checkGoroutines(t)
	h := startServer(t, nil, newMem("disk", 4096))
	for _, tt := range []struct {
		name string
		send []byte
	}{
		{"unknown client flags", be.AppendUint32(nil, 1<<2)},
		{"bad option magic", append(be.AppendUint32(nil, nbdwire.CFlagFixedNewstyle), "NOTMAGIC\x00\x00\x00\x03\x00\x00\x00\x00"...)},
		// Truncated: the client hangs up mid-option.
		{"truncated header", append(be.AppendUint32(nil, nbdwire.CFlagFixedNewstyle), optHeader(nbdwire.OptGo, 10)[:9]...)},
		{"truncated data", append(append(be.AppendUint32(nil, nbdwire.CFlagFixedNewstyle), optHeader(nbdwire.OptGo, 10)...), 0, 0, 0)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := dial(t, h.addr)
			c.write(tt.send)
			if strings.HasPrefix(tt.name, "truncated") {
				c.nc.(*net.TCPConn).CloseWrite()
			}
			c.expectClosed()
		})
	}
	waitFor(t, "connections to end", func() bool { return h.srv.numConns() == 0 })
	connectOn(t, dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle), "disk")
}

func TestHandshakeTimeout(t *testing.T) {
	checkGoroutines(t)
	h := startServer(t, func(c *Config) { c.HandshakeTimeout = 100 * time.Millisecond }, newMem("disk", 4096))
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	start := time.Now()
	c.expectClosed()
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("closed after %v", d)
	}
	// A client that completes the handshake in time is not dropped later.
	tc := connect(t, h.addr, "disk", false)
	time.Sleep(200 * time.Millisecond)
	tc.read(0, 1)
}

// ---- transmission tests ----

func TestTransmissionIO(t *testing.T) {
	modes(t, func(t *testing.T, structured bool) {
		checkGoroutines(t)
		disk := newMem("disk", 4<<20)
		h := startServer(t, nil, disk)
		tc := connect(t, h.addr, "disk", structured)
		want := transmissionFlags(false, structured)
		if tc.flags != want || tc.flags&nbdwire.TFlagReadOnly != 0 {
			t.Fatalf("flags %#x, want %#x", tc.flags, want)
		}

		p := pattern(70000, 3)
		tc.write(123, p, 0)
		if got := tc.read(123, 70000); !bytes.Equal(got, p) {
			t.Fatal("read back differs")
		}
		if got := disk.snapshot(123, 70000); !bytes.Equal(got, p) {
			t.Fatal("export differs")
		}
		// The whole export in one request, and the largest payload.
		big := pattern(4<<20, 9)
		tc.write(0, big, 0)
		if got := tc.read(0, 4<<20); !bytes.Equal(got, big) {
			t.Fatal("4 MiB read back differs")
		}

		tc.write(8192, []byte("durable"), nbdwire.CmdFlagFUA)
		if disk.fuaWrites.Load() != 1 {
			t.Fatal("FUA not passed to WriteAt")
		}
		tc.expectErrno(tc.do(nbdwire.CmdFlush, 0, 0, 0, nil), 0)
		if disk.flushes.Load() != 1 {
			t.Fatal("no Flush")
		}

		tc.expectErrno(tc.do(nbdwire.CmdTrim, 0, 100, 50, nil), 0)
		if got := disk.snapshot(100, 50); !bytes.Equal(got, make([]byte, 50)) {
			t.Fatal("trim (which zeroes in memExport) did not reach the export")
		}
		tc.expectErrno(tc.do(nbdwire.CmdWriteZeroes, nbdwire.CmdFlagNoHole, 1000, 3000, nil), 0)
		if got := tc.read(999, 3002); got[0] == 0 || got[3001] == 0 || !bytes.Equal(got[1:3001], make([]byte, 3000)) {
			t.Fatal("write zeroes wrong")
		}
		if disk.noHoles.Load() != 1 {
			t.Fatal("NO_HOLE not passed")
		}
		tc.expectErrno(tc.do(nbdwire.CmdWriteZeroes, nbdwire.CmdFlagFUA, 0, 10, nil), 0)
		tc.expectErrno(tc.do(nbdwire.CmdTrim, nbdwire.CmdFlagFUA, 0, 10, nil), 0)
		if disk.flushes.Load() != 3 {
			t.Fatalf("FUA write zeroes/trim: %d flushes, want 3", disk.flushes.Load())
		}
		// FUA is accepted on any command once advertised.
		tc.expectErrno(tc.do(nbdwire.CmdRead, nbdwire.CmdFlagFUA, 0, 10, nil), 0)
		// The last byte of the export.
		tc.write(4<<20-1, []byte{0x77}, 0)
		if got := tc.read(4<<20-1, 1); got[0] != 0x77 {
			t.Fatal("last byte")
		}
		if structured {
			tc.expectErrno(tc.do(nbdwire.CmdRead, nbdwire.CmdFlagDF, 0, 65536, nil), 0)
		}
	})
}

func TestOutOfOrderReplies(t *testing.T) {
	checkGoroutines(t)
	const n = 64
	disk := newMem("disk", n*4096)
	copy(disk.data, pattern(n*4096, 1))
	// Later requests finish first.
	disk.hook = func(ctx context.Context, op string, off, _ uint64) error {
		if op == "read" {
			time.Sleep(time.Duration(n-off/4096) * 500 * time.Microsecond)
		}
		return nil
	}
	h := startServer(t, nil, disk)
	modes(t, func(t *testing.T, structured bool) {
		tc := connect(t, h.addr, "disk", structured)
		calls := make([]*call, n)
		for i := range calls {
			calls[i] = tc.start(nbdwire.CmdRead, 0, uint64(i)*4096, 4096, nil)
		}
		for i, cl := range calls {
			cl.wait(t)
			if cl.errno != 0 || !bytes.Equal(cl.data, disk.snapshot(i*4096, 4096)) {
				t.Fatalf("read %d: errno %d or wrong data", i, cl.errno)
			}
		}
		order := tc.order()
		if len(order) != n {
			t.Fatalf("%d replies", len(order))
		}
		if slices.IsSortedFunc(order, func(a, b uint64) int { return int(a>>8) - int(b>>8) }) {
			t.Fatal("replies came back in request order; the server serialised them")
		}
	})
}

func TestMaxInFlight(t *testing.T) {
	checkGoroutines(t)
	disk := newMem("disk", 1<<20)
	gate := make(chan struct{})
	var cur, peak atomic.Int64
	disk.hook = func(ctx context.Context, op string, off, n uint64) error {
		c := cur.Add(1)
		defer cur.Add(-1)
		for {
			p := peak.Load()
			if c <= p || peak.CompareAndSwap(p, c) {
				break
			}
		}
		<-gate
		return nil
	}
	h := startServer(t, func(c *Config) { c.MaxInFlight = 3 }, disk)
	tc := connect(t, h.addr, "disk", true)
	var calls []*call
	for i := range 10 {
		calls = append(calls, tc.start(nbdwire.CmdWrite, 0, uint64(i)*512, 512, make([]byte, 512)))
	}
	waitFor(t, "3 requests in the export", func() bool { return cur.Load() == 3 })
	time.Sleep(50 * time.Millisecond)
	if p := peak.Load(); p != 3 {
		t.Fatalf("%d requests in the export at once, want 3", p)
	}
	close(gate)
	for _, cl := range calls {
		tc.expectErrno(cl.wait(t), 0)
	}
	if p := peak.Load(); p != 3 {
		t.Fatalf("peak %d", p)
	}
}

func TestInvalidRequests(t *testing.T) {
	const size = 1 << 20
	modes(t, func(t *testing.T, structured bool) {
		checkGoroutines(t)
		disk := newMem("disk", size)
		h := startServer(t, nil, disk)
		tc := connect(t, h.addr, "disk", structured)
		bigRead := nbdwire.EINVAL
		if structured {
			bigRead = nbdwire.EOVERFLOW
		}
		dfRead := nbdwire.EINVAL
		if structured {
			dfRead = 0
		}
		for _, tt := range []struct {
			name    string
			typ     nbdwire.Command
			flags   uint16
			off     uint64
			length  uint32
			payload bool
			want    uint32
		}{
			{"read past end", nbdwire.CmdRead, 0, size - 1, 2, false, nbdwire.EINVAL},
			{"read at end", nbdwire.CmdRead, 0, size, 1, false, nbdwire.EINVAL},
			{"read offset overflow", nbdwire.CmdRead, 0, 1<<64 - 1, 2, false, nbdwire.EINVAL},
			{"write past end", nbdwire.CmdWrite, 0, size - 10, 11, true, nbdwire.EINVAL},
			{"write far past end", nbdwire.CmdWrite, 0, 1 << 40, 512, true, nbdwire.EINVAL},
			{"trim past end", nbdwire.CmdTrim, 0, size, 1, false, nbdwire.EINVAL},
			{"write zeroes past end", nbdwire.CmdWriteZeroes, 0, 1<<64 - 512, 1024, false, nbdwire.EINVAL},
			{"read zero length", nbdwire.CmdRead, 0, 0, 0, false, nbdwire.EINVAL},
			{"write zero length", nbdwire.CmdWrite, 0, 0, 0, false, nbdwire.EINVAL},
			{"trim zero length", nbdwire.CmdTrim, 0, 0, 0, false, nbdwire.EINVAL},
			{"write zeroes zero length", nbdwire.CmdWriteZeroes, 0, 0, 0, false, nbdwire.EINVAL},
			{"read above max payload", nbdwire.CmdRead, 0, 0, nbdwire.MaxPayload + 1, false, bigRead},
			{"unknown command", 99, 0, 0, 512, false, nbdwire.EINVAL},
			{"cache", nbdwire.CmdCache, 0, 0, 512, false, nbdwire.EINVAL},
			{"block status", nbdwire.CmdBlockStatus, 0, 0, 512, false, nbdwire.EINVAL},
			{"resize", nbdwire.CmdResize, 0, 0, 0, false, nbdwire.EINVAL},
			{"no hole on read", nbdwire.CmdRead, nbdwire.CmdFlagNoHole, 0, 512, false, nbdwire.EINVAL},
			{"fast zero", nbdwire.CmdWriteZeroes, nbdwire.CmdFlagFastZero, 0, 512, false, nbdwire.EINVAL},
			{"req one on read", nbdwire.CmdRead, nbdwire.CmdFlagReqOne, 0, 512, false, nbdwire.EINVAL},
			{"unknown flag on write", nbdwire.CmdWrite, 1 << 12, 0, 512, true, nbdwire.EINVAL},
			{"DF", nbdwire.CmdRead, nbdwire.CmdFlagDF, 0, 512, false, dfRead},
			{"flush with offset", nbdwire.CmdFlush, 0, 512, 0, false, nbdwire.EINVAL},
			{"flush with length", nbdwire.CmdFlush, 0, 0, 512, false, nbdwire.EINVAL},
		} {
			t.Run(tt.name, func(t *testing.T) {
				tc.t = t
				var p []byte
				if tt.payload {
					p = pattern(int(tt.length), 5)
				}
				tc.expectErrno(tc.do(tt.typ, tt.flags, tt.off, tt.length, p), tt.want)
				// The connection goes on, in step.
				tc.write(0, []byte{1, 2, 3}, 0)
				if got := tc.read(0, 3); !bytes.Equal(got, []byte{1, 2, 3}) {
					t.Fatalf("read after the error: %v", got)
				}
			})
		}
		tc.t = t
		if got := disk.snapshot(size-10, 10); !bytes.Equal(got, make([]byte, 10)) {
			t.Fatal("a refused write reached the export")
		}
	})
}

func TestReadOnlyExport(t *testing.T) {
	modes(t, func(t *testing.T, structured bool) {
		checkGoroutines(t)
		ro := newMem("ro", 1<<20)
		ro.ro = true
		copy(ro.data, "original")
		h := startServer(t, nil, ro)
		tc := connect(t, h.addr, "ro", structured)
		if tc.flags&nbdwire.TFlagReadOnly == 0 {
			t.Fatal("READ_ONLY not set")
		}
		if tc.flags&(nbdwire.TFlagSendTrim|nbdwire.TFlagSendWriteZeroes|nbdwire.TFlagSendFUA) != 0 {
			t.Fatalf("read-only export advertises writing features: %#x", tc.flags)
		}
		tc.expectErrno(tc.do(nbdwire.CmdWrite, 0, 0, 8, []byte("modified")), nbdwire.EPERM)
		tc.expectErrno(tc.do(nbdwire.CmdWrite, 0, 1<<30, 8, []byte("modified")), nbdwire.EPERM)
		tc.expectErrno(tc.do(nbdwire.CmdTrim, 0, 0, 8, nil), nbdwire.EPERM)
		tc.expectErrno(tc.do(nbdwire.CmdWriteZeroes, nbdwire.CmdFlagNoHole, 0, 8, nil), nbdwire.EPERM)
		if got := tc.read(0, 8); string(got) != "original" {
			t.Fatalf("read %q", got)
		}
		tc.expectErrno(tc.do(nbdwire.CmdFlush, 0, 0, 0, nil), 0)
	})
}

var errNoSpace = errors.New("container full")

func TestExportErrors(t *testing.T) {
	for _, tt := range []struct {
		name  string
		errno func(error) uint32
		want  uint32
	}{
		{"mapped", func(err error) uint32 {
			if errors.Is(err, errNoSpace) {
				return nbdwire.ENOSPC
			}
			return nbdwire.EIO
		}, nbdwire.ENOSPC},
		{"nil Errno", nil, nbdwire.EIO},
		{"Errno returns 0", func(error) uint32 { return 0 }, nbdwire.EIO},
	} {
		t.Run(tt.name, func(t *testing.T) {
			modes(t, func(t *testing.T, structured bool) {
				checkGoroutines(t)
				disk := newMem("disk", 1<<20)
				disk.hook = func(ctx context.Context, op string, off, n uint64) error {
					if off == 4096 {
						return fmt.Errorf("%s at %d: %w", op, off, errNoSpace)
					}
					return nil
				}
				h := startServer(t, func(c *Config) { c.Errno = tt.errno }, disk)
				tc := connect(t, h.addr, "disk", structured)
				for _, typ := range []nbdwire.Command{nbdwire.CmdWrite, nbdwire.CmdRead, nbdwire.CmdTrim, nbdwire.CmdWriteZeroes} {
					var p []byte
					if typ == nbdwire.CmdWrite {
						p = make([]byte, 512)
					}
					cl := tc.do(typ, 0, 4096, 512, p)
					tc.expectErrno(cl, tt.want)
					if structured && !strings.Contains(cl.msg, "container full") {
						t.Errorf("message %q", cl.msg)
					}
					tc.write(0, []byte{9}, 0)
					tc.read(0, 1)
				}
			})
		})
	}
}

func TestBadRequestMagicDisconnects(t *testing.T) {
	checkGoroutines(t)
	h := startServer(t, nil, newMem("disk", 1<<20))
	tc := connect(t, h.addr, "disk", false)
	tc.read(0, 1)
	bad := requestBytes(nbdwire.CmdRead, 0, 1, 0, 512)
	bad[0] ^= 0xff
	tc.nc.Write(bad)
	tc.expectClosed()
	waitFor(t, "export closed", func() bool { return h.backend.closes.Load() == 1 })
}

func TestOversizedWrite(t *testing.T) {
	modes(t, func(t *testing.T, structured bool) {
		checkGoroutines(t)
		disk := newMem("disk", 64<<20)
		h := startServer(t, nil, disk)
		tc := connect(t, h.addr, "disk", structured)
		// Above the maximum payload but not absurd: consumed, refused.
		n := nbdwire.MaxPayload + 1<<20
		tc.expectErrno(tc.do(nbdwire.CmdWrite, 0, 0, uint32(n), pattern(n, 1)), nbdwire.EINVAL)
		tc.write(0, []byte("ok"), 0)
		if got := tc.read(0, 2); string(got) != "ok" {
			t.Fatalf("read %q", got)
		}
		if got := disk.snapshot(2, 1024); !bytes.Equal(got, make([]byte, 1024)) {
			t.Fatal("refused payload reached the export")
		}
		// Absurd: the server hangs up rather than read 100 MiB.
		tc.start(nbdwire.CmdWrite, 0, 0, 100<<20, nil)
		tc.expectClosed()
	})
}

func TestPanicInExport(t *testing.T) {
	checkGoroutines(t)
	disk := newMem("disk", 1<<20)
	disk.hook = func(ctx context.Context, op string, off, n uint64) error {
		if op == "read" && off == 0 {
			panic("export bug")
		}
		return nil
	}
	var mapped atomic.Int64
	h := startServer(t, func(c *Config) {
		c.Errno = func(err error) uint32 { mapped.Add(1); return nbdwire.ENOSPC }
	}, disk)
	modes(t, func(t *testing.T, structured bool) {
		tc := connect(t, h.addr, "disk", structured)
		tc.expectErrno(tc.do(nbdwire.CmdRead, 0, 0, 512, nil), nbdwire.EIO)
		tc.read(512, 512)
	})
	if !strings.Contains(h.logs.String(), "export bug") {
		t.Fatal("panic not logged")
	}
	if mapped.Load() != 0 {
		t.Fatal("a panic went through Errno")
	}

	// A panicking Errno is recovered too.
	disk2 := newMem("disk", 4096)
	disk2.hook = func(context.Context, string, uint64, uint64) error { return errNoSpace }
	h2 := startServer(t, func(c *Config) { c.Errno = func(error) uint32 { panic("errno bug") } }, disk2)
	tc := connect(t, h2.addr, "disk", true)
	tc.expectErrno(tc.do(nbdwire.CmdFlush, 0, 0, 0, nil), nbdwire.EIO)
	tc.expectErrno(tc.do(nbdwire.CmdFlush, 0, 0, 0, nil), nbdwire.EIO)
}

func TestDiscAnswersInFlight(t *testing.T) {
	checkGoroutines(t)
	disk := newMem("disk", 1<<20)
	disk.hook = func(ctx context.Context, op string, off, n uint64) error {
		time.Sleep(30 * time.Millisecond)
		return nil
	}
	h := startServer(t, nil, disk)
	tc := connect(t, h.addr, "disk", true)
	var calls []*call
	for i := range 4 {
		calls = append(calls, tc.start(nbdwire.CmdWrite, 0, uint64(i)*512, 512, pattern(512, byte(i))))
	}
	tc.start(nbdwire.CmdDisc, 0, 0, 0, nil)
	for _, cl := range calls {
		tc.expectErrno(cl.wait(t), 0)
	}
	tc.expectClosed()
	waitFor(t, "export closed", func() bool { return h.backend.closes.Load() == 1 })
	for i := range 4 {
		if !bytes.Equal(disk.snapshot(i*512, 512), pattern(512, byte(i))) {
			t.Fatalf("write %d lost", i)
		}
	}
}

func TestClientHangupReleasesExport(t *testing.T) {
	checkGoroutines(t)
	h := startServer(t, nil, newMem("disk", 1<<20))
	tc := connect(t, h.addr, "disk", false)
	tc.read(0, 1)
	tc.close()
	waitFor(t, "export closed", func() bool { return h.backend.closes.Load() == 1 })
	waitFor(t, "connections to end", func() bool { return h.srv.numConns() == 0 })
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

func TestShutdownWaitsForInFlight(t *testing.T) {
	checkGoroutines(t)
	disk := newMem("disk", 1<<20)
	copy(disk.data, "payload")
	g := newGate()
	disk.hook = g.hook
	h := startServer(t, nil, disk)

	busy := connect(t, h.addr, "disk", true)
	idle := connect(t, h.addr, "disk", false)
	idle.read(512, 1) // surely in transmission
	shaking := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	read := busy.start(nbdwire.CmdRead, 0, 0, 7, nil)
	<-g.entered

	done := make(chan error, 1)
	go func() { done <- h.srv.Shutdown(context.Background()) }()
	idle.expectClosed()
	shaking.expectClosed()
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned %v with a request in flight", err)
	case <-time.After(50 * time.Millisecond):
	}
	if _, err := net.Dial("tcp", h.addr); err == nil {
		t.Fatal("listener still accepting")
	}
	close(g.release)
	read.wait(t)
	if read.errno != 0 || string(read.data) != "payload" {
		t.Fatalf("in-flight read: errno %d data %q", read.errno, read.data)
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	busy.expectClosed()
	if err := <-h.served; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
	h.served <- ErrServerClosed // for the cleanup
	if n := h.backend.closes.Load(); n != 2 {
		t.Fatalf("%d exports closed, want 2", n)
	}
}

func TestShutdownContextAndClose(t *testing.T) {
	checkGoroutines(t)
	disk := newMem("disk", 1<<20)
	g := newGate()
	disk.hook = g.hook
	h := startServer(t, nil, disk)
	tc := connect(t, h.addr, "disk", false)
	tc.start(nbdwire.CmdRead, 0, 0, 512, nil)
	<-g.entered
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := h.srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown: %v", err)
	}
	// Close cancels the export's context and ends the connection.
	if err := h.srv.Close(); err != nil {
		t.Fatal(err)
	}
	tc.expectClosed()
	if h.srv.numConns() != 0 {
		t.Fatal("connections left after Close")
	}
	// Serve after Close.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.srv.Serve(l); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve after Close: %v", err)
	}
}

// TestMultiConnModel runs random operations from several connections, one
// at a time, against a reference copy of the export.
func TestMultiConnModel(t *testing.T) {
	checkGoroutines(t)
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	rnd := newRand(seed)
	const size = 1 << 20
	disk := newMem("disk", size)
	h := startServer(t, nil, disk)
	model := make([]byte, size)
	var conns []*txClient
	for i := range 4 {
		conns = append(conns, connect(t, h.addr, "disk", i%2 == 1))
	}
	for i := range 400 {
		tc := conns[rnd.IntN(len(conns))]
		off := rnd.IntN(size)
		n := 1 + rnd.IntN(min(size-off, 70000))
		switch op := rnd.IntN(5); op {
		case 0, 1:
			p := make([]byte, n)
			for j := range p {
				p[j] = byte(rnd.IntN(256))
			}
			tc.write(uint64(off), p, uint16(rnd.IntN(2))*nbdwire.CmdFlagFUA)
			copy(model[off:], p)
		case 2:
			if got := tc.read(uint64(off), uint32(n)); !bytes.Equal(got, model[off:off+n]) {
				t.Fatalf("seed %d op %d: read %d+%d differs from the model", seed, i, off, n)
			}
		case 3:
			tc.expectErrno(tc.do(nbdwire.CmdWriteZeroes, 0, uint64(off), uint32(n), nil), 0)
			clear(model[off : off+n])
		case 4:
			tc.expectErrno(tc.do(nbdwire.CmdFlush, 0, 0, 0, nil), 0)
		}
	}
	if !bytes.Equal(disk.snapshot(0, size), model) {
		t.Fatalf("seed %d: export differs from the model", seed)
	}
}

// TestShutdownRefusesReceivedRequests: requests the connection had already
// received when Shutdown stopped it are answered ESHUTDOWN, not run.
func TestShutdownRefusesReceivedRequests(t *testing.T) {
	checkGoroutines(t)
	disk := newMem("disk", 1<<20)
	srv := NewServer(Config{Backend: &memBackend{exports: []*memExport{disk}}, Logger: slog.New(slog.DiscardHandler)})
	defer srv.Close()
	script := cat(clientFlags(nbdwire.CFlagFixedNewstyle|nbdwire.CFlagNoZeroes), opt(nbdwire.OptExportName, []byte("disk")),
		req(nbdwire.CmdWrite, 0, 0, 4), []byte("data"), req(nbdwire.CmdRead, 0, 0, 512), req(nbdwire.CmdFlush, 0, 0, 0))
	nc := newScriptConn(script)
	nc.out = &bytes.Buffer{}
	c := newConn(srv, nc)
	srv.track(c)
	c.stop() // as Shutdown does; a scripted conn ignores the deadline
	c.serve()
	out := nc.out.Bytes()
	const head = 18 + 10 // greeting, size and flags
	if len(out) != head+3*nbdwire.SimpleReplySize {
		t.Fatalf("server wrote %d bytes", len(out))
	}
	for i := range 3 {
		r := out[head+i*nbdwire.SimpleReplySize:]
		if be.Uint32(r) != nbdwire.MagicSimpleReply || be.Uint32(r[4:]) != nbdwire.ESHUTDOWN {
			t.Fatalf("reply %d: % x", i, r[:nbdwire.SimpleReplySize])
		}
	}
	if disk.snapshot(0, 4)[0] != 0 || disk.flushes.Load() != 0 {
		t.Fatal("a request ran after Shutdown")
	}
}

// panicBackend panics in Open for "boom" and returns no export for "nil".
type panicBackend struct{ *memBackend }

func (b panicBackend) Open(ctx context.Context, name string) (Export, io.Closer, error) {
	switch name {
	case "boom":
		panic("backend bug")
	case "nil":
		return nil, nil, nil
	}
	return b.memBackend.Open(ctx, name)
}

func TestBackendPanicsAndNilExport(t *testing.T) {
	checkGoroutines(t)
	h := startServer(t, func(c *Config) {
		c.Backend = panicBackend{c.Backend.(*memBackend)}
	}, newMem("disk", 4096))
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	c.expectFinal(nbdwire.OptGo, infoData("nil"), nbdwire.RepErrUnknown)
	c.sendOpt(nbdwire.OptGo, infoData("boom"))
	c.expectClosed()
	if !strings.Contains(h.logs.String(), "backend bug") {
		t.Fatal("panic not logged")
	}
	connectOn(t, dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle), "disk")
}

func TestConfigDefaults(t *testing.T) {
	b := &memBackend{}
	cfg := Config{Backend: b}
	s := NewServer(cfg)
	defer s.Close()
	if s.maxInFlight != DefaultMaxInFlight || s.handshakeTimeout != DefaultHandshakeTimeout || s.log == nil {
		t.Fatalf("defaults: %d %v %v", s.maxInFlight, s.handshakeTimeout, s.log)
	}
	if cfg.MaxInFlight != 0 || cfg.Logger != nil {
		t.Fatal("NewServer changed the caller's Config")
	}
	s2 := NewServer(Config{Backend: b, MaxInFlight: 1 << 30})
	defer s2.Close()
	if s2.maxInFlight != maxMaxInFlight {
		t.Fatalf("MaxInFlight %d", s2.maxInFlight)
	}
	defer func() {
		if recover() == nil {
			t.Fatal("no panic for a nil Backend")
		}
	}()
	NewServer(Config{})
}

// TestNoWaitRead covers READs served on the reader (NoWaitReader): served,
// refused (a worker serves them), failed, panicking; replies of both kinds
// interleave on one connection.
func TestNoWaitRead(t *testing.T) {
	modes(t, func(t *testing.T, structured bool) {
		checkGoroutines(t)
		disk := newMem("disk", 1<<20)
		copy(disk.data, pattern(1<<20, 7))
		var inline, refused atomic.Int64
		disk.try = func(p []byte, off uint64) (bool, error) {
			switch off {
			case 4096:
				return true, errNoSpace
			case 8192:
				panic("try bug")
			}
			if off%(2*512) == 512 {
				refused.Add(1)
				return false, nil
			}
			inline.Add(1)
			disk.mu.RLock()
			defer disk.mu.RUnlock()
			copy(p, disk.data[off:])
			return true, nil
		}
		h := startServer(t, func(c *Config) {
			c.Errno = func(err error) uint32 {
				if errors.Is(err, errNoSpace) {
					return nbdwire.ENOSPC
				}
				return nbdwire.EIO
			}
		}, disk)
		tc := connect(t, h.addr, "disk", structured)
		tc.expectErrno(tc.do(nbdwire.CmdRead, 0, 4096, 512, nil), nbdwire.ENOSPC)
		tc.expectErrno(tc.do(nbdwire.CmdRead, 0, 8192, 512, nil), nbdwire.EIO)
		// Pipelined: inline and worker replies, in any order.
		var calls []*call
		for i := range 64 {
			calls = append(calls, tc.start(nbdwire.CmdRead, 0, uint64(16384+i*512), 512, nil))
		}
		for i, cl := range calls {
			cl.wait(t)
			tc.expectErrno(cl, 0)
			off := 16384 + i*512
			if !bytes.Equal(cl.data, disk.snapshot(off, 512)) {
				t.Fatalf("read %d: wrong data", i)
			}
		}
		if inline.Load() == 0 || refused.Load() == 0 {
			t.Fatalf("inline %d, refused %d: want both", inline.Load(), refused.Load())
		}
		if !strings.Contains(h.logs.String(), "try bug") {
			t.Fatal("panic not logged")
		}
	})
}
