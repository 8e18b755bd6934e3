// Package container provides the storage backends of segmap: a storage
// container is a file or block device cut into fixed-size segment slots
// onto which virtual disks map their segments. The package only stores
// bytes; which slot belongs to which disk is decided elsewhere. Backends:
// a file or block device (File), an NBD export (NBD), memory (Memory);
// OpenURI and CreateURI reach the first two by URI (file://, nbd://).
//
// # Layout
//
// A container file or device starts with a HeaderSize-byte header followed
// by the slot data area:
//
//	[0, HeaderSize)                       header (see below)
//	[HeaderSize + i*SlotSize, +SlotSize)  slot i, for 0 <= i < Slots
//
// The header holds, little-endian: the magic "SEGMAPC1", the format
// version (uint32, 1), the container id (uint32), the slot size (uint64),
// the slot count (uint64) and a CRC-32C (Castagnoli) of the preceding
// bytes; the rest of the header is zero. Callers of a Container never see
// the header: offsets passed to ReadAt, WriteAt and Punch are relative to
// the start of the data area.
//
// # Invariants
//
//   - A container's geometry (id, slot size, slot count) never changes
//     after Create or Format; Open refuses a file whose header is foreign
//     (ErrNotContainer), damaged (ErrCorruptHeader), not the expected one
//     (ErrWrongContainer) or whose data area is cut short (ErrTruncated).
//   - Every I/O is checked against [0, Size()) before it is issued: an
//     out-of-range request fails with ErrOutOfRange and has no effect, it is
//     never clipped into a short read or write.
//   - Bytes never written, or punched since, read as zero.
//
// # States
//
// A container is open from Create, Open, Format or NewMemory until Close:
//
//	open --Close--> closed
//
// Once closed, every method that returns an error returns ErrClosed (the
// geometry methods keep working). I/O racing with Close either completes
// or fails with ErrClosed.
//
// # Backends
//
// File stores a container in a regular file or block device with
// pread/pwrite and punches holes with fallocate (on a block device, a
// WRITE_ZEROES or discard that reads back as zero; see File). Memory
// keeps a sparse container in memory for tests. Package containertest
// holds the conformance suite that every backend must pass.
//
// # Creating and formatting
//
// Create makes a new sparse container file. Format (a block device or an
// existing file) and FormatNBD (an NBD export) write a header onto what is
// there, sized to it; they refuse with ErrNotBlank a target that holds a
// file system, a partition table, a swap area, an LVM or LUKS volume or a
// container header (Signature) unless forced, since formatting would
// destroy it.
package container

import (
	"fmt"
	"io"
)

// Container is a storage container cut into Slots() slots of SlotSize()
// bytes each.
//
// Offsets passed to ReadAt, WriteAt and Punch are byte offsets into the slot
// data area: slot i occupies [i*SlotSize(), (i+1)*SlotSize()). The header is
// not addressable.
//
// ReadAt of a range that was never written, or was punched, returns zeros.
// ReadAt, WriteAt and Punch of a range that is not inside [0, Size()) fail
// with an error wrapping ErrOutOfRange and transfer nothing: there are no
// partial reads or writes at the end of a container. A zero-length request
// at any offset in [0, Size()] succeeds.
//
// All methods are safe for concurrent use; ReadAt and WriteAt may run in
// parallel on any ranges, overlapping or not. As with io.ReaderAt and
// io.WriterAt, the caller keeps ownership of p and the container does not
// retain it. Concurrent overlapping writes leave the overlap holding either
// write's bytes, possibly mixed; order them above this layer if it matters.
type Container interface {
	io.ReaderAt
	io.WriterAt

	// ID returns the container id recorded in its header.
	ID() uint32
	// SlotSize returns the number of bytes in each slot.
	SlotSize() int64
	// Slots returns the number of slots.
	Slots() int64
	// Size returns the size of the data area, Slots()*SlotSize().
	Size() int64

	// Flush makes all completed writes and punches durable.
	Flush() error
	// Punch makes [off, off+n) read as zero and, where the backend can,
	// releases the storage behind it. The range must lie inside [0, Size()).
	Punch(off, n int64) error
	// Close releases the container. Afterwards every method that returns
	// an error returns ErrClosed. Close does not imply Flush.
	Close() error
}

// NoWaitReader is an optional interface of a Container: a read that does
// not wait for storage, for callers that would rather hand a slow read to
// another goroutine than block on it.
type NoWaitReader interface {
	// ReadAtNoWait reads len(p) bytes at off, as ReadAt does, if it can
	// without waiting for the storage (the bytes are cached in memory).
	// Otherwise, and whenever it cannot tell, it returns ok false at once
	// and the caller must use ReadAt; p may then have been written to.
	// An out-of-range read returns ok false as well: ReadAt reports it.
	ReadAtNoWait(p []byte, off int64) (ok bool)
}

// Aborter is an optional interface of a Container whose I/O waits on a
// remote storage node: a holder that gave up on the node (it stopped
// answering) releases the container without waiting for answers that may
// never come, as Close would.
type Aborter interface {
	// Abort releases the container as Close does, except that the I/O in
	// flight fails with ErrClosed at once; whether the storage carried
	// out the writes among it is unknown. It returns what Close would.
	Abort() error
}

// Leaser is an optional interface of a Container whose storage serves
// its holder only under a lease: an NBD container on a segmap storage node,
// opened with a lease (OpenNBDLeased). Once the lease runs out every
// request fails with ErrLeaseOver, so that a holder paused past its lease,
// and fenced meanwhile, cannot land a write late.
type Leaser interface {
	// RenewLease asks for the lease to be extended to the holder's
	// current lease end, in the background: it does not wait.
	RenewLease()
}

// Allocator is an optional interface of a Container: how much storage
// its backing holds, as opposed to how much it could hold (Size). Slots
// never written and ranges punched since take none where the backing is
// sparse, so the figure is what a pool really costs on disk.
type Allocator interface {
	// Allocated returns the bytes of storage the container's backing
	// holds, its header included: for a file, its allocated blocks
	// (st_blocks × 512, what du(1) counts). It fails with an error
	// wrapping ErrAllocationUnknown where the backing cannot tell (a
	// block device), and with ErrClosed after Close.
	Allocated() (int64, error)
}

// FreeSlot punches slot so that it reads as zero and its storage is released
// where the backend can.
func FreeSlot(c Container, slot int64) error {
	if slot < 0 || slot >= c.Slots() {
		return fmt.Errorf("container %d: free slot %d of %d: %w", c.ID(), slot, c.Slots(), ErrOutOfRange)
	}
	return c.Punch(slot*c.SlotSize(), c.SlotSize())
}

// checkRange returns an error wrapping ErrOutOfRange unless
// 0 <= off <= off+n <= size. It is written to avoid overflow for any off
// and n.
func checkRange(id uint32, op string, off, n, size int64) error {
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("container %d: %s of %d bytes at offset %d outside [0, %d): %w", id, op, n, off, size, ErrOutOfRange)
	}
	return nil
}
