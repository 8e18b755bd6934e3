package container

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// File is a Container stored in a regular file or a block device.
//
// Reads and writes go straight to pread(2) and pwrite(2) (os.File's ReadAt
// and WriteAt) with no lock of our own: the only shared state on the I/O
// path is an atomic closed flag. A Close racing with I/O is safe because
// os.File keeps the descriptor alive until in-flight calls return; those
// calls fail with ErrClosed.
//
// Punch uses fallocate(2) with FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE, so
// a punched slot gives its blocks back to the file system. On a block
// device the same call discards the range and guarantees it reads as zero
// (the kernel issues WRITE_ZEROES with unmap; a loop device punches its
// backing file); a device that cannot do that is asked for
// FALLOC_FL_ZERO_RANGE, which the kernel carries out by writing zeros if
// it must, and, on kernels without fallocate on block devices, the
// BLKZEROOUT ioctl. BLKDISCARD is never used: a discarded range need not
// read as zero. Where none of these is supported (or the range is not
// aligned to the device's logical blocks), Punch writes zeros itself,
// which keeps the contract (the range reads as zero) without releasing
// space. The kernel drops the device's page cache over the range in
// every case, so a read after Punch sees the zeros.
type File struct {
	f    *os.File
	raw  syscall.RawConn // f's descriptor, for fallocate
	path string
	h    Header

	// dev is true for a block device.
	dev bool

	closed atomic.Bool
	// noPunch, noZeroRange and noZeroOut are set once the kernel reported
	// that punching a hole, zeroing a range with fallocate, or BLKZEROOUT
	// are not supported at all, so later punches stop asking.
	noPunch, noZeroRange, noZeroOut atomic.Bool
	// noNoWait is set once preadv2 refused RWF_NOWAIT (an old kernel, a
	// file system without it): ReadAtNoWait stops trying.
	noNoWait atomic.Bool
}

var (
	_ Container    = (*File)(nil)
	_ NoWaitReader = (*File)(nil)
	_ Allocator    = (*File)(nil)
)

// headerWritten is how much of the header Create writes: the fields and
// their checksum fit in it, the rest is zero.
const headerWritten = 4096

// Create makes a new container file at path with header h. The file must not
// exist (the error then wraps fs.ErrExist). The data area is sparse: the file
// is extended with ftruncate, so it reads as zero and takes no space until
// written. The file and its directory are fsynced before Create returns, so
// the new container survives a crash. On failure nothing is left at path.
func Create(path string, h Header) (*File, error) {
	if err := h.validate(); err != nil {
		return nil, fmt.Errorf("create container %s: %w: %v", path, ErrInvalidHeader, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create container: %w", err)
	}
	fail := func(err error) (*File, error) {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("create container %s: %w", path, err)
	}
	// Only the header's first page holds anything: the rest stays a hole
	// of the new file (reading as zero), so a fresh container holds one
	// page on storage, not HeaderSize.
	if _, err := f.WriteAt(h.encode()[:headerWritten], 0); err != nil {
		return fail(err)
	}
	if err := f.Truncate(HeaderSize + h.DataSize()); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		return fail(err)
	}
	c, err := newFile(f, path, h)
	if err != nil {
		return fail(err)
	}
	return c, nil
}

// Open opens an existing container file or block device for reading and
// writing and checks that it is a whole, intact container. If want is not
// nil, the container's id and slot size must equal want's (want.Slots is
// ignored: a container may be opened without knowing its size); otherwise
// Open fails with ErrWrongContainer.
func Open(path string, want *Header) (*File, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open container: %w", err)
	}
	h, err := readHeader(f)
	if err == nil && want != nil && (h.ID != want.ID || h.SlotSize != want.SlotSize) {
		err = fmt.Errorf("%w: found id %d with slot size %d, want id %d with slot size %d",
			ErrWrongContainer, h.ID, h.SlotSize, want.ID, want.SlotSize)
	}
	if err == nil {
		err = checkSize(f, h)
	}
	var c *File
	if err == nil {
		c, err = newFile(f, path, h)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open container %s: %w", path, err)
	}
	return c, nil
}

// ReadHeader reads and validates the header of the container at path,
// without checking the rest of the file.
func ReadHeader(path string) (Header, error) {
	f, err := os.Open(path)
	if err != nil {
		return Header{}, fmt.Errorf("read container header: %w", err)
	}
	defer f.Close()
	h, err := readHeader(f)
	if err != nil {
		return Header{}, fmt.Errorf("read container header %s: %w", path, err)
	}
	return h, nil
}

