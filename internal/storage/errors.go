package storage

import "errors"

// Errors of this package, wrapped with the name or path.
var (
	// ErrBadName means a name cannot be a served file: empty, too long,
	// not UTF-8, or with a slash, a NUL or a leading dot.
	ErrBadName = errors.New("invalid export file name")
	// ErrNotRegular means the path is not a regular file.
	ErrNotRegular = errors.New("not a regular file")
	// ErrNotBlockDevice means a path given as a device is not a block
	// device.
	ErrNotBlockDevice = errors.New("not a block device")
	// ErrShortRead means a read found the file shorter than it was when
	// the connection opened it: someone truncated it underneath.
	ErrShortRead = errors.New("file shrank under the export")
)
