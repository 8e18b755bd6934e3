package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	"segmap/internal/backoff"
	"segmap/internal/nbd/nbdwire"
)

// Export is one disk served over NBD.
//
// Methods are called concurrently, from many requests of one connection and
// from many connections; ranges always lie inside [0, Size()) and are never
// empty. The ctx is cancelled when the server is closed. An error fails
// that request only: it is answered with Config.Errno(err) and the
// connection goes on, unless it wraps ErrHangUp, which ends the
// connection. A panic is recovered and answered with EIO.
type Export interface {
	// Size is the export's size in bytes. It is read once per connection.
	Size() uint64
	// ReadOnly reports whether writes are refused. It is read once per
	// connection.
	ReadOnly() bool
	// ReadAt fills all of p from offset off, or returns an error. p is the
	// server's buffer and is valid only during the call.
	ReadAt(ctx context.Context, p []byte, off uint64) error
	// WriteAt writes p at off. If fua is set the data must be durable when
	// WriteAt returns. p is valid only during the call.
	WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error
	// Flush makes durable every write that returned before Flush was
	// called, from every connection to this export (the server advertises
	// NBD_FLAG_CAN_MULTI_CONN).
	Flush(ctx context.Context) error
	// Trim hints that [off, off+n) is no longer needed; its contents are
	// undefined until written again.
	Trim(ctx context.Context, off, n uint64) error
	// WriteZeroes makes [off, off+n) read as zeroes. If noHole is set the
	// range must stay allocated (no hole may be punched).
	WriteZeroes(ctx context.Context, off, n uint64, noHole bool) error
}

// NoWaitReader is an optional interface of an Export: a read that can be
// tried without blocking, so that the server can serve it on the goroutine
// that reads the connection, with no hand-off to a worker (reads from a
// page cache are faster than waking a goroutine).
//
// TryReadAt either serves the READ as ReadAt would, reporting done with
// ReadAt's error, or, if serving it would wait (for storage, for a lock,
// for a remote answer), returns done false at once with no effect beyond
// scribbling on p; the server then calls ReadAt from a worker. It must
// never block: it runs on the connection's reading goroutine. p is the
// server's buffer and is valid only during the call.
type NoWaitReader interface {
	TryReadAt(ctx context.Context, p []byte, off uint64) (done bool, err error)
}

// ExtentLister is an optional interface of an Export: it tells which parts
// of the export are allocated, for the base:allocation metadata context
// (NBD_CMD_BLOCK_STATUS), so that a client can skip holes when it copies
// or maps a disk. An Export without it is reported allocated everywhere
// (flags 0), which is always correct but makes a copy read every byte.
//
// Extents calls fn for consecutive runs of [off, off+length), from off on,
// each with its nonzero length and its flags, until the range is covered
// or fn returns false; it should merge runs of equal flags where it can.
// A run may go on past off+length (the server cuts it), and Extents may
// stop short (the client asks again for the rest). It must not read the
// data only to find holes: reporting a run as allocated (flags 0) is
// always correct. It may be called concurrently with every other method;
// a write that returned before the call is reflected in it. An error fails
// the request as for ReadAt.
type ExtentLister interface {
	Extents(ctx context.Context, off, length uint64, fn func(length uint64, flags ExtentFlags) bool) error
}

// MetaContexter is an optional interface of a Backend: metadata contexts
// of namespaces of its own, beside base:allocation (a dirty bitmap, say).
//
// MetaContexts answers the query q (a namespace, a colon, and what
// follows, never of the namespace "base") of NBD_OPT_LIST_META_CONTEXT
// (list) or NBD_OPT_SET_META_CONTEXT for export: the names of the
// contexts it names. For SET it returns q itself or nothing; for LIST it
// may expand a query that names a namespace or a prefix into every
// context it covers. A query it does not know returns nothing (the spec
// asks servers to ignore those); an error fails the option.
//
// An Export opened after a SET that selected some of its contexts must
// implement ContextExtenter.
type MetaContexter interface {
	MetaContexts(ctx context.Context, export, q string, list bool) ([]string, error)
}

