// Package nbdclient is an NBD client: Dial negotiates an export with any
// fixed newstyle server (package nbd's, qemu-nbd, nbdkit, nbd-server) and
// the returned Client reads and writes it. The NBD-export container
// (package container) and the tests use it.
//
// # Client states
//
//	Dial ──handshake──► open ──Close──► closing ──► closed
//	                     │                 ▲ in-flight requests answered,
//	                     │                 │ or closeTimeout passes
//	                     ├──────Abort──────┴─────────────────────► closed
//	                     └─ connection lost / protocol error ─► broken
//
// In open, requests are sent by the caller's goroutine under the write lock
// and answered through one reader goroutine that matches replies to
// requests by cookie, so any number of requests may be in flight. In
// closing, new requests fail with ErrClientClosed while those in flight are
// answered. In broken every request in flight and every later one fails
// with the error that broke the connection (wrapping ErrDisconnected). The
// client never reconnects: a caller that wants to go on dials again.
package nbdclient

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strconv"
	"sync"
	"time"

	"segmap/internal/nbd/nbdwire"
)

// RemoteError is an error answered by the server for one request. Msg is
// the server's message from a structured error chunk, if any.
type RemoteError struct {
	Errno uint32
	Msg   string
}

func (e *RemoteError) Error() string {
	s := "nbd: server error " + errnoName(e.Errno)
	if e.Msg != "" {
		s += ": " + e.Msg
	}
	return s
}

// Is reports whether target is the sentinel of e's error value (ErrEIO for
// values the spec does not define).
func (e *RemoteError) Is(target error) bool { return target == errnoSentinel(e.Errno) }

func errnoSentinel(errno uint32) error {
	switch errno {
	case nbdwire.EPERM:
		return ErrEPERM
	case nbdwire.ENOMEM:
		return ErrENOMEM
	case nbdwire.EINVAL:
		return ErrEINVAL
	case nbdwire.ENOSPC:
		return ErrENOSPC
	case nbdwire.EOVERFLOW:
		return ErrEOVERFLOW
	case nbdwire.ENOTSUP:
		return ErrENOTSUP
	case nbdwire.ESHUTDOWN:
		return ErrESHUTDOWN
	}
	return ErrEIO
}

func errnoName(errno uint32) string {
	if name, ok := nbdwire.ErrnoName(errno); ok {
		return name
	}
	return strconv.FormatUint(uint64(errno), 10)
}

// The client's own defaults.
const (
	// DefaultHandshakeTimeout bounds the handshake when
	// ClientConfig.HandshakeTimeout is 0.
	DefaultHandshakeTimeout = 10 * time.Second
	// readBufferSize is the size of the connection's read buffer.
	readBufferSize = 64 << 10
)

// aLongTimeAgo is a deadline in the past, set to interrupt reads and
// writes.
var aLongTimeAgo = time.Unix(1, 0)

var be = binary.BigEndian

// Client limits.
const (
	// DefaultPort is the NBD port of an nbd:// URI without one.
	DefaultPort = 10809
	// clientMaxRequest caps the payload of one READ or WRITE whatever the
	// server advertises: the spec's default maximum, which every server
	// accepts and no server treats as a denial of service.
	clientMaxRequest = nbdwire.MaxPayload
	// clientMaxZero caps the length of one TRIM or WRITE_ZEROES; the
	// field has 32 bits and 1 GiB keeps servers that apply their payload
	// limit to these commands, too, within reason.
	clientMaxZero = 1 << 30
	// maxOptReply bounds an option reply the client reads into memory;
	// replies are an export name and a description at most.
	maxOptReply = 1 << 20
	// maxChunkMeta bounds the non-data part of a reply chunk (an error
	// message and its offset).
	maxChunkMeta = 64 << 10
	// closeTimeout bounds how long Close waits for the requests in flight
	// and for the disconnect request to be sent.
	closeTimeout = 10 * time.Second
)

// ClientConfig configures Dial.
type ClientConfig struct {
	// TLS, if not nil, makes the client upgrade the connection with
	// NBD_OPT_STARTTLS before any other option, and fail if the server
	// refuses: a client that asks for TLS never falls back to plaintext.
	// An empty ServerName is taken from the host of the address. Nil
	// means plaintext.
	TLS *tls.Config
	// HandshakeTimeout bounds connecting and the handshake, on top of the
	// context given to Dial. Default DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// Lease asks the server for segmap's lease (nbdwire.OptSegmapLease):
	// every request is then refused (ErrEPERM) unless Lease granted time
	// that has not run out. A server that does not know it serves the
	// connection without one (Leased reports which).
	Lease bool
	// CacheID asks the server who holds its write cache
	// (nbdwire.OptSegmapCache), which CacheID then reports. A server
	// that does not know the option is served all the same.
	CacheID bool

	// Test knobs: do not ask for structured replies; skip NBD_OPT_GO and
	// use NBD_OPT_EXPORT_NAME.
	noStructured, noGo bool
}

// ParseURI splits an nbd://HOST[:PORT][/EXPORT] URI into the address to
// dial (the port defaults to DefaultPort) and the export name, which may
// be empty (the server's default export). The export is the URI's path
// without its leading slash, percent-decoded. Other schemes (nbds://,
// nbd+unix://), user information, queries and fragments are refused.
func ParseURI(uri string) (addr, export string, err error) {
	u, err := url.Parse(uri)
	if err != nil {
		return "", "", fmt.Errorf("nbd URI %q: %w", uri, err)
	}
	switch {
	case u.Scheme != "nbd":
		return "", "", fmt.Errorf("nbd URI %q: scheme %q, want nbd://HOST[:PORT]/EXPORT", uri, u.Scheme)
	case u.Opaque != "" || u.User != nil || u.RawQuery != "" || u.Fragment != "":
		return "", "", fmt.Errorf("nbd URI %q: want nbd://HOST[:PORT]/EXPORT only", uri)
	case u.Hostname() == "":
		return "", "", fmt.Errorf("nbd URI %q: no host", uri)
	}
	port := u.Port()
	if port == "" {
		port = strconv.Itoa(DefaultPort)
	} else if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return "", "", fmt.Errorf("nbd URI %q: bad port %q", uri, port)
	}
	export = u.Path
	if len(export) > 0 && export[0] == '/' {
		export = export[1:]
	}
	if !nbdwire.ValidString(export) {
		return "", "", fmt.Errorf("nbd URI %q: export name is not a valid NBD string", uri)
	}
	return net.JoinHostPort(u.Hostname(), port), export, nil
}

