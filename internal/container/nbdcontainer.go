package container

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"segmap/internal/backoff"
	"segmap/internal/nbd/nbdclient"
	"segmap/internal/nbd/nbdwire"
)

// NBD is a Container stored on an NBD export on another machine (served by
// `segmap storage`, qemu-nbd, nbdkit or any NBD server), laid out exactly
// like a File: the header in the export's first HeaderSize bytes, the slots
// after it. OpenNBD and FormatNBD fail with the same errors as Open and
// Format.
//
// Reads and writes go to one nbdclient.Client, which keeps many requests in
// flight on its connection. Flush is an NBD flush. Punch is WRITE_ZEROES
// without NO_HOLE, so the server may release the storage; an export that
// cannot zero gets zeros written instead.
//
// # Reconnection
//
// The Container interface has no context, so I/O waits for the server as
// long as the connection lives (TCP keepalive notices a dead peer). When
// the connection breaks (the server hung up or restarted, the network
// failed, the server answered ESHUTDOWN), the container dials again by
// itself with the same configuration (TLS, lease), backing off from 50 ms
// to 2 s (NBDOptions.Reconnect), and logs one line when the outage begins
// and one when it ends. A new connection is used only once it passed the
// checks of OpenNBD again: on a leased container the lease is granted
// anew (Lease with the holder's current end) before anything else, and
// the header must be the very one found at open (id, slot size, slots);
// another header means the export now holds another container, and the
// container fails for good with ErrWrongContainer.
//
// Requests that meet the broken connection, and requests made while it
// is down, wait for the next connection and are then sent again on it:
// reads, writes, zeroings and flushes are idempotent. The connection's
// states, as Status reports them:
//
//	connected --break--> reconnecting --FailTimeout--> unreachable
//	    ^                     |                            |
//	    +-----reconnected-----+<-------reconnected---------+
//	reconnecting, unreachable --header changed--> failed
//	any --Close--> closed
//
// While unreachable (down for longer than NBDOptions.FailTimeout, 30 s
// by default), waiting requests and new ones fail with an error wrapping
// ErrUnreachable, which callers can tell from other I/O errors, and
// reconnecting goes on in the background: once the storage is back,
// requests succeed again. A request waits at most FailTimeout from the
// start of the outage (a request sent on a connection whose peer
// vanished without a word waits until TCP notices, as before).
//
// Flushes across a reconnection: the storage acknowledges a write once
// it is in its write cache, and a storage node that restarts because
// its machine crashed has lost that cache, while one whose process alone
// restarted (kill -9, an upgrade) has not: a segmap storage node's write
// cache is the kernel's page cache. So the container asks each server
// who holds its write cache (nbdwire.OptSegmapCache; a storage node
// answers with its machine's boot id). If a write was acknowledged on a
// connection that then broke before a flush on it covered the write,
// and the new connection's server does not report the same write cache
// as the old one (another boot, or a server that does not say: qemu-nbd,
// nbdkit), the writes may be lost: the next Flush to complete (on the
// new connection, after a real NBD flush there) fails with an error
// wrapping ErrWritesLost, once. Replaying the writes instead would need
// a copy of every unflushed write kept in memory, without bound between
// a host's flushes; failing the flush is what a disk whose write cache
// was lost does, and what fsync reports after writeback errors. A host
// that flushes before it relies on its data (every file system, every
// database) learns of the possible loss; one that never flushes never
// asked for durability. A write sent again on the new connection is
// acknowledged there and covered by the next flush as usual.
//
// One case is beyond the client: a write in flight when the connection
// broke may still be carried out by an old server process that has not
// noticed the break, after the same range was written again on the new
// connection. A storage node that ends ends its requests with it, so
// this needs a network cut with both sides alive.
type NBD struct {
	uri    string
	h      Header
	cfg    nbdclient.ClientConfig
	opts   NBDOptions // defaults filled in
	closed atomic.Bool
	// noZero is set once the export refused WRITE_ZEROES as unsupported,
	// so that later punches write zeros straight away.
	noZero atomic.Bool

	// until, on a leased connection, gives the holder's lease end; kick
	// wakes the renewer.
	until func() time.Time
	kick  chan struct{}
	// lost wakes the keeper when a request found the connection broken.
	lost chan struct{}
	// life ends at Close (stop), which then waits for the goroutines
	// in tasks: the keeper, the renewer, closers of broken clients.
	life  context.Context
	stop  context.CancelFunc
	tasks sync.WaitGroup

	mu struct {
		sync.Mutex
		// cl is the live connection, nil while down; gen counts
		// connections, cl's included.
		cl  *nbdclient.Client
		gen uint64
		// since is when cl came up, or when the outage began.
		since time.Time
		// While down: up is closed when a connection is back (or the
		// container failed), cause is why it is down (the break, then
		// the last failed dial).
		up    chan struct{}
		cause error
		// failed, once set, fails every request: the export holds
		// another container now.
		failed error
		// acked counts writes acknowledged on cl; flushed the first
		// of them that a successful flush on cl covered. unflushed
		// is set when cl broke with acked > flushed; writesLost when
		// the next connection's write cache is not cl's (cacheID,
		// hasCache), and reported by the next successful Flush.
		acked, flushed        uint64
		unflushed, writesLost bool
		cacheID               [nbdwire.CacheIDSize]byte
		hasCache              bool
	}
}

