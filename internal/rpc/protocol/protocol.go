// Package protocol defines the protocol between a controller and its
// mapping agents, as two small interfaces and the messages they carry:
// faults and their replies, commands, and the errors both sides share. It
// has no logic: the controller implements Controller, an agent implements
// Agent, and a transport (a direct call in one process, gRPC between
// processes: package transport) connects them.
//
// Two kinds of exchange, as in the patent this system follows:
//
//   - fault/response, asked by the agent: an I/O hit an entry state that
//     stops it (Controller.Fault); the controller answers with replacement
//     entries, after which the agent retries, or with an error for that I/O;
//   - command/response, asked by the controller: NewTable, DeleteTable,
//     GetEntry, GetStatus, SetEntry, SetEntryState, Quiesce and Activate on
//     an agent.
//
// Set commands may carry Blocking: the agent applies the change at once but
// answers only after every I/O that passed its table before the command has
// finished, so the controller knows no write made under the old entries is
// still on its way.
package protocol

import (
	"context"
	"fmt"
	"time"

	"segmap/internal/table"
)

// DiskID identifies a disk for its lifetime.
type DiskID uint64

// Disk is what an agent needs to serve a disk.
type Disk struct {
	ID          DiskID
	Name        string
	Size        uint64
	SegmentSize uint64
	ReadOnly    bool
	// Family is the id of the first disk of its lineage (see
	// meta.Disk.Family): disks of one family share slots at the same
	// segment index, and their entries can be compared.
	Family DiskID
}

// Segments returns the number of entries in d's table.
func (d Disk) Segments() uint64 { return (d.Size + d.SegmentSize - 1) / d.SegmentSize }

// Container is what an agent needs to open a storage container.
type Container struct {
	ID       uint32
	URI      string
	SlotSize uint64
	Slots    uint64
	// Epoch and Replicas, for a mirrored container, are its replicas as
	// of its membership epoch; URI is then empty. A plain container has
	// none.
	Epoch    uint64
	Replicas []Replica
}

// Mirrored reports whether c is a mirrored container.
func (c Container) Mirrored() bool { return len(c.Replicas) > 0 }

// Membership returns c's membership.
func (c Container) Membership() Membership {
	return Membership{Container: c.ID, Epoch: c.Epoch, Replicas: c.Replicas}
}

// ReplicaState is the state of one replica of a mirrored container.
type ReplicaState uint8

// The replica states.
const (
	// ReplicaHealthy: in sync; written and read.
	ReplicaHealthy ReplicaState = iota
	// ReplicaFailed: out of the mirror; neither written nor read. The
	// slots written meanwhile are recorded (ReplicaReport.Slots) so that
	// it can catch up when it is back.
	ReplicaFailed
	// ReplicaRebuilding: being copied onto; written, not read.
	ReplicaRebuilding
)

// String returns the state's name as the CLI shows it.
func (s ReplicaState) String() string {
	switch s {
	case ReplicaHealthy:
		return "healthy"
	case ReplicaFailed:
		return "failed"
	case ReplicaRebuilding:
		return "rebuilding"
	}
	return fmt.Sprintf("replica-state(%d)", uint8(s))
}

// Replica is one replica of a mirrored container.
type Replica struct {
	URI   string
	State ReplicaState
}

// Membership is a mirrored container's replicas at an epoch. The epoch
// grows with every change; a holder ignores a membership older than the
// one it has.
type Membership struct {
	Container uint32
	Epoch     uint64
	Replicas  []Replica
}

// Degraded reports whether some replica is failed: writes then miss it
// and must be recorded first (ReplicaReport.Slots).
func (m Membership) Degraded() bool {
	for _, r := range m.Replicas {
		if r.State == ReplicaFailed {
			return true
		}
	}
	return false
}

// ReplicaReport is what a holder of a mirrored container reports: that
// replica Failed failed an I/O (Failed -1: none), and which slots it
// wrote, or is about to write, that a replica may miss. The controller
// answers once the failure and the slots are recorded durably and every
// agent has been told the new membership.
type ReplicaReport struct {
	Agent     string
	Container uint32
	Epoch     uint64
	Failed    int
	// URI is the failed replica's, as the holder had it: a report about
	// a replica since replaced at the same index is not taken as one
	// about the new replica.
	URI   string
	Cause string
	Slots []uint32
}

// FaultOp is the operation that faulted.
type FaultOp uint8

