package meta

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"slices"
	"time"

	"segmap/internal/table"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Record versions. A record starts with its version byte.
const (
	diskVersion      = 2 // 1 had no UUID (see Disk.Identity)
	diskVersionNoID  = 1
	containerVersion = 2 // 1 had no state (every container online)
	containerV1      = 1
	containerMirror  = 3 // version 2's fields, then the replicas
	intentVersion    = 1
	pageVersion      = 1 // whole entries only
	partPageVersion  = 2 // version 1's entries, then the partial ones (see encodePage)
	refsVersion      = 1
	dirVersion       = 2 // 1 was a table page stored under t/, before pages were shared
)

// entrySize is the encoded size of one table entry: container, slot, state.
const entrySize = 4 + 4 + 1

// maxName bounds names inside records, so that a corrupt length cannot make
// the decoder allocate much.
const maxName = 4096

// enc appends fields to a record.
type enc struct{ b []byte }

func (e *enc) u8(v uint8)   { e.b = append(e.b, v) }
func (e *enc) u32(v uint32) { e.b = binary.LittleEndian.AppendUint32(e.b, v) }
func (e *enc) u64(v uint64) { e.b = binary.LittleEndian.AppendUint64(e.b, v) }
func (e *enc) str(s string) { e.u32(uint32(len(s))); e.b = append(e.b, s...) }

// seal appends the checksum and returns the record.
func (e *enc) seal() []byte {
	return binary.LittleEndian.AppendUint32(e.b, crc32.Checksum(e.b, castagnoli))
}

// dec reads fields from a record whose checksum has been verified. The first
// error sticks; later reads return zero values.
type dec struct {
	b       []byte
	version uint8        // the record's version
	err     *RecordError // its Key is filled in by done
}

// open verifies v's checksum and version (one of versions) and returns a
// decoder over its body.
// A value too short for its checksum, or shorter than the layout its own
// length fields describe (see layoutSize), is reported as truncated; any
// other checksum failure as a checksum mismatch.
func open(key []byte, v []byte, versions ...uint8) *dec {
	if len(v) < 5 {
		return &dec{err: truncated(key, "record of %d bytes, too short for a version and a checksum", len(v))}
	}
	body, sum := v[:len(v)-4], binary.LittleEndian.Uint32(v[len(v)-4:])
	if crc32.Checksum(body, castagnoli) != sum {
		if n, ok := layoutSize(key, v); ok && len(v) < n {
			return &dec{err: truncated(key, "record of %d bytes, its layout needs %d", len(v), n)}
		}
		return &dec{err: corrupt(key, "checksum mismatch")}
	}
	if !slices.Contains(versions, body[0]) {
		return &dec{err: corrupt(key, "record version %d, want %v", body[0], versions[len(versions)-1])}
	}
	return &dec{b: body[1:], version: body[0]}
}

// corrupt returns the error for the record under key that does not decode.
func corrupt(key []byte, format string, args ...any) *RecordError {
	return &RecordError{Key: bytes.Clone(key), Reason: fmt.Sprintf(format, args...)}
}

// truncated returns the error for the record under key that is too short.
func truncated(key []byte, format string, args ...any) *RecordError {
	return &RecordError{Key: bytes.Clone(key), Reason: fmt.Sprintf(format, args...), Truncated: true}
}

func (d *dec) need(n int) bool {
	if d.err != nil {
		return false
	}
	if len(d.b) < n {
		d.err = truncated(nil, "fields run past the end of the record")
		return false
	}
	return true
}