// Format writes a new header onto an existing file or block device, which is
// how containers on block devices are made. The container gets as many slots
// of slotSize as fit after the header: (size - HeaderSize) / slotSize, the
// size of a device being what seeking to its end gives (its st_size is 0).
//
// Format refuses, with ErrNotBlank and nothing written, a target that
// already holds something it recognises (see Signature): a file system,
// a partition table, a swap area, an LVM or LUKS volume, or a container
// header, its own included. With force it overwrites it. A block device
// is opened exclusively (O_EXCL), so one that is mounted or held by the
// kernel (device mapper, md, swap) fails with EBUSY even with force.
//
// Format does not clear the data area: slots hold whatever the device held
// before until they are written or freed with FreeSlot (a controller
// punches every free slot of a container before it hands one out).
func Format(path string, id uint32, slotSize int64, force bool) (*File, error) {
	flag := os.O_RDWR
	if st, err := os.Stat(path); err == nil && st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0 {
		flag |= os.O_EXCL // a block device: claim it, refuse it if in use
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("format container: %w", err)
	}
	c, err := format(f, path, id, slotSize, force)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("format container %s: %w", path, err)
	}
	return c, nil
}

func format(f *os.File, path string, id uint32, slotSize int64, force bool) (*File, error) {
	size, err := deviceSize(f)
	if err != nil {
		return nil, err
	}
	h := Header{ID: id, SlotSize: slotSize}
	if slotSize > 0 && size > HeaderSize {
		h.Slots = (size - HeaderSize) / slotSize
	}
	if err := h.validate(); err != nil {
		return nil, fmt.Errorf("%w: %v (device is %d bytes)", ErrInvalidHeader, err, size)
	}
	head := make([]byte, min(size, SignatureSpan))
	if _, err := f.ReadAt(head, 0); err != nil && err != io.EOF {
		return nil, err
	}
	if err := checkBlank(head, force); err != nil {
		return nil, err
	}
	if _, err := f.WriteAt(h.encode(), 0); err != nil {
		return nil, err
	}
	if err := f.Sync(); err != nil {
		return nil, err
	}
	return newFile(f, path, h)
}

func newFile(f *os.File, path string, h Header) (*File, error) {
	raw, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	dev := st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0
	return &File{f: f, raw: raw, path: path, h: h, dev: dev}, nil
}

// readHeader reads and decodes the header at the start of f: its first
// headerLen bytes, the only ones that hold anything, and f's size. A file
// shorter than HeaderSize is decoded from what is there, so that a short
// foreign file is reported as ErrNotContainer rather than ErrTruncated.
func readHeader(f *os.File) (Header, error) {
	size, err := deviceSize(f)
	if err != nil {
		return Header{}, err
	}
	b := make([]byte, min(size, headerLen))
	n, rerr := f.ReadAt(b, 0)
	if rerr != nil && !errors.Is(rerr, io.EOF) {
		return Header{}, rerr
	}
	return decodeHeaderOf(b[:n], size)
}

// checkSize fails with ErrTruncated if f is too short to hold h's data area.
func checkSize(f *os.File, h Header) error {
	size, err := deviceSize(f)
	if err != nil {
		return err
	}
	if want := HeaderSize + h.DataSize(); size < want {
		return fmt.Errorf("%w: %d bytes, header (%v) needs %d", ErrTruncated, size, h, want)
	}
	return nil
}

// deviceSize returns the size of a regular file or block device. Seeking to
// the end works for both, where Stat reports 0 for a block device.
func deviceSize(f *os.File) (int64, error) {
	return f.Seek(0, io.SeekEnd)
}

// syncDir fsyncs directory dir so that a file just created in it survives a
// crash.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// Path returns the path the container was opened with.
func (c *File) Path() string { return c.path }

// Header returns the container's header.
func (c *File) Header() Header { return c.h }

// ID implements Container.
func (c *File) ID() uint32 { return c.h.ID }

// SlotSize implements Container.
func (c *File) SlotSize() int64 { return c.h.SlotSize }

// Slots implements Container.
func (c *File) Slots() int64 { return c.h.Slots }

// Size implements Container.
func (c *File) Size() int64 { return c.h.DataSize() }