// The fault operations. Read and Write are the table's; Discard asks the
// controller to return whole segments to Zero (trim, write-zeroes).
const (
	FaultRead    FaultOp = FaultOp(table.Read)
	FaultWrite   FaultOp = FaultOp(table.Write)
	FaultDiscard FaultOp = 3
	// FaultCommit confirms a staged write (see Reply.Stage): the data is
	// in the staged slot and flushed; the controller may now map it.
	FaultCommit FaultOp = 4
	// FaultFlush makes the disk's map changes that the controller keeps
	// in memory (Reply.Deferred) durable. The agent sends it when the
	// disk is flushed, after flushing its containers.
	FaultFlush FaultOp = 5
)

func (o FaultOp) String() string {
	switch o {
	case FaultDiscard:
		return "discard"
	case FaultCommit:
		return "commit"
	case FaultFlush:
		return "flush"
	}
	return table.Op(o).String()
}

// Fault is a map fault raised by an agent.
type Fault struct {
	// Agent is the faulting agent's name.
	Agent string
	// Disk and Segment say where; Count is the number of segments from
	// Segment: 1 for Write, any for Discard, and up to MaxReadRange for
	// Read. A read fault on several segments (an agent mapping a range
	// for block status, say) may be answered with fewer entries than
	// Count, but at least the first.
	Disk    DiskID
	Segment uint64
	Count   uint64
	Op      FaultOp
	// Reason is the state that stopped the I/O (informational: the
	// controller decides from its persistent table).
	Reason table.State
	// Whole reports that a write covers its entire segment, so a
	// copy-on-write need not copy the old data.
	Whole bool
	// Off and Len, for Write, are the bytes of the segment the write
	// covers: the controller maps the sub-blocks they touch
	// (sub-segment copy-on-write).
	Off, Len uint64
	// Token names the staged write a FaultCommit confirms.
	Token uint64
	// Abandon, with FaultCommit, gives the staged write of Token back
	// unmade: the agent could not make it (its copy source or its
	// staged slot failed, or a command changed the segment before the
	// copy began). The controller frees the reserved slot.
	Abandon bool
	// ID, if not 0, names this fault among its agent's: a fault sent
	// again (its answer lost with a connection) carries the same ID,
	// and a fill in place staged for it is handed out again rather
	// than left waiting to be taken back.
	ID uint64
}

// MaxReadRange is the most segments one read fault may ask for: one
// table page's worth, which keeps a reply well under a message's limit.
const MaxReadRange = 1024

// Reply answers a fault with the current entries for [First,
// First+len(Entries)), which the agent installs before it retries.
type Reply struct {
	First   uint64
	Entries []table.Entry
	// Stage, instead of entries, answers a write fault on a shared
	// segment that moves it forward: the agent writes the segment to the
	// staged slot, flushes it, and confirms with a FaultCommit; only
	// then does the controller map the slot. A crash before the commit
	// leaves the old data in place. For a write that covers the whole
	// segment nothing is copied; for a partial one the agent copies the
	// rest of the segment from Stage.From (a copy-on-write made by the
	// agent, which has the containers open).
	Stage *Stage
	// Deferred: the map change that this reply's entries come from is
	// in the controller's memory only, until the agent flushes the
	// disk (FaultFlush). A controller that dies loses it; the agent
	// that got it then drops its clients' connections as it attaches
	// to the next, as a crashed server would, since they may have read
	// data that the disk no longer maps.
	Deferred bool
}

// Stage is a slot reserved for a staged write.
type Stage struct {
	Loc   table.Location
	Token uint64
	// From, for a partial write, is the entry the rest of the segment is
	// read from (a partial one reads each sub-block from the layer that
	// holds it); the zero Entry (no container has id 0) for a whole
	// write.
	From table.Entry
	// Sparse: the agent writes into Loc only the sub-blocks its write
	// touches, each filled from From where the write does not cover it;
	// the others are left alone (sub-segment copy-on-write, or the
	// filling in of a partial entry's own slot, when Loc is From's).
	// Otherwise it writes the whole segment: From with the write laid
	// over it.
	Sparse bool
	// FillRest, with Sparse: the agent also copies into Loc, from the
	// layers of From, every sub-block that From's own slot (Loc) does
	// not hold and the write does not touch, so that Loc then holds the
	// whole segment (all-zero 4 KiB blocks are punched, not written,
	// and the sub-blocks Loc holds already are not touched).
	FillRest bool
	// NoFlush: the agent need not flush the staged slot before it asks
	// for the commit, which the controller keeps in memory (Deferred)
	// until the agent flushes the disk; that flush flushes the slot's
	// container first.
	NoFlush bool
}

