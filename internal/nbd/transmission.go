package nbd

import (
	"errors"
	"fmt"
	"io"
	"net"
	"runtime/debug"
	"sync"
	"time"

	"segmap/internal/nbd/nbdwire"
)

// transmission is the state of a connection in the transmission phase.
// The connection's goroutine reads requests and hands each to a worker;
// workers run the request and queue its reply. A small READ that the export
// can serve without blocking (NoWaitReader) is served by the reader itself.
//
// Replies are written by whoever finds the queue idle (flat combining):
// it writes every queued reply in one writev, and goes on while more
// arrive. At queue depth 1 that is one write per reply, as before; under
// load replies go out in batches, with fewer syscalls and no goroutine
// dedicated to writing. A slot goes back to the reader only after its reply
// was written, since the reply points into the slot and its buffer.
type transmission struct {
	// slots hold the requests in flight; free hands them to the reader,
	// which blocks when all MaxInFlight are out.
	slots []request
	free  chan *request
	work  chan *request
	// workers is the number of worker goroutines started (reader only);
	// wg waits for them.
	workers int
	wg      sync.WaitGroup
	budget  budget

	// tryRead is the export as a NoWaitReader, or nil.
	tryRead NoWaitReader
	// held are replies the reader queued without writing them yet, and
	// heldBytes their payload: it writes them when it has no complete
	// request buffered, or holds too much.
	held, heldBytes int

	// wmu guards the reply queue.
	wmu sync.Mutex
	// queued are replies waiting to be written; spare is the batch being
	// written, reused.
	queued, spare []*request
	iovs, wbufs   net.Buffers // the writer's scratch (writing set)
	writing       bool        // a goroutine is writing queued replies
	writeErr      error       // the first failed reply
}

// Limits on the replies the reader keeps queued before writing them, and on
// the READs it serves itself.
const (
	maxHeldReplies = 32
	maxHeldBytes   = 1 << 20
	maxInlineRead  = 128 << 10
)

// request is one request in flight, with everything its reply needs, so
// serving it allocates nothing.
type request struct {
	requestHeader
	raw [nbdwire.RequestSize]byte
	// errno, when set by checkRequest, is answered without calling the
	// export; msg goes with it in a structured error chunk.
	errno uint32
	msg   string
	buf   *[]byte // payload buffer from the pool, READ and WRITE
	// charged is the budget this request holds.
	charged int

	// start is when the request arrived and status the error it was
	// answered, for Config.Metrics (start is set only with them).
	start  time.Time
	status uint32

	// bsFirst is the length of the first chunk's payload of a
	// BLOCK_STATUS reply (see blockStatus).
	bsFirst int

	out [nbdwire.ChunkHeaderSize + 6 + nbdwire.MaxErrMsg]byte // reply header
	iov [2][]byte                                             // the reply: header, payload
}

// transmit serves requests until the client disconnects, the connection
// breaks or Shutdown stops it; it returns once every request read has been
// answered (or its reply failed).
func (c *conn) transmit() error {
	t := &c.tx
	n := c.srv.maxInFlight
	t.slots = make([]request, n)
	t.free = make(chan *request, n)
	for i := range t.slots {
		t.free <- &t.slots[i]
	}
	t.work = make(chan *request)
	t.budget.init(maxConnPayload)
	t.queued = make([]*request, 0, n)
	t.spare = make([]*request, 0, n)
	t.iovs = make(net.Buffers, 0, 2*n)
	t.tryRead, _ = c.sess.exp.(NoWaitReader)

	err := c.readRequests()
	c.flushHeld()
	c.setState(stateDraining)
	close(t.work)
	t.wg.Wait()
	t.wmu.Lock()
	defer t.wmu.Unlock()
	if t.writeErr != nil {
		return t.writeErr
	}
	return err
}

