package container

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"segmap/internal/nbd/nbdclient"
)

// NBD is a Container stored on an NBD export on another machine (served by
// `segmap storage`, qemu-nbd, nbdkit or any NBD server), laid out exactly
// like a File: the header in the export's first HeaderSize bytes, the slots
// after it. OpenNBD and FormatNBD fail with the same errors as Open and
// Format.
//
// Reads and writes go to one nbdclient.Client, which keeps many requests in
// flight on its connection; the only state of our own is an atomic closed
// flag. Flush is an NBD flush. Punch is WRITE_ZEROES without NO_HOLE, so
// the server may release the storage; an export that cannot zero gets
// zeros written instead.
//
// The Container interface has no context, so I/O waits for the server as
// long as the connection lives (TCP keepalive notices a dead peer). A lost
// connection fails every request with an error wrapping
// nbdclient.ErrDisconnected, for good: the container does not reconnect; close
// it and open it again.
type NBD struct {
	c   *nbdclient.Client
	uri string
	h   Header

	closed atomic.Bool
	// noZero is set once the export refused WRITE_ZEROES as unsupported,
	// so that later punches write zeros straight away.
	noZero atomic.Bool

	// until, on a leased connection, gives the holder's lease end; kick
	// wakes the renewer, stop (Close) ends it and its renewal under way,
	// renewer waits for it.
	until   func() time.Time
	kick    chan struct{}
	life    context.Context
	stop    context.CancelFunc
	renewer sync.WaitGroup
}

var (
	_ Container = (*NBD)(nil)
	_ Leaser    = (*NBD)(nil)
)

// leaseTimeout bounds one lease renewal.
const leaseTimeout = 5 * time.Second

// OpenNBD opens the container on the NBD export at uri
// (nbd://HOST[:PORT]/EXPORT) and checks that it is a whole, intact
// container, as Open does: a foreign export fails with ErrNotContainer, a
// damaged header with ErrCorruptHeader, an export shorter than its header
// says with ErrTruncated, and, if want is not nil, a container whose id or
// slot size differ from want's with ErrWrongContainer. A read-only export
// is refused (nbdclient.ErrEPERM). ctx bounds connecting and reading the header;
// it is not kept.
func OpenNBD(ctx context.Context, uri string, want *Header, cfg nbdclient.ClientConfig) (*NBD, error) {
	return OpenNBDLeased(ctx, uri, want, cfg, nil)
}