// Client is a connection to one export of an NBD server, in the
// transmission phase. Its methods are safe for concurrent use and may all
// be in flight at once on the one connection; replies may come back in any
// order.
//
// Requests larger than the server's maximum payload are split. If the
// server advertises a minimum block size above 1, unaligned reads are
// widened to whole blocks and unaligned writes and zeroings become
// read-modify-write cycles of the partial blocks at their ends; those are
// atomic with respect to other writes through this Client only.
//
// A request whose context ends before its reply returns the context's
// error; the request may still take effect on the server, and its reply is
// discarded. A context that ends while a request is being sent (only
// possible when the server stops reading) breaks the connection, because
// half a request cannot be taken back.
//
// A failed request fails alone (a *RemoteError); a lost connection fails
// every request (ErrDisconnected). The client never reconnects: callers
// that want to go on dial a new Client.
type Client struct {
	nc net.Conn
	rd *bufio.Reader

	export     string
	size       uint64
	flags      uint16 // transmission flags
	structured bool
	minBlock   uint64 // 1 if the server set no constraint
	prefBlock  uint64
	maxBlock   uint64 // as advertised
	maxReq     uint64 // largest READ or WRITE sent, a multiple of minBlock
	maxZero    uint64 // largest TRIM or WRITE_ZEROES sent, likewise
	leased     bool   // the server acknowledged nbdwire.OptSegmapLease
	// cacheID is the server's answer to nbdwire.OptSegmapCache, if
	// hasCacheID.
	cacheID    [nbdwire.CacheIDSize]byte
	hasCacheID bool

	// lease serialises Lease calls; got is when the reply to the last
	// one arrived (zero before the first, and after one failed), ref the
	// low 32 bits of its cookie.
	lease struct {
		mu  chan struct{}
		got time.Time
		ref uint32
	}

	// wlock is the write lock: a request and its payload are written while
	// holding it. It is a channel so that waiting for it heeds a context.
	wlock chan struct{}
	// rmw orders writes when minBlock > 1: read-modify-write cycles hold
	// it exclusively, other writes shared.
	rmw sync.RWMutex

	// dead is closed when mu.err is set; readerDone when the reader
	// goroutine has returned, after it failed every request left.
	dead       chan struct{}
	readerDone chan struct{}

	mu struct {
		sync.Mutex
		pending map[uint64]*clientReq
		cookie  uint64 // last cookie used
		closing bool   // Close began: no new requests
		// drained, if not nil, is closed when pending becomes empty.
		drained chan struct{}
		// err, once set, fails every new request; the connection is
		// closed or about to be.
		err error
	}
}

// clientReq is one request in flight.
type clientReq struct {
	cookie uint64
	typ    nbdwire.Command
	off    uint64
	length uint32
	// done is closed when the reply is complete; err is set before.
	done chan struct{}
	err  error

	// Only the reader goroutine touches the fields below, until done.
	covered  uint64 // bytes of a READ covered by data and hole chunks
	chunkErr error  // the first error chunk of a structured reply

	// mu guards buf, the destination of a READ, against the caller
	// abandoning the call: the reader fills buf under mu, and an
	// abandoning caller sets it to nil under mu, after which the reader
	// discards the data.
	mu  sync.Mutex
	buf []byte
}

// Dial connects to addr (host:port), negotiates the export named export
// (empty: the server's default export) and returns a Client in the
// transmission phase. ctx bounds the connection and the handshake only.
//
// The handshake is fixed newstyle: STARTTLS first if cfg.TLS is set,
// STRUCTURED_REPLY, then GO with a request for the block size constraints
// (EXPORT_NAME if the server does not know GO). An export the server does
// not have fails with an error wrapping ErrUnknownExport.
func Dial(ctx context.Context, addr, export string, cfg ClientConfig) (*Client, error) {
	if !nbdwire.ValidString(export) {
		return nil, fmt.Errorf("nbd: dial %s: export name %q is not a valid NBD string", addr, export)
	}
	timeout := cfg.HandshakeTimeout
	if timeout <= 0 {
		timeout = DefaultHandshakeTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("nbd: dial %s: %w", addr, err)
	}
	c, err := handshakeClient(ctx, nc, addr, export, cfg)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("nbd: dial %s export %q: %w", addr, export, err)
	}
	c.readerDone = make(chan struct{})
	go c.readLoop()
	return c, nil
}

// clientHandshake is the state of a client's handshake.
type clientHandshake struct {
	nc  net.Conn
	rd  *bufio.Reader
	cfg ClientConfig
}

// handshakeClient negotiates the export on nc. It returns a Client with
// everything set but the reader goroutine. A context that ends during the
// handshake interrupts its I/O.
func handshakeClient(ctx context.Context, nc net.Conn, addr, export string, cfg ClientConfig) (*Client, error) {
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	interrupted := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(interrupted)
		nc.SetDeadline(aLongTimeAgo)
	})
	h := &clientHandshake{nc: nc, rd: bufio.NewReaderSize(nc, 4096), cfg: cfg}
	c, err := h.run(addr, export)
	if !stop() {
		<-interrupted
		if err == nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("%w (%w)", ctx.Err(), err)
	}
	if err != nil {
		return nil, err
	}
	h.nc.SetDeadline(time.Time{})
	c.nc = h.nc
	c.rd = bufio.NewReaderSize(h.rd, readBufferSize) // keeps what h.rd holds
	return c, nil
}