// Copies reports whether the staged write reads from From.
func (s Stage) Copies() bool { return s.From.Loc.Container != 0 }

// Controller is what an agent needs of its controller.
type Controller interface {
	// Attach registers agent a under name. A re-attaching agent has
	// forgotten every entry; its open disks are given again in open.
	Attach(ctx context.Context, name string, a Agent, open []DiskID) error
	// Detach unregisters an agent.
	Detach(ctx context.Context, name string) error
	// Open maps the disk called disk for agent name.
	Open(ctx context.Context, agent, disk string) (Disk, error)
	// CloseDisk unmaps a disk for agent name.
	CloseDisk(ctx context.Context, agent string, disk DiskID) error
	// Containers lists the storage containers.
	Containers(ctx context.Context) ([]Container, error)
	// Exports lists the disks agent may serve.
	Exports(ctx context.Context, agent string) ([]Disk, error)
	// Fault resolves a map fault.
	Fault(ctx context.Context, f Fault) (Reply, error)
	// ReportReplica reports a replica failure or a write intent on a
	// mirrored container, and returns its membership once recorded.
	ReportReplica(ctx context.Context, r ReplicaReport) (Membership, error)
}

// SetEntry is the set_entry command: replace entries [First,
// First+len(Entries)).
type SetEntry struct {
	Disk     DiskID
	First    uint64
	Entries  []table.Entry
	Blocking bool
}

// SetEntryState is the set_entry_state command: set (On) or clear the bits
// State in entries [First, First+Count).
type SetEntryState struct {
	Disk     DiskID
	First    uint64
	Count    uint64
	State    table.State
	On       bool
	Blocking bool
}

// DiskStatus is an agent's answer to get_status for one disk: how its
// table stands and what it has under way. It is a snapshot, stale as soon
// as it is taken; it is for people and monitoring, never for decisions.
type DiskStatus struct {
	Disk DiskID
	// Segments is the number of entries in the agent's table; Loaded,
	// those that are not Invalid (loaded by faults or set by commands).
	Segments, Loaded uint64
	// Invalid, Error, Zero and NoWrite count the entries with each state
	// bit set; an entry may count under two (Invalid|Error). Mapped
	// counts the entries that point at storage (NoWrite or writable).
	Invalid, Error, Zero, NoWrite, Mapped uint64
	// InFlight counts the I/Os let through to storage and not yet
	// returned; FaultsOut, the faults sent to the controller and not yet
	// answered.
	InFlight, FaultsOut uint64
	// Quiesced: new I/O to the disk is held (by Quiesce, or because the
	// agent fenced itself and waits to re-attach).
	Quiesced bool
	// Leased: the agent does I/O under a lease from its controller, which
	// holds for LeaseLeft more (0: lapsed). Without a lease LeaseLeft is 0.
	Leased    bool
	LeaseLeft time.Duration
}

// Agent is what a controller needs of a mapping agent.
type Agent interface {
	// NewTable makes the agent's table for d all Invalid.
	NewTable(ctx context.Context, d Disk) error
	// DeleteTable forgets disk id: its I/O fails from now on.
	DeleteTable(ctx context.Context, id DiskID) error
	// GetEntry returns entries [first, first+n) of the agent's table.
	GetEntry(ctx context.Context, id DiskID, first, n uint64) ([]table.Entry, error)
	// GetStatus returns the status of the agent's table for disk id. It
	// does not wait for I/O: it only counts.
	GetStatus(ctx context.Context, id DiskID) (DiskStatus, error)
	// SetEntry applies a set_entry command.
	SetEntry(ctx context.Context, c SetEntry) error
	// SetEntryState applies a set_entry_state command.
	SetEntryState(ctx context.Context, c SetEntryState) error
	// Quiesce queues new I/O to disk id and answers once the I/O in flight
	// has drained, or fails after timeout (0: no limit), in which case the
	// disk is active again.
	Quiesce(ctx context.Context, id DiskID, timeout time.Duration) error
	// Activate releases the I/O queued by Quiesce.
	Activate(ctx context.Context, id DiskID) error
	// SetMembership gives the agent a mirrored container's replicas. It
	// answers once I/O follows them: a failed replica is no longer
	// written, a rebuilding one is written by every I/O that starts
	// after the answer.
	SetMembership(ctx context.Context, m Membership) error
}
