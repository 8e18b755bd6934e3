package protocol

import "errors"

// Errors that cross the protocol: a transport carries them as codes, and
// both sides test them with errors.Is. They decide the error a host sees.
var (
	// ErrNoSpace: no free slot for a write (the host sees ENOSPC).
	ErrNoSpace = errors.New("no free space in the container pool")
	// ErrReadOnly: a write to a read-only disk (EPERM).
	ErrReadOnly = errors.New("disk is read-only")
	// ErrIO: the I/O cannot be done: an Error entry, a failed container
	// (EIO).
	ErrIO = errors.New("i/o error")
	// ErrNotFound: no such disk.
	ErrNotFound = errors.New("no such disk")
	// ErrStale: a staged write's commit came too late (the segment
	// changed, or the controller restarted); the agent retries the write.
	ErrStale = errors.New("staged write is stale")
	// ErrFenced: a request from an agent the controller no longer
	// counts on (its lease lapsed), or a command from a deposed
	// controller (an older epoch). The agent re-attaches.
	ErrFenced = errors.New("fenced: re-attach")
	// ErrBadRequest: a malformed request or command.
	ErrBadRequest = errors.New("bad request")
	// ErrUnavailable: the controller (or agent) cannot be reached.
	ErrUnavailable = errors.New("unavailable")
)
