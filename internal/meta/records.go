package meta

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"time"

	"segmap/internal/table"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Record versions. A record starts with its version byte.
const (
	diskVersion      = 1
	containerVersion = 1
	pageVersion      = 1
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
	b   []byte
	err *RecordError // its Key is filled in by done
}

// open verifies v's checksum and version and returns a decoder over its body.
// A value too short for its checksum, or shorter than the layout its own
// length fields describe (see layoutSize), is reported as truncated; any
// other checksum failure as a checksum mismatch.
func open(key []byte, v []byte, version uint8) *dec {
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
	if body[0] != version {
		return &dec{err: corrupt(key, "record version %d, want %d", body[0], version)}
	}
	return &dec{b: body[1:]}
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
	e.u8(diskVersion)
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
	return e.seal()
}

func decodeDisk(key, v []byte) (Disk, error) {
	r := open(key, v, diskVersion)
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
	if err := r.done(key); err != nil {
		return Disk{}, err
	}
	switch {
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
	e.u8(containerVersion)
	e.u32(c.ID)
	e.str(c.URI)
	e.u64(c.SlotSize)
	e.u64(c.Slots)
	e.u64(c.Used)
	return e.seal()
}

func decodeContainer(key, v []byte) (Container, error) {
	r := open(key, v, containerVersion)
	var c Container
	c.ID = r.u32()
	c.URI = r.str()
	c.SlotSize = r.u64()
	c.Slots = r.u64()
	c.Used = r.u64()
	if err := r.done(key); err != nil {
		return Container{}, err
	}
	if c.ID == 0 || c.Used > c.Slots || c.SlotSize == 0 || c.SlotSize&(c.SlotSize-1) != 0 {
		return Container{}, corrupt(key, "container %d: slot size %d, %d of %d slots used", c.ID, c.SlotSize, c.Used, c.Slots)
	}
	return c, nil
}

// page is a decoded table page.
type page [PageEntries]table.Entry

func encodePage(p *page) []byte {
	e := &enc{b: make([]byte, 0, 1+PageEntries*entrySize+4)}
	e.u8(pageVersion)
	for _, x := range p {
		e.u32(x.Loc.Container)
		e.u32(x.Loc.Slot)
		e.u8(uint8(x.State))
	}
	return e.seal()
}

func decodePage(key, v []byte) (*page, error) {
	r := open(key, v, pageVersion)
	if r.err == nil && len(r.b) != PageEntries*entrySize {
		return nil, shortIf(len(r.b) < PageEntries*entrySize, key, "table page of %d bytes", len(r.b))
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
	if err := r.done(key); err != nil {
		return nil, err
	}
	return p, nil
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
	for i := range p {
		p[i] = r.u32()
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

func seqKey(name string) []byte { return append([]byte("s/"), name...) }

// pageNo returns the page number at the end of a page key.
func pageNo(key []byte) uint64 { return binary.BigEndian.Uint64(key[len(key)-8:]) }
