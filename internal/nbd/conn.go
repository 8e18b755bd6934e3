package nbd

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
)

// connState is the phase of a connection; see the package doc.
type connState uint8

const (
	stateHandshake    connState = iota // greeting and option haggling
	stateTransmission                  // serving requests
	stateDraining                      // not reading; answering requests in flight
	stateClosed                        // socket closed, export released
)

func (s connState) String() string {
	switch s {
	case stateHandshake:
		return "handshake"
	case stateTransmission:
		return "transmission"
	case stateDraining:
		return "draining"
	case stateClosed:
		return "closed"
	}
	return "connState(?)"
}

// readBufferSize is the size of a connection's read buffer: pipelined
// request headers and small write payloads arrive in one read.
const readBufferSize = 64 << 10

// aLongTimeAgo is a deadline in the past, set to interrupt reads.
var aLongTimeAgo = time.Unix(1, 0)

// conn is one client connection. Its goroutine (serve) runs the handshake
// and then reads requests; workers answer them.
type conn struct {
	srv *Server
	// raw is the socket: deadlines are set and the connection is broken
	// through it, from any goroutine. nc is what the protocol is spoken
	// over: raw, or the TLS connection over it once NBD_OPT_STARTTLS
	// succeeded. Only the connection's goroutine changes nc and rd, in the
	// handshake, before any worker starts.
	raw net.Conn
	nc  net.Conn
	rd  *bufio.Reader
	log *slog.Logger
	// ctx is passed to Backend and Export calls; cancelled by Server.Close
	// and when the connection ends.
	ctx    context.Context
	cancel context.CancelFunc

	// Set by the handshake, before any worker starts; read-only after.
	sess *session

	tx transmission

	// met is told of the connection's requests (Config.Metrics), once it
	// has entered transmission; nil: no metrics.
	met ExportMetrics

	// stopping is set by Server.Shutdown: the connection reads nothing
	// more, answers what it had already received with ESHUTDOWN, and
	// closes once the requests in flight are answered. It is set, and
	// read together with a deadline change, under mu.
	stopping atomic.Bool

	// lease is the client's lease, on a leased session.
	lease lease

	mu struct {
		sync.Mutex
		state connState
		// deadline is the handshake's, while it runs; zero otherwise.
		deadline time.Time
	}
}

// session is the export a connection selected and what it negotiated.
type session struct {
	params
	name   string
	exp    Export
	closer io.Closer
}

func newConn(s *Server, nc net.Conn) *conn {
	c := &conn{srv: s, raw: nc, nc: nc}
	c.lease.base = time.Now()
	c.ctx, c.cancel = context.WithCancel(s.ctx)
	c.rd = bufio.NewReaderSize(nc, readBufferSize)
	c.log = s.log.With("remote", remoteAddr(nc))
	return c
}

func remoteAddr(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil {
		return a.String()
	}
	return ""
}

// serve runs the connection to its end. The caller has tracked c.
func (c *conn) serve() {
	defer c.srv.untrack(c)
	defer c.cancel()

	c.startHandshake()
	sess, err := c.safeHandshake()
	if err != nil {
		c.nc.Close()
		c.setState(stateClosed)
		c.logEnd("handshake", err)
		return
	}
	c.sess = sess
	c.log.Debug("nbd: transmission", "export", sess.name, "size", sess.size,
		"flags", sess.flags, "structured", sess.structured)
	c.enterTransmission()
	if c.srv.metrics != nil {
		c.met = c.srv.metrics.Export(sess.name)
		c.met.Connected(1)
		defer c.met.Connected(-1)
	}
	err = c.transmit()
	c.nc.Close()
	if cerr := sess.closer.Close(); cerr != nil {
		c.log.Warn("nbd: closing export", "export", sess.name, "err", cerr)
	}
	c.setState(stateClosed)
	c.logEnd("transmission", err)
}

