package nbd

import (
	"bytes"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"
)

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

func (c *scriptConn) LocalAddr() net.Addr                { return scriptAddr{} }
func (c *scriptConn) RemoteAddr() net.Addr               { return scriptAddr{} }
func (c *scriptConn) SetDeadline(t time.Time) error      { return nil }
func (c *scriptConn) SetReadDeadline(t time.Time) error  { return nil }
func (c *scriptConn) SetWriteDeadline(t time.Time) error { return nil }

type scriptAddr struct{}

func (scriptAddr) Network() string { return "script" }
func (scriptAddr) String() string  { return "script" }

// fuzzExportSize is small so that no request the fuzzer makes can pass the
// range check with a large length: every payload buffer is at most this.
const fuzzExportSize = 1 << 20

// fuzzServer is shared by the executions of a fuzz target.
func fuzzServer(tb testing.TB) *Server {
	disk := newMem("disk", fuzzExportSize)
	ro := newMem("ro", 4096)
	ro.ro = true
	srv := NewServer(Config{
		Backend:     &memBackend{exports: []*memExport{disk, ro}},
		Logger:      slog.New(slog.DiscardHandler),
		MaxInFlight: 4,
	})
	tb.Cleanup(func() { srv.Close() })
	return srv
}

// allocLimit bounds the bytes one execution may allocate: a few payload
// buffers of the fuzz export's size, the connection's read buffer, and
// change. An allocation sized by an unchecked client length (up to 4 GiB,
// or the 32 MiB maximum payload) would exceed it.
const allocLimit = 16 << 20

// serveScript runs one connection over script to its end and checks that
// it ends promptly, without a panic, and within allocLimit.
func serveScript(t *testing.T, srv *Server, script []byte) {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	c := newConn(srv, newScriptConn(script))
	if !srv.track(c) {
		t.Fatal("server closed")
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.serve()
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		buf := make([]byte, 1<<20)
		t.Fatalf("connection did not end:\n%s", buf[:runtime.Stack(buf, true)])
	}
	runtime.ReadMemStats(&after)
	if n := after.TotalAlloc - before.TotalAlloc; n > allocLimit+uint64(4*len(script)) {
		t.Fatalf("one connection allocated %d bytes", n)
	}
}

// Seed builders.

func clientFlags(f uint32) []byte { return be.AppendUint32(nil, f) }

