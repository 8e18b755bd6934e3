package stream

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"time"
	"unicode/utf8"
)

// Version is the format version this package writes and the only one it
// reads.
const Version = 1

// magic opens every stream. The high byte catches a channel that strips
// the eighth bit, the newline one that rewrites line ends.
const magic = "\x89SEGMAP\n"

// Sizes and limits of the format (docs/stream.md).
const (
	// Sector is the unit of every offset and length: each is a multiple
	// of it.
	Sector = 512
	// MaxData is the most payload one data record carries. Writer.Data
	// splits longer extents; the Reader refuses a longer record before
	// reading it, so it never holds more than this much of one record.
	MaxData = 4 << 20
	// MaxName is the longest snapshot name, in bytes.
	MaxName = 255
	// MaxSize is the largest snapshot size, 1 EiB.
	MaxSize = 1 << 60
	// MinSegmentSize and MaxSegmentSize bound a snapshot's segment size,
	// a power of two.
	MinSegmentSize = Sector
	MaxSegmentSize = 1 << 30
)

const (
	preambleLen = len(magic) + 4 // magic, version
	headLen     = 8              // type, 3 reserved bytes, body length
	crcLen      = 4
	idLen       = 46 // a snapshot identity without its name
	flagBase    = 1  // header flags: a base identity follows the source's

	headerMinBody = 4 + idLen + 1
	headerMaxBody = 4 + 2*(idLen+MaxName)
	dataMinBody   = 8 + Sector
	dataMaxBody   = 8 + MaxData
	zeroBody      = 16
	endBody       = 28
)

// castagnoli is the CRC-32C table of every checksum in a stream.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// RecordType is the type of a record, its first byte. The values are
// ASCII letters so that a hex dump of a stream reads.
type RecordType uint8

// The record types. A stream is a header record, data and zero records
// in increasing offset order, and an end record.
const (
	TypeHeader RecordType = 'H'
	TypeData   RecordType = 'D'
	TypeZero   RecordType = 'Z'
	TypeEnd    RecordType = 'E'
)

// String returns the type's name, or its value for an unknown type.
func (t RecordType) String() string {
	switch t {
	case TypeHeader:
		return "header"
	case TypeData:
		return "data"
	case TypeZero:
		return "zero"
	case TypeEnd:
		return "end"
	}
	return fmt.Sprintf("type 0x%02x", uint8(t))
}

// Snapshot identifies a snapshot: the source of a stream or the base an
// incremental stream applies to. An importer refuses an incremental
// stream unless its target's newest snapshot has the base's ID (and, as
// a cross-check, its size and creation time).
type Snapshot struct {
	// Name is the snapshot's name, 1 to MaxName bytes of UTF-8. A full
	// import ends with a snapshot of this name.
	Name string
	// ID is the snapshot's identity: random, unique, not all zero. It is
	// what an importer compares, not the name, which can be reused.
	ID [16]byte
	// Created is when the snapshot was taken. It is stored to the
	// nanosecond without location or monotonic reading; a Reader returns
	// it in UTC, so compare it with Equal.
	Created time.Time
	// Size is the snapshot's size in bytes: a non-zero multiple of
	// Sector, at most MaxSize.
	Size uint64
	// SegmentSize is the snapshot's segment size: a power of two from
	// MinSegmentSize to MaxSegmentSize.
	SegmentSize uint64
}

// Header opens a stream.
type Header struct {
	// Source is the snapshot the stream carries. The stream's extents
	// lie within Source.Size.
	Source Snapshot
	// Base is nil for a full stream, which gives every byte of Source
	// (bytes no record covers read as zero). For an incremental stream
	// it is the snapshot the stream applies to: the records are what
	// changed from Base to Source, and bytes no record covers are Base's.
	// When the sizes differ the target is first resized to Source.Size;
	// bytes past Base.Size then read as zero unless a record covers them.
	Base *Snapshot
}

// check reports what is wrong with s, or nil.
func (s *Snapshot) check() error {
	switch {
	case len(s.Name) == 0 || len(s.Name) > MaxName:
		return fmt.Errorf("name of %d bytes (1 to %d)", len(s.Name), MaxName)
	case !utf8.ValidString(s.Name):
		return fmt.Errorf("name %q is not UTF-8", s.Name)
	case s.ID == [16]byte{}:
		return fmt.Errorf("snapshot %q has an all-zero ID", s.Name)
	case s.Size == 0 || s.Size%Sector != 0 || s.Size > MaxSize:
		return fmt.Errorf("snapshot %q size %d (a non-zero multiple of %d, at most %d)", s.Name, s.Size, Sector, uint64(MaxSize))
	case s.SegmentSize < MinSegmentSize || s.SegmentSize > MaxSegmentSize || s.SegmentSize&(s.SegmentSize-1) != 0:
		return fmt.Errorf("snapshot %q segment size %d (a power of two from %d to %d)", s.Name, s.SegmentSize, MinSegmentSize, MaxSegmentSize)
	}
	return nil
}

// check reports what is wrong with h, or nil.
func (h *Header) check() error {
	if err := h.Source.check(); err != nil {
		return fmt.Errorf("source: %w", err)
	}
	if h.Base == nil {
		return nil
	}
	if err := h.Base.check(); err != nil {
		return fmt.Errorf("base: %w", err)
	}
	if h.Base.ID == h.Source.ID {
		return fmt.Errorf("base and source have the same ID %x", h.Source.ID)
	}
	return nil
}