func (d *dec) u8() uint8 {
	if !d.need(1) {
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

func (d *dec) u32() uint32 {
	if !d.need(4) {
		return 0
	}
	v := binary.LittleEndian.Uint32(d.b)
	d.b = d.b[4:]
	return v
}

func (d *dec) u64() uint64 {
	if !d.need(8) {
		return 0
	}
	v := binary.LittleEndian.Uint64(d.b)
	d.b = d.b[8:]
	return v
}

func (d *dec) str() string {
	n := d.u32()
	if d.err == nil && n > maxName {
		d.err = corrupt(nil, "string of %d bytes", n)
	}
	if !d.need(int(n)) {
		return ""
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}

// done reports the decoder's error, or ErrCorrupt if bytes are left over.
func (d *dec) done(key []byte) error {
	if d.err != nil {
		e := *d.err
		e.Key = bytes.Clone(key)
		return &e
	}
	if len(d.b) != 0 {
		return corrupt(key, "%d trailing bytes", len(d.b))
	}
	return nil
}

func encodeDisk(d Disk) []byte {
	e := &enc{}
	// A disk without a UUID (stored before they existed) keeps version
	// 1, so that its record re-encodes as it was read.
	if d.UUID == ([16]byte{}) {
		e.u8(diskVersionNoID)
	} else {
		e.u8(diskVersion)
	}
	e.u64(uint64(d.ID))
	e.str(d.Name)
	e.u64(d.Size)
	e.u64(d.SegmentSize)
	e.u8(uint8(d.Policy))
	e.u64(uint64(d.Origin))
	e.u64(uint64(d.Family))
	var flags uint8
	if d.ReadOnly {
		flags |= 1
	}
	e.u8(flags)
	e.u64(uint64(d.Created.UnixNano()))
	if d.UUID != ([16]byte{}) {
		e.b = append(e.b, d.UUID[:]...)
	}
	return e.seal()
}

func decodeDisk(key, v []byte) (Disk, error) {
	r := open(key, v, diskVersionNoID, diskVersion)
	var d Disk
	d.ID = DiskID(r.u64())
	d.Name = r.str()
	d.Size = r.u64()
	d.SegmentSize = r.u64()
	d.Policy = table.Policy(r.u8())
	d.Origin = DiskID(r.u64())
	d.Family = DiskID(r.u64())
	flags := r.u8()
	d.ReadOnly = flags&1 != 0
	d.Created = time.Unix(0, int64(r.u64())).UTC()
	if r.version == diskVersion && r.need(len(d.UUID)) {
		copy(d.UUID[:], r.b)
		r.b = r.b[len(d.UUID):]
	}
	if err := r.done(key); err != nil {
		return Disk{}, err
	}
	switch {
	case r.version == diskVersion && d.UUID == [16]byte{}:
		return Disk{}, corrupt(key, "version %d disk with a zero UUID", r.version)
	case d.ID == 0 || d.Name == "":
		return Disk{}, corrupt(key, "disk without id or name")
	case d.SegmentSize == 0 || d.SegmentSize&(d.SegmentSize-1) != 0:
		return Disk{}, corrupt(key, "segment size %d", d.SegmentSize)
	case !d.Policy.Valid():
		return Disk{}, corrupt(key, "policy %d", d.Policy)
	case flags&^1 != 0:
		return Disk{}, corrupt(key, "flags 0x%x", flags)
	}
	return d, nil
}

func encodeContainer(c Container) []byte {
	e := &enc{}
	// An online container keeps version 1, so that records stored
	// before states existed re-encode as they were read, and a store
	// whose containers are all online is still read by older binaries.
	switch {
	case c.Mirrored():
		e.u8(containerMirror)
	case c.State == ContainerOnline:
		e.u8(containerV1)
	default:
		e.u8(containerVersion)
	}
	e.u32(c.ID)
	e.str(c.URI)
	e.u64(c.SlotSize)
	e.u64(c.Slots)
	e.u64(c.Used)
	if c.State != ContainerOnline || c.Mirrored() {
		e.u8(uint8(c.State))
	}
	if c.Mirrored() {
		e.u64(c.Epoch)
		e.u8(uint8(len(c.Replicas)))
		for _, r := range c.Replicas {
			e.str(r.URI)
			e.u8(uint8(r.State))
			full := uint8(0)
			if r.Full {
				full = 1
			}
			e.u8(full)
		}
		e.u64(uint64(c.CursorFam))
		e.u64(c.CursorSeg)
	}
	return e.seal()
}

func decodeContainer(key, v []byte) (Container, error) {
	r := open(key, v, containerV1, containerVersion, containerMirror)
	var c Container
	c.ID = r.u32()
	c.URI = r.str()
	c.SlotSize = r.u64()
	c.Slots = r.u64()
	c.Used = r.u64()
	if r.version >= containerVersion {
		c.State = ContainerState(r.u8())
	}
	if r.version == containerMirror {
		c.Epoch = r.u64()
		n := int(r.u8())
		if n < 2 || n > MaxReplicas {
			return Container{}, corrupt(key, "mirrored container with %d replicas", n)
		}
		for range n {
			rp := Replica{URI: r.str(), State: ReplicaState(r.u8())}
			full := r.u8()
			rp.Full = full == 1
			if !rp.State.Valid() || full > 1 {
				return Container{}, corrupt(key, "replica state %d, full %d", rp.State, full)
			}
			c.Replicas = append(c.Replicas, rp)
		}
		c.CursorFam = DiskID(r.u64())
		c.CursorSeg = r.u64()
	}
	if err := r.done(key); err != nil {
		return Container{}, err
	}
	if c.ID == 0 || c.Used > c.Slots || c.SlotSize == 0 || c.SlotSize&(c.SlotSize-1) != 0 {
		return Container{}, corrupt(key, "container %d: slot size %d, %d of %d slots used", c.ID, c.SlotSize, c.Used, c.Slots)
	}
	if r.version == containerMirror && (!c.State.Valid() || c.URI != "") {
		return Container{}, corrupt(key, "mirrored container %d in state %d with URI %q", c.ID, c.State, c.URI)
	}
	if r.version == containerVersion && (c.State == ContainerOnline || !c.State.Valid()) {
		return Container{}, corrupt(key, "version %d container %d in state %d", r.version, c.ID, c.State)
	}
	return c, nil
}

// page is a decoded table page.
type page [PageEntries]table.Entry

// partEntryMax is the most bytes one partial entry adds to a page: its
// index and layer count, its top's sub-blocks, and each layer under it
// (container, slot, sub-blocks).
const partEntryMax = 2 + 1 + bitsMax + (table.MaxDepth-1)*(4+4+bitsMax)

// partEntryMin is the fewest bytes one partial entry can take: its index
// and layer count, its top's sub-blocks, and one layer, each set of
// sub-blocks its word count alone (empty sets do not decode, but a record
// holding them is malformed, not cut short).
const partEntryMin = 2 + 1 + 1 + (4 + 4 + 1)

// bitsMax is the most bytes a set of sub-blocks takes: its word count and
// the words.
const bitsMax = 1 + len(table.Bits{})*8

// encodePage encodes a table page. A page without a partial entry is a
// version 1 record: PageEntries entries of entrySize bytes (container,
// slot, state). A page with some is a version 2 record: the same entries,
// then the number of partial entries and, for each in index order, its
// index (u16), the number of layers under it (u8), the sub-blocks its own
// slot holds, and each layer (container, slot, sub-blocks), newest first.
// A set of sub-blocks is its number of 64-bit words up to the last that
// is not zero (u8), then those words. So a page with no partial entry is
// stored as it always was, and a store written before partial entries
// existed reads unchanged.
func encodePage(p *page) []byte {
	parts := 0
	for _, x := range p {
		if x.Partial() {
			parts++
		}
	}
	version := uint8(pageVersion)
	size := 1 + PageEntries*entrySize + 4
	if parts > 0 {
		version = partPageVersion
		size += 4 + parts*partEntryMax
	}
	e := &enc{b: make([]byte, 0, size)}
	e.u8(version)
	for _, x := range p {
		e.u32(x.Loc.Container)
		e.u32(x.Loc.Slot)
		e.u8(uint8(x.State))
	}
	if parts == 0 {
		return e.seal()
	}
	e.u32(uint32(parts))
	for i, x := range p {
		if !x.Partial() {
			continue
		}
		e.b = binary.LittleEndian.AppendUint16(e.b, uint16(i))
		e.u8(uint8(len(x.Part.Under)))
		e.bits(x.Part.Bits)
		for _, l := range x.Part.Under {
			e.u32(l.Loc.Container)
			e.u32(l.Loc.Slot)
			e.bits(l.Bits)
		}
	}
	return e.seal()
}

// bits appends a set of sub-blocks: its words up to the last non-zero one,
// after their count.
func (e *enc) bits(b table.Bits) {
	n := len(b)
	for n > 0 && b[n-1] == 0 {
		n--
	}
	e.u8(uint8(n))
	for _, w := range b[:n] {
		e.u64(w)
	}
}

// bits reads a set of sub-blocks written by enc.bits; a word count past
// the set's size, or a last word of zero (not how it is written), is an
// error.
func (d *dec) bits() table.Bits {
	var b table.Bits
	n := int(d.u8())
	if d.err == nil && n > len(b) {
		d.err = corrupt(nil, "set of %d sub-block words, at most %d", n, len(b))
	}
	for i := 0; i < n && d.err == nil; i++ {
		b[i] = d.u64()
	}
	if d.err == nil && n > 0 && b[n-1] == 0 {
		d.err = corrupt(nil, "set of sub-blocks ends in a zero word")
	}
	return b
}

func (d *dec) u16() uint16 {
	if !d.need(2) {
		return 0
	}
	v := binary.LittleEndian.Uint16(d.b)
	d.b = d.b[2:]
	return v
}

// decodePage decodes a table page of either version. It checks what a
// partial entry's layout can tell alone (an index in the page, each once
// and in order, on a mapped entry; 1 to MaxDepth-1 layers, none in
// container 0; no empty set of sub-blocks); its full shape needs the
// disk's segment size (table.Partial.Valid), which the controller's check
// applies.
func decodePage(key, v []byte) (*page, error) {
	r := open(key, v, pageVersion, partPageVersion)
	if r.err == nil && r.version == pageVersion && len(r.b) != PageEntries*entrySize {
		return nil, shortIf(len(r.b) < PageEntries*entrySize, key, "table page of %d bytes", len(r.b))
	}
	if r.err == nil && r.version == partPageVersion && len(r.b) < PageEntries*entrySize+4 {
		return nil, truncated(key, "table page of %d bytes", len(r.b))
	}
	p := new(page)
	for i := range p {
		p[i].Loc.Container = r.u32()
		p[i].Loc.Slot = r.u32()
		p[i].State = table.State(r.u8())
		if r.err == nil && (!p[i].State.Valid() || p[i].State&table.Invalid != 0) {
			return nil, corrupt(key, "entry %d state %v", i, p[i].State)
		}
	}
	if r.err == nil && r.version == partPageVersion {
		r.partials(p)
	}
	if err := r.done(key); err != nil {
		return nil, err
	}
	return p, nil
}

// decodePageEntry decodes entry i of a table page of either version,
// without decoding the rest: the fault path reads one entry per fault,
// and a page of partial entries costs far more to decode whole. It
// checks the record's checksum and version, entry i as decodePage would,
// and the partial entries before it only as far as it must to skip them.
func decodePageEntry(key, v []byte, i int) (table.Entry, error) {
	r := open(key, v, pageVersion, partPageVersion)
	if r.err == nil && r.version == pageVersion && len(r.b) != PageEntries*entrySize {
		return table.Entry{}, shortIf(len(r.b) < PageEntries*entrySize, key, "table page of %d bytes", len(r.b))
	}
	if r.err == nil && r.version == partPageVersion && len(r.b) < PageEntries*entrySize+4 {
		return table.Entry{}, truncated(key, "table page of %d bytes", len(r.b))
	}
	if r.err != nil {
		return table.Entry{}, r.done(key)
	}
	body := r.b
	r.b = body[i*entrySize : (i+1)*entrySize]
	var e table.Entry
	e.Loc.Container = r.u32()
	e.Loc.Slot = r.u32()
	e.State = table.State(r.u8())
	if !e.State.Valid() || e.State&table.Invalid != 0 {
		return table.Entry{}, corrupt(key, "entry %d state %v", i, e.State)
	}
	if r.version != partPageVersion {
		return e, nil
	}
	r.b = body[PageEntries*entrySize:]
	n := r.u32()
	if n == 0 || n > PageEntries {
		return table.Entry{}, corrupt(key, "%d partial entries", n)
	}
	last := -1
	for range n {
		j, depth := int(r.u16()), int(r.u8())
		switch {
		case r.err != nil:
			return table.Entry{}, r.done(key)
		case j <= last || j >= PageEntries:
			return table.Entry{}, corrupt(key, "partial entry %d after entry %d", j, last)
		case depth == 0 || 1+depth > table.MaxDepth:
			return table.Entry{}, corrupt(key, "partial entry %d has %d layers (2 to %d)", j, 1+depth, table.MaxDepth)
		case j > i:
			return e, nil
		case j < i:
			// Skip its top's sub-blocks and its layers.
			r.skipBits()
			for range depth {
				r.need(8)
				if r.err == nil {
					r.b = r.b[8:]
				}
				r.skipBits()
			}
			last = j
			continue
		}
		if !e.Mapped() {
			return table.Entry{}, corrupt(key, "partial entry %d is %v", j, e.State)
		}
		part := r.layers(r.bits(), depth)
		if r.err != nil {
			return table.Entry{}, r.done(key)
		}
		if why := badPartLayout(part); why != "" {
			return table.Entry{}, corrupt(key, "partial entry %d: %s", j, why)
		}
		e.Part = part
		return e, nil
	}
	if r.err != nil {
		return table.Entry{}, r.done(key)
	}
	return e, nil
}

// layers reads the depth layers under a partial entry whose top holds
// top, and returns the entry's layers (not checked: see badPartLayout).
func (d *dec) layers(top table.Bits, depth int) *table.Partial {
	part := &table.Partial{Bits: top, Under: make([]table.Layer, depth)}
	for j := range part.Under {
		l := &part.Under[j]
		l.Loc.Container = d.u32()
		l.Loc.Slot = d.u32()
		l.Bits = d.bits()
	}
	return part
}

// skipBits skips a set of sub-blocks (see bits).
func (d *dec) skipBits() {
	n := int(d.u8())
	if d.err == nil && n > len(table.Bits{}) {
		d.err = corrupt(nil, "set of %d sub-block words, at most %d", n, len(table.Bits{}))
	}
	if d.need(8 * n) {
		d.b = d.b[8*n:]
	}
}

// badPartLayout says what is wrong with a partial entry as a page record
// stores it, or returns "": from 1 to MaxDepth-1 layers under the top,
// none in container 0, and no layer (the top included) holding no
// sub-block. SetEntries refuses what decodePage would.
func badPartLayout(p *table.Partial) string {
	switch {
	case len(p.Under) == 0 || 1+len(p.Under) > table.MaxDepth:
		return fmt.Sprintf("%d layers (2 to %d)", 1+len(p.Under), table.MaxDepth)
	case p.Bits.Empty():
		return "its own slot holds no sub-block"
	}
	for j, l := range p.Under {
		if l.Loc.Container == 0 || l.Bits.Empty() {
			return fmt.Sprintf("layer %d is %v holding {%v}", j+1, l.Loc, l.Bits)
		}
	}
	return ""
}

// clonePart returns a copy of p that shares nothing with it.
func clonePart(p *table.Partial) *table.Partial {
	return &table.Partial{Bits: p.Bits, Under: slices.Clone(p.Under)}
}

// partials reads the partial entries of a version 2 page into p. Like
// every read, it leaves its error in d (its Key filled in by done).
func (d *dec) partials(p *page) {
	n := d.u32()
	switch {
	case d.err != nil:
		return
	case n == 0 || n > PageEntries:
		d.err = corrupt(nil, "%d partial entries", n)
		return
	case len(d.b) < int(n)*partEntryMin:
		d.err = truncated(nil, "%d partial entries in %d bytes", n, len(d.b))
		return
	}
	last := -1
	for range n {
		i, depth := int(d.u16()), int(d.u8())
		top := d.bits()
		switch {
		case d.err != nil:
			return
		case i <= last || i >= PageEntries:
			d.err = corrupt(nil, "partial entry %d after entry %d", i, last)
			return
		case !p[i].Mapped():
			d.err = corrupt(nil, "partial entry %d is %v", i, p[i].State)
			return
		case depth == 0 || 1+depth > table.MaxDepth:
			d.err = corrupt(nil, "partial entry %d has %d layers (2 to %d)", i, 1+depth, table.MaxDepth)
			return
		}
		part := d.layers(top, depth)
		if d.err != nil {
			return
		}
		if why := badPartLayout(part); why != "" {
			d.err = corrupt(nil, "partial entry %d: %s", i, why)
			return
		}
		p[i].Part = part
		last = i
	}
}

// zeroPage is the content of a table page that is not stored.
var zeroPage = func() *page {
	p := new(page)
	for i := range p {
		p[i] = table.ZeroEntry
	}
	return p
}()

// dir is a decoded table directory: the ids of DirPages consecutive table
// pages of one disk (0: a page not stored, all Zero).
type dir [DirPages]uint64

// encodeDir stores only the pages that exist: count, then (index, id).
func encodeDir(d *dir) []byte {
	e := &enc{b: make([]byte, 0, 64)}
	e.u8(dirVersion)
	n := 0
	for _, id := range d {
		if id != 0 {
			n++
		}
	}
	e.u32(uint32(n))
	for i, id := range d {
		if id != 0 {
			e.u32(uint32(i))
			e.u64(id)
		}
	}
	return e.seal()
}

func decodeDir(key, v []byte) (*dir, error) {
	r := open(key, v, dirVersion)
	n := r.u32()
	if r.err == nil && (n > DirPages || len(r.b) != int(n)*12) {
		return nil, shortIf(n <= DirPages && len(r.b) < int(n)*12, key, "table directory of %d pages in %d bytes", n, len(r.b))
	}
	d := new(dir)
	last := -1
	for range n {
		i, id := r.u32(), r.u64()
		if r.err != nil {
			break
		}
		if int(i) <= last || i >= DirPages || id == 0 {
			return nil, corrupt(key, "table directory entry %d -> page %d", i, id)
		}
		d[i] = id
		last = int(i)
	}
	if err := r.done(key); err != nil {
		return nil, err
	}
	return d, nil
}

// refs is a decoded page of reference counts.
type refs [PageSlots]uint32

func encodeRefs(p *refs) []byte {
	e := &enc{b: make([]byte, 0, 1+PageSlots*4+4)}
	e.u8(refsVersion)
	for _, n := range p {
		e.u32(n)
	}
	return e.seal()
}

func decodeRefs(key, v []byte) (*refs, error) {
	r := open(key, v, refsVersion)
	if r.err == nil && len(r.b) != PageSlots*4 {
		return nil, shortIf(len(r.b) < PageSlots*4, key, "reference page of %d bytes", len(r.b))
	}
	p := new(refs)
	if r.err == nil {
		// Its length checked, the page decodes in one pass rather
		// than a checked read per entry: every fault decodes pages,
		// and under the race detector each read was several
		// instrumented accesses.
		for i := range p {
			p[i] = binary.LittleEndian.Uint32(r.b[4*i:])
		}
		r.b = r.b[len(p)*4:]
	}
	if err := r.done(key); err != nil {
		return nil, err
	}
	return p, nil
}

const grantsVersion = 1

// maxGrants bounds the agents a grant list may hold.
const maxGrants = 4096

func encodeGrants(agents []string) []byte {
	e := &enc{}
	e.u8(grantsVersion)
	e.u32(uint32(len(agents)))
	for _, a := range agents {
		e.str(a)
	}
	return e.seal()
}

func decodeGrants(key, v []byte) ([]string, error) {
	r := open(key, v, grantsVersion)
	n := r.u32()
	if r.err == nil && n > maxGrants {
		return nil, corrupt(key, "%d grants", n)
	}
	out := make([]string, 0, min(n, 64))
	for i := uint32(0); i < n && r.err == nil; i++ {
		out = append(out, r.str())
	}
	if err := r.done(key); err != nil {
		return nil, err
	}
	return out, nil
}

func grantsKey(id DiskID) []byte { return binary.BigEndian.AppendUint64([]byte("g/"), uint64(id)) }

func encodeU64(v uint64) []byte {
	e := &enc{}
	e.u8(1)
	e.u64(v)
	return e.seal()
}

func decodeU64(key, v []byte) (uint64, error) {
	r := open(key, v, 1)
	x := r.u64()
	return x, r.done(key)
}

// Keys.

func nameKey(name string) []byte { return append([]byte("n/"), name...) }

func diskKey(id DiskID) []byte { return binary.BigEndian.AppendUint64([]byte("d/"), uint64(id)) }

func tablePrefix(id DiskID) []byte {
	return append(binary.BigEndian.AppendUint64([]byte("t/"), uint64(id)), '/')
}

// dirKey is the key of table directory dn of disk id.
func dirKey(id DiskID, dn uint64) []byte {
	return binary.BigEndian.AppendUint64(tablePrefix(id), dn)
}

// pageKey is the key of the table page with id pid.
func pageKey(pid uint64) []byte { return binary.BigEndian.AppendUint64([]byte("p/"), pid) }

// pageRefsKey is the key of the reference counts of pages [n*PageSlots,
// (n+1)*PageSlots).
func pageRefsKey(n uint64) []byte { return binary.BigEndian.AppendUint64([]byte("q/"), n) }

func containerKey(id uint32) []byte { return binary.BigEndian.AppendUint32([]byte("c/"), id) }

func refsPrefix(cid uint32) []byte {
	return append(binary.BigEndian.AppendUint32([]byte("r/"), cid), '/')
}

func refsKey(cid uint32, pg uint64) []byte {
	return binary.BigEndian.AppendUint64(refsPrefix(cid), pg)
}

func intentPrefix(cid uint32) []byte { return binary.BigEndian.AppendUint32([]byte("w/"), cid) }

func intentKey(cid, slot uint32) []byte {
	return binary.BigEndian.AppendUint32(intentPrefix(cid), slot)
}

func seqKey(name string) []byte { return append([]byte("s/"), name...) }

// pageNo returns the page number at the end of a page key.
func pageNo(key []byte) uint64 { return binary.BigEndian.Uint64(key[len(key)-8:]) }
