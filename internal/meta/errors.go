package meta

import (
	"errors"
	"fmt"
)

// Errors of every backend. Each is returned wrapped, with the record it is
// about; test them with errors.Is.
var (
	// ErrNotFound is returned for a disk or container that does not exist.
	ErrNotFound = errors.New("not found")
	// ErrExists is returned when a disk would take a name another disk
	// has (CreateDisk, a rename by PutDisk), or a container an id another
	// container has (AddContainer).
	ErrExists = errors.New("already exists")
	// ErrCorrupt marks a record that fails its checksum or does not decode,
	// or a store that contradicts itself. It is never retried.
	ErrCorrupt = errors.New("corrupt metadata")
	// ErrTruncated marks a record shorter than its layout: cut off, so
	// that it cannot hold its fields or its checksum. Every error that
	// matches it matches ErrCorrupt too.
	ErrTruncated = errors.New("truncated record")
	// ErrReadOnlyTx is returned by a Tx method that writes when the
	// transaction is read-only (inside View). It says nothing of the
	// disk: a write to a read-only disk is the protocol's ErrReadOnly.
	ErrReadOnlyTx = errors.New("write in a read-only transaction")
	// ErrRange is returned for table entries or slots outside their disk or
	// container.
	ErrRange = errors.New("out of range")
	// ErrInvalid is returned when asked to store a record that breaks the
	// record rules (no name, a segment size that is not a power of two,
	// an unknown policy, no creation time, ...).
	ErrInvalid = errors.New("invalid record")
	// ErrInUse is returned when asked to remove a container that still
	// holds slots.
	ErrInUse = errors.New("in use")
	// ErrLocked is returned when another process holds the store.
	ErrLocked = errors.New("metadata store locked by another process")
	// ErrNotStore is returned by OpenBoltReadOnly for a bbolt file that
	// holds no segmap store.
	ErrNotStore = errors.New("not a segmap metadata store")
	// ErrClosed is returned after Close.
	ErrClosed = errors.New("metadata store closed")
)

// Errors of the etcd backend (see Etcd).
var (
	// ErrTxnTooLarge is returned by Update when etcd refuses the commit
	// because it has more operations than the server's --max-txn-ops or
	// more bytes than its --max-request-bytes (or than the client's
	// MaxCallSendMsgSize). Nothing was written; retrying cannot help: the
	// limits must be raised (see Etcd).
	ErrTxnTooLarge = errors.New("transaction too large for etcd")
	// ErrConflict is returned by Update when every one of its attempts
	// lost to a concurrent transaction that changed what it had read.
	// Nothing was written.
	ErrConflict = errors.New("transaction kept conflicting with concurrent updates")
	// ErrLeadershipLost is returned by Update on a store opened WithFence
	// once the leadership it was opened under is gone (the leader's
	// election key was deleted or re-created): the commit wrote nothing,
	// and no later one will. The controller is deposed and steps down;
	// this is not the protocol's ErrFenced, which fences an agent or a
	// command of an older epoch.
	ErrLeadershipLost = errors.New("leadership lost: write fenced")
	// ErrUnreachable is returned by Update when the store could not be
	// reached to commit (etcd's connection broke): the commit may have
	// landed or not. The caller reads the store again before it acts on
	// what it meant to commit; a client may retry, as against a
	// controller that is stepping down.
	ErrUnreachable = errors.New("store unreachable: commit outcome unknown")
)

// Errors that never leave the package.
var (
	// errStale reports an etcd commit refused because something the
	// transaction read has changed since; Update reruns it.
	errStale = errors.New("read set changed")
	// errRollback ends CheckFile's transaction without committing it.
	errRollback = errors.New("rollback")
	// errGoexit is the error of the calls of a batch whose leader's
	// goroutine ended inside an fn (runtime.Goexit; see group.go).
	errGoexit = errors.New("meta: an Update function called runtime.Goexit; its batch was abandoned")
	// errRerun and errSplit end an attempt of a batch that does not
	// settle its calls: it runs again without a call that failed it,
	// or as two halves, too large for the backend (see group.go).
	errRerun = errors.New("rerun the batch")
	errSplit = errors.New("split the batch")
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
