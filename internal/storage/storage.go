// Package storage is segmap's storage node: it serves the regular files of
// one directory as NBD exports, one export per file, named after it, and
// block devices named one by one. It is a dumb disk server: an export is
// the file's or device's raw bytes, with no header and no segmap logic, so
// that a controller can format a container on it over NBD
// (container.FormatNBD) and agents can open it (container.OpenNBD) from
// other machines, exactly as they would a qemu-nbd or nbdkit export.
//
// # Exports
//
// Dir is the nbd.Backend: it lists the directory on every NBD_OPT_LIST and
// opens the file on every connection that selects it, so files created
// while the server runs (Create, or any other way) are served at once.
// Names starting with a dot are not served (Create makes its files under
// such a name and links them into place when they are complete), nor are
// symbolic links, directories and device nodes found in the directory: a
// link or a device node dropped there must not expose a disk by accident.
// Block devices are served only when named explicitly (Device, 'segmap
// storage --device NAME=/dev/X'): the export NAME is the device at that
// path (a symbolic link such as /dev/disk/by-id/... is followed), its size
// the device's (BLKGETSIZE64), read when a connection opens it. A device's
// name hides a file of the same name in the directory. An export name is
// the configured prefix followed by the file or device name.
//
// # Requests
//
// File is the nbd.Export of one connection: reads and writes are pread and
// pwrite on the file or device, FLUSH and FUA are fdatasync, TRIM and
// WRITE_ZEROES without NO_HOLE punch a hole with fallocate (the file keeps
// its size; a block device discards the range and reads it as zero),
// WRITE_ZEROES with NO_HOLE zeroes the range in place. Where the file
// system or device cannot punch or zero, zeros are written. A file or
// device that cannot be opened for writing is served read-only. Every
// error fails its request only; Errno maps it to the NBD error the client
// sees.
package storage

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"unicode/utf8"
	"unsafe"

	"golang.org/x/sys/unix"

	"segmap/internal/nbd"
	"segmap/internal/nbd/nbdwire"
)

// maxNameLen is the longest file name most Linux file systems allow.
const maxNameLen = 255

// CheckName returns an error wrapping ErrBadName unless name can be the
// name of a served file.
func CheckName(name string) error {
	switch {
	case name == "", len(name) > maxNameLen, !utf8.ValidString(name),
		strings.ContainsAny(name, "/\x00"), name[0] == '.':
		return fmt.Errorf("%q: %w (want 1 to %d bytes of UTF-8, no '/', no leading '.')", name, ErrBadName, maxNameLen)
	}
	return nil
}

// Dir serves the regular files of a directory, and named block devices,
// as NBD exports. It implements nbd.Backend; its methods may be called
// concurrently.
type Dir struct {
	path    string // "" serves no files
	prefix  string
	devices []Device // in name order
}

// Device is a block device served as an export.
type Device struct {
	// Name is the export's name, after the prefix: as CheckName allows.
	Name string
	// Path is the device node, or a symbolic link to it.
	Path string
}

var _ nbd.Backend = (*Dir)(nil)

// NewDir returns a backend for the files in path, whose export names are
// prefix followed by the file name, and for devices, named likewise.
// path must be a directory, or "" to serve the devices only. Every device
// must be a block device when NewDir is called, and their names distinct.
func NewDir(path, prefix string, devices ...Device) (*Dir, error) {
	if path != "" {
		st, err := os.Stat(path)
		if err != nil {
			return nil, fmt.Errorf("storage directory: %w", err)
		}
		if !st.IsDir() {
			return nil, fmt.Errorf("storage directory %s: not a directory", path)
		}
	}
	if !utf8.ValidString(prefix) || strings.ContainsRune(prefix, 0) || len(prefix) > 4096-maxNameLen {
		return nil, fmt.Errorf("export prefix %q: want a short UTF-8 string without NUL", prefix)
	}
	devs := slices.Clone(devices)
	slices.SortFunc(devs, func(a, b Device) int { return strings.Compare(a.Name, b.Name) })
	for i, dv := range devs {
		if err := CheckName(dv.Name); err != nil {
			return nil, fmt.Errorf("device %s: %w", dv.Path, err)
		}
		if i > 0 && devs[i-1].Name == dv.Name {
			return nil, fmt.Errorf("devices %s and %s: %w: both named %q", devs[i-1].Path, dv.Path, ErrBadName, dv.Name)
		}
		st, err := os.Stat(dv.Path)
		if err != nil {
			return nil, fmt.Errorf("device %s: %w", dv.Name, err)
		}
		if !isBlockDevice(st.Mode()) {
			return nil, fmt.Errorf("device %s: %s: %w", dv.Name, dv.Path, ErrNotBlockDevice)
		}
	}
	return &Dir{path: path, prefix: prefix, devices: devs}, nil
}

