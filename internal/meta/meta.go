// Package meta is the controller's persistent store: the disk catalogue, each
// disk's mapping table, the storage containers, and per-slot reference
// counts that say which slots are allocated and how many table entries share
// them.
//
// Every change the controller makes is one transaction (Store.Update), so a
// crash leaves the store as it was before or after the change, never between.
// Updates that arrive while a commit is in flight are committed together,
// in one backend transaction (group commit, see group.go): each still
// lands whole or not at all, and N concurrent Updates cost one fsync or
// one etcd Txn rather than N.
// The records are built on a small ordered key-value interface so that each
// backend (bbolt for one controller, etcd for several) only has to provide atomic transactions
// over keys; the record layout, checksums and the page caching live here once.
//
// # Layout
//
//	n/<name>                 -> disk id
//	d/<disk id>              -> Disk record
//	t/<disk id>/<dir>        -> table directory: the ids of DirPages table pages
//	p/<page id>              -> table page: PageEntries entries, then its partial entries' layers
//	q/<page id / PageSlots>  -> reference counts of PageSlots table pages
//	c/<container id>         -> Container record
//	r/<container id>/<page>  -> reference counts of PageSlots slots
//	s/<sequence name>        -> last id handed out
//	g/<disk id>              -> the agents allowed to map the disk (absent: any)
//	a/                       -> the agents that may hold a controller's lease
//
// A disk's table is a list of pages, held in directories. A page that does
// not exist (id 0) holds only Zero entries, so a disk of any size is created
// by writing one record, and a reference page that does not exist holds
// only free slots. Every value ends in a CRC-32C of the bytes before it; a
// record that fails it, or that does not decode, is reported as ErrCorrupt
// with its key.
//
// # Shared pages
//
// Table pages are shared between disks: CopyTable (a snapshot, a clone)
// copies the source's directories and counts one more reference on each of
// its pages, whatever the number of entries. A page is written only by a
// disk that holds its only reference: the first change to a shared page
// through a disk (SetEntries, Unshare) first copies it for that disk (copy
// on write, as dm-thin shares btree nodes), and the copy counts one more
// reference on every slot it maps (every layer of a partial entry too).
//
// # Invariants (checked by the controller's Check)
//
//   - a table page's reference count equals the number of directory slots,
//     across all disks, that hold its id; a page with none is not stored;
//   - a slot's reference count equals the number of entries of stored
//     table pages that name it, as their own slot or as a layer under a
//     partial entry (table.Entry.Slots; a page shared by several disks
//     counts once); a count of zero means free;
//   - so a slot is shared by several disks exactly when its count is above
//     one or the page that maps it is shared: writes to it must not land
//     in place, whether the entry says No-write or not;
//   - Container.Used is the number of slots with a non-zero count.
package meta

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math"
	"time"

	"segmap/internal/table"
)

// PageEntries is the number of table entries in one stored table page.
const PageEntries = 1024

// PageSlots is the number of slot reference counts in one stored page.
const PageSlots = 1024

// DirPages is the number of table pages in one table directory.
const DirPages = 1024

// PageRef is one page of a disk's table: its index in the table (entries
// [Index*PageEntries, (Index+1)*PageEntries)) and the stored page's id.
type PageRef struct {
	Index, ID uint64
}

// DiskID identifies a disk for its lifetime; ids are never reused.
type DiskID uint64

// Disk is a virtual disk's catalogue record.
type Disk struct {
	ID          DiskID
	Name        string
	Size        uint64 // bytes; a multiple of 512
	SegmentSize uint64 // bytes; a power of two
	Policy      table.Policy
	// Origin is the disk this one was snapshotted or cloned from, 0 if none.
	// The origin may since have been deleted.
	Origin DiskID
	// Family is the id of the first disk of the snapshot tree this disk
	// belongs to. Only disks of one family can share slots, and they share
	// them at the same segment index, which is how the reverse-delta policy
	// finds every sharer of a slot.
	Family   DiskID
	ReadOnly bool
	Created  time.Time
	// UUID identifies the disk's contents across clusters: random when
	// the disk is created (a new disk, a snapshot, a clone), carried by
	// an import onto the snapshot it makes, so that an export stream can
	// name its source and base (internal/stream). Zero in records stored
	// before it existed: see Identity.
	UUID [16]byte
}