// ContextExtenter is an optional interface of an Export: the status of its
// runs in a context a MetaContexter selected, as ExtentLister does for
// base:allocation. The flags' meaning is the context's; all 32 bits are
// passed to the client.
type ContextExtenter interface {
	ContextExtents(ctx context.Context, name string, off, length uint64, fn func(length uint64, flags ExtentFlags) bool) error
}

// ExtentFlags are the status of a run of an export in a metadata context.
// In base:allocation their bits are NBD_STATE_HOLE and NBD_STATE_ZERO.
type ExtentFlags uint32

const (
	// ExtentHole: the run is not allocated in the backend storage
	// (writing to it may fail with ENOSPC).
	ExtentHole = ExtentFlags(nbdwire.StateHole)
	// ExtentZero: the run reads as zeroes.
	ExtentZero = ExtentFlags(nbdwire.StateZero)
)

func (f ExtentFlags) String() string {
	switch f {
	case 0:
		return "data"
	case ExtentHole:
		return "hole"
	case ExtentZero:
		return "zero"
	case ExtentHole | ExtentZero:
		return "hole|zero"
	}
	return "ExtentFlags(" + strconv.FormatUint(uint64(f), 10) + ")"
}

// ExportInfo describes an export for NBD_OPT_LIST and NBD_OPT_INFO.
type ExportInfo struct {
	Name, Description string
	Size              uint64
	ReadOnly          bool
}

// Backend finds exports by name. Its methods are called concurrently.
type Backend interface {
	// List returns every export a client may select.
	List(ctx context.Context) ([]ExportInfo, error)
	// Open is called once per connection that selects the export; the
	// Closer returned is called when that connection ends, after its last
	// Export call has returned. An unknown name returns an error wrapping
	// nbdwire.ErrUnknownExport.
	Open(ctx context.Context, name string) (Export, io.Closer, error)
}

// Config configures a Server. NewServer copies it.
type Config struct {
	Backend Backend
	// Errno maps an Export error to an NBD error code; nil means every
	// error is EIO, and so does a result of 0.
	Errno func(error) uint32
	// MaxInFlight is the number of requests served concurrently per
	// connection; the connection stops reading requests while that many
	// are in flight. Default 64, at most 4096.
	MaxInFlight int
	// Logger receives connection events; default slog.Default().
	Logger *slog.Logger
	// HandshakeTimeout bounds the handshake, the TLS handshake included: a
	// client that has not entered the transmission phase in time is
	// dropped. The time the server waits in Backend.Open does not count.
	// Default 10s.
	HandshakeTimeout time.Duration
	// TLS, if set, lets a client upgrade its connection with
	// NBD_OPT_STARTTLS; it configures the server side of the TLS
	// handshake (certificates, client authentication). Option haggling
	// then starts afresh over TLS. Nil: STARTTLS is refused with
	// NBD_REP_ERR_POLICY (the spec's NOTLS mode). NewServer keeps a
	// clone.
	TLS *tls.Config
	// TLSRequired makes TLS mandatory (the spec's FORCEDTLS mode): until
	// STARTTLS succeeds every option but STARTTLS and ABORT is answered
	// NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME, which cannot be
	// answered an error, ends the connection, as does a client without
	// fixed newstyle (it cannot ask for TLS). It needs TLS.
	TLSRequired bool
	// Leases lets clients ask for segmap's lease (nbdwire.OptSegmapLease):
	// on such a connection every request is refused with EPERM once the
	// lease the client grants runs out, so that a client paused past its
	// lease (and fenced by its controller meanwhile) cannot land a write
	// late. Off: the option is answered NBD_REP_ERR_UNSUP.
	Leases bool
	// CacheID, if not zero, is the identity of the write cache behind
	// the exports, given to clients that ask (nbdwire.OptSegmapCache):
	// it must change whenever writes answered but not flushed may have
	// been lost, so that a client that reconnects can tell whether its
	// unflushed writes survived. Zero: the option is answered
	// NBD_REP_ERR_UNSUP.
	CacheID [nbdwire.CacheIDSize]byte
	// Metrics, if set, is told of every connection and request (see
	// Metrics).
	Metrics Metrics
}