// run runs the handshake on h.nc.
func (h *clientHandshake) run(addr, export string) (*Client, error) {
	var greet [18]byte
	if _, err := io.ReadFull(h.rd, greet[:16]); err != nil {
		return nil, fmt.Errorf("read greeting: %w", err)
	}
	if be.Uint64(greet[0:]) != nbdwire.MagicNBD {
		return nil, fmt.Errorf("%w: not an NBD server (greeting %#x)", ErrProtocol, be.Uint64(greet[0:]))
	}
	if m := be.Uint64(greet[8:]); m != nbdwire.MagicOpts {
		if m == nbdwire.MagicOldstyle {
			return nil, fmt.Errorf("%w: oldstyle negotiation is not supported", ErrProtocol)
		}
		return nil, fmt.Errorf("%w: greeting magic %#x", ErrProtocol, m)
	}
	if _, err := io.ReadFull(h.rd, greet[16:]); err != nil {
		return nil, fmt.Errorf("read greeting: %w", err)
	}
	hflags := be.Uint16(greet[16:])
	fixed := hflags&nbdwire.HFlagFixedNewstyle != 0
	var cflags uint32
	if fixed {
		cflags |= nbdwire.CFlagFixedNewstyle
	}
	noZeroes := hflags&nbdwire.HFlagNoZeroes != 0
	if noZeroes {
		cflags |= nbdwire.CFlagNoZeroes
	}
	if err := h.write(be.AppendUint32(nil, cflags)); err != nil {
		return nil, err
	}

	c := &Client{
		export:    export,
		minBlock:  1,
		prefBlock: nbdwire.PreferredBlockSize,
		maxBlock:  nbdwire.MaxPayload,
		wlock:     make(chan struct{}, 1),
		dead:      make(chan struct{}),
	}
	c.lease.mu = make(chan struct{}, 1)
	c.mu.pending = make(map[uint64]*clientReq)

	if h.cfg.TLS != nil {
		if !fixed {
			return nil, fmt.Errorf("%w: the server cannot do STARTTLS (no fixed newstyle)", ErrProtocol)
		}
		if err := h.startTLS(addr); err != nil {
			return nil, err
		}
	}
	var err error
	if fixed && !h.cfg.noStructured {
		if c.structured, err = h.structuredReply(); err != nil {
			return nil, err
		}
	}
	if fixed && h.cfg.Lease {
		if c.leased, err = h.askLease(); err != nil {
			return nil, err
		}
	}
	if fixed && h.cfg.CacheID {
		if c.cacheID, c.hasCacheID, err = h.askCache(); err != nil {
			return nil, err
		}
	}
	done := false
	if fixed && !h.cfg.noGo {
		if done, err = h.goExport(c); err != nil {
			return nil, err
		}
	}
	if !done {
		if err := h.exportName(c, noZeroes); err != nil {
			return nil, err
		}
	}
	if err := c.setLimits(); err != nil {
		return nil, err
	}
	return c, nil
}

func (h *clientHandshake) write(b []byte) error {
	if _, err := h.nc.Write(b); err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	return nil
}

// sendOption sends one option with its data.
func (h *clientHandshake) sendOption(opt nbdwire.Option, data []byte) error {
	b := make([]byte, 16, 16+len(data))
	be.PutUint64(b[0:], nbdwire.MagicOpts)
	be.PutUint32(b[8:], uint32(opt))
	be.PutUint32(b[12:], uint32(len(data)))
	return h.write(append(b, data...))
}

// optReply reads one option reply to opt.
func (h *clientHandshake) optReply(opt nbdwire.Option) (nbdwire.RepType, []byte, error) {
	var hdr [20]byte
	if _, err := io.ReadFull(h.rd, hdr[:]); err != nil {
		return 0, nil, fmt.Errorf("read reply to %v: %w", opt, err)
	}
	if m := be.Uint64(hdr[0:]); m != nbdwire.MagicOptReply {
		return 0, nil, fmt.Errorf("%w: reply magic %#x to %v", ErrProtocol, m, opt)
	}
	if o := nbdwire.Option(be.Uint32(hdr[8:])); o != opt {
		return 0, nil, fmt.Errorf("%w: reply to %v while waiting for %v", ErrProtocol, o, opt)
	}
	typ := nbdwire.RepType(be.Uint32(hdr[12:]))
	n := be.Uint32(hdr[16:])
	if n > maxOptReply {
		return 0, nil, fmt.Errorf("%w: %v reply to %v of %d bytes", ErrProtocol, typ, opt, n)
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(h.rd, data); err != nil {
		return 0, nil, fmt.Errorf("read reply to %v: %w", opt, err)
	}
	return typ, data, nil
}

// optError describes an error reply, wrapping ErrUnknownExport and
// ErrTLSRequired where they apply.
func optError(opt nbdwire.Option, typ nbdwire.RepType, data []byte) error {
	msg := ""
	if len(data) > 0 && nbdwire.ValidString(string(data)) {
		msg = ": " + string(data)
	}
	switch typ {
	case nbdwire.RepErrUnknown:
		return fmt.Errorf("%w (%v answered %v%s)", nbdwire.ErrUnknownExport, opt, typ, msg)
	case nbdwire.RepErrTLSReqd:
		return fmt.Errorf("%w (%v answered %v%s)", ErrTLSRequired, opt, typ, msg)
	}
	if typ&nbdwire.RepErr == 0 {
		return fmt.Errorf("%w: unexpected %v reply to %v", ErrProtocol, typ, opt)
	}
	return fmt.Errorf("nbd: server refused %v: %v%s", opt, typ, msg)
}

// startTLS upgrades the connection: STARTTLS, then a TLS handshake; every
// later byte goes through TLS.
func (h *clientHandshake) startTLS(addr string) error {
	if err := h.sendOption(nbdwire.OptStartTLS, nil); err != nil {
		return err
	}
	typ, data, err := h.optReply(nbdwire.OptStartTLS)
	if err != nil {
		return err
	}
	if typ != nbdwire.RepAck {
		return fmt.Errorf("TLS refused: %w", optError(nbdwire.OptStartTLS, typ, data))
	}
	if h.rd.Buffered() > 0 {
		return fmt.Errorf("%w: data after the STARTTLS reply", ErrProtocol)
	}
	cfg := h.cfg.TLS
	if cfg.ServerName == "" {
		cfg = cfg.Clone()
		if host, _, err := net.SplitHostPort(addr); err == nil {
			cfg.ServerName = host
		}
	}
	tc := tls.Client(h.nc, cfg)
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	h.nc = tc
	h.rd = bufio.NewReaderSize(tc, 4096)
	return nil
}

// structuredReply asks for structured replies; false if the server does
// not offer them.
func (h *clientHandshake) structuredReply() (bool, error) {
	return h.ackOption(nbdwire.OptStructuredReply)
}

// askLease asks for segmap's lease; ok is false if the server refuses it.
func (h *clientHandshake) askLease() (ok bool, err error) {
	return h.ackOption(nbdwire.OptSegmapLease)
}

// ackOption sends opt without data; ok is true if the server acknowledges
// it, false if it refuses it (any error reply but TLS required).
func (h *clientHandshake) ackOption(opt nbdwire.Option) (ok bool, err error) {
	if err := h.sendOption(opt, nil); err != nil {
		return false, err
	}
	typ, data, err := h.optReply(opt)
	switch {
	case err != nil:
		return false, err
	case typ == nbdwire.RepAck:
		return true, nil
	case typ == nbdwire.RepErrTLSReqd:
		return false, optError(opt, typ, data)
	case typ&nbdwire.RepErr != 0:
		return false, nil
	}
	return false, fmt.Errorf("%w: %v reply to %v", ErrProtocol, typ, opt)
}

// askCache asks who holds the server's write cache; ok is false if the
// server does not say.
func (h *clientHandshake) askCache() (id [nbdwire.CacheIDSize]byte, ok bool, err error) {
	if err := h.sendOption(nbdwire.OptSegmapCache, nil); err != nil {
		return id, false, err
	}
	typ, data, err := h.optReply(nbdwire.OptSegmapCache)
	switch {
	case err != nil:
		return id, false, err
	case typ == nbdwire.RepSegmapCache && len(data) == nbdwire.CacheIDSize:
		copy(id[:], data)
		return id, true, nil
	case typ == nbdwire.RepErrTLSReqd:
		return id, false, optError(nbdwire.OptSegmapCache, typ, data)
	case typ&nbdwire.RepErr != 0:
		return id, false, nil
	}
	return id, false, fmt.Errorf("%w: %v reply of %d bytes to %v", ErrProtocol, typ, len(data), nbdwire.OptSegmapCache)
}

// goExport selects the export with NBD_OPT_GO. ok is false if the server
// does not know GO (the caller falls back to EXPORT_NAME).
func (h *clientHandshake) goExport(c *Client) (ok bool, err error) {
	data := make([]byte, 0, 4+len(c.export)+4)
	data = be.AppendUint32(data, uint32(len(c.export)))
	data = append(data, c.export...)
	data = be.AppendUint16(data, 1)
	data = be.AppendUint16(data, nbdwire.InfoBlockSize)
	if err := h.sendOption(nbdwire.OptGo, data); err != nil {
		return false, err
	}
	gotExport := false
	for {
		typ, data, err := h.optReply(nbdwire.OptGo)
		if err != nil {
			return false, err
		}
		switch {
		case typ == nbdwire.RepInfo:
			if len(data) < 2 {
				return false, fmt.Errorf("%w: NBD_REP_INFO of %d bytes", ErrProtocol, len(data))
			}
			switch t := be.Uint16(data); {
			case t == nbdwire.InfoExport:
				if len(data) != 12 {
					return false, fmt.Errorf("%w: NBD_INFO_EXPORT of %d bytes", ErrProtocol, len(data))
				}
				c.size, c.flags = be.Uint64(data[2:]), be.Uint16(data[10:])
				gotExport = true
			case t == nbdwire.InfoBlockSize:
				if len(data) != 14 {
					return false, fmt.Errorf("%w: NBD_INFO_BLOCK_SIZE of %d bytes", ErrProtocol, len(data))
				}
				c.minBlock = uint64(be.Uint32(data[2:]))
				c.prefBlock = uint64(be.Uint32(data[6:]))
				c.maxBlock = uint64(be.Uint32(data[10:]))
			}
			// Other information is ignored, as the spec asks.
		case typ == nbdwire.RepAck:
			if !gotExport {
				return false, fmt.Errorf("%w: NBD_OPT_GO acknowledged without NBD_INFO_EXPORT", ErrProtocol)
			}
			return true, nil
		case typ == nbdwire.RepErrUnsup:
			return false, nil
		default:
			return false, optError(nbdwire.OptGo, typ, data)
		}
	}
}

// exportName selects the export with NBD_OPT_EXPORT_NAME, which a server
// answers by hanging up if it does not have the export.
func (h *clientHandshake) exportName(c *Client, noZeroes bool) error {
	if err := h.sendOption(nbdwire.OptExportName, []byte(c.export)); err != nil {
		return err
	}
	b := make([]byte, 10+nbdwire.ZeroPadSize)
	if noZeroes {
		b = b[:10]
	}
	if _, err := io.ReadFull(h.rd, b); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("%w (the server hung up on NBD_OPT_EXPORT_NAME)", nbdwire.ErrUnknownExport)
		}
		return fmt.Errorf("read reply to %v: %w", nbdwire.OptExportName, err)
	}
	c.size, c.flags = be.Uint64(b[0:]), be.Uint16(b[8:])
	return nil
}