// Identity returns the disk's UUID, or for a disk stored without one a
// UUID derived from its id and creation time: stable, and unlike any
// random one but by chance.
func (d Disk) Identity() [16]byte {
	if d.UUID != ([16]byte{}) {
		return d.UUID
	}
	var b [16]byte
	binary.LittleEndian.PutUint64(b[:8], uint64(d.ID))
	binary.LittleEndian.PutUint64(b[8:], uint64(d.Created.UnixNano()))
	sum := sha256.Sum256(append([]byte("segmap disk identity\x00"), b[:]...))
	copy(b[:], sum[:16])
	b[6] = b[6]&0x0f | 0x80 // version 8 (custom), RFC 9562
	b[8] = b[8]&0x3f | 0x80
	return b
}

// NewUUID returns a random version 4 UUID.
func NewUUID() [16]byte {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return b
}

// validate checks the rules every stored disk record keeps.
func (d Disk) validate() error {
	switch {
	case d.Name == "" || len(d.Name) > maxName:
		return fmt.Errorf("disk name %q: %w", d.Name, ErrInvalid)
	case d.SegmentSize == 0 || d.SegmentSize&(d.SegmentSize-1) != 0:
		return fmt.Errorf("disk %q: segment size %d: %w", d.Name, d.SegmentSize, ErrInvalid)
	case !d.Policy.Valid():
		return fmt.Errorf("disk %q: policy %d: %w", d.Name, d.Policy, ErrInvalid)
	case d.Created.IsZero() || !time.Unix(0, d.Created.UnixNano()).Equal(d.Created):
		// Stored as Unix nanoseconds: about 1678 to 2262.
		return fmt.Errorf("disk %q: creation time %v: %w", d.Name, d.Created, ErrInvalid)
	}
	return nil
}

// validate checks the rules every stored container record keeps.
func (c Container) validate() error {
	switch {
	case c.SlotSize == 0 || c.SlotSize&(c.SlotSize-1) != 0:
		return fmt.Errorf("container %d: slot size %d: %w", c.ID, c.SlotSize, ErrInvalid)
	case c.Slots == 0 || c.Slots > math.MaxUint32:
		return fmt.Errorf("container %d: %d slots (1 to 2^32-1): %w", c.ID, c.Slots, ErrInvalid)
	case c.Used > c.Slots:
		return fmt.Errorf("container %d: %d of %d slots used: %w", c.ID, c.Used, c.Slots, ErrInvalid)
	case len(c.URI) > maxName:
		return fmt.Errorf("container %d: URI of %d bytes: %w", c.ID, len(c.URI), ErrInvalid)
	case !c.State.Valid():
		return fmt.Errorf("container %d: state %d: %w", c.ID, c.State, ErrInvalid)
	case len(c.Replicas) == 1 || len(c.Replicas) > MaxReplicas:
		return fmt.Errorf("container %d: %d replicas (2 to %d): %w", c.ID, len(c.Replicas), MaxReplicas, ErrInvalid)
	case len(c.Replicas) > 0 && c.URI != "":
		return fmt.Errorf("container %d: mirrored, with a URI: %w", c.ID, ErrInvalid)
	}
	for i, r := range c.Replicas {
		if r.URI == "" || len(r.URI) > maxName || !r.State.Valid() {
			return fmt.Errorf("container %d: replica %d (%q, state %d): %w", c.ID, i, r.URI, r.State, ErrInvalid)
		}
	}
	return nil
}

// Segments returns the number of table entries of d.
func (d Disk) Segments() uint64 { return (d.Size + d.SegmentSize - 1) / d.SegmentSize }

// Container is a storage container's catalogue record.
type Container struct {
	ID       uint32
	URI      string // where agents and the controller open it
	SlotSize uint64
	Slots    uint64
	// Used is the number of slots whose reference count is not zero. It is
	// maintained by Tx.SetRefs.
	Used uint64
	// State says whether slots may be allocated on the container. Zero
	// (Online) in records stored before states existed.
	State ContainerState
	// Replicas, for a mirrored container (URI empty), are its replicas;
	// Epoch grows with every change of their states or URIs.
	Epoch    uint64
	Replicas []Replica
	// Cursor, while a replica is rebuilding, is where the rebuild
	// stands: every segment index of family CursorFam below CursorSeg,
	// and of every lower family, has been copied.
	CursorFam DiskID
	CursorSeg uint64
}