// readRequests is the request reader: it returns why it stopped.
func (c *conn) readRequests() error {
	t := &c.tx
	for {
		if t.held > 0 && (c.rd.Buffered() < nbdwire.RequestSize || t.held >= maxHeldReplies ||
			t.heldBytes >= maxHeldBytes || len(t.free) == 0) {
			// About to wait (for the client, or for a slot that a
			// held reply would free), or holding enough.
			c.flushHeld()
		}
		r := <-t.free
		if err := c.readRequest(r); err != nil {
			t.free <- r
			return err
		}
		if r.typ == nbdwire.CmdDisc {
			t.free <- r
			return errDisconnect
		}
		if c.tryInline(r) {
			continue
		}
		c.dispatch(r)
	}
}

// tryInline serves r on the reader if it is a small READ the export can
// serve without blocking, and queues its reply; false leaves r untouched
// for a worker.
func (c *conn) tryInline(r *request) bool {
	t := &c.tx
	if t.tryRead == nil || r.typ != nbdwire.CmdRead || r.errno != 0 || r.length > maxInlineRead {
		return false
	}
	errno, msg, data, ok := c.runNoWait(r)
	if !ok {
		return false
	}
	c.prepareReply(r, errno, msg, data)
	t.held++
	t.heldBytes += len(data)
	t.wmu.Lock()
	t.queued = append(t.queued, r)
	t.wmu.Unlock()
	return true
}

// flushHeld writes the replies the reader queued, unless a worker is
// writing already (it takes them along).
func (c *conn) flushHeld() {
	t := &c.tx
	t.held, t.heldBytes = 0, 0
	t.wmu.Lock()
	c.writeQueuedLocked()
}

// readRequest reads one request, and the payload of a WRITE, into r.
func (c *conn) readRequest(r *request) error {
	if _, err := io.ReadFull(c.rd, r.raw[:]); err != nil {
		return err
	}
	h, ok := decodeRequest(&r.raw)
	if !ok {
		return fmt.Errorf("%w: request magic %#x", errProtocol, be.Uint32(r.raw[:]))
	}
	r.requestHeader = h
	if c.met != nil {
		r.start = time.Now()
	}
	r.errno, r.msg = checkRequest(h, c.sess.params)
	if r.errno == 0 && c.stopping.Load() {
		// Received, but after Shutdown began (spec "Terminating the
		// transmission phase").
		r.errno, r.msg = nbdwire.ESHUTDOWN, "server shutting down"
	}
	n := int(h.length)
	switch {
	case h.typ == nbdwire.CmdWrite && r.errno != 0:
		// Keep the stream in step: the payload follows regardless.
		if n > maxDiscard {
			return fmt.Errorf("%w: write payload of %d bytes", errProtocol, n)
		}
		if _, err := c.rd.Discard(n); err != nil {
			return err
		}
	case h.typ == nbdwire.CmdWrite:
		c.tx.budget.acquire(n)
		r.charged = n
		r.buf = getBuf(n)
		if _, err := io.ReadFull(c.rd, (*r.buf)[:n]); err != nil {
			c.release(r)
			return err
		}
	case h.typ == nbdwire.CmdRead && r.errno == 0:
		c.tx.budget.acquire(n)
		r.charged = n
	case h.typ == nbdwire.CmdBlockStatus && r.errno == 0:
		n = extentBufSize(h.length)
		c.tx.budget.acquire(n)
		r.charged = n
	}
	return nil
}

// dispatch hands r to an idle worker, starting one if none is idle and
// fewer than MaxInFlight run. There is always a worker to take r: at most
// MaxInFlight-1 other requests are out.
func (c *conn) dispatch(r *request) {
	t := &c.tx
	select {
	case t.work <- r:
		return
	default:
	}
	if t.workers < len(t.slots) {
		t.workers++
		t.wg.Add(1)
		go c.worker()
	}
	t.work <- r
}