// Default values of Config fields.
const (
	DefaultMaxInFlight      = 64
	maxMaxInFlight          = 4096
	DefaultHandshakeTimeout = 10 * time.Second
)

// Server serves the exports of a Backend over NBD. Its methods may be
// called concurrently.
type Server struct {
	backend          Backend
	errnoFunc        func(error) uint32
	maxInFlight      int
	log              *slog.Logger
	handshakeTimeout time.Duration
	tls              *tls.Config // nil: no STARTTLS
	tlsRequired      bool
	leases           bool
	cacheID          [nbdwire.CacheIDSize]byte
	metrics          Metrics // nil: none

	// ctx is the parent of every connection's context; Close cancels it.
	ctx    context.Context
	cancel context.CancelFunc
	// closing is closed when Shutdown or Close begins.
	closing chan struct{}
	// conns counts the connection goroutines.
	conns sync.WaitGroup

	mu struct {
		sync.Mutex
		closed    bool // Shutdown or Close was called
		listeners map[net.Listener]struct{}
		conns     map[*conn]struct{}
		// drained is closed when conns becomes empty after closed is set.
		drained chan struct{}
	}

	// failed paces the warnings of requests failed with EIO.
	failed struct {
		mu struct {
			sync.Mutex
			last    time.Time // the last one logged
			skipped int       // left out since
		}
	}
}

// failedEvery is how often at most the server warns of a request failed
// with EIO; those in between are counted in the next warning.
const failedEvery = time.Second

// logFailed logs that request r failed with err, answered with errno: at
// Warn, paced by failedEvery, when the failure is the server's (EIO: the
// host sees an I/O error and its operator needs the cause), else at Debug
// (a request the client got wrong, or the export refused by design).
func (s *Server) logFailed(log *slog.Logger, r *request, errno uint32, err error) {
	if errno != nbdwire.EIO {
		log.Debug("nbd: request failed", "cmd", r.typ, "offset", r.off, "length", r.length, "errno", errno, "err", err)
		return
	}
	now := time.Now()
	s.failed.mu.Lock()
	if !s.failed.mu.last.IsZero() && now.Sub(s.failed.mu.last) < failedEvery {
		s.failed.mu.skipped++
		s.failed.mu.Unlock()
		return
	}
	skipped := s.failed.mu.skipped
	s.failed.mu.last, s.failed.mu.skipped = now, 0
	s.failed.mu.Unlock()
	log.Warn("nbd: request failed with EIO", "cmd", r.typ, "offset", r.off, "length", r.length, "err", err, "more_since_last", skipped)
}