// setLimits checks the negotiated block sizes and derives the request
// limits.
func (c *Client) setLimits() error {
	if c.flags&nbdwire.TFlagHasFlags == 0 {
		c.flags = 0
	}
	pow2 := func(n uint64) bool { return n != 0 && n&(n-1) == 0 }
	switch {
	case !pow2(c.minBlock) || c.minBlock > 64<<10:
		return fmt.Errorf("%w: minimum block size %d", ErrProtocol, c.minBlock)
	case !pow2(c.prefBlock) || c.prefBlock < c.minBlock:
		return fmt.Errorf("%w: preferred block size %d (minimum %d)", ErrProtocol, c.prefBlock, c.minBlock)
	case c.maxBlock < c.minBlock:
		return fmt.Errorf("%w: maximum payload %d (minimum block %d)", ErrProtocol, c.maxBlock, c.minBlock)
	}
	c.maxReq = min(c.maxBlock, clientMaxRequest) / c.minBlock * c.minBlock
	c.maxZero = clientMaxZero / c.minBlock * c.minBlock
	return nil
}

// Export returns the name of the export.
func (c *Client) Export() string { return c.export }

// Done returns a channel that is closed once the client serves no more
// requests: the connection broke (requests fail with ErrDisconnected) or
// Close ended it. A caller that keeps a connection up watches it to
// reconnect before the next request finds the connection gone.
func (c *Client) Done() <-chan struct{} { return c.dead }

// Size returns the size of the export in bytes.
func (c *Client) Size() uint64 { return c.size }

// ReadOnly reports whether the server refuses writes to the export.
func (c *Client) ReadOnly() bool { return c.flags&nbdwire.TFlagReadOnly != 0 }

// CanMultiConn reports whether the server promises that a flush on one
// connection covers writes answered on every connection to the export, so
// that a caller may spread its requests over several Clients.
func (c *Client) CanMultiConn() bool { return c.flags&nbdwire.TFlagCanMultiConn != 0 }

// BlockSize returns the server's block size constraints: the minimum
// (requests are aligned to it), the preferred, and the maximum payload of
// one request (larger requests are split). Servers that advertise none get
// the spec's defaults: 1, 4096 and 32 MiB.
func (c *Client) BlockSize() (minimum, preferred, maximum uint32) {
	return uint32(c.minBlock), uint32(c.prefBlock), uint32(c.maxBlock)
}

// checkRange refuses what the server would refuse: a range past the end of
// the export, and writes to a read-only export.
func (c *Client) checkRange(op string, off, n uint64, write bool) error {
	if off > c.size || n > c.size-off {
		return fmt.Errorf("nbd: %s of %d bytes at offset %d beyond the export's %d bytes: %w", op, n, off, c.size, ErrEINVAL)
	}
	if write && c.ReadOnly() {
		return fmt.Errorf("nbd: %s: export %q is read-only: %w", op, c.export, ErrEPERM)
	}
	return nil
}