// OpenNBDLeased is OpenNBD for a holder with a lease, whose end until
// gives (nil, or a zero end: no lease): where the server offers segmap's
// lease (a segmap storage node), it serves the container only until that
// end, which RenewLease extends, and refuses requests afterwards with
// ErrLeaseOver. Other servers serve it without a lease.
func OpenNBDLeased(ctx context.Context, uri string, want *Header, cfg nbdclient.ClientConfig, until func() time.Time) (*NBD, error) {
	if until != nil && until().IsZero() {
		until = nil
	}
	cfg.Lease = until != nil
	cl, err := dialNBD(ctx, uri, cfg)
	if err != nil {
		return nil, fmt.Errorf("open container %s: %w", uri, err)
	}
	if cl.Leased() {
		if err := cl.Lease(ctx, until()); err != nil {
			cl.Close()
			return nil, fmt.Errorf("open container %s: lease: %w", uri, err)
		}
	}
	h, err := readNBDHeader(ctx, cl)
	if err == nil && want != nil && (h.ID != want.ID || h.SlotSize != want.SlotSize) {
		err = fmt.Errorf("%w: found id %d with slot size %d, want id %d with slot size %d",
			ErrWrongContainer, h.ID, h.SlotSize, want.ID, want.SlotSize)
	}
	if err == nil {
		if need := uint64(HeaderSize + h.DataSize()); cl.Size() < need {
			err = fmt.Errorf("%w: export is %d bytes, header (%v) needs %d", ErrTruncated, cl.Size(), h, need)
		}
	}
	if err != nil {
		cl.Close()
		return nil, fmt.Errorf("open container %s: %w", uri, err)
	}
	c := &NBD{c: cl, uri: uri, h: h}
	if cl.Leased() {
		c.until, c.kick = until, make(chan struct{}, 1)
		c.life, c.stop = context.WithCancel(context.Background())
		c.renewer.Go(c.renew)
	}
	return c, nil
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
// this one) before it retries them.
func (c *NBD) renew() {
	for {
		select {
		case <-c.life.Done():
			return
		case <-c.kick:
		}
		ctx, cancel := context.WithTimeout(c.life, leaseTimeout)
		_ = c.c.Lease(ctx, c.until())
		cancel()
	}
}

// FormatNBD writes a new header onto the NBD export at uri, as Format does
// on a device: the container gets as many slots of slotSize as fit after
// the header, (export size - HeaderSize) / slotSize. The header is written
// with FUA, so it is durable when FormatNBD returns. As Format, it refuses
// an export that already holds a file system, a partition table or a
// container header (ErrNotBlank) unless force; the data area is left as
// it is.
func FormatNBD(ctx context.Context, uri string, id uint32, slotSize int64, force bool, cfg nbdclient.ClientConfig) (*NBD, error) {
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
	return &NBD{c: cl, uri: uri, h: h}, nil
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

// ReadAt implements io.ReaderAt; see Container.
func (c *NBD) ReadAt(p []byte, off int64) (int, error) {
	if c.closed.Load() {
		return 0, c.errClosed()
	}
	if err := checkRange(c.h.ID, "read", off, int64(len(p)), c.Size()); err != nil {
		return 0, err
	}
	if err := c.c.ReadAt(context.Background(), p, uint64(HeaderSize+off)); err != nil {
		return 0, c.ioErr("read", off, int64(len(p)), err)
	}
	return len(p), nil
}

// WriteAt implements io.WriterAt; see Container.
func (c *NBD) WriteAt(p []byte, off int64) (int, error) {
	if c.closed.Load() {
		return 0, c.errClosed()
	}
	if err := checkRange(c.h.ID, "write", off, int64(len(p)), c.Size()); err != nil {
		return 0, err
	}
	if err := c.c.WriteAt(context.Background(), p, uint64(HeaderSize+off), false); err != nil {
		return 0, c.ioErr("write", off, int64(len(p)), err)
	}
	return len(p), nil
}

// Flush implements Container with an NBD flush.
func (c *NBD) Flush() error {
	if c.closed.Load() {
		return c.errClosed()
	}
	if err := c.c.Flush(context.Background()); err != nil {
		return c.ioErr("flush", 0, 0, err)
	}
	return nil
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
		err := c.c.WriteZeroes(ctx, uint64(HeaderSize+off), uint64(n), false)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, nbdclient.ErrENOTSUP):
			c.noZero.Store(true)
		default:
			return c.ioErr("punch", off, n, err)
		}
	}
	for done := int64(0); done < n; {
		l := min(n-done, int64(len(zeros)))
		if err := c.c.WriteAt(ctx, zeros[:l], uint64(HeaderSize+off+done), false); err != nil {
			return c.ioErr("punch", off, n, err)
		}
		done += l
	}
	return nil
}

// Close implements Container: it ends the NBD session once the requests in
// flight are answered. It does not flush.
func (c *NBD) Close() error {
	if !c.closed.CompareAndSwap(false, true) {
		return c.errClosed()
	}
	if c.stop != nil {
		c.stop()
		c.renewer.Wait()
	}
	if err := c.c.Close(); err != nil && !errors.Is(err, nbdclient.ErrClientClosed) {
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
	if c.closed.Load() || errors.Is(err, nbdclient.ErrClientClosed) {
		return c.errClosed()
	}
	if c.until != nil && errors.Is(err, nbdclient.ErrEPERM) {
		return fmt.Errorf("container %s: %s of %d bytes at offset %d: %w: %w", c.uri, op, n, off, ErrLeaseOver, err)
	}
	return fmt.Errorf("container %s: %s of %d bytes at offset %d: %w", c.uri, op, n, off, err)
}