// logEnd logs why a connection ended: protocol violations and clients
// refused by the TLS policy at Warn, the ordinary ends (client hung up or
// disconnected, server stopping) at Debug.
func (c *conn) logEnd(phase string, err error) {
	switch {
	case errors.Is(err, errProtocol):
		c.log.Warn("nbd: dropping client", "phase", phase, "err", err)
	case errors.Is(err, errPanic):
		c.log.Error("nbd: dropping client", "phase", phase, "err", err)
	case errors.Is(err, os.ErrDeadlineExceeded) && phase == "handshake" && !c.stopping.Load():
		c.log.Info("nbd: handshake timed out", "err", err)
	case (errors.Is(err, errTLSHandshake) || errors.Is(err, errTLSRequired)) && !c.srv.isClosed():
		// Not when the server's stop broke the handshake.
		c.log.Warn("nbd: dropping client", "phase", phase, "err", err)
	default:
		c.log.Debug("nbd: connection closed", "phase", phase, "err", err)
	}
}

// safeHandshake runs the handshake; a panic in the Backend (or in an
// Export's Size or ReadOnly) ends this connection, not the process.
func (c *conn) safeHandshake() (s *session, err error) {
	defer func() {
		if p := recover(); p != nil {
			c.log.Error("nbd: panic in handshake", "panic", p, "stack", string(debug.Stack()))
			s, err = nil, errPanic
		}
	}()
	return c.handshake()
}

// startHandshake sets the handshake deadline, unless Shutdown already
// asked this connection to stop.
func (c *conn) startHandshake() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.stopping.Load() {
		c.mu.deadline = time.Now().Add(c.srv.handshakeTimeout)
		c.raw.SetDeadline(c.mu.deadline)
	}
}

// waitBackend stops the handshake clock while the server waits on its
// Backend (an Open that waits for a restarting controller, say), and
// returns the function that starts it again with the time that was left:
// the handshake deadline bounds the client's slowness, not the backend's.
func (c *conn) waitBackend() (resume func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopping.Load() || c.mu.deadline.IsZero() {
		return func() {}
	}
	left := time.Until(c.mu.deadline)
	c.raw.SetDeadline(time.Time{})
	return func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.stopping.Load() {
			return
		}
		c.mu.deadline = time.Now().Add(left)
		c.raw.SetDeadline(c.mu.deadline)
	}
}

// enterTransmission lifts the handshake deadline, unless Shutdown already
// asked this connection to stop.
func (c *conn) enterTransmission() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.mu.state = stateTransmission
	c.mu.deadline = time.Time{}
	if !c.stopping.Load() {
		c.raw.SetDeadline(time.Time{})
	}
}

// stop makes the connection read nothing more (Server.Shutdown): its reads
// fail at once; replies still go out. A connection still in its handshake
// has no requests to finish: its Backend call in flight is cancelled.
func (c *conn) stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopping.Store(true)
	c.raw.SetReadDeadline(aLongTimeAgo)
	if c.mu.state == stateHandshake {
		c.cancel()
	}
}

func (c *conn) setState(s connState) {
	c.mu.Lock()
	c.mu.state = s
	c.mu.Unlock()
}

// lease is the lease a client grants on a leased session
// (nbdwire.OptSegmapLease): requests are served until end. Times are
// monotonic, in nanoseconds since base.
type lease struct {
	base time.Time
	end  atomic.Int64 // 0: no lease yet
	mu   struct {
		sync.Mutex
		// sent is when the reply to the last CmdSegmapLease was
		// about to be sent, 0 before the first; ref is the low 32
		// bits of its cookie.
		sent int64
		ref  uint32
	}
}

// holds reports whether the lease has not run out.
func (l *lease) holds() bool {
	e := l.end.Load()
	return e > 0 && l.now() < e
}

func (l *lease) now() int64 { return int64(time.Since(l.base)) + 1 }

// renew handles a CmdSegmapLease of r nanoseconds counted from the reply
// to the lease command whose cookie ends in ref: if that is the last one
// answered, the lease runs to r after its reply was sent (the client
// counted r from when it received that reply, which was later). An older
// one (a command the client gave up on was answered since) grants
// nothing. A lease never shrinks. The reply to this command starts the
// next count.
func (l *lease) renew(r uint64, ref uint32, cookie uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if r > 0 && l.mu.sent > 0 && ref == l.mu.ref && r < 1<<62 {
		if end := l.mu.sent + int64(r); end > l.end.Load() {
			l.end.Store(end)
		}
	}
	l.mu.sent, l.mu.ref = l.now(), uint32(cookie)
}