// ReadAt fills p with the export's bytes at off. It returns an error, and
// p's contents are undefined, unless all of p was read.
func (c *Client) ReadAt(ctx context.Context, p []byte, off uint64) error {
	if err := c.checkRange("read", off, uint64(len(p)), false); err != nil {
		return err
	}
	if len(p) == 0 {
		return nil
	}
	if c.aligned(off, uint64(len(p))) {
		return c.run(ctx, c.split(nbdwire.CmdRead, 0, off, uint64(len(p)), p, nil))
	}
	return c.readUnaligned(ctx, p, off)
}

// WriteAt writes p at off. If fua is set, the data is durable when WriteAt
// returns (with NBD_CMD_FLAG_FUA, or a flush if the server has no FUA).
func (c *Client) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	if err := c.checkRange("write", off, uint64(len(p)), true); err != nil {
		return err
	}
	if len(p) == 0 {
		return nil
	}
	if c.minBlock > 1 && !c.aligned(off, uint64(len(p))) {
		// Several requests: one flush after them all stands for FUA.
		if err := c.writeUnaligned(ctx, off, uint64(len(p)), p, 0); err != nil || !fua {
			return err
		}
		return c.Flush(ctx)
	}
	c.rlockRMW()
	err := c.run(ctx, c.split(nbdwire.CmdWrite, c.fuaFlag(fua), off, uint64(len(p)), nil, p))
	c.runlockRMW()
	if err != nil {
		return err
	}
	return c.emulateFUA(ctx, fua)
}

// Flush makes every write answered before it durable. Against a server
// without a write cache (no NBD_FLAG_SEND_FLUSH) it does nothing.
func (c *Client) Flush(ctx context.Context) error {
	if c.flags&nbdwire.TFlagSendFlush == 0 {
		return c.liveErr()
	}
	return c.run(ctx, []piece{{typ: nbdwire.CmdFlush}})
}

// CacheID returns who holds the server's write cache, as the server
// said when asked (ClientConfig.CacheID): the same id after a reconnection
// means writes answered but not flushed before it are still there. ok is
// false if the client did not ask or the server did not say.
func (c *Client) CacheID() (id [nbdwire.CacheIDSize]byte, ok bool) { return c.cacheID, c.hasCacheID }

// Leased reports whether the server took the lease Config.Lease asked for.
func (c *Client) Leased() bool { return c.leased }

// Lease lets the server serve this connection's requests until end, as
// this client's clock sees it, or a little less (never more): the server
// counts from when it sent the previous Lease's reply, this client from
// when it received it. The first call only starts the count, and a second
// round trip grants the time. A lease never shrinks. It fails with
// ErrNotLeased on a connection without one.
func (c *Client) Lease(ctx context.Context, end time.Time) error {
	if !c.leased {
		return ErrNotLeased
	}
	select {
	case c.lease.mu <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-c.lease.mu }()
	for {
		var r uint64
		if got := c.lease.got; !got.IsZero() {
			if d := end.Sub(got); d > 0 {
				r = uint64(d)
			}
		}
		first := c.lease.got.IsZero()
		c.lease.got = time.Time{} // until this one is answered
		cl, err := c.send(ctx, piece{typ: nbdwire.CmdSegmapLease, off: r, n: uint64(c.lease.ref)})
		if err != nil {
			return err
		}
		if err := c.wait(ctx, cl); err != nil {
			return err
		}
		c.lease.got, c.lease.ref = time.Now(), uint32(cl.cookie)
		if !first {
			return nil
		}
	}
}

// Trim tells the server that [off, off+n) is no longer needed; its
// contents are undefined until written again. Trim is a hint: against a
// server that does not advertise it, it does nothing, and the unaligned
// ends of the range are left alone.
func (c *Client) Trim(ctx context.Context, off, n uint64) error {
	if err := c.checkRange("trim", off, n, true); err != nil {
		return err
	}
	lo, hi := alignUp(off, c.minBlock), alignDown(off+n, c.minBlock)
	if off+n == c.size {
		hi = c.size
	}
	if c.flags&nbdwire.TFlagSendTrim == 0 || hi <= lo {
		return c.liveErr()
	}
	c.rlockRMW()
	defer c.runlockRMW()
	return c.run(ctx, c.split(nbdwire.CmdTrim, 0, lo, hi-lo, nil, nil))
}

// WriteZeroes makes [off, off+n) read as zeros. Without noHole the server
// may punch a hole; with it the range stays allocated. An export that does
// not advertise WRITE_ZEROES fails with an error wrapping ErrENOTSUP (the
// caller may write zeros instead).
func (c *Client) WriteZeroes(ctx context.Context, off, n uint64, noHole bool) error {
	if err := c.checkRange("write zeroes", off, n, true); err != nil {
		return err
	}
	if c.flags&nbdwire.TFlagSendWriteZeroes == 0 {
		return fmt.Errorf("nbd: write zeroes: export %q does not support it: %w", c.export, ErrENOTSUP)
	}
	if n == 0 {
		return c.liveErr()
	}
	var flags uint16
	if noHole {
		flags |= nbdwire.CmdFlagNoHole
	}
	if c.minBlock > 1 && !c.aligned(off, n) {
		return c.writeUnaligned(ctx, off, n, nil, flags)
	}
	c.rlockRMW()
	defer c.runlockRMW()
	return c.run(ctx, c.split(nbdwire.CmdWriteZeroes, flags, off, n, nil, nil))
}

// liveErr returns the error that ended the client, if any: requests that
// need not reach the server still report a dead client.
func (c *Client) liveErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.errLocked()
}

func (c *Client) errLocked() error {
	if c.mu.err != nil {
		return c.mu.err
	}
	if c.mu.closing {
		return ErrClientClosed
	}
	return nil
}

func (c *Client) fuaFlag(fua bool) uint16 {
	if fua && c.flags&nbdwire.TFlagSendFUA != 0 {
		return nbdwire.CmdFlagFUA
	}
	return 0
}

// emulateFUA flushes after a write that asked for FUA on a server that
// does not offer it.
func (c *Client) emulateFUA(ctx context.Context, fua bool) error {
	if fua && c.flags&nbdwire.TFlagSendFUA == 0 {
		return c.Flush(ctx)
	}
	return nil
}

func (c *Client) rlockRMW() {
	if c.minBlock > 1 {
		c.rmw.RLock()
	}
}

func (c *Client) runlockRMW() {
	if c.minBlock > 1 {
		c.rmw.RUnlock()
	}
}