var (
	_ Container = (*NBD)(nil)
	_ Leaser    = (*NBD)(nil)
)

const (
	// leaseTimeout bounds one lease renewal.
	leaseTimeout = 5 * time.Second
	// redialTimeout bounds one reconnection attempt: the handshake,
	// the lease and the header.
	redialTimeout = 10 * time.Second
	// DefaultFailTimeout is NBDOptions.FailTimeout's default.
	DefaultFailTimeout = 30 * time.Second
)

// DefaultReconnect is NBDOptions.Reconnect's default: 50 ms doubling to
// 2 s, each delay shortened by up to a fifth at random so that the
// holders of many containers do not dial in step.
var DefaultReconnect = backoff.Policy{Initial: 50 * time.Millisecond, Max: 2 * time.Second, Jitter: 0.2}

// NBDOptions tunes an NBD container; the zero value is the defaults.
type NBDOptions struct {
	// Lease, if not nil, gives the end of the holder's lease, as for
	// OpenNBDLeased. A nil Lease, or a zero end at open: no lease.
	Lease func() time.Time
	// FailTimeout is how long requests wait for a broken connection to
	// come back before they fail with ErrUnreachable.
	// Default DefaultFailTimeout.
	FailTimeout time.Duration
	// Reconnect spaces the attempts to reconnect; its Limit is
	// ignored: reconnecting goes on until Close. A zero Policy means
	// DefaultReconnect.
	Reconnect backoff.Policy
	// Logger gets a line when a connection breaks, when it is back,
	// when the failure timeout passes and when the container fails.
	// Default slog.Default().
	Logger *slog.Logger
}