func (c *conn) worker() {
	defer c.tx.wg.Done()
	for r := range c.tx.work {
		errno, msg := r.errno, r.msg
		var data []byte
		if errno == 0 {
			errno, msg, data = c.run(r)
		}
		c.prepareReply(r, errno, msg, data)
		c.sendReply(r)
	}
}

// release gives back r's buffer and budget.
func (c *conn) release(r *request) {
	if r.buf != nil {
		putBuf(r.buf)
		r.buf = nil
	}
	if r.charged > 0 {
		c.tx.budget.release(r.charged)
		r.charged = 0
	}
}

// errLeaseOver is the message of a request refused because the client's
// lease ran out.
const errLeaseOver = "segmap lease over"

// run calls the export for a checked request. data is the payload of a
// successful READ. A panic in the export (or in Config.Errno) fails this
// request with EIO and is logged; the connection goes on.
func (c *conn) run(r *request) (errno uint32, msg string, data []byte) {
	defer func() {
		if p := recover(); p != nil {
			c.log.Error("nbd: panic serving request", "cmd", r.typ, "offset", r.off,
				"length", r.length, "panic", p, "stack", string(debug.Stack()))
			errno, msg, data = c.srv.errno(errPanic), "internal server error", nil
		}
	}()
	if c.sess.leased {
		if r.typ == nbdwire.CmdSegmapLease {
			c.lease.renew(r.off, r.length, r.cookie)
			return 0, "", nil
		}
		if !c.lease.holds() {
			return nbdwire.EPERM, errLeaseOver, nil
		}
	}
	exp, ctx := c.sess.exp, c.ctx
	fua := r.flags&nbdwire.CmdFlagFUA != 0
	var err error
	switch r.typ {
	case nbdwire.CmdRead:
		r.buf = getBuf(int(r.length))
		data = (*r.buf)[:r.length]
		err = exp.ReadAt(ctx, data, r.off)
	case nbdwire.CmdWrite:
		err = exp.WriteAt(ctx, (*r.buf)[:r.length], r.off, fua)
	case nbdwire.CmdFlush:
		err = exp.Flush(ctx)
	case nbdwire.CmdTrim:
		err = exp.Trim(ctx, r.off, uint64(r.length))
		if err == nil && fua {
			err = exp.Flush(ctx)
		}
	case nbdwire.CmdWriteZeroes:
		err = exp.WriteZeroes(ctx, r.off, uint64(r.length), r.flags&nbdwire.CmdFlagNoHole != 0)
		if err == nil && fua {
			err = exp.Flush(ctx)
		}
	case nbdwire.CmdBlockStatus:
		data, err = c.blockStatus(r)
	default:
		// checkRequest lets no other command through.
		return nbdwire.EINVAL, "unsupported command", nil
	}
	if err != nil {
		if errors.Is(err, ErrHangUp) {
			c.hangUp(err)
		}
		errno := c.srv.errno(err)
		c.srv.logFailed(c.log, r, errno, err)
		return errno, nbdwire.ClipMessage(err.Error()), nil
	}
	return 0, "", data
}

