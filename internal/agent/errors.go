package agent

import (
	"errors"

	"segmap/internal/rpc/protocol"
)

var (
	// ErrRange is returned for I/O outside the disk.
	ErrRange = errors.New("i/o outside the disk")
	// ErrReadOnly is returned for a write to a read-only disk.
	ErrReadOnly = protocol.ErrReadOnly
	// ErrIO is returned when the I/O failed: an Error entry, a container
	// error, or a fault the controller could not resolve.
	ErrIO = protocol.ErrIO
	// ErrNoTable is returned for a command about a disk the agent does not
	// map.
	ErrNoTable = errors.New("agent has no table for this disk")
	// ErrGone is returned for I/O to a disk that was deleted or closed.
	ErrGone = errors.New("disk no longer mapped")
	// ErrQuiesceTimeout is returned when in-flight I/O did not drain within
	// a quiesce's time limit. The disk is active again.
	ErrQuiesceTimeout = errors.New("quiesce: in-flight i/o did not drain in time")
	// ErrClosed is returned after Close.
	ErrClosed = errors.New("agent closed")
)