func (o NBDOptions) withDefaults() NBDOptions {
	if o.Lease != nil && o.Lease().IsZero() {
		o.Lease = nil
	}
	if o.FailTimeout <= 0 {
		o.FailTimeout = DefaultFailTimeout
	}
	if o.Reconnect == (backoff.Policy{}) {
		o.Reconnect = DefaultReconnect
	}
	o.Reconnect.Limit = 0
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

// NBDState is the state of an NBD container's connection; see NBD.
type NBDState int

// The states of an NBD container's connection.
const (
	// NBDConnected: requests go to the storage.
	NBDConnected NBDState = iota
	// NBDReconnecting: the connection broke less than the failure
	// timeout ago; requests wait for it.
	NBDReconnecting
	// NBDUnreachable: the connection has been down for longer than the
	// failure timeout; requests fail with ErrUnreachable, reconnecting
	// goes on.
	NBDUnreachable
	// NBDFailed: the export holds another container; requests fail
	// for good.
	NBDFailed
	// NBDClosed: Close was called.
	NBDClosed
)

func (s NBDState) String() string {
	switch s {
	case NBDConnected:
		return "connected"
	case NBDReconnecting:
		return "reconnecting"
	case NBDUnreachable:
		return "unreachable"
	case NBDFailed:
		return "failed"
	case NBDClosed:
		return "closed"
	}
	return fmt.Sprintf("NBDState(%d)", int(s))
}

// NBDStatus is what Status reports.
type NBDStatus struct {
	State NBDState
	// Since is when the connection came up (NBDConnected) or when the
	// outage began (NBDReconnecting, NBDUnreachable, NBDFailed).
	Since time.Time
	// Err, when not connected, says why: the break, the last failed
	// attempt to reconnect, or what failed the container.
	Err error
}

// Status reports the state of the container's connection, for status
// displays.
func (c *NBD) Status() NBDStatus {
	if c.closed.Load() {
		return NBDStatus{State: NBDClosed}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.mu.failed != nil:
		return NBDStatus{State: NBDFailed, Since: c.mu.since, Err: c.mu.failed}
	case c.mu.cl != nil:
		return NBDStatus{State: NBDConnected, Since: c.mu.since}
	case time.Since(c.mu.since) >= c.opts.FailTimeout:
		return NBDStatus{State: NBDUnreachable, Since: c.mu.since, Err: c.mu.cause}
	}
	return NBDStatus{State: NBDReconnecting, Since: c.mu.since, Err: c.mu.cause}
}

// OpenNBD opens the container on the NBD export at uri
// (nbd://HOST[:PORT]/EXPORT) and checks that it is a whole, intact
// container, as Open does: a foreign export fails with ErrNotContainer, a
// damaged header with ErrCorruptHeader, an export shorter than its header
// says with ErrTruncated, and, if want is not nil, a container whose id or
// slot size differ from want's with ErrWrongContainer. A read-only export
// is refused (nbdclient.ErrEPERM). ctx bounds connecting and reading the header;
// it is not kept. The container reconnects with the default NBDOptions.
func OpenNBD(ctx context.Context, uri string, want *Header, cfg nbdclient.ClientConfig) (*NBD, error) {
	return OpenNBDWith(ctx, uri, want, cfg, NBDOptions{})
}

// OpenNBDLeased is OpenNBD for a holder with a lease, whose end until
// gives (nil, or a zero end: no lease): where the server offers segmap's
// lease (a segmap storage node), it serves the container only until that
// end, which RenewLease extends, and refuses requests afterwards with
// ErrLeaseOver. Other servers serve it without a lease.
func OpenNBDLeased(ctx context.Context, uri string, want *Header, cfg nbdclient.ClientConfig, until func() time.Time) (*NBD, error) {
	return OpenNBDWith(ctx, uri, want, cfg, NBDOptions{Lease: until})
}

// OpenNBDWith is OpenNBD with options: a lease (as OpenNBDLeased), the
// failure timeout, the reconnection schedule and the logger.
func OpenNBDWith(ctx context.Context, uri string, want *Header, cfg nbdclient.ClientConfig, opts NBDOptions) (*NBD, error) {
	opts = opts.withDefaults()
	cfg.Lease = opts.Lease != nil
	cfg.CacheID = true
	cl, err := dialNBD(ctx, uri, cfg)
	if err != nil && want != nil && !definite(err) {
		// A registered container whose node is down (restarting, say)
		// is waited for as a broken connection is: up to the failure
		// timeout.
		cl, err = redial(ctx, uri, cfg, opts, err)
	}
	if err != nil {
		return nil, fmt.Errorf("open container %s: %w", uri, err)
	}
	h, err := attach(ctx, cl, opts.Lease)
	if err == nil && want != nil && (h.ID != want.ID || h.SlotSize != want.SlotSize) {
		err = fmt.Errorf("%w: found id %d with slot size %d, want id %d with slot size %d",
			ErrWrongContainer, h.ID, h.SlotSize, want.ID, want.SlotSize)
	}
	if err != nil {
		cl.Close()
		return nil, fmt.Errorf("open container %s: %w", uri, err)
	}
	if !cl.Leased() {
		opts.Lease = nil
	}
	return newNBD(cl, uri, h, cfg, opts), nil
}

// definite reports whether err, from dialing an export, says the export
// itself is wrong (dialing again will not help), rather than that its
// node could not be reached.
func definite(err error) bool {
	return errors.Is(err, nbdwire.ErrUnknownExport) || errors.Is(err, nbdclient.ErrEPERM) ||
		errors.Is(err, nbdclient.ErrTLSRequired) || errors.Is(err, nbdclient.ErrProtocol)
}

// redial dials uri again after first failed, with opts.Reconnect's backoff,
// until it connects, the failure timeout passes (ErrUnreachable) or ctx
// ends.
func redial(ctx context.Context, uri string, cfg nbdclient.ClientConfig, opts NBDOptions, first error) (*nbdclient.Client, error) {
	opts.Logger.Warn("container storage unreachable at open; retrying", "uri", uri, "err", first)
	deadline := time.Now().Add(opts.FailTimeout)
	b := backoff.New(opts.Reconnect, nil)
	err := first
	for time.Now().Before(deadline) {
		if errors.Is(b.Sleep(ctx, b.Next()), context.Canceled) || ctx.Err() != nil {
			return nil, fmt.Errorf("%v: %w", err, ctx.Err())
		}
		var cl *nbdclient.Client
		if cl, err = dialNBD(ctx, uri, cfg); err == nil || definite(err) {
			return cl, err
		}
	}
	return nil, fmt.Errorf("%v: %w", err, ErrUnreachable)
}

// attach readies a new connection for requests: it grants the lease
// first, if the server took it (nothing else is served without one), then
// reads the header and checks the export is large enough for it.
func attach(ctx context.Context, cl *nbdclient.Client, until func() time.Time) (Header, error) {
	if until != nil && cl.Leased() {
		if err := cl.Lease(ctx, until()); err != nil {
			return Header{}, fmt.Errorf("lease: %w", err)
		}
	}
	h, err := readNBDHeader(ctx, cl)
	if err != nil {
		return Header{}, err
	}
	if need := uint64(HeaderSize + h.DataSize()); cl.Size() < need {
		return Header{}, fmt.Errorf("%w: export is %d bytes, header (%v) needs %d", ErrTruncated, cl.Size(), h, need)
	}
	return h, nil
}

// newNBD returns the container on cl and starts its keeper (and renewer,
// with a lease).
func newNBD(cl *nbdclient.Client, uri string, h Header, cfg nbdclient.ClientConfig, opts NBDOptions) *NBD {
	c := &NBD{uri: uri, h: h, cfg: cfg, opts: opts, until: opts.Lease, lost: make(chan struct{}, 1)}
	c.mu.cl, c.mu.gen, c.mu.since = cl, 1, time.Now()
	c.mu.cacheID, c.mu.hasCache = cl.CacheID()
	c.life, c.stop = context.WithCancel(context.Background())
	c.tasks.Go(c.keep)
	if c.until != nil {
		c.kick = make(chan struct{}, 1)
		c.tasks.Go(c.renew)
	}
	return c
}

// RenewLease implements Leaser. Without a lease it does nothing.
func (c *NBD) RenewLease() {
	if c.kick == nil {
		return
	}
	select {
	case c.kick <- struct{}{}:
	default: // a renewal is due already, and reads the newest end
	}
}

// renew extends the lease each time RenewLease asks, until Close. A
// failed renewal is not retried before the next ask: requests fail with
// ErrLeaseOver meanwhile, and the holder renews its own lease (and then
// this one) before it retries them. While the connection is down there
// is nothing to renew: the next connection is granted the newest end.
func (c *NBD) renew() {
	for {
		select {
		case <-c.life.Done():
			return
		case <-c.kick:
		}
		c.mu.Lock()
		cl, gen := c.mu.cl, c.mu.gen
		c.mu.Unlock()
		if cl == nil {
			continue
		}
		ctx, cancel := context.WithTimeout(c.life, leaseTimeout)
		if err := cl.Lease(ctx, c.until()); reconnectable(err) {
			c.broken(gen, err)
		}
		cancel()
	}
}

// reconnectable reports whether err says the connection is gone, so that
// the request is worth sending again on the next one.
func reconnectable(err error) bool {
	// ErrClientClosed: the keeper closed a connection that was still
	// shutting down (Close, which also closes clients, is checked
	// first).
	return errors.Is(err, nbdclient.ErrDisconnected) || errors.Is(err, nbdclient.ErrESHUTDOWN) ||
		errors.Is(err, nbdclient.ErrClientClosed)
}

// broken takes connection gen down for cause, if it is still the live
// one, and wakes the keeper.
func (c *NBD) broken(gen uint64, cause error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.downLocked(gen, cause)
}

func (c *NBD) downLocked(gen uint64, cause error) {
	if gen != c.mu.gen || c.mu.cl == nil {
		return // known already
	}
	c.mu.cl = nil
	c.mu.since, c.mu.up, c.mu.cause = time.Now(), make(chan struct{}), cause
	if c.mu.acked > c.mu.flushed {
		c.mu.unflushed = true
	}
	select {
	case c.lost <- struct{}{}:
	default:
	}
}

// keep watches the live connection and, once it breaks, reconnects;
// it returns at Close or when the container failed.
func (c *NBD) keep() {
	c.mu.Lock()
	cl, gen := c.mu.cl, c.mu.gen
	c.mu.Unlock()
	for {
		select {
		case <-c.life.Done():
			return
		case <-cl.Done():
			c.broken(gen, nbdclient.ErrDisconnected)
		case <-c.lost:
		}
		c.mu.Lock()
		if c.mu.cl != nil {
			c.mu.Unlock()
			continue // a stale wake-up: cl is the live connection
		}
		cause := c.mu.cause
		c.mu.Unlock()
		// Close answers what is still in flight on cl (nothing, unless
		// the server is shutting down) and may take a while.
		old := cl
		c.tasks.Go(func() { old.Close() })
		c.opts.Logger.Warn("container storage connection lost; reconnecting",
			"container", c.h.ID, "uri", c.uri, "err", cause)
		if cl, gen = c.reconnect(); cl == nil {
			return
		}
	}
}

// reconnect dials until a connection passes the checks, the container
// fails or Close. It returns the new connection and its number, or nil.
func (c *NBD) reconnect() (*nbdclient.Client, uint64) {
	bo := backoff.New(c.opts.Reconnect, nil)
	warned := false
	for attempt := 1; ; attempt++ {
		cl, err := c.redial()
		c.mu.Lock()
		since := c.mu.since
		switch {
		case err == nil && c.life.Err() == nil:
			c.mu.cl, c.mu.gen, c.mu.since = cl, c.mu.gen+1, time.Now()
			c.mu.cause, c.mu.acked, c.mu.flushed = nil, 0, 0
			id, ok := cl.CacheID()
			sameCache := ok && c.mu.hasCache && id == c.mu.cacheID
			if c.mu.unflushed && !sameCache {
				c.mu.writesLost = true
			}
			c.mu.unflushed, c.mu.cacheID, c.mu.hasCache = false, id, ok
			gen := c.mu.gen
			close(c.mu.up)
			c.mu.Unlock()
			c.opts.Logger.Info("container storage connection back",
				"container", c.h.ID, "uri", c.uri, "down", time.Since(since).Round(time.Millisecond), "attempts", attempt)
			return cl, gen
		case err == nil:
			c.mu.Unlock()
			cl.Close()
			return nil, 0
		case c.life.Err() != nil:
			c.mu.Unlock()
			return nil, 0
		case errors.Is(err, ErrWrongContainer):
			c.mu.failed = err
			close(c.mu.up)
			c.mu.Unlock()
			c.opts.Logger.Error("container storage holds another container now; failing it",
				"container", c.h.ID, "uri", c.uri, "err", err)
			return nil, 0
		}
		c.mu.cause = err
		c.mu.Unlock()
		if !c.pause(bo.Next(), since.Add(c.opts.FailTimeout), &warned) {
			return nil, 0
		}
	}
}

// pause waits d before the next attempt to reconnect, and logs, once per
// outage (warned), when the failure timeout passes meanwhile. It reports
// false if Close came first.
func (c *NBD) pause(d time.Duration, failAt time.Time, warned *bool) bool {
	wait := time.NewTimer(d)
	defer wait.Stop()
	var fail <-chan time.Time
	if !*warned {
		t := time.NewTimer(time.Until(failAt))
		defer t.Stop()
		fail = t.C
	}
	for {
		select {
		case <-wait.C:
			return true
		case <-c.life.Done():
			return false
		case <-fail:
			fail, *warned = nil, true
			c.mu.Lock()
			cause := c.mu.cause
			c.mu.Unlock()
			c.opts.Logger.Error("container storage unreachable beyond the failure timeout; failing its requests, still reconnecting",
				"container", c.h.ID, "uri", c.uri, "timeout", c.opts.FailTimeout, "err", cause)
		}
	}
}

// redial makes a new connection ready for requests: the lease granted
// again, the header the one found at open. A header that differs (or is
// no header at all) fails with ErrWrongContainer.
func (c *NBD) redial() (*nbdclient.Client, error) {
	ctx, cancel := context.WithTimeout(c.life, redialTimeout)
	defer cancel()
	cl, err := dialNBD(ctx, c.uri, c.cfg)
	if err != nil {
		return nil, err
	}
	h, err := attach(ctx, cl, c.until)
	switch {
	case errors.Is(err, ErrNotContainer), errors.Is(err, ErrCorruptHeader), errors.Is(err, ErrTruncated):
		err = fmt.Errorf("%w: the header changed: %w", ErrWrongContainer, err)
	case err == nil && h != c.h:
		err = fmt.Errorf("%w: the header changed from %v to %v", ErrWrongContainer, c.h, h)
	}
	if err != nil {
		cl.Close()
		return nil, err
	}
	return cl, nil
}

// conn returns the live connection and its number, waiting while the
// connection is down, up to the failure timeout from the start of the
// outage.
func (c *NBD) conn() (*nbdclient.Client, uint64, error) {
	for {
		if c.closed.Load() {
			return nil, 0, ErrClosed
		}
		c.mu.Lock()
		if err := c.mu.failed; err != nil {
			c.mu.Unlock()
			return nil, 0, err
		}
		if cl := c.mu.cl; cl != nil {
			gen := c.mu.gen
			c.mu.Unlock()
			return cl, gen, nil
		}
		up, since, cause := c.mu.up, c.mu.since, c.mu.cause
		c.mu.Unlock()
		left := time.Until(since.Add(c.opts.FailTimeout))
		if left <= 0 {
			return nil, 0, fmt.Errorf("%w: down since %s: %w", ErrUnreachable, since.Format(time.RFC3339Nano), cause)
		}
		t := time.NewTimer(left)
		select {
		case <-up:
		case <-t.C:
		case <-c.life.Done():
		}
		t.Stop()
	}
}

// do runs op on the live connection, and again on the next one each time
// it meets a broken connection. A write (and zeroing) counts, once
// acknowledged, among the writes the next flush must cover.
func (c *NBD) do(name string, off, n int64, write bool, op func(*nbdclient.Client) error) error {
	for {
		cl, gen, err := c.conn()
		if err != nil {
			return c.ioErr(name, off, n, err)
		}
		err = op(cl)
		if err == nil {
			if write {
				c.acked(gen)
			}
			return nil
		}
		if !reconnectable(err) || c.closed.Load() {
			return c.ioErr(name, off, n, err)
		}
		c.broken(gen, err)
	}
}

// acked counts a write acknowledged on connection gen.
func (c *NBD) acked(gen uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case gen == c.mu.gen && c.mu.cl != nil:
		c.mu.acked++
	case gen == c.mu.gen:
		// Acknowledged on the connection just given up: the next
		// one tells whether it survived.
		c.mu.unflushed = true
	default:
		// Acknowledged on a connection given up before the live
		// one came: assume the worst.
		c.mu.writesLost = true
	}
}