func alignDown(x, a uint64) uint64 { return x / a * a }

func alignUp(x, a uint64) uint64 {
	if r := x % a; r != 0 {
		return x + a - r
	}
	return x
}

// aligned reports whether [off, off+n) obeys the minimum block size. A
// range ending at the end of the export counts as aligned there: an export
// whose size is not a multiple of the block size has no other way to reach
// its last bytes.
func (c *Client) aligned(off, n uint64) bool {
	return off%c.minBlock == 0 && (n%c.minBlock == 0 || off+n == c.size)
}

// blockLen returns the length of the block at blk (shorter at the end of an
// export whose size is not a multiple of the block size).
func (c *Client) blockLen(blk uint64) uint64 { return min(c.minBlock, c.size-blk) }

// readUnaligned reads a range that does not obey the minimum block size:
// the partial blocks at its ends are read whole into bounce buffers, the
// aligned middle straight into p, all at once.
func (c *Client) readUnaligned(ctx context.Context, p []byte, off uint64) error {
	end := off + uint64(len(p))
	first, last := alignDown(off, c.minBlock), alignDown(end-1, c.minBlock)
	if first == last {
		b := make([]byte, c.blockLen(first))
		if err := c.run(ctx, []piece{{typ: nbdwire.CmdRead, off: first, n: uint64(len(b)), buf: b}}); err != nil {
			return err
		}
		copy(p, b[off-first:])
		return nil
	}
	lo, hi := alignUp(off, c.minBlock), alignDown(end, c.minBlock)
	if end == c.size {
		hi = end
	}
	var head, tail []byte
	var ps []piece
	if lo > off {
		head = make([]byte, c.minBlock)
		ps = append(ps, piece{typ: nbdwire.CmdRead, off: first, n: c.minBlock, buf: head})
	}
	if hi > lo {
		ps = append(ps, c.split(nbdwire.CmdRead, 0, lo, hi-lo, p[lo-off:hi-off], nil)...)
	}
	if end > hi {
		tail = make([]byte, c.blockLen(last))
		ps = append(ps, piece{typ: nbdwire.CmdRead, off: last, n: uint64(len(tail)), buf: tail})
	}
	if err := c.run(ctx, ps); err != nil {
		return err
	}
	if head != nil {
		copy(p, head[off-first:])
	}
	if tail != nil {
		copy(p[hi-off:], tail)
	}
	return nil
}

// writeUnaligned writes p (or zeros, if p is nil) over [off, off+n), which
// does not obey the minimum block size: the partial blocks at the ends are
// read, patched and written back while no other write of this client runs;
// the aligned middle is written directly, with flags.
func (c *Client) writeUnaligned(ctx context.Context, off, n uint64, p []byte, flags uint16) error {
	end := off + n
	lo, hi := alignUp(off, c.minBlock), alignDown(end, c.minBlock)
	if end == c.size {
		hi = end
	}
	if hi <= lo {
		// Inside one block, or across one boundary with no whole block.
		lo, hi = end, end
	}
	patch := func(blk uint64) error {
		from, to := max(off, blk), min(end, blk+c.blockLen(blk))
		return c.readModifyWrite(ctx, blk, func(b []byte) {
			if p == nil {
				clear(b[from-blk : to-blk])
			} else {
				copy(b[from-blk:to-blk], p[from-off:to-off])
			}
		})
	}
	for blk := alignDown(off, c.minBlock); blk < lo; blk += c.minBlock {
		if err := patch(blk); err != nil {
			return err
		}
	}
	if hi > lo {
		c.rlockRMW()
		var err error
		if p == nil {
			err = c.run(ctx, c.split(nbdwire.CmdWriteZeroes, flags, lo, hi-lo, nil, nil))
		} else {
			err = c.run(ctx, c.split(nbdwire.CmdWrite, flags, lo, hi-lo, nil, p[lo-off:hi-off]))
		}
		c.runlockRMW()
		if err != nil {
			return err
		}
	}
	if hi < end {
		return patch(hi)
	}
	return nil
}

// readModifyWrite reads the block at blk, lets patch change it and writes
// it back, excluding every other write of this client meanwhile.
func (c *Client) readModifyWrite(ctx context.Context, blk uint64, patch func([]byte)) error {
	c.rmw.Lock()
	defer c.rmw.Unlock()
	b := make([]byte, c.blockLen(blk))
	if err := c.run(ctx, []piece{{typ: nbdwire.CmdRead, off: blk, n: uint64(len(b)), buf: b}}); err != nil {
		return err
	}
	patch(b)
	return c.run(ctx, []piece{{typ: nbdwire.CmdWrite, off: blk, n: uint64(len(b)), payload: b}})
}

// piece is one request to send.
type piece struct {
	typ     nbdwire.Command
	flags   uint16
	off, n  uint64
	buf     []byte // READ destination
	payload []byte // WRITE data
}

// split cuts [off, off+n) into requests the server accepts: READ and WRITE
// at most maxReq bytes, TRIM and WRITE_ZEROES at most maxZero. buf and
// payload are cut along.
func (c *Client) split(typ nbdwire.Command, flags uint16, off, n uint64, buf, payload []byte) []piece {
	limit := c.maxReq
	if typ == nbdwire.CmdTrim || typ == nbdwire.CmdWriteZeroes {
		limit = c.maxZero
	}
	ps := make([]piece, 0, (n+limit-1)/limit)
	for done := uint64(0); done < n; {
		l := min(limit, n-done)
		p := piece{typ: typ, flags: flags, off: off + done, n: l}
		if buf != nil {
			p.buf = buf[done : done+l]
		}
		if payload != nil {
			p.payload = payload[done : done+l]
		}
		ps = append(ps, p)
		done += l
	}
	return ps
}

// run sends every piece, then waits for all their replies, and returns the
// first error. If a send fails or ctx ends, the pieces sent are abandoned.
func (c *Client) run(ctx context.Context, ps []piece) error {
	calls := make([]*clientReq, 0, len(ps))
	var err error
	for _, p := range ps {
		var cl *clientReq
		if cl, err = c.send(ctx, p); err != nil {
			break
		}
		calls = append(calls, cl)
	}
	for _, cl := range calls {
		if err != nil {
			cl.abandon()
			continue
		}
		err = c.wait(ctx, cl)
	}
	return err
}

