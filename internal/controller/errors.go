package controller

import "errors"

// The controller's own errors. The errors a host or an agent acts on (no
// such disk, a read-only disk, no space, an I/O error, a bad request) are
// the protocol's, in package protocol: the controller returns them wrapped
// but unrenamed, so that one name tests them on either side of the
// transport.
var (
	// ErrRepairRefused is returned by Repair when the store holds damage
	// other than leaked slots: Repair then changes nothing.
	ErrRepairRefused = errors.New("repair refused: damage other than leaked slots needs a person to decide")
	// ErrInvalidName is returned for a disk name that is empty, too long,
	// or uses characters other than letters, digits, '.', '_' and '-'.
	ErrInvalidName = errors.New("invalid disk name")
	// ErrInvalidSize is returned for a disk size that is zero, not a
	// multiple of 512 bytes, or too large.
	ErrInvalidSize = errors.New("invalid disk size")
	// ErrInvalidSegmentSize is returned for a segment size that is not a
	// power of two between MinSegmentSize and MaxSegmentSize.
	ErrInvalidSegmentSize = errors.New("invalid segment size")
	// ErrExists is returned for a disk name that is taken.
	ErrExists = errors.New("disk already exists")
	// ErrShrink is returned when a resize would shrink a disk and shrinking
	// was not asked for explicitly.
	ErrShrink = errors.New("resize would shrink the disk (data past the new end is lost); ask for shrink explicitly")
	// ErrNoPool is returned when creating a disk whose segment size no
	// container serves.
	ErrNoPool = errors.New("no container with this slot size")
	// ErrNotMapped is returned for a fault or command about a disk the
	// agent has not opened.
	ErrNotMapped = errors.New("disk not mapped by this agent")
	// ErrUnknownAgent is returned for a request from an agent that has not
	// attached.
	ErrUnknownAgent = errors.New("agent not attached")
	// ErrOtherLineage is returned for a rollback to, or an incremental
	// export from, a disk of another family: it shares no history with
	// the other disk, and nothing to compare.
	ErrOtherLineage = errors.New("not of the disk's lineage")
	// ErrNotSnapshot is returned for a rollback to, or an export of, a
	// writable disk: only a read-only snapshot holds still while it is
	// shared or read.
	ErrNotSnapshot = errors.New("not a read-only snapshot")
	// ErrContainerFailed is returned for a drain of a failed container:
	// its slots cannot be read.
	ErrContainerFailed = errors.New("container failed")
	// ErrContainerInUse is returned for a remove of a container that
	// still holds slots: drain it first.
	ErrContainerInUse = errors.New("container holds slots; drain it first")
	// ErrDrainStuck is returned by a drain that finds used slots on the
	// container that no entry names (leaked: check --repair frees them),
	// or slots reserved by writes in flight that do not end.
	ErrDrainStuck = errors.New("drain cannot finish")
	// ErrRebuilding is returned for a rebuild of a mirrored container
	// that another rebuild runs on, and by a rebuild whose replica
	// changed (failed, replaced) under it.
	ErrRebuilding = errors.New("replica rebuilding")
	// ErrNothingToRebuild is returned for a rebuild of a mirrored
	// container whose replicas are all healthy.
	ErrNothingToRebuild = errors.New("no replica to rebuild")
	// ErrClosed is returned after Close.
	ErrClosed = errors.New("controller closed")
)

// errUntold wraps setReplica's error when a membership change was made
// but some agent did not take it.
var errUntold = errors.New("membership changed, but not every agent took it")

// errNotZeroed is a preallocation that met a container whose free slots
// are not known to be zero: the caller zeroes them and tries again.
var errNotZeroed = errors.New("free slots not zeroed")

// Errors of export and import (export.go, import.go).
var (
	// ErrWrongBase is returned for an incremental stream whose base is
	// not the target disk's newest snapshot.
	ErrWrongBase = errors.New("stream's base is not the target's newest snapshot")
	// ErrWrittenSince is returned for an incremental stream whose target
	// has been written since its newest snapshot (import with force to
	// drop those writes).
	ErrWrittenSince = errors.New("target written since its newest snapshot")
)

// errStop ends a walk early (sameTables).
var errStop = errors.New("stop")