// FormatNBD writes a new header onto the NBD export at uri, as Format does
// on a device: the container gets as many slots of slotSize as fit after
// the header, (export size - HeaderSize) / slotSize. The header is written
// with FUA, so it is durable when FormatNBD returns. As Format, it refuses
// an export that already holds a file system, a partition table or a
// container header (ErrNotBlank) unless force; the data area is left as
// it is. The container reconnects with the default NBDOptions.
func FormatNBD(ctx context.Context, uri string, id uint32, slotSize int64, force bool, cfg nbdclient.ClientConfig) (*NBD, error) {
	cfg.Lease, cfg.CacheID = false, true
	cl, err := dialNBD(ctx, uri, cfg)
	if err != nil {
		return nil, fmt.Errorf("format container %s: %w", uri, err)
	}
	h := Header{ID: id, SlotSize: slotSize}
	size := min(cl.Size(), math.MaxInt64)
	if slotSize > 0 && size > HeaderSize {
		h.Slots = int64(size-HeaderSize) / slotSize
	}
	err = h.validate()
	if err != nil {
		err = fmt.Errorf("%w: %v (export is %d bytes)", ErrInvalidHeader, err, cl.Size())
	}
	if err == nil {
		head := make([]byte, min(size, SignatureSpan))
		if err = cl.ReadAt(ctx, head, 0); err == nil {
			err = checkBlank(head, force)
		}
	}
	if err == nil {
		err = cl.WriteAt(ctx, h.encode(), 0, true)
	}
	if err != nil {
		cl.Close()
		return nil, fmt.Errorf("format container %s: %w", uri, err)
	}
	return newNBD(cl, uri, h, cfg, NBDOptions{}.withDefaults()), nil
}