// appendSnapshot appends s's encoding (docs/stream.md "Header record").
func appendSnapshot(b []byte, s *Snapshot) []byte {
	b = append(b, s.ID[:]...)
	b = binary.LittleEndian.AppendUint64(b, uint64(s.Created.Unix()))
	b = binary.LittleEndian.AppendUint32(b, uint32(s.Created.Nanosecond()))
	b = binary.LittleEndian.AppendUint64(b, s.Size)
	b = binary.LittleEndian.AppendUint64(b, s.SegmentSize)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(s.Name)))
	return append(b, s.Name...)
}

// appendHeaderBody appends the body of h's header record.
func appendHeaderBody(b []byte, h *Header) []byte {
	var flags uint32
	if h.Base != nil {
		flags |= flagBase
	}
	b = binary.LittleEndian.AppendUint32(b, flags)
	b = appendSnapshot(b, &h.Source)
	if h.Base != nil {
		b = appendSnapshot(b, h.Base)
	}
	return b
}

// parseSnapshot decodes one snapshot identity from the start of b and
// returns the bytes after it.
func parseSnapshot(b []byte, s *Snapshot) ([]byte, error) {
	if len(b) < idLen {
		return nil, fmt.Errorf("snapshot identity cut short: %d of at least %d bytes", len(b), idLen+1)
	}
	copy(s.ID[:], b)
	sec := int64(binary.LittleEndian.Uint64(b[16:]))
	nsec := binary.LittleEndian.Uint32(b[24:])
	if nsec >= 1e9 {
		return nil, fmt.Errorf("creation time has %d nanoseconds", nsec)
	}
	s.Created = time.Unix(sec, int64(nsec)).UTC()
	s.Size = binary.LittleEndian.Uint64(b[28:])
	s.SegmentSize = binary.LittleEndian.Uint64(b[36:])
	n := int(binary.LittleEndian.Uint16(b[44:]))
	b = b[idLen:]
	if n > len(b) {
		return nil, fmt.Errorf("name of %d bytes, %d left in the record", n, len(b))
	}
	s.Name = string(b[:n])
	if err := s.check(); err != nil {
		return nil, err
	}
	return b[n:], nil
}

// parseHeaderBody decodes a header record's body into h.
func parseHeaderBody(b []byte, h *Header) error {
	flags := binary.LittleEndian.Uint32(b)
	if flags&^flagBase != 0 {
		return fmt.Errorf("unknown flags 0x%x", flags&^flagBase)
	}
	b, err := parseSnapshot(b[4:], &h.Source)
	if err != nil {
		return fmt.Errorf("source: %w", err)
	}
	h.Base = nil
	if flags&flagBase != 0 {
		base := new(Snapshot)
		if b, err = parseSnapshot(b, base); err != nil {
			return fmt.Errorf("base: %w", err)
		}
		h.Base = base
	}
	if len(b) != 0 {
		return fmt.Errorf("%d bytes after the header's fields", len(b))
	}
	return h.check()
}

// extents holds what the Writer and the Reader both check of the
// sequence of data and zero records, with O(1) state: each extent is
// aligned, within the source's size and starts at or after the end of
// the one before it. It also counts what the end record sums up.
type extents struct {
	size      uint64 // the source's size
	next      uint64 // the lowest offset the next extent may start at
	records   uint64 // data and zero records so far
	dataBytes uint64
	zeroBytes uint64
	chain     uint32 // CRC-32C of the checksums of the records so far
	scratch   [4]byte
}

// check reports what is wrong with an extent of n bytes at off, or nil.
// n is not zero.
func (e *extents) check(off, n uint64) error {
	switch {
	case off%Sector != 0 || n%Sector != 0:
		return fmt.Errorf("extent [%d, +%d) not aligned to %d bytes", off, n, Sector)
	case off > e.size || n > e.size-off:
		return fmt.Errorf("extent [%d, +%d) past the end, %d", off, n, e.size)
	case off < e.next:
		return fmt.Errorf("extent [%d, +%d) starts before the end of the previous one, %d", off, n, e.next)
	}
	return nil
}

// add records an extent that passed check, and its record's checksum.
func (e *extents) add(t RecordType, off, n uint64, sum uint32) {
	e.next = off + n
	e.records++
	if t == TypeData {
		e.dataBytes += n
	} else {
		e.zeroBytes += n
	}
	e.chainSum(sum)
}

// chainSum adds a record's checksum to the chain.
func (e *extents) chainSum(sum uint32) {
	// Through e, not a local array: crc32 would move that to the heap.
	binary.LittleEndian.PutUint32(e.scratch[:], sum)
	e.chain = crc32.Update(e.chain, castagnoli, e.scratch[:])
}

// appendEndBody appends the body of the end record that e sums up.
func (e *extents) appendEndBody(b []byte) []byte {
	b = binary.LittleEndian.AppendUint64(b, e.records)
	b = binary.LittleEndian.AppendUint64(b, e.dataBytes)
	b = binary.LittleEndian.AppendUint64(b, e.zeroBytes)
	return binary.LittleEndian.AppendUint32(b, e.chain)
}

// appendHead appends a record head.
func appendHead(b []byte, t RecordType, bodyLen int) []byte {
	b = append(b, byte(t), 0, 0, 0)
	return binary.LittleEndian.AppendUint32(b, uint32(bodyLen))
}