// send registers a call for p and writes the request. The call is
// answered by the reader goroutine, also when the write fails (which
// breaks the connection).
func (c *Client) send(ctx context.Context, p piece) (*clientReq, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	select {
	case c.wlock <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-c.dead:
		return nil, c.liveErr()
	}
	defer func() { <-c.wlock }()

	cl := &clientReq{typ: p.typ, off: p.off, length: uint32(p.n), done: make(chan struct{}), buf: p.buf}
	c.mu.Lock()
	if err := c.errLocked(); err != nil {
		c.mu.Unlock()
		return nil, err
	}
	c.mu.cookie++
	cookie := c.mu.cookie
	cl.cookie = cookie
	c.mu.pending[cookie] = cl
	c.mu.Unlock()

	var hdr [nbdwire.RequestSize]byte
	be.PutUint32(hdr[0:], nbdwire.MagicRequest)
	be.PutUint16(hdr[4:], p.flags)
	be.PutUint16(hdr[6:], uint16(p.typ))
	be.PutUint64(hdr[8:], cookie)
	be.PutUint64(hdr[16:], p.off)
	be.PutUint32(hdr[24:], uint32(p.n))
	if err := c.writeRequest(ctx, hdr[:], p.payload); err != nil {
		c.breakConn(fmt.Errorf("send %v: %w", p.typ, err))
	}
	return cl, nil
}

// writeRequest writes a request and its payload in one go. The caller
// holds the write lock. A context that ends meanwhile interrupts the write
// through a deadline, which leaves the stream unusable.
func (c *Client) writeRequest(ctx context.Context, hdr, payload []byte) error {
	if ctx.Done() == nil {
		return c.write(hdr, payload)
	}
	interrupted := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(interrupted)
		c.nc.SetWriteDeadline(aLongTimeAgo)
	})
	err := c.write(hdr, payload)
	if !stop() {
		<-interrupted
		if err == nil {
			// The deadline came too late to cut this request short; lift
			// it for the next one.
			c.nc.SetWriteDeadline(time.Time{})
		} else {
			err = fmt.Errorf("%w (%w)", ctx.Err(), err)
		}
	}
	return err
}

func (c *Client) write(hdr, payload []byte) error {
	if payload == nil {
		_, err := c.nc.Write(hdr)
		return err
	}
	bufs := net.Buffers{hdr, payload}
	_, err := bufs.WriteTo(c.nc)
	return err
}

// wait waits for cl's reply or for ctx to end.
func (c *Client) wait(ctx context.Context, cl *clientReq) error {
	select {
	case <-cl.done:
		return cl.err
	case <-ctx.Done():
		if cl.abandon() {
			return cl.err
		}
		return ctx.Err()
	}
}

// abandon detaches cl from its caller: the reader discards READ data from
// now on. It returns true if the reply had already been received whole.
func (cl *clientReq) abandon() bool {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	select {
	case <-cl.done:
		return true
	default:
	}
	cl.buf = nil
	return false
}

// breakConn records why the connection is unusable and closes it; the
// reader goroutine then fails the requests in flight.
func (c *Client) breakConn(cause error) {
	c.mu.Lock()
	c.setErrLocked(cause)
	c.mu.Unlock()
	c.nc.Close()
}

// setErrLocked sets the client's terminal error, if not set yet: after
// Close it is ErrClientClosed, otherwise cause wrapped in ErrDisconnected.
func (c *Client) setErrLocked(cause error) {
	if c.mu.err != nil {
		return
	}
	if c.mu.closing {
		c.mu.err = ErrClientClosed
	} else {
		c.mu.err = fmt.Errorf("%w: %w", ErrDisconnected, cause)
	}
	close(c.dead)
}

// readLoop is the reader goroutine: it reads replies until the connection
// ends, then fails every request still pending.
func (c *Client) readLoop() {
	defer close(c.readerDone)
	err := c.readReplies()
	c.mu.Lock()
	c.setErrLocked(err)
	err = c.mu.err
	pending := c.mu.pending
	c.mu.pending = nil
	if c.mu.drained != nil {
		close(c.mu.drained)
		c.mu.drained = nil
	}
	c.mu.Unlock()
	c.nc.Close()
	for _, cl := range pending {
		cl.finish(err)
	}
}

func (cl *clientReq) finish(err error) {
	cl.err = err
	close(cl.done)
}

// lookup returns the call of cookie; remove also forgets it.
func (c *Client) lookup(cookie uint64, remove bool) *clientReq {
	c.mu.Lock()
	defer c.mu.Unlock()
	cl := c.mu.pending[cookie]
	if cl != nil && remove {
		delete(c.mu.pending, cookie)
		if len(c.mu.pending) == 0 && c.mu.drained != nil {
			close(c.mu.drained)
			c.mu.drained = nil
		}
	}
	return cl
}

// readReplies reads replies and completes their calls. It returns why the
// connection can no longer be read.
func (c *Client) readReplies() error {
	var hdr [nbdwire.ChunkHeaderSize]byte
	for {
		if _, err := io.ReadFull(c.rd, hdr[:4]); err != nil {
			return err
		}
		switch m := be.Uint32(hdr[:]); m {
		case nbdwire.MagicSimpleReply:
			if _, err := io.ReadFull(c.rd, hdr[4:nbdwire.SimpleReplySize]); err != nil {
				return err
			}
			if err := c.simpleReply(be.Uint32(hdr[4:]), be.Uint64(hdr[8:])); err != nil {
				return err
			}
		case nbdwire.MagicChunk:
			if !c.structured {
				return fmt.Errorf("%w: structured reply without negotiation", ErrProtocol)
			}
			if _, err := io.ReadFull(c.rd, hdr[4:nbdwire.ChunkHeaderSize]); err != nil {
				return err
			}
			flags, typ := be.Uint16(hdr[4:]), be.Uint16(hdr[6:])
			cookie, length := be.Uint64(hdr[8:]), be.Uint32(hdr[16:])
			cl := c.lookup(cookie, false)
			if cl == nil {
				return fmt.Errorf("%w: reply chunk for unknown cookie %d", ErrProtocol, cookie)
			}
			if err := c.chunk(cl, flags, typ, length); err != nil {
				return err
			}
			if flags&nbdwire.ReplyFlagDone != 0 {
				c.lookup(cookie, true)
				cl.finish(cl.result())
			}
		default:
			return fmt.Errorf("%w: reply magic %#x", ErrProtocol, m)
		}
	}
}

// simpleReply handles a simple reply; the data of a successful READ
// follows it.
func (c *Client) simpleReply(errno uint32, cookie uint64) error {
	cl := c.lookup(cookie, true)
	if cl == nil {
		return fmt.Errorf("%w: reply for unknown cookie %d", ErrProtocol, cookie)
	}
	var err error
	if errno != 0 {
		err = &RemoteError{Errno: errno}
	} else if cl.typ == nbdwire.CmdRead {
		// A structured server must not answer a READ this way, but the
		// reply is unambiguous, so take it.
		if rerr := cl.fill(c.rd, 0, uint64(cl.length)); rerr != nil {
			cl.finish(rerr)
			return rerr
		}
	}
	cl.finish(err)
	return nil
}