// dialNBD connects to the export of uri, which must be writable.
func dialNBD(ctx context.Context, uri string, cfg nbdclient.ClientConfig) (*nbdclient.Client, error) {
	addr, export, err := nbdclient.ParseURI(uri)
	if err != nil {
		return nil, err
	}
	cl, err := nbdclient.Dial(ctx, addr, export, cfg)
	if err != nil {
		return nil, err
	}
	if cl.ReadOnly() {
		cl.Close()
		return nil, fmt.Errorf("export is read-only: %w", nbdclient.ErrEPERM)
	}
	return cl, nil
}

// readNBDHeader reads and decodes the header at the start of the export. An
// export shorter than HeaderSize is decoded from what is there, so that a
// small foreign export is reported as ErrNotContainer.
func readNBDHeader(ctx context.Context, cl *nbdclient.Client) (Header, error) {
	b := make([]byte, min(cl.Size(), HeaderSize))
	if err := cl.ReadAt(ctx, b, 0); err != nil {
		return Header{}, err
	}
	return decodeHeader(b)
}

// URI returns the URI the container was opened with.
func (c *NBD) URI() string { return c.uri }

// Header returns the container's header.
func (c *NBD) Header() Header { return c.h }

// ID implements Container.
func (c *NBD) ID() uint32 { return c.h.ID }