// ReadAt implements io.ReaderAt; see Container.
func (c *File) ReadAt(p []byte, off int64) (int, error) {
	if c.closed.Load() {
		return 0, c.errClosed()
	}
	if err := checkRange(c.h.ID, "read", off, int64(len(p)), c.Size()); err != nil {
		return 0, err
	}
	n, err := c.f.ReadAt(p, HeaderSize+off)
	if err != nil {
		if err == io.EOF {
			// Open checked the size, so the file shrank under us.
			err = ErrTruncated
		}
		return n, c.ioErr("read", off, len(p), err)
	}
	return n, nil
}

// ReadAtNoWait implements NoWaitReader with preadv2(2) and RWF_NOWAIT,
// which reads from the page cache only: data that is not all cached fails
// with EAGAIN or comes back short, and the caller then reads with ReadAt.
func (c *File) ReadAtNoWait(p []byte, off int64) bool {
	if c.noNoWait.Load() || c.closed.Load() || len(p) == 0 || off < 0 ||
		off > c.Size() || int64(len(p)) > c.Size()-off {
		return false
	}
	r := noWaitReads.Get().(*noWaitRead)
	r.p, r.off = p, HeaderSize+off
	// Control holds the descriptor open during the call: a racing Close
	// makes it fail instead of reading another file's descriptor.
	err := c.raw.Control(r.fn)
	n, errno := r.n, r.errno
	*r = noWaitRead{fn: r.fn}
	noWaitReads.Put(r)
	if err != nil {
		return false
	}
	if errno == unix.EOPNOTSUPP || errno == unix.EINVAL {
		c.noNoWait.Store(true)
	}
	return errno == 0 && n == uintptr(len(p))
}

// noWaitRead is one ReadAtNoWait: its arguments and results, and fn, the
// function given to RawConn.Control, bound once so that a read allocates
// nothing.
type noWaitRead struct {
	p     []byte
	off   int64
	n     uintptr
	errno syscall.Errno
	fn    func(fd uintptr)
}

var noWaitReads = sync.Pool{New: func() any {
	r := &noWaitRead{}
	r.fn = func(fd uintptr) { r.n, r.errno = preadv2NoWait(fd, r.p, r.off) }
	return r
}}

// preadv2NoWait is preadv2(fd, {p}, off, RWF_NOWAIT) without the
// allocations of unix.Preadv2.
func preadv2NoWait(fd uintptr, p []byte, off int64) (uintptr, syscall.Errno) {
	var iov unix.Iovec
	iov.Base = &p[0]
	iov.SetLen(len(p))
	const longBits = unsafe.Sizeof(uintptr(0)) * 8
	lo, hi := uintptr(off), uintptr(uint64(off)>>(longBits-1)>>1)
	n, _, errno := unix.Syscall6(unix.SYS_PREADV2, fd, uintptr(unsafe.Pointer(&iov)), 1, lo, hi, unix.RWF_NOWAIT)
	runtime.KeepAlive(p)
	return n, errno
}

// WriteAt implements io.WriterAt; see Container.
func (c *File) WriteAt(p []byte, off int64) (int, error) {
	if c.closed.Load() {
		return 0, c.errClosed()
	}
	if err := checkRange(c.h.ID, "write", off, int64(len(p)), c.Size()); err != nil {
		return 0, err
	}
	n, err := c.f.WriteAt(p, HeaderSize+off)
	if err != nil {
		return n, c.ioErr("write", off, len(p), err)
	}
	return n, nil
}

// Flush implements Container with fdatasync(2): the data, and the metadata
// needed to read it back (block allocation, size), but not timestamps.
func (c *File) Flush() error {
	if c.closed.Load() {
		return c.errClosed()
	}
	if err := fdatasync(c.f); err != nil {
		if c.closed.Load() || errors.Is(err, os.ErrClosed) {
			return c.errClosed()
		}
		return fmt.Errorf("container %s: flush: %w", c.path, err)
	}
	return nil
}

// Punch implements Container. See File for how.
func (c *File) Punch(off, n int64) error {
	if c.closed.Load() {
		return c.errClosed()
	}
	if err := checkRange(c.h.ID, "punch", off, n, c.Size()); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	err := c.zeroFast(HeaderSize+off, n)
	if err == nil {
		return nil
	}
	if !unsupported(err) {
		return c.ioErr("punch", off, int(n), err)
	}
	if err := c.writeZeros(HeaderSize+off, n); err != nil {
		return c.ioErr("punch", off, int(n), err)
	}
	return nil
}

