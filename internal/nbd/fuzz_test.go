package nbd

import (
	"bytes"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"segmap/internal/nbd/nbdwire"
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

func opt(o nbdwire.Option, data []byte) []byte {
	return append(optHeader(o, uint32(len(data))), data...)
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func req(typ nbdwire.Command, flags uint16, off uint64, n uint32) []byte {
	return requestBytes(typ, flags, uint64(typ)<<32|off, off, n)
}

// handshakeTo returns client bytes that enter transmission on name; with
// structured replies, base:allocation is selected too.
func handshakeTo(name string, structured bool) []byte {
	b := clientFlags(nbdwire.CFlagFixedNewstyle | nbdwire.CFlagNoZeroes)
	if structured {
		b = append(b, opt(nbdwire.OptStructuredReply, nil)...)
		b = append(b, opt(nbdwire.OptSetMetaContext, metaData(name, nbdwire.MetaBaseAllocation))...)
	}
	return append(b, opt(nbdwire.OptGo, infoData(name, nbdwire.InfoBlockSize))...)
}

// transmissionSeeds are request streams for both fuzz targets.
func transmissionSeeds() [][]byte {
	return [][]byte{
		req(nbdwire.CmdRead, 0, 0, 4096),
		cat(req(nbdwire.CmdWrite, nbdwire.CmdFlagFUA, 100, 5), []byte("hello"), req(nbdwire.CmdRead, 0, 100, 5)),
		cat(req(nbdwire.CmdFlush, 0, 0, 0), req(nbdwire.CmdTrim, 0, 0, 512), req(nbdwire.CmdWriteZeroes, nbdwire.CmdFlagNoHole, 0, 512)),
		cat(req(nbdwire.CmdRead, 0, 0, 512), req(nbdwire.CmdDisc, 0, 0, 0), req(nbdwire.CmdRead, 0, 0, 512)),
		req(nbdwire.CmdRead, nbdwire.CmdFlagDF, fuzzExportSize-1, 2),
		req(nbdwire.CmdRead, 0, 0, nbdwire.MaxPayload+1),
		req(nbdwire.CmdRead, 0, 0, 0xffffffff),
		cat(req(nbdwire.CmdWrite, 0, 0, nbdwire.MaxPayload+1), make([]byte, 1024)),
		req(nbdwire.CmdWrite, 0, 0, 0xffffffff),
		cat(req(nbdwire.CmdWrite, 0, fuzzExportSize, 8), make([]byte, 8), req(nbdwire.CmdRead, 0, 0, 1)),
		cat(req(nbdwire.CmdWrite, 0, 0, fuzzExportSize), make([]byte, 100)), // truncated payload
		cat(req(nbdwire.CmdCache, 0, 0, 512), req(nbdwire.CmdBlockStatus, nbdwire.CmdFlagReqOne, 0, 512), req(99, 0xffff, 1<<63, 7)),
		cat(req(nbdwire.CmdRead, 0, 0, 512)[:20]),
		cat(req(nbdwire.CmdBlockStatus, 0, 0, fuzzExportSize), req(nbdwire.CmdBlockStatus, nbdwire.CmdFlagReqOne, 1000, 5000)),
		cat(req(nbdwire.CmdBlockStatus, 0, 0, 0xffffffff), req(nbdwire.CmdBlockStatus, 0, fuzzExportSize-1, 1), req(nbdwire.CmdBlockStatus, 0, 0, 0)),
		[]byte("NOTMAGICNOTMAGICNOTMAGICNOTM"),
		bytes.Repeat(req(nbdwire.CmdRead, 0, 0, 64<<10), 20),
	}
}

func FuzzHandshake(f *testing.F) {
	fixed := clientFlags(nbdwire.CFlagFixedNewstyle)
	for _, s := range [][]byte{
		nil,
		fixed,
		clientFlags(0xffffffff),
		cat(fixed, opt(nbdwire.OptExportName, []byte("disk")), req(nbdwire.CmdRead, 0, 0, 512)),
		cat(clientFlags(nbdwire.CFlagFixedNewstyle|nbdwire.CFlagNoZeroes), opt(nbdwire.OptExportName, []byte("ro")), req(nbdwire.CmdWrite, 0, 0, 1), []byte{1}),
		cat(fixed, opt(nbdwire.OptExportName, []byte("nope"))),
		cat(fixed, opt(nbdwire.OptList, nil), opt(nbdwire.OptList, []byte{1}), opt(nbdwire.OptAbort, nil)),
		cat(fixed, opt(nbdwire.OptInfo, infoData("disk", nbdwire.InfoName, nbdwire.InfoDescription, nbdwire.InfoBlockSize)), opt(nbdwire.OptGo, infoData("disk"))),
		cat(fixed, opt(nbdwire.OptGo, infoData("nope")), opt(nbdwire.OptGo, infoData("")), opt(nbdwire.OptGo, infoData("disk")), req(nbdwire.CmdFlush, 0, 0, 0)),
		cat(fixed, opt(nbdwire.OptStartTLS, nil), opt(nbdwire.OptStructuredReply, nil), opt(nbdwire.OptGo, infoData("ro", nbdwire.InfoExport)), req(nbdwire.CmdRead, 0, 0, 4096)),
		cat(fixed, opt(nbdwire.OptSetMetaContext, infoData("disk")[:8]), opt(nbdwire.OptExtendedHeaders, nil), opt(0xdead, []byte("x"))),
		cat(fixed, opt(nbdwire.OptListMetaContext, metaData("disk")), opt(nbdwire.OptListMetaContext, metaData("disk", "base:", "x-a:b")),
			opt(nbdwire.OptSetMetaContext, metaData("disk", "base:allocation")), opt(nbdwire.OptStructuredReply, nil),
			opt(nbdwire.OptSetMetaContext, metaData("disk", "base:allocation")), opt(nbdwire.OptGo, infoData("disk")),
			req(nbdwire.CmdBlockStatus, 0, 0, 4096)),
		cat(fixed, opt(nbdwire.OptStructuredReply, nil), opt(nbdwire.OptSetMetaContext, metaData("nope", "base:allocation")),
			opt(nbdwire.OptSetMetaContext, []byte{0, 0, 0, 4, 'd', 'i', 's', 'k', 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1})),
		cat(fixed, opt(nbdwire.OptInfo, []byte{0, 0, 0, 9, 'd'}), opt(nbdwire.OptGo, []byte{0xff, 0xff, 0xff, 0xff, 0, 0})),
		cat(fixed, optHeader(nbdwire.OptInfo, maxOptionData+1), make([]byte, 100)),
		cat(fixed, optHeader(nbdwire.OptInfo, 0xffffffff)),
		cat(fixed, []byte("IHAVEOPX"), []byte{0, 0, 0, 1, 0, 0, 0, 0}),
		cat(fixed, opt(nbdwire.OptGo, infoData("disk"))[:20]),
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
	f.Add(false, true, cat(req(nbdwire.CmdWrite, 0, 0, 4), []byte("nope"), req(nbdwire.CmdTrim, 0, 0, 1)))
	f.Add(true, true, cat(req(nbdwire.CmdWriteZeroes, 0, 0, 1), req(nbdwire.CmdRead, 0, 4095, 1)))
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
	nc := newScriptConn(cat(handshakeTo("disk", false), req(nbdwire.CmdRead, 0, 0, 4096)))
	c := newConn(srv, nc)
	srv.track(c)
	c.serve()
	// greeting + GO replies + 16-byte reply header + 4096 bytes.
	if nc.written < 4096+16 {
		t.Fatalf("%d bytes written", nc.written)
	}
}