// NewServer returns a server for cfg. It panics if cfg.Backend is nil, and
// if cfg.TLSRequired is set without cfg.TLS.
func NewServer(cfg Config) *Server {
	if cfg.Backend == nil {
		panic("nbd: Config.Backend is nil")
	}
	if cfg.TLSRequired && cfg.TLS == nil {
		panic("nbd: Config.TLSRequired without Config.TLS")
	}
	s := &Server{
		backend:          cfg.Backend,
		errnoFunc:        cfg.Errno,
		maxInFlight:      cfg.MaxInFlight,
		log:              cfg.Logger,
		handshakeTimeout: cfg.HandshakeTimeout,
		tlsRequired:      cfg.TLSRequired,
		leases:           cfg.Leases,
		cacheID:          cfg.CacheID,
		metrics:          cfg.Metrics,
		closing:          make(chan struct{}),
	}
	if cfg.TLS != nil {
		s.tls = cfg.TLS.Clone()
	}
	if s.maxInFlight <= 0 {
		s.maxInFlight = DefaultMaxInFlight
	}
	s.maxInFlight = min(s.maxInFlight, maxMaxInFlight)
	if s.log == nil {
		s.log = slog.Default()
	}
	if s.handshakeTimeout <= 0 {
		s.handshakeTimeout = DefaultHandshakeTimeout
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.mu.listeners = make(map[net.Listener]struct{})
	s.mu.conns = make(map[*conn]struct{})
	return s
}

// Serve accepts connections on l and serves each in its own goroutine. It
// closes l when it returns; after Shutdown or Close it returns
// ErrServerClosed.
func (s *Server) Serve(l net.Listener) error {
	defer l.Close()
	s.mu.Lock()
	if s.mu.closed {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.mu.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.mu.listeners, l)
		s.mu.Unlock()
	}()

	b := backoff.New(backoff.Accept, nil) // after a failed Accept
	for {
		nc, err := l.Accept()
		if err != nil {
			if s.isClosed() {
				return ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of file descriptors and the like: retry after a pause.
			delay := b.Next()
			s.log.Warn("nbd: accept failed", "err", err, "retry_in", delay)
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-s.closing:
				t.Stop()
				return ErrServerClosed
			}
			continue
		}
		b.Reset()
		c := newConn(s, nc)
		if !s.track(c) {
			nc.Close()
			return ErrServerClosed
		}
		go c.serve()
	}
}

// Shutdown stops the server gracefully: it closes the listeners, stops
// every connection from reading new requests, lets the requests in flight
// finish and be answered, then closes the connections. Connections in the
// handshake or without requests in flight are closed at once. If ctx ends
// first, Shutdown returns its error; Close then ends what is left.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	err := s.closeLocked()
	for c := range s.mu.conns {
		c.stop()
	}
	if len(s.mu.conns) == 0 {
		s.mu.Unlock()
		return err
	}
	if s.mu.drained == nil {
		s.mu.drained = make(chan struct{})
	}
	drained := s.mu.drained
	s.mu.Unlock()

	select {
	case <-drained:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close closes the listeners and every connection at once, cancels the
// context of the Export calls in flight and waits for them to return.
func (s *Server) Close() error {
	s.mu.Lock()
	err := s.closeLocked()
	for c := range s.mu.conns {
		c.raw.Close()
	}
	s.mu.Unlock()
	s.cancel()
	s.conns.Wait()
	return err
}

// closeLocked marks the server closed and closes its listeners.
func (s *Server) closeLocked() error {
	if !s.mu.closed {
		s.mu.closed = true
		close(s.closing)
	}
	var err error
	for l := range s.mu.listeners {
		if cerr := l.Close(); cerr != nil && err == nil && !errors.Is(cerr, net.ErrClosed) {
			err = cerr
		}
		delete(s.mu.listeners, l)
	}
	return err
}

func (s *Server) isClosed() bool {
	select {
	case <-s.closing:
		return true
	default:
		return false
	}
}

// track registers a new connection; false if the server is closed.
func (s *Server) track(c *conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mu.closed {
		return false
	}
	s.mu.conns[c] = struct{}{}
	s.conns.Add(1)
	return true
}

// untrack is called by a connection's goroutine as its last act.
func (s *Server) untrack(c *conn) {
	s.mu.Lock()
	delete(s.mu.conns, c)
	if len(s.mu.conns) == 0 && s.mu.drained != nil {
		close(s.mu.drained)
		s.mu.drained = nil
	}
	s.mu.Unlock()
	s.conns.Done()
}

// errno maps an Export error to the NBD error to answer.
func (s *Server) errno(err error) uint32 {
	if errors.Is(err, errPanic) {
		return nbdwire.EIO
	}
	if s.errnoFunc != nil {
		if e := s.errnoFunc(err); e != 0 {
			return e
		}
	}
	return nbdwire.EIO
}