// Path returns the directory served ("" if none).
func (d *Dir) Path() string { return d.path }

// Devices returns the devices served, in name order.
func (d *Dir) Devices() []Device { return slices.Clone(d.devices) }

// List implements nbd.Backend: one export per device, then one per
// regular file, each in name order. A device that cannot be opened is
// left out (it is listed again once it can be).
func (d *Dir) List(ctx context.Context) ([]nbd.ExportInfo, error) {
	var out []nbd.ExportInfo
	for _, dv := range d.devices {
		x, err := OpenDevice(dv.Path)
		if err != nil {
			continue
		}
		out = append(out, nbd.ExportInfo{
			Name:        d.prefix + dv.Name,
			Description: "segmap storage device " + dv.Path,
			Size:        x.Size(),
			ReadOnly:    x.ReadOnly(),
		})
		x.Close()
	}
	if d.path == "" {
		return out, nil
	}
	ents, err := os.ReadDir(d.path)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", d.path, err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() || CheckName(e.Name()) != nil || d.device(e.Name()) != nil {
			continue
		}
		info, err := e.Info()
		if err != nil {
			continue // removed meanwhile
		}
		p := filepath.Join(d.path, e.Name())
		out = append(out, nbd.ExportInfo{
			Name:        d.prefix + e.Name(),
			Description: "segmap storage file " + p,
			Size:        uint64(info.Size()),
			ReadOnly:    unix.Access(p, unix.W_OK) != nil,
		})
	}
	return out, nil
}

// device returns the device named name, or nil.
func (d *Dir) device(name string) *Device {
	i, ok := slices.BinarySearchFunc(d.devices, name, func(dv Device, n string) int { return strings.Compare(dv.Name, n) })
	if !ok {
		return nil
	}
	return &d.devices[i]
}

// Open implements nbd.Backend: it opens the device or file of export name
// for one connection; the Closer closes it.
func (d *Dir) Open(ctx context.Context, name string) (nbd.Export, io.Closer, error) {
	file, ok := strings.CutPrefix(name, d.prefix)
	if !ok || CheckName(file) != nil {
		return nil, nil, fmt.Errorf("export %q: %w", name, nbdwire.ErrUnknownExport)
	}
	if dv := d.device(file); dv != nil {
		f, err := OpenDevice(dv.Path)
		if err != nil {
			return nil, nil, fmt.Errorf("export %q: %w", name, err)
		}
		return f, f, nil
	}
	if d.path == "" {
		return nil, nil, fmt.Errorf("export %q: %w", name, nbdwire.ErrUnknownExport)
	}
	f, err := OpenFile(filepath.Join(d.path, file))
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, ErrNotRegular) || errors.Is(err, unix.ELOOP) {
		return nil, nil, fmt.Errorf("export %q: %w: %w", name, nbdwire.ErrUnknownExport, err)
	}
	if err != nil {
		return nil, nil, err
	}
	return f, f, nil
}

// File is an NBD export over one open regular file or block device. Its
// methods may be called concurrently.
type File struct {
	f    *os.File
	raw  syscall.RawConn
	path string
	size uint64
	ro   bool

	// Set once the file system said it cannot punch holes, or zero ranges
	// in place, so that later requests write zeros straight away.
	noPunch, noZeroRange atomic.Bool
}

var _ nbd.Export = (*File)(nil)

