package meta

import (
	"errors"
	"fmt"
)

var (
	// ErrNotFound is returned for a disk or container that does not exist.
	ErrNotFound = errors.New("not found")
	// ErrExists is returned when creating a disk whose name is taken.
	ErrExists = errors.New("already exists")
	// ErrCorrupt marks a record that fails its checksum or does not decode,
	// or a store that contradicts itself. It is never retried.
	ErrCorrupt = errors.New("corrupt metadata")
	// ErrTruncated marks a record shorter than its layout: cut off, so
	// that it cannot hold its fields or its checksum. Every error that
	// matches it matches ErrCorrupt too.
	ErrTruncated = errors.New("truncated record")
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
	// ErrNotStore is returned by OpenBoltReadOnly for a bbolt file that
	// holds no segmap store.
	ErrNotStore = errors.New("not a segmap metadata store")
	// ErrClosed is returned after Close.
	ErrClosed = errors.New("metadata store closed")
)

// RecordError is the error for one record that fails its checksum, does not
// decode, or contradicts the key it is stored under. It matches ErrCorrupt,
// and ErrTruncated as well when the record is too short.
type RecordError struct {
	Key       []byte // the record's key, as stored (see KeyName)
	Reason    string // what is wrong with it
	Truncated bool   // the record is shorter than its layout
}

// Error names the record readably (KeyName) and as stored (quoted).
func (e *RecordError) Error() string {
	name := fmt.Sprintf("%q", e.Key)
	if n := KeyName(e.Key); n != name {
		name = n + " (" + name + ")"
	}
	if e.Truncated {
		return fmt.Sprintf("record %s: %s: %v: %v", name, e.Reason, ErrTruncated, ErrCorrupt)
	}
	return fmt.Sprintf("record %s: %s: %v", name, e.Reason, ErrCorrupt)
}

// Is reports whether e matches target: ErrCorrupt always, ErrTruncated when
// the record is truncated.
func (e *RecordError) Is(target error) bool {
	return target == ErrCorrupt || e.Truncated && target == ErrTruncated
}