// fill reads n bytes of READ data for offset rel of cl's range into its
// buffer, or discards them if the call was abandoned.
func (cl *clientReq) fill(rd *bufio.Reader, rel, n uint64) error {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.buf == nil {
		_, err := rd.Discard(int(n))
		return err
	}
	_, err := io.ReadFull(rd, cl.buf[rel:rel+n])
	return err
}

// chunk reads the payload of one structured reply chunk for cl. An error
// return breaks the connection.
func (c *Client) chunk(cl *clientReq, flags, typ uint16, length uint32) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %v reply: %s", ErrProtocol, cl.typ, fmt.Sprintf(format, args...))
	}
	switch typ {
	case nbdwire.ChunkNone:
		if length != 0 || flags&nbdwire.ReplyFlagDone == 0 {
			return bad("NONE chunk with length %d, flags %#x", length, flags)
		}
		return nil
	case nbdwire.ChunkOffsetData, nbdwire.ChunkOffsetHole:
		if cl.typ != nbdwire.CmdRead {
			return bad("content chunk type %d", typ)
		}
		if (typ == nbdwire.ChunkOffsetData && length < 9) || (typ == nbdwire.ChunkOffsetHole && length != 12) {
			return bad("chunk type %d of %d bytes", typ, length)
		}
		var b [12]byte
		hl := 8
		if typ == nbdwire.ChunkOffsetHole {
			hl = 12
		}
		if _, err := io.ReadFull(c.rd, b[:hl]); err != nil {
			return err
		}
		off := be.Uint64(b[0:])
		n := uint64(length) - 8
		if typ == nbdwire.ChunkOffsetHole {
			n = uint64(be.Uint32(b[8:]))
		}
		if off < cl.off || off-cl.off > uint64(cl.length) || n > uint64(cl.length)-(off-cl.off) || n == 0 {
			return bad("chunk for [%d, +%d) outside the request [%d, +%d)", off, n, cl.off, cl.length)
		}
		cl.covered += n
		if cl.covered > uint64(cl.length) {
			return bad("overlapping content chunks")
		}
		rel := off - cl.off
		if typ == nbdwire.ChunkOffsetData {
			return cl.fill(c.rd, rel, n)
		}
		cl.mu.Lock()
		if cl.buf != nil {
			clear(cl.buf[rel : rel+n])
		}
		cl.mu.Unlock()
		return nil
	}
	if typ&nbdwire.ChunkErrorBit == 0 {
		return bad("unknown chunk type %d", typ)
	}
	// An error chunk, known or not: error, message length, message, and
	// for ERROR_OFFSET an offset.
	minLen := uint32(6)
	if typ == nbdwire.ChunkErrorOffset {
		minLen = 14
	}
	if length < minLen || length > maxChunkMeta {
		return bad("error chunk type %d of %d bytes", typ, length)
	}
	b := make([]byte, length)
	if _, err := io.ReadFull(c.rd, b); err != nil {
		return err
	}
	errno, msgLen := be.Uint32(b[0:]), uint32(be.Uint16(b[4:]))
	if msgLen > length-minLen {
		return bad("error message of %d bytes in a chunk of %d", msgLen, length)
	}
	if errno == 0 {
		errno = nbdwire.EIO // an error chunk must carry an error
	}
	if cl.chunkErr == nil {
		msg := string(b[6 : 6+msgLen])
		if !nbdwire.ValidString(msg) {
			msg = nbdwire.ClipMessage(msg)
		}
		cl.chunkErr = &RemoteError{Errno: errno, Msg: msg}
	}
	return nil
}

// result is the outcome of a structured reply, once its last chunk came.
func (cl *clientReq) result() error {
	if cl.chunkErr != nil {
		return cl.chunkErr
	}
	if cl.typ == nbdwire.CmdRead && cl.covered != uint64(cl.length) {
		return fmt.Errorf("%w: read of %d bytes at offset %d answered with %d", ErrProtocol, cl.length, cl.off, cl.covered)
	}
	return nil
}

// Abort ends the session at once: the connection is closed and every
// request in flight, and every later one, fails with ErrClientClosed,
// without waiting for the server's answers (whatever it does with the
// requests it already received is unknown). It is for a caller that gave
// up on the server: Close would wait up to closeTimeout for a server that
// stopped answering. It may be called during a Close, which then ends at
// once too. It returns nil, or ErrClientClosed if the session was already
// ended.
func (c *Client) Abort() error {
	c.mu.Lock()
	already := c.mu.err != nil
	c.mu.closing = true
	c.setErrLocked(ErrClientClosed)
	c.mu.Unlock()
	c.nc.Close()
	<-c.readerDone
	if already {
		return ErrClientClosed
	}
	return nil
}

// Close ends the session: new requests fail with ErrClientClosed at once,
// requests in flight get their replies (for up to 10 seconds), then the
// client sends NBD_CMD_DISC and closes the connection. Close does not
// flush. It returns nil, or ErrClientClosed if already called.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.mu.closing {
		c.mu.Unlock()
		<-c.readerDone
		return ErrClientClosed
	}
	c.mu.closing = true
	live := c.mu.err == nil
	var drained chan struct{}
	if live && len(c.mu.pending) > 0 {
		drained = make(chan struct{})
		c.mu.drained = drained
	}
	c.mu.Unlock()

	if live {
		timer := time.NewTimer(closeTimeout)
		defer timer.Stop()
		if drained != nil {
			select {
			case <-drained:
			case <-timer.C:
			}
		}
		// Nothing else is sent once closing is set, but a send may still
		// be finishing.
		select {
		case c.wlock <- struct{}{}:
			var hdr [nbdwire.RequestSize]byte
			be.PutUint32(hdr[0:], nbdwire.MagicRequest)
			be.PutUint16(hdr[6:], uint16(nbdwire.CmdDisc))
			c.nc.SetWriteDeadline(time.Now().Add(time.Second))
			_, _ = c.nc.Write(hdr[:]) // best effort: the connection closes next
			<-c.wlock
		case <-timer.C:
		case <-c.dead:
		}
	}
	c.mu.Lock()
	c.setErrLocked(ErrClientClosed)
	c.mu.Unlock()
	c.nc.Close()
	<-c.readerDone
	return nil
}
