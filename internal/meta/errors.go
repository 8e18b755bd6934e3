package meta

import "errors"

var (
	// ErrNotFound is returned for a disk or container that does not exist.
	ErrNotFound = errors.New("not found")
	// ErrExists is returned when creating a disk whose name is taken.
	ErrExists = errors.New("already exists")
	// ErrCorrupt marks a record that fails its checksum or does not decode,
	// or a store that contradicts itself. It is never retried.
	ErrCorrupt = errors.New("corrupt metadata")
	// ErrReadOnly is returned by writes inside View.
	ErrReadOnly = errors.New("write in a read-only transaction")
	// ErrRange is returned for table entries or slots outside their disk or
	// container.
	ErrRange = errors.New("out of range")
	// ErrInvalid is returned when asked to store a record that breaks the
	// record rules (no name, a segment size that is not a power of two,
	// an unknown policy, no creation time, ...).
	ErrInvalid = errors.New("invalid record")
	// ErrLocked is returned when another process holds the store.
	ErrLocked = errors.New("metadata store locked by another process")
	// ErrClosed is returned after Close.
	ErrClosed = errors.New("metadata store closed")
)