func opt(o option, data []byte) []byte {
	return append(optHeader(o, uint32(len(data))), data...)
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func req(typ command, flags uint16, off uint64, n uint32) []byte {
	return requestBytes(typ, flags, uint64(typ)<<32|off, off, n)
}

// handshakeTo returns client bytes that enter transmission on name.
func handshakeTo(name string, structured bool) []byte {
	b := clientFlags(cflagFixedNewstyle | cflagNoZeroes)
	if structured {
		b = append(b, opt(optStructuredReply, nil)...)
	}
	return append(b, opt(optGo, infoData(name, infoBlockSize))...)
}

// transmissionSeeds are request streams for both fuzz targets.
func transmissionSeeds() [][]byte {
	return [][]byte{
		req(cmdRead, 0, 0, 4096),
		cat(req(cmdWrite, cmdFlagFUA, 100, 5), []byte("hello"), req(cmdRead, 0, 100, 5)),
		cat(req(cmdFlush, 0, 0, 0), req(cmdTrim, 0, 0, 512), req(cmdWriteZeroes, cmdFlagNoHole, 0, 512)),
		cat(req(cmdRead, 0, 0, 512), req(cmdDisc, 0, 0, 0), req(cmdRead, 0, 0, 512)),
		req(cmdRead, cmdFlagDF, fuzzExportSize-1, 2),
		req(cmdRead, 0, 0, maxPayload+1),
		req(cmdRead, 0, 0, 0xffffffff),
		cat(req(cmdWrite, 0, 0, maxPayload+1), make([]byte, 1024)),
		req(cmdWrite, 0, 0, 0xffffffff),
		cat(req(cmdWrite, 0, fuzzExportSize, 8), make([]byte, 8), req(cmdRead, 0, 0, 1)),
		cat(req(cmdWrite, 0, 0, fuzzExportSize), make([]byte, 100)), // truncated payload
		cat(req(cmdCache, 0, 0, 512), req(cmdBlockStatus, cmdFlagReqOne, 0, 512), req(99, 0xffff, 1<<63, 7)),
		cat(req(cmdRead, 0, 0, 512)[:20]),
		[]byte("NOTMAGICNOTMAGICNOTMAGICNOTM"),
		bytes.Repeat(req(cmdRead, 0, 0, 64<<10), 20),
	}
}

func FuzzHandshake(f *testing.F) {
	fixed := clientFlags(cflagFixedNewstyle)
	for _, s := range [][]byte{
		nil,
		fixed,
		clientFlags(0xffffffff),
		cat(fixed, opt(optExportName, []byte("disk")), req(cmdRead, 0, 0, 512)),
		cat(clientFlags(cflagFixedNewstyle|cflagNoZeroes), opt(optExportName, []byte("ro")), req(cmdWrite, 0, 0, 1), []byte{1}),
		cat(fixed, opt(optExportName, []byte("nope"))),
		cat(fixed, opt(optList, nil), opt(optList, []byte{1}), opt(optAbort, nil)),
		cat(fixed, opt(optInfo, infoData("disk", infoName, infoDescription, infoBlockSize)), opt(optGo, infoData("disk"))),
		cat(fixed, opt(optGo, infoData("nope")), opt(optGo, infoData("")), opt(optGo, infoData("disk")), req(cmdFlush, 0, 0, 0)),
		cat(fixed, opt(optStartTLS, nil), opt(optStructuredReply, nil), opt(optGo, infoData("ro", infoExport)), req(cmdRead, 0, 0, 4096)),
		cat(fixed, opt(optSetMetaContext, infoData("disk")[:8]), opt(optExtendedHeaders, nil), opt(0xdead, []byte("x"))),
		cat(fixed, opt(optInfo, []byte{0, 0, 0, 9, 'd'}), opt(optGo, []byte{0xff, 0xff, 0xff, 0xff, 0, 0})),
		cat(fixed, optHeader(optInfo, maxOptionData+1), make([]byte, 100)),
		cat(fixed, optHeader(optInfo, 0xffffffff)),
		cat(fixed, []byte("IHAVEOPX"), []byte{0, 0, 0, 1, 0, 0, 0, 0}),
		cat(fixed, opt(optGo, infoData("disk"))[:20]),
	} {
		f.Add(s)
	}
	for _, s := range transmissionSeeds() {
		f.Add(cat(handshakeTo("disk", true), s))
	}
	srv := fuzzServer(f)
	f.Fuzz(func(t *testing.T, script []byte) {
		serveScript(t, srv, script)
	})
}

func FuzzTransmission(f *testing.F) {
	for _, s := range transmissionSeeds() {
		f.Add(false, false, s)
		f.Add(true, false, s)
	}
	f.Add(false, true, cat(req(cmdWrite, 0, 0, 4), []byte("nope"), req(cmdTrim, 0, 0, 1)))
	f.Add(true, true, cat(req(cmdWriteZeroes, 0, 0, 1), req(cmdRead, 0, 4095, 1)))
	srv := fuzzServer(f)
	f.Fuzz(func(t *testing.T, structured, readOnly bool, requests []byte) {
		name := "disk"
		if readOnly {
			name = "ro"
		}
		serveScript(t, srv, append(handshakeTo(name, structured), requests...))
	})
}

// TestScriptConnReplies checks the fuzz harness itself: a scripted
// connection is really served (the replies are written).
func TestScriptConnReplies(t *testing.T) {
	srv := fuzzServer(t)
	nc := newScriptConn(cat(handshakeTo("disk", false), req(cmdRead, 0, 0, 4096)))
	c := newConn(srv, nc)
	srv.track(c)
	c.serve()
	// greeting + GO replies + 16-byte reply header + 4096 bytes.
	if nc.written < 4096+16 {
		t.Fatalf("%d bytes written", nc.written)
	}
}