// blockStatus answers a checked BLOCK_STATUS with one
// NBD_REPLY_TYPE_BLOCK_STATUS chunk per selected context: base:allocation
// (an Export that is not an ExtentLister is all data), then the
// ContextExtenter's, in the order of their ids. It returns the payload of
// the first chunk followed by every later chunk, header and payload (the
// last with NBD_REPLY_FLAG_DONE; prepareReply writes the first header),
// and sets r.bsFirst to the first payload's length.
func (c *conn) blockStatus(r *request) ([]byte, error) {
	one := r.flags&nbdwire.CmdFlagReqOne != 0
	per := extentBufSize(r.length)
	k := len(c.sess.contexts)
	if c.sess.allocation {
		k++
	}
	r.buf = getBuf(k*per + (k-1)*nbdwire.ChunkHeaderSize)
	buf := (*r.buf)[:0]
	chunk := func(i int, fill func(l *extentList) error, id uint32, mask ExtentFlags) error {
		if i > 0 {
			// The header of this chunk, after the previous payload:
			// DONE goes on the last, and the length is set below.
			buf = buf[:len(buf)+nbdwire.ChunkHeaderSize]
		}
		start := len(buf)
		l := newExtentList(buf[start:start+per], id, mask, r.length, one)
		if err := fill(&l); err != nil {
			return err
		}
		p := l.payload()
		if i > 0 {
			var flags uint16
			if i == k-1 {
				flags = nbdwire.ReplyFlagDone
			}
			nbdwire.PutChunk(buf[start-nbdwire.ChunkHeaderSize:start], flags, nbdwire.ChunkBlockStatus, r.cookie, uint32(len(p)))
		} else {
			r.bsFirst = len(p)
		}
		buf = buf[:start+len(p)]
		return nil
	}
	i := 0
	if c.sess.allocation {
		if err := chunk(i, func(l *extentList) error {
			if el, ok := c.sess.exp.(ExtentLister); ok {
				return el.Extents(c.ctx, r.off, uint64(r.length), l.add)
			}
			return nil
		}, allocationID, ExtentHole|ExtentZero); err != nil {
			return nil, err
		}
		i++
	}
	for j, name := range c.sess.contexts {
		ce := c.sess.exp.(ContextExtenter) // checked when the session opened
		if err := chunk(i, func(l *extentList) error {
			return ce.ContextExtents(c.ctx, name, r.off, uint64(r.length), l.add)
		}, uint32(firstContextID+j), ^ExtentFlags(0)); err != nil {
			return nil, err
		}
		i++
	}
	return buf, nil
}

// hangUp breaks the connection: no reply written after it reaches the
// client, and the reader stops.
func (c *conn) hangUp(err error) {
	c.log.Warn("nbd: export hung up on the connection", "err", err)
	_ = c.raw.Close()
}

// runNoWait tries a checked READ with the export's NoWaitReader; ok is
// false if the read would block and must go to a worker. A panic fails the
// request, as in run.
func (c *conn) runNoWait(r *request) (errno uint32, msg string, data []byte, ok bool) {
	defer func() {
		if p := recover(); p != nil {
			c.log.Error("nbd: panic serving request", "cmd", r.typ, "offset", r.off,
				"length", r.length, "panic", p, "stack", string(debug.Stack()))
			errno, msg, data, ok = c.srv.errno(errPanic), "internal server error", nil, true
		}
	}()
	if c.sess.leased && !c.lease.holds() {
		return nbdwire.EPERM, errLeaseOver, nil, true
	}
	r.buf = getBuf(int(r.length))
	data = (*r.buf)[:r.length]
	done, err := c.tx.tryRead.TryReadAt(c.ctx, data, r.off)
	if !done {
		putBuf(r.buf)
		r.buf = nil
		return 0, "", nil, false
	}
	if err != nil {
		if errors.Is(err, ErrHangUp) {
			c.hangUp(err)
		}
		errno := c.srv.errno(err)
		c.srv.logFailed(c.log, r, errno, err)
		return errno, nbdwire.ClipMessage(err.Error()), nil, true
	}
	return 0, "", data, true
}

