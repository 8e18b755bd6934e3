package agent

import "errors"

// The agent's own errors. A write to a read-only disk and a failed I/O
// are the protocol's ErrReadOnly and ErrIO, in package protocol, returned
// wrapped but unrenamed.
var (
	// ErrRange is returned for I/O outside the disk.
	ErrRange = errors.New("i/o outside the disk")
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

// errWouldWait stops tryReadSeg's runs at one that would wait.
var errWouldWait = errors.New("would wait")

// errStopExtents ends the walk of Extents when its caller wants no more.
var errStopExtents = errors.New("no more extents wanted")

// ErrLineage is returned by Changed for two disks that do not share a
// lineage (a family): their tables cannot be compared.
var ErrLineage = errors.New("not of one lineage")
