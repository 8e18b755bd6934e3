// Package meta is the controller's persistent store: the disk catalogue, each
// disk's mapping table, the storage containers, and per-slot reference
// counts that say which slots are allocated and how many table entries share
// them.
//
// Every change the controller makes is one transaction (Store.Update), so a
// crash leaves the store as it was before or after the change, never between.
// The records are built on a small ordered key-value interface so that each
// backend (bbolt for one controller, etcd for several) only has to provide atomic transactions
// over keys; the record layout, checksums and the page caching live here once.
//
// # Layout
//
//	n/<name>                 -> disk id
//	d/<disk id>              -> Disk record
//	t/<disk id>/<dir>        -> table directory: the ids of DirPages table pages
//	p/<page id>              -> table page: PageEntries entries
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
// reference on every slot it maps.
//
// # Invariants (checked by the controller's Check)
//
//   - a table page's reference count equals the number of directory slots,
//     across all disks, that hold its id; a page with none is not stored;
//   - a slot's reference count equals the number of stored table pages
//     with an entry that points at it (a page shared by several disks
//     counts once); a count of zero means free;
//   - so a slot is shared by several disks exactly when its count is above
//     one or the page that maps it is shared: writes to it must not land
//     in place, whether the entry says No-write or not;
//   - Container.Used is the number of slots with a non-zero count.
package meta

import (
	"context"
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
}

// Free returns the number of free slots.
func (c Container) Free() uint64 { return c.Slots - c.Used }

// Store is the persistent store. Its methods are safe for concurrent use;
// transactions are serialisable.
type Store interface {
	// View runs fn in a read-only transaction.
	View(ctx context.Context, fn func(Tx) error) error
	// Update runs fn in a read-write transaction and commits it durably if
	// fn returns nil; otherwise nothing fn did is kept. fn may be called
	// more than once and must not have effects outside the transaction.
	Update(ctx context.Context, fn func(Tx) error) error
	// Close releases the store.
	Close() error
}

// Tx is a transaction. It is not safe for concurrent use, and it is valid
// only inside the function it was passed to. In a read-only transaction the
// methods that write return ErrReadOnlyTx.
type Tx interface {
	// Disk returns the disk called name, or ErrNotFound.
	Disk(name string) (Disk, error)
	// DiskByID returns disk id, or ErrNotFound.
	DiskByID(id DiskID) (Disk, error)
	// Disks returns every disk, ordered by id.
	Disks() ([]Disk, error)
	// CreateDisk stores a new disk, giving it a fresh id (and making it
	// its own family if d.Family is 0). The name must be free
	// (ErrExists). Its table is all Zero.
	CreateDisk(d Disk) (Disk, error)
	// PutDisk updates an existing disk's record; the name may change.
	PutDisk(d Disk) error
	// DeleteDisk removes the disk record and its table: each of its
	// pages loses a reference, and a page left with none is removed and
	// releases its slots. It returns the slots whose count reached zero
	// (the caller may punch them).
	DeleteDisk(id DiskID) ([]table.Location, error)

	// Entries returns entries [first, first+n) of disk id's table.
	Entries(id DiskID, first, n uint64) ([]table.Entry, error)
	// SetEntries replaces entries [first, first+len(es)) of disk id's
	// table, first unsharing the pages it changes (see Unshare). The
	// caller keeps slot reference counts right for the entries it
	// replaces.
	SetEntries(id DiskID, first uint64, es []table.Entry) error
	// ForEachMapped calls fn for every entry of disk id's table that holds
	// a location (neither Zero, Error nor Invalid), in segment order.
	ForEachMapped(id DiskID, fn func(seg uint64, e table.Entry) error) error
	// CopyTable makes dst's table a copy of src's by sharing its pages:
	// its cost grows with the number of pages, not of entries, and no
	// slot's count changes. dst's previous table is released as by
	// DeleteDisk.
	CopyTable(src, dst DiskID) error
	// PageShared says whether the page holding entry seg of disk id is
	// shared with another disk.
	PageShared(id DiskID, seg uint64) (bool, error)
	// Unshare gives disk id a page of its own for every shared page that
	// holds entries [first, first+n): a copy, which counts one more
	// reference on each slot it maps. Afterwards a slot's count tells
	// whether one of those entries is shared.
	Unshare(id DiskID, first, n uint64) error
	// TablePages returns the stored pages of disk id's table, in order.
	TablePages(id DiskID) ([]PageRef, error)
	// Page returns the entries of the stored table page pid.
	Page(pid uint64) ([]table.Entry, error)
	// PageRefs returns the reference count of table page pid.
	PageRefs(pid uint64) (uint32, error)
	// ForEachStoredPage calls fn, in id order, for every table page that
	// is stored or has a non-zero reference count, with that count.
	ForEachStoredPage(fn func(pid uint64, refs uint32, stored bool) error) error

	// Containers returns every container, ordered by id.
	Containers() ([]Container, error)
	// Container returns container id, or ErrNotFound.
	Container(id uint32) (Container, error)
	// AddContainer stores a new container record, giving it a fresh id
	// when c.ID is 0.
	AddContainer(c Container) (Container, error)

	// Refs returns the reference count of a slot.
	Refs(loc table.Location) (uint32, error)
	// SetRefs sets the reference count of a slot and keeps the container's
	// Used count in step.
	SetRefs(loc table.Location, n uint32) error
	// FindFree returns a free slot of container cid, searching from slot
	// from upward and wrapping around; ok is false if there is none.
	FindFree(cid uint32, from uint32) (slot uint32, ok bool, err error)
	// ForEachRef calls fn for every slot of container cid with a non-zero
	// count, in slot order.
	ForEachRef(cid uint32, fn func(slot uint32, n uint32) error) error

	// Grants returns the agents allowed to map disk id; all is true
	// when any agent may (no list was ever set).
	Grants(id DiskID) (agents []string, all bool, err error)
	// SetGrants sets the agents allowed to map disk id; all opens it to
	// every agent (and agents is ignored).
	SetGrants(id DiskID, agents []string, all bool) error

	// Agents returns the agents registered as possibly holding a lease
	// from a controller (see the controller's Hold); SetAgents replaces
	// the list.
	Agents() ([]string, error)
	SetAgents(agents []string) error

	// Damaged decodes every record in the store and returns, in key
	// order, each one that fails its checksum, is too short for its
	// layout, does not decode, or contradicts its key or the record it
	// names (a name for a missing disk, a disk without its name). It
	// sees the records as stored, not the transaction's own unflushed
	// changes, and reads the whole store.
	Damaged() ([]*RecordError, error)

	// NextSeq increments the named counter and returns its new value
	// (the first is 1). The controller's epoch is one.
	NextSeq(name string) (uint64, error)
}

// AddRefs adds delta to a slot's reference count and returns the new count.
// It refuses to go below zero (ErrCorrupt: the store already disagrees with
// itself).
func AddRefs(tx Tx, loc table.Location, delta int) (uint32, error) {
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