// prepareReply encodes the reply to r into r.iov: a simple reply, or one
// structured chunk with NBD_REPLY_FLAG_DONE (OFFSET_DATA for a READ,
// BLOCK_STATUS for a BLOCK_STATUS, NONE for other successes, ERROR with a
// message for failures).
func (c *conn) prepareReply(r *request, errno uint32, msg string, data []byte) {
	h := r.out[:]
	r.iov[0], r.iov[1] = nil, nil
	r.status = errno
	switch {
	case !c.sess.structured:
		nbdwire.PutSimpleReply(h, errno, r.cookie)
		r.iov[0] = h[:nbdwire.SimpleReplySize]
		if errno == 0 && r.typ == nbdwire.CmdRead {
			r.iov[1] = data
		}
	case errno != 0:
		m := copy(h[nbdwire.ChunkHeaderSize+6:], msg)
		nbdwire.PutChunk(h, nbdwire.ReplyFlagDone, nbdwire.ChunkError, r.cookie, uint32(6+m))
		be.PutUint32(h[nbdwire.ChunkHeaderSize:], errno)
		be.PutUint16(h[nbdwire.ChunkHeaderSize+4:], uint16(m))
		r.iov[0] = h[:nbdwire.ChunkHeaderSize+6+m]
	case r.typ == nbdwire.CmdRead:
		nbdwire.PutChunk(h, nbdwire.ReplyFlagDone, nbdwire.ChunkOffsetData, r.cookie, uint32(8+len(data)))
		be.PutUint64(h[nbdwire.ChunkHeaderSize:], r.off)
		r.iov[0] = h[:nbdwire.ChunkHeaderSize+8]
		r.iov[1] = data
	case r.typ == nbdwire.CmdBlockStatus:
		var flags uint16
		if r.bsFirst == len(data) {
			flags = nbdwire.ReplyFlagDone // one context: one chunk
		}
		nbdwire.PutChunk(h, flags, nbdwire.ChunkBlockStatus, r.cookie, uint32(r.bsFirst))
		r.iov[0] = h[:nbdwire.ChunkHeaderSize]
		r.iov[1] = data
	default:
		nbdwire.PutChunk(h, nbdwire.ReplyFlagDone, nbdwire.ChunkNone, r.cookie, 0)
		r.iov[0] = h[:nbdwire.ChunkHeaderSize]
	}
}

// sendReply queues r's reply and writes the queue unless another goroutine
// is writing it already.
func (c *conn) sendReply(r *request) {
	t := &c.tx
	t.wmu.Lock()
	t.queued = append(t.queued, r)
	c.writeQueuedLocked()
}

// writeQueuedLocked writes the queued replies, batch after batch, until the
// queue is empty, then releases wmu; it returns at once if another
// goroutine is writing. Written requests go back to the reader. Called
// with wmu held.
func (c *conn) writeQueuedLocked() {
	t := &c.tx
	if t.writing || len(t.queued) == 0 {
		t.wmu.Unlock()
		return
	}
	t.writing = true
	for len(t.queued) > 0 {
		batch := t.queued
		t.queued, t.spare = t.spare[:0], nil
		failed := t.writeErr != nil
		t.wmu.Unlock()

		var err error
		if !failed {
			err = c.writeReplies(batch)
		}
		if c.met != nil {
			c.observe(batch, time.Now())
		}
		for i, r := range batch {
			c.release(r)
			t.free <- r
			batch[i] = nil
		}

		t.wmu.Lock()
		if err != nil && t.writeErr == nil {
			// A reply cut short leaves the stream unusable: hang
			// up, which also stops the reader.
			t.writeErr = fmt.Errorf("write reply: %w", err)
			c.nc.Close()
		}
		t.spare = batch[:0]
	}
	t.writing = false
	t.wmu.Unlock()
}

// writeReplies writes the replies of batch: one write for a lone header,
// one writev otherwise. Only the goroutine that set t.writing calls it.
func (c *conn) writeReplies(batch []*request) error {
	t := &c.tx
	if len(batch) == 1 && batch[0].iov[1] == nil {
		_, err := c.nc.Write(batch[0].iov[0])
		return err
	}
	iovs := t.iovs[:0]
	for _, r := range batch {
		iovs = append(iovs, r.iov[0])
		if r.iov[1] != nil {
			iovs = append(iovs, r.iov[1])
		}
	}
	// WriteTo consumes the slice it is called on: a field of t, so that
	// taking its address allocates nothing.
	t.wbufs = iovs
	_, err := t.wbufs.WriteTo(c.nc)
	t.wbufs = nil
	clear(iovs) // no references to pooled buffers
	t.iovs = iovs[:0]
	return err
}