// OpenFile opens the regular file at path for reading and writing, or for
// reading only if writing is not allowed. A symbolic link is refused.
func OpenFile(path string) (*File, error) {
	return openExport(path, unix.O_NOFOLLOW, false)
}

// OpenDevice opens the block device at path (a symbolic link to one is
// followed) for reading and writing, or for reading only if writing is
// not allowed; anything else fails with ErrNotBlockDevice. Its size is
// the device's, from BLKGETSIZE64.
func OpenDevice(path string) (*File, error) {
	return openExport(path, 0, true)
}

func openExport(path string, flags int, dev bool) (*File, error) {
	ro := false
	f, err := os.OpenFile(path, os.O_RDWR|flags, 0)
	if errors.Is(err, fs.ErrPermission) || errors.Is(err, unix.EROFS) {
		ro = true
		f, err = os.OpenFile(path, os.O_RDONLY|flags, 0)
	}
	what := "file"
	if dev {
		what = "device"
	}
	if err != nil {
		return nil, fmt.Errorf("open export %s: %w", what, err)
	}
	st, err := f.Stat()
	switch {
	case err != nil:
	case dev && !isBlockDevice(st.Mode()):
		err = fmt.Errorf("%s: %w", path, ErrNotBlockDevice)
	case !dev && !st.Mode().IsRegular():
		err = fmt.Errorf("%s: %w", path, ErrNotRegular)
	}
	var raw syscall.RawConn
	if err == nil {
		raw, err = f.SyscallConn()
	}
	size := uint64(0)
	if err == nil && dev {
		size, err = deviceSize(raw)
	} else if err == nil {
		size = uint64(st.Size())
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open export %s: %w", what, err)
	}
	return &File{f: f, raw: raw, path: path, size: size, ro: ro}, nil
}

// isBlockDevice reports whether m is a block device's mode.
func isBlockDevice(m fs.FileMode) bool {
	return m&fs.ModeDevice != 0 && m&fs.ModeCharDevice == 0
}

// deviceSize returns the size of the block device open on raw, which its
// st_size does not give.
func deviceSize(raw syscall.RawConn) (uint64, error) {
	var size uint64
	var errno syscall.Errno
	if err := raw.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size)))
	}); err != nil {
		return 0, err
	}
	if errno != 0 {
		return 0, fmt.Errorf("BLKGETSIZE64: %w", errno)
	}
	return size, nil
}

// Size implements nbd.Export: the file's or device's size when it was
// opened.
func (x *File) Size() uint64 { return x.size }

// ReadOnly implements nbd.Export.
func (x *File) ReadOnly() bool { return x.ro }

// ReadAt implements nbd.Export with pread.
func (x *File) ReadAt(ctx context.Context, p []byte, off uint64) error {
	n, err := x.f.ReadAt(p, int64(off))
	if err == io.EOF && n < len(p) {
		err = ErrShortRead
	}
	if err != nil {
		return x.ioErr("read", off, uint64(len(p)), err)
	}
	return nil
}

// WriteAt implements nbd.Export with pwrite, and fdatasync for FUA.
func (x *File) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	if _, err := x.f.WriteAt(p, int64(off)); err != nil {
		return x.ioErr("write", off, uint64(len(p)), err)
	}
	if fua {
		return x.Flush(ctx)
	}
	return nil
}

// Flush implements nbd.Export with fdatasync, which covers every write to
// the file through any descriptor, so every connection's.
func (x *File) Flush(ctx context.Context) error {
	if err := x.control(unix.Fdatasync); err != nil {
		return fmt.Errorf("%s: flush: %w", x.path, err)
	}
	return nil
}

// Trim implements nbd.Export by punching a hole; where the file system
// cannot, the hint is ignored.
func (x *File) Trim(ctx context.Context, off, n uint64) error {
	if err := x.punch(off, n); err != nil && !unsupported(err) {
		return x.ioErr("trim", off, n, err)
	}
	return nil
}

