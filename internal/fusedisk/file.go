package fusedisk

import (
	"context"
	"errors"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"segmap/internal/nbd/nbdclient"
)

// file is the inode of Dir/disk. It has no file handles: every request
// goes to the Disk.
type file struct {
	fs.Inode
	d     *Disk
	mtime time.Time
}

var (
	_ fs.NodeGetattrer = (*file)(nil)
	_ fs.NodeSetattrer = (*file)(nil)
	_ fs.NodeOpener    = (*file)(nil)
	_ fs.NodeReader    = (*file)(nil)
	_ fs.NodeWriter    = (*file)(nil)
	_ fs.NodeFsyncer   = (*file)(nil)
	_ fs.NodeFlusher   = (*file)(nil)
)

// state returns the size and whether the export is read-only.
func (f *file) state() (size uint64, readOnly bool) {
	f.d.mu.Lock()
	defer f.d.mu.Unlock()
	return f.d.mu.size, f.d.mu.readOnly
}

func (f *file) attr(out *fuse.AttrOut) {
	size, ro := f.state()
	out.Mode = syscall.S_IFREG | 0o600
	if ro {
		out.Mode = syscall.S_IFREG | 0o400
	}
	out.Size = size
	out.Blocks = (size + 511) / 512
	out.Blksize = 4096
	out.Nlink = 1
	out.SetTimes(nil, &f.mtime, &f.mtime)
}

func (f *file) Getattr(ctx context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	f.attr(out)
	return 0
}

// Setattr refuses a size other than the export's; other changes (mode,
// times, owner) are accepted and ignored, so that tools that set them do
// not fail.
func (f *file) Setattr(ctx context.Context, _ fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok {
		if size, _ := f.state(); sz != size {
			return syscall.EPERM
		}
	}
	f.attr(out)
	return 0
}

func (f *file) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if _, ro := f.state(); ro && flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EROFS
	}
	return nil, fuse.FOPEN_DIRECT_IO, 0
}

func (f *file) Read(ctx context.Context, _ fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	size, _ := f.state()
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if uint64(off) >= size {
		return fuse.ReadResultData(nil), 0
	}
	n := min(uint64(len(dest)), size-uint64(off))
	p := dest[:n]
	err := f.d.do(ctx, func(ctx context.Context, c *nbdclient.Client) error {
		return c.ReadAt(ctx, p, uint64(off))
	})
	if err != nil {
		return nil, f.d.errno("read", off, len(p), err)
	}
	return fuse.ReadResultData(p), 0
}

func (f *file) Write(ctx context.Context, _ fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	size, ro := f.state()
	switch {
	case ro:
		return 0, syscall.EROFS
	case off < 0:
		return 0, syscall.EINVAL
	case uint64(off) >= size:
		return 0, syscall.EFBIG
	}
	p := data[:min(uint64(len(data)), size-uint64(off))]
	err := f.d.do(ctx, func(ctx context.Context, c *nbdclient.Client) error {
		return c.WriteAt(ctx, p, uint64(off), false)
	})
	if err != nil {
		return 0, f.d.errno("write", off, len(p), err)
	}
	f.d.wrote()
	return uint32(len(p)), 0
}

// Fsync is the loop device's flush (the fsync of the file system above
// it): an NBD flush.
func (f *file) Fsync(ctx context.Context, _ fs.FileHandle, flags uint32) syscall.Errno {
	return f.flush(ctx)
}

// Flush (a close) flushes too: whoever wrote through a file descriptor
// and closed it finds the data durable.
func (f *file) Flush(ctx context.Context, _ fs.FileHandle) syscall.Errno {
	return f.flush(ctx)
}

func (f *file) flush(ctx context.Context) syscall.Errno {
	if _, ro := f.state(); ro {
		return 0
	}
	if err := f.d.flush(ctx); err != nil {
		return f.d.errno("flush", 0, 0, err)
	}
	return 0
}

// errno logs a failed request and maps its error to what the caller of
// read(2) or write(2) sees.
func (d *Disk) errno(op string, off int64, n int, err error) syscall.Errno {
	e := toErrno(err)
	d.log.Warn("fusedisk: request failed", "op", op, "off", off, "len", n, "errno", e.Error(), "err", err)
	return e
}

// toErrno maps an NBD error to an errno; whatever is not the server's
// answer (a lost connection, a timeout) is EIO.
func toErrno(err error) syscall.Errno {
	switch {
	case errors.Is(err, context.Canceled):
		return syscall.EINTR
	case errors.Is(err, nbdclient.ErrEPERM):
		return syscall.EPERM
	case errors.Is(err, nbdclient.ErrENOSPC):
		return syscall.ENOSPC
	case errors.Is(err, nbdclient.ErrENOMEM):
		return syscall.ENOMEM
	case errors.Is(err, nbdclient.ErrEINVAL):
		return syscall.EINVAL
	case errors.Is(err, nbdclient.ErrEOVERFLOW):
		return syscall.EOVERFLOW
	case errors.Is(err, nbdclient.ErrENOTSUP):
		return syscall.EOPNOTSUPP
	}
	return syscall.EIO
}