// zeroFast asks the kernel to make [off, off+n) of the underlying file
// (offsets include the header) read as zero, without our writing the
// zeros: see File for the ways it tries. An error for which unsupported
// is true means that none worked and zeros must be written.
func (c *File) zeroFast(off, n int64) error {
	try := func(no *atomic.Bool, call func(fd int) error) error {
		if no.Load() {
			return unix.EOPNOTSUPP
		}
		err := c.control(call)
		if neverSupported(err) {
			no.Store(true)
		}
		return err
	}
	err := try(&c.noPunch, func(fd int) error {
		return unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	})
	if !c.dev || !unsupported(err) {
		return err
	}
	err = try(&c.noZeroRange, func(fd int) error {
		return unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	})
	if !unsupported(err) {
		return err
	}
	return try(&c.noZeroOut, func(fd int) error {
		r := [2]uint64{uint64(off), uint64(n)}
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKZEROOUT, uintptr(unsafe.Pointer(&r)))
		if errno != 0 {
			return errno
		}
		return nil
	})
}

// control runs a system call on the file's descriptor.
func (c *File) control(call func(fd int) error) error {
	var errno error
	if err := c.raw.Control(func(fd uintptr) { errno = call(int(fd)) }); err != nil {
		return err
	}
	return errno
}

// unsupported reports whether an error of zeroFast means that the kernel
// cannot zero this range this way (rather than that the I/O failed):
// EINVAL is a range not aligned to a device's logical blocks, and ENOTTY
// an ioctl the file does not know.
func unsupported(err error) bool {
	return neverSupported(err) || errors.Is(err, unix.EINVAL)
}

// neverSupported reports whether an error means that this way of zeroing
// is not supported at all, so there is no point asking again.
func neverSupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.ENOTTY)
}

// zeros is the source for writeZeros. It is never written, so sharing it
// between goroutines is safe.
var zeros [256 << 10]byte

// writeZeros overwrites [off, off+n) of the underlying file (offsets include
// the header) with zeros.
func (c *File) writeZeros(off, n int64) error {
	for n > 0 {
		l := min(n, int64(len(zeros)))
		if _, err := c.f.WriteAt(zeros[:l], off); err != nil {
			return err
		}
		off += l
		n -= l
	}
	return nil
}

// Allocated implements Allocator with fstat(2): st_blocks × 512 of a
// regular file. A block device's blocks are not the file system's to
// count: ErrAllocationUnknown.
func (c *File) Allocated() (int64, error) {
	if c.closed.Load() {
		return 0, c.errClosed()
	}
	var st unix.Stat_t
	var errno error
	if err := c.raw.Control(func(fd uintptr) { errno = unix.Fstat(int(fd), &st) }); err != nil {
		if c.closed.Load() || errors.Is(err, os.ErrClosed) {
			return 0, c.errClosed()
		}
		return 0, fmt.Errorf("container %s: stat: %w", c.path, err)
	}
	if errno != nil {
		return 0, fmt.Errorf("container %s: stat: %w", c.path, errno)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return 0, fmt.Errorf("container %s: not a regular file: %w", c.path, ErrAllocationUnknown)
	}
	return st.Blocks * 512, nil
}

// Close implements Container. It closes the descriptor without fsync; call
// Flush first if durability matters.
func (c *File) Close() error {
	if !c.closed.CompareAndSwap(false, true) {
		return c.errClosed()
	}
	if err := c.f.Close(); err != nil {
		return fmt.Errorf("container %s: close: %w", c.path, err)
	}
	return nil
}

func (c *File) errClosed() error {
	return fmt.Errorf("container %s: %w", c.path, ErrClosed)
}

// ioErr wraps an error from the file with the operation and range. An error
// caused by a concurrent Close becomes ErrClosed.
func (c *File) ioErr(op string, off int64, n int, err error) error {
	if c.closed.Load() || errors.Is(err, os.ErrClosed) {
		return c.errClosed()
	}
	return fmt.Errorf("container %s: %s of %d bytes at offset %d: %w", c.path, op, n, off, err)
}

// fdatasync syncs f's data, retrying when interrupted.
func fdatasync(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		for {
			serr = syscall.Fdatasync(int(fd))
			if serr != syscall.EINTR {
				return
			}
		}
	}); err != nil {
		return err
	}
	if serr != nil {
		return &os.PathError{Op: "fdatasync", Path: f.Name(), Err: serr}
	}
	return nil
}
