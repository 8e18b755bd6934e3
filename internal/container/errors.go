package container

import "errors"

// Errors returned by this package. They are always wrapped with context
// (the path or container id and the offending values); compare them with
// errors.Is, never by their text.
var (
	// ErrNotContainer means the file or device does not start with the
	// segmap magic: it is some other file (a text file, a file system
	// image, a blank device) and must not be touched as a container.
	ErrNotContainer = errors.New("not a segmap container")

	// ErrCorruptHeader means the magic is present but the rest of the
	// header cannot be trusted: its checksum does not match, its format
	// version is unknown, or its fields make no sense. The data area is
	// left alone; recovering from this needs a human.
	ErrCorruptHeader = errors.New("corrupt container header")

	// ErrWrongContainer means the header is valid but describes a
	// different container (id or slot size) than the caller expected,
	// typically because devices were renamed or swapped.
	ErrWrongContainer = errors.New("wrong container")

	// ErrTruncated means the file or device is shorter than its header
	// says it is (or shorter than the header itself), so some slots
	// would be missing.
	ErrTruncated = errors.New("container truncated")

	// ErrInvalidHeader means a header passed to Create or Format is
	// unacceptable: the slot size is not a power of two in
	// [MinSlotSize, MaxSlotSize], there are no slots, or the container
	// would be too large to address.
	ErrInvalidHeader = errors.New("invalid container header")

	// ErrOutOfRange means a read, write or punch reaches outside the
	// slot data area [0, Size()). Nothing was read, written or punched.
	ErrOutOfRange = errors.New("range outside container")

	// ErrClosed means the container has been closed.
	ErrClosed = errors.New("container closed")

	// ErrAllocationUnknown means the backing of a container cannot say
	// how much storage it holds (Allocator): a block device, whose
	// blocks belong to whatever provides it.
	ErrAllocationUnknown = errors.New("allocated storage unknown")

	// ErrLeaseOver means the storage refused a request because the
	// holder's lease had run out (Leaser): nothing was read or written.
	// The holder may have been fenced meanwhile; it must get a new lease
	// and look at its map again before it retries.
	ErrLeaseOver = errors.New("storage lease over")

	// ErrNotBlank means Format or FormatNBD found something on the
	// target that formatting would destroy: a file system, a partition
	// table, a swap area, an LVM or LUKS volume, or a container header
	// (see Signature). Nothing was written; formatting with force
	// overwrites it.
	ErrNotBlank = errors.New("refusing to format over existing data")

	// ErrUnreachable means the storage of an nbd:// container has been
	// out of reach for longer than the container's failure timeout
	// (NBDOptions.FailTimeout): the request was given up. A write given
	// up may or may not have landed, as with any failed write. The
	// container keeps reconnecting meanwhile; once the storage is back,
	// requests succeed again.
	ErrUnreachable = errors.New("container storage unreachable")

	// ErrWritesLost means a Flush cannot vouch for writes the storage
	// acknowledged on an NBD connection that broke before they were
	// flushed: the storage may have restarted without them (a crash
	// of its machine loses its write cache). It is reported by one
	// Flush, the first to complete after the reconnection; the data of
	// those writes must be taken as lost.
	ErrWritesLost = errors.New("acknowledged writes may be lost")
)