// WriteZeroes implements nbd.Export: a hole unless noHole, else zeros
// written in place by the file system, else zeros written by us.
func (x *File) WriteZeroes(ctx context.Context, off, n uint64, noHole bool) error {
	if !noHole {
		err := x.punch(off, n)
		if err == nil {
			return nil
		}
		if !unsupported(err) {
			return x.ioErr("write zeroes", off, n, err)
		}
	}
	if !x.noZeroRange.Load() {
		err := x.fallocate(unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		if err == nil {
			return nil
		}
		if !unsupported(err) {
			return x.ioErr("write zeroes", off, n, err)
		}
		if neverSupported(err) {
			x.noZeroRange.Store(true)
		}
	}
	if err := x.writeZeros(off, n); err != nil {
		return x.ioErr("write zeroes", off, n, err)
	}
	return nil
}

// Close closes the file. It does not flush.
func (x *File) Close() error { return x.f.Close() }

func (x *File) punch(off, n uint64) error {
	if x.noPunch.Load() {
		return unix.EOPNOTSUPP
	}
	err := x.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if neverSupported(err) {
		x.noPunch.Store(true)
	}
	return err
}

func (x *File) fallocate(mode uint32, off, n uint64) error {
	return x.control(func(fd int) error { return unix.Fallocate(fd, mode, int64(off), int64(n)) })
}

// control runs a system call on the file's descriptor.
func (x *File) control(f func(fd int) error) error {
	var errno error
	if err := x.raw.Control(func(fd uintptr) { errno = f(int(fd)) }); err != nil {
		return err
	}
	return errno
}

// unsupported reports whether a fallocate error means that the file
// system cannot do this (rather than that it failed): zeros must be
// written instead.
func unsupported(err error) bool {
	return neverSupported(err) || errors.Is(err, unix.EINVAL)
}

// neverSupported reports whether a fallocate error means that the file
// system cannot do this mode at all, so there is no point asking again.
func neverSupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS)
}

// zeros is the source of writeZeros; never written, so shared freely.
var zeros [256 << 10]byte

func (x *File) writeZeros(off, n uint64) error {
	for n > 0 {
		l := min(n, uint64(len(zeros)))
		if _, err := x.f.WriteAt(zeros[:l], int64(off)); err != nil {
			return err
		}
		off += l
		n -= l
	}
	return nil
}

func (x *File) ioErr(op string, off, n uint64, err error) error {
	return fmt.Errorf("%s: %s of %d bytes at offset %d: %w", x.path, op, n, off, err)
}

// Errno maps an error of a File to the NBD error its client sees (for
// nbd.Config.Errno): a full or over-quota file system is ENOSPC, a refused
// write EPERM, everything else EIO.
func Errno(err error) uint32 {
	switch {
	case errors.Is(err, unix.ENOSPC), errors.Is(err, unix.EDQUOT), errors.Is(err, unix.EFBIG):
		return nbdwire.ENOSPC
	case errors.Is(err, unix.EROFS), errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return nbdwire.EPERM
	case errors.Is(err, unix.ENOMEM):
		return nbdwire.ENOMEM
	}
	return nbdwire.EIO
}

// Create makes a sparse file of size bytes named name in dir, to be served
// as an export: it reads as zeros and takes no space until written. It has
// no header; a controller formats it over NBD. The file appears whole or
// not at all (it is made under a hidden name, synced, then linked into
// place); an existing file is never replaced (the error wraps
// fs.ErrExist).
func Create(dir, name string, size uint64) (err error) {
	if err := CheckName(name); err != nil {
		return fmt.Errorf("create export file: %w", err)
	}
	if size == 0 || size > 1<<62 {
		return fmt.Errorf("create export file %s: size %d out of range", name, size)
	}
	path := filepath.Join(dir, name)
	var suffix [6]byte
	rand.Read(suffix[:])
	tmp := filepath.Join(dir, "."+name+".creating-"+hex.EncodeToString(suffix[:]))
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create export file %s: %w", path, err)
	}
	defer os.Remove(tmp)
	err = f.Truncate(int64(size))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		if err = os.Link(tmp, path); errors.Is(err, fs.ErrExist) {
			err = fs.ErrExist
		}
	}
	if err == nil {
		err = syncDir(dir)
	}
	if err != nil {
		return fmt.Errorf("create export file %s: %w", path, err)
	}
	return nil
}

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