// MaxReplicas is the most replicas a mirrored container has.
const MaxReplicas = 3

// Replica is one replica of a mirrored container.
type Replica struct {
	URI   string
	State ReplicaState
	// Full: the replica holds nothing it can keep (it is new, or was
	// away without a record of what it missed) and is rebuilt by copying
	// every used slot; otherwise only the slots recorded while it was
	// failed (Tx.Intents).
	Full bool
}

// ReplicaState is the state of a replica; the values are
// protocol.ReplicaState's.
type ReplicaState uint8

// Replica states.
const (
	ReplicaHealthy ReplicaState = iota
	ReplicaFailed
	ReplicaRebuilding
	replicaStates
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

// Valid reports whether s is a known state.
func (s ReplicaState) Valid() bool { return s < replicaStates }

// Mirrored reports whether c is a mirrored container.
func (c Container) Mirrored() bool { return len(c.Replicas) > 0 }

// Healthy returns the number of c's healthy replicas.
func (c Container) Healthy() int {
	n := 0
	for _, r := range c.Replicas {
		if r.State == ReplicaHealthy {
			n++
		}
	}
	return n
}

// ContainerState is the life state of a container.
//
//	        drain             drain ends (no slot used)
//	Online ───────▶ Draining ─────────────────────────▶ removed (record deleted)
//	  │  ▲                                                   ▲
//	  │  └─ (online: later work)                             │ remove, no slot used
//	  └─────────────── failure detection (later work) ──▶ Failed
//	Online ─── remove, no slot used ─────────────────────────┘
//
// Only an Online container gets new slots. A Draining one keeps serving
// the slots it holds until the drain has moved them. A removed container
// has no record at all: nothing (the allocator, check, the agents'
// container list) has to learn to skip it, its reference records are all
// absent since it held no slot, and the same container (its id is in its
// header) may be added again.
type ContainerState uint8

// Container states.
const (
	// ContainerOnline: slots are allocated on it.
	ContainerOnline ContainerState = iota
	// ContainerDraining: no slot is allocated on it; a drain is moving
	// its slots to online containers (segmap container drain), and
	// resumes when run again.
	ContainerDraining
	// ContainerFailed: its storage has failed; no slot is allocated on it.
	ContainerFailed
	containerStates // the number of states
)

// String returns the state's name as the CLI shows it.
func (s ContainerState) String() string {
	switch s {
	case ContainerOnline:
		return "online"
	case ContainerDraining:
		return "draining"
	case ContainerFailed:
		return "failed"
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// Valid reports whether s is a known state.
func (s ContainerState) Valid() bool { return s < containerStates }

// Free returns the number of free slots.
func (c Container) Free() uint64 { return c.Slots - c.Used }

// Store is the persistent store. Its methods are safe for concurrent use;
// transactions are serialisable.
type Store interface {
	// View runs fn in a read-only transaction.
	View(ctx context.Context, fn func(*Tx) error) error
	// Update runs fn in a read-write transaction and commits it durably if
	// fn returns nil; otherwise nothing fn did is kept. fn may be called
	// more than once and must not have effects outside the transaction.
	// It may run on another caller's goroutine, with Updates that arrived
	// at the same time (group commit), so it must return rather than call
	// runtime.Goexit; a panic in it is raised again in its caller.
	Update(ctx context.Context, fn func(*Tx) error) error
	// Close releases the store.
	Close() error
}

// AddRefs adds delta to a slot's reference count and returns the new count.
// It refuses to go below zero (ErrCorrupt: the store already disagrees with
// itself).
func AddRefs(tx *Tx, loc table.Location, delta int) (uint32, error) {
	n, err := tx.Refs(loc)
	if err != nil {
		return 0, err
	}
	v := int64(n) + int64(delta)
	if v < 0 || v > math.MaxUint32 {
		return 0, fmt.Errorf("slot %v: reference count %d%+d: %w", loc, n, delta, ErrCorrupt)
	}
	return uint32(v), tx.SetRefs(loc, uint32(v))
}