// SlotSize implements Container.
func (c *NBD) SlotSize() int64 { return c.h.SlotSize }

// Slots implements Container.
func (c *NBD) Slots() int64 { return c.h.Slots }

// Size implements Container.
func (c *NBD) Size() int64 { return c.h.DataSize() }

// ReadAt implements io.ReaderAt; see Container and, for a broken
// connection, NBD.
func (c *NBD) ReadAt(p []byte, off int64) (int, error) {
	if c.closed.Load() {
		return 0, c.errClosed()
	}
	if err := checkRange(c.h.ID, "read", off, int64(len(p)), c.Size()); err != nil {
		return 0, err
	}
	err := c.do("read", off, int64(len(p)), false, func(cl *nbdclient.Client) error {
		return cl.ReadAt(context.Background(), p, uint64(HeaderSize+off))
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt implements io.WriterAt; see Container and, for a broken
// connection, NBD.
func (c *NBD) WriteAt(p []byte, off int64) (int, error) {
	if c.closed.Load() {
		return 0, c.errClosed()
	}
	if err := checkRange(c.h.ID, "write", off, int64(len(p)), c.Size()); err != nil {
		return 0, err
	}
	err := c.do("write", off, int64(len(p)), true, func(cl *nbdclient.Client) error {
		return cl.WriteAt(context.Background(), p, uint64(HeaderSize+off), false)
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// Flush implements Container with an NBD flush. A flush that meets a
// broken connection is sent again on the next one; it then fails with
// ErrWritesLost if writes acknowledged on the broken connection had not
// been flushed there (see NBD).
func (c *NBD) Flush() error {
	if c.closed.Load() {
		return c.errClosed()
	}
	for {
		cl, gen, err := c.conn()
		if err != nil {
			return c.ioErr("flush", 0, 0, err)
		}
		c.mu.Lock()
		covers := c.mu.acked // if gen is still live
		c.mu.Unlock()
		err = cl.Flush(context.Background())
		if err == nil {
			c.mu.Lock()
			if gen == c.mu.gen && c.mu.cl != nil {
				c.mu.flushed = max(c.mu.flushed, covers)
			}
			lost := c.mu.writesLost
			c.mu.writesLost = false
			c.mu.Unlock()
			if lost {
				return fmt.Errorf("container %s: flush: %w", c.uri, ErrWritesLost)
			}
			return nil
		}
		if !reconnectable(err) || c.closed.Load() {
			return c.ioErr("flush", 0, 0, err)
		}
		c.broken(gen, err)
	}
}

// Punch implements Container. See NBD for how.
func (c *NBD) Punch(off, n int64) error {
	if c.closed.Load() {
		return c.errClosed()
	}
	if err := checkRange(c.h.ID, "punch", off, n, c.Size()); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	ctx := context.Background()
	if !c.noZero.Load() {
		err := c.do("punch", off, n, true, func(cl *nbdclient.Client) error {
			return cl.WriteZeroes(ctx, uint64(HeaderSize+off), uint64(n), false)
		})
		switch {
		case err == nil:
			return nil
		case errors.Is(err, nbdclient.ErrENOTSUP):
			c.noZero.Store(true)
		default:
			return err
		}
	}
	for done := int64(0); done < n; {
		l := min(n-done, int64(len(zeros)))
		err := c.do("punch", off, n, true, func(cl *nbdclient.Client) error {
			return cl.WriteAt(ctx, zeros[:l], uint64(HeaderSize+off+done), false)
		})
		if err != nil {
			return err
		}
		done += l
	}
	return nil
}

// Close implements Container: it stops reconnecting, fails the requests
// waiting for a connection with ErrClosed and ends the NBD session once
// the requests in flight are answered. It does not flush.
func (c *NBD) Close() error { return c.close(false) }

// Abort implements Aborter: it is Close, but the requests in flight fail
// with ErrClosed at once instead of waiting for the storage node's
// answers.
func (c *NBD) Abort() error { return c.close(true) }

func (c *NBD) close(abort bool) error {
	if !c.closed.CompareAndSwap(false, true) {
		return c.errClosed()
	}
	c.stop()
	if abort {
		c.mu.Lock()
		cl := c.mu.cl
		c.mu.Unlock()
		if cl != nil {
			_ = cl.Abort() // what the close below does then finds it ended
		}
	}
	c.tasks.Wait()
	c.mu.Lock()
	cl := c.mu.cl
	c.mu.cl = nil
	c.mu.Unlock()
	if cl == nil {
		return nil
	}
	if err := cl.Close(); err != nil && !errors.Is(err, nbdclient.ErrClientClosed) {
		return fmt.Errorf("container %s: close: %w", c.uri, err)
	}
	return nil
}

func (c *NBD) errClosed() error {
	return fmt.Errorf("container %s: %w", c.uri, ErrClosed)
}

// ioErr wraps an error of the client with the operation and range. An
// error caused by a concurrent Close becomes ErrClosed.
func (c *NBD) ioErr(op string, off, n int64, err error) error {
	if c.closed.Load() || errors.Is(err, nbdclient.ErrClientClosed) || errors.Is(err, ErrClosed) {
		return c.errClosed()
	}
	if c.until != nil && errors.Is(err, nbdclient.ErrEPERM) {
		return fmt.Errorf("container %s: %s of %d bytes at offset %d: %w: %w", c.uri, op, n, off, ErrLeaseOver, err)
	}
	return fmt.Errorf("container %s: %s of %d bytes at offset %d: %w", c.uri, op, n, off, err)
}
