package meta

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"unicode/utf8"
)

// Record verification: Damaged decodes every stored record, so that a
// checker reports each damaged one with its key instead of stopping at the
// first the controller happens to read.

// layoutSize returns the length the record under key must have, read from
// its layout and from the length fields in v (which may themselves be
// damaged: a length field that is out of bounds counts as the smallest
// layout). ok is false for a key of no known record.
func layoutSize(key, v []byte) (n int, ok bool) {
	if len(key) < 2 || key[1] != '/' {
		return 0, false
	}
	u32 := func(off int) (int, bool) {
		if len(v) < off+4 {
			return 0, false
		}
		return int(binary.LittleEndian.Uint32(v[off:])), true
	}
	switch key[0] {
	case 'n', 's':
		return 1 + 8 + 4, true
	case 'p':
		const fixed = 1 + PageEntries*entrySize + 4
		if len(v) == 0 || v[0] != partPageVersion {
			return fixed, true
		}
		m, ok := u32(1 + PageEntries*entrySize)
		if !ok || m > PageEntries {
			return fixed + 4, true
		}
		return fixed + 4 + m*partEntryMin, true
	case 'q', 'r':
		return 1 + PageSlots*4 + 4, true
	case 'd':
		// version, id, name, size, segment size, policy, origin,
		// family, flags, created, checksum
		// (version 2: then the UUID)
		fixed := 1 + 8 + 4 + 8 + 8 + 1 + 8 + 8 + 1 + 8 + 4
		if len(v) > 0 && v[0] == diskVersion {
			fixed += 16
		}
		l, ok := u32(1 + 8)
		if !ok || l > maxName {
			return fixed, true
		}
		return fixed + l, true
	case 'c':
		// version, id, URI, slot size, slots, used, checksum
		const fixed = 1 + 4 + 4 + 8 + 8 + 8 + 4
		l, ok := u32(1 + 4)
		if !ok || l > maxName {
			return fixed, true
		}
		return fixed + l, true
	case 't':
		const fixed = 1 + 4 + 4
		m, ok := u32(1)
		if !ok || m > DirPages {
			return fixed, true
		}
		return fixed + 12*m, true
	case 'g', 'a':
		m, ok := u32(1)
		if !ok || m > maxGrants {
			return 1 + 4 + 4, true
		}
		off := 1 + 4
		for range m {
			l, ok := u32(off)
			if !ok || l > maxName {
				return off + 4 + 4, true
			}
			off += 4 + l
		}
		return off + 4, true
	}
	return 0, false
}

// shortIf returns a truncated-record error if short, else a corrupt one.
func shortIf(short bool, key []byte, format string, args ...any) *RecordError {
	if short {
		return truncated(key, format, args...)
	}
	return corrupt(key, format, args...)
}

// KeyName returns a readable form of a record key: "d/3" for the record of
// disk 3, "t/3/0" for its first table directory, "p/17" for table page 17,
// "q/0", "c/1", "r/1/0", "w/1/5", "g/3", "n/NAME", "s/NAME", "a/". A key of no known
// shape is quoted.
func KeyName(k []byte) string {
	be := binary.BigEndian
	switch {
	case len(k) == 10 && k[1] == '/' && (k[0] == 'd' || k[0] == 'p' || k[0] == 'q' || k[0] == 'g'):
		return fmt.Sprintf("%c/%d", k[0], be.Uint64(k[2:]))
	case len(k) == 19 && k[0] == 't' && k[1] == '/' && k[10] == '/':
		return fmt.Sprintf("t/%d/%d", be.Uint64(k[2:]), be.Uint64(k[11:]))
	case len(k) == 6 && k[0] == 'c' && k[1] == '/':
		return fmt.Sprintf("c/%d", be.Uint32(k[2:]))
	case len(k) == 15 && k[0] == 'r' && k[1] == '/' && k[6] == '/':
		return fmt.Sprintf("r/%d/%d", be.Uint32(k[2:]), be.Uint64(k[7:]))
	case len(k) == 10 && k[0] == 'w' && k[1] == '/':
		return fmt.Sprintf("w/%d/%d", be.Uint32(k[2:]), be.Uint32(k[6:]))
	case len(k) > 2 && (k[0] == 'n' || k[0] == 's') && k[1] == '/' && printable(k[2:]):
		return string(k)
	case string(k) == "a/":
		return "a/"
	}
	return strconv.Quote(string(k))
}

func printable(b []byte) bool {
	if !utf8.Valid(b) {
		return false
	}
	for _, r := range string(b) {
		if !strconv.IsPrint(r) || r == ' ' {
			return false
		}
	}
	return true
}

// Damaged decodes every record in the store and returns, in key
// order, each one that fails its checksum, is too short for its
// layout, does not decode, or contradicts its key or the record it
// names (a name for a missing disk, a disk without its name). It
// sees the records as stored, not the transaction's own unflushed
// changes, and reads the whole store.
func (t *Tx) Damaged() ([]*RecordError, error) {
	var out []*RecordError
	names := map[string]DiskID{} // n/ records that decode
	disks := map[DiskID]string{} // d/ records that decode
	badDisks := map[DiskID]bool{}
	badNames := map[string]bool{}
	err := t.kv.Scan(nil, func(k, v []byte) error {
		err := t.verifyRecord(k, v, names, disks)
		var re *RecordError
		switch {
		case err == nil:
			return nil
		case errors.As(err, &re):
			out = append(out, re)
			switch {
			case len(k) == 10 && k[0] == 'd' && k[1] == '/':
				badDisks[DiskID(pageNo(k))] = true
			case len(k) > 2 && k[0] == 'n' && k[1] == '/':
				badNames[string(k[2:])] = true
			}
			return nil
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	// Names and disk records point at each other.
	for name, id := range names {
		dn, ok := disks[id]
		switch {
		case badDisks[id]:
		case !ok:
			out = append(out, corrupt(nameKey(name), "names disk %d, which has no record", id))
		case dn != name:
			out = append(out, corrupt(nameKey(name), "names disk %d, which is called %q", id, dn))
		}
	}
	for id, name := range disks {
		if nid, ok := names[name]; !badNames[name] && (!ok || nid != id) {
			out = append(out, corrupt(diskKey(id), "disk %q has no name record pointing at it", name))
		}
	}
	slices.SortStableFunc(out, func(a, b *RecordError) int { return bytes.Compare(a.Key, b.Key) })
	return out, nil
}

// verifyRecord decodes the record under k and checks that it belongs under
// k. It notes name and disk records in names and disks, and keeps the
// table pages, directories and counts it decoded in the transaction's
// caches (unless they are there already, maybe changed), so that reading
// them again costs nothing.
func (t *Tx) verifyRecord(k, v []byte, names map[string]DiskID, disks map[DiskID]string) error {
	bad := func(what string) error { return corrupt(k, "not a key of %s", what) }
	if len(k) < 2 || k[1] != '/' {
		return corrupt(k, "not a key of any record")
	}
	switch k[0] {
	case 'n':
		id, err := decodeU64(k, v)
		if err == nil {
			names[string(k[2:])] = DiskID(id)
		}
		return err
	case 's':
		_, err := decodeU64(k, v)
		return err
	case 'd':
		if len(k) != 10 {
			return bad("a disk")
		}
		d, err := decodeDisk(k, v)
		if err != nil {
			return err
		}
		if uint64(d.ID) != pageNo(k) {
			return corrupt(k, "holds disk %d", d.ID)
		}
		disks[d.ID] = d.Name
		return nil
	case 't':
		if len(k) != 19 || k[10] != '/' {
			return bad("a table directory")
		}
		d, err := decodeDir(k, v)
		if err == nil && t.dirs[string(k)] == nil {
			if t.dirs == nil {
				t.dirs = make(map[string]*cachedDir)
			}
			t.dirs[string(k)] = &cachedDir{d: d}
		}
		return err
	case 'p':
		if len(k) != 10 {
			return bad("a table page")
		}
		p, err := decodePage(k, v)
		if pid := pageNo(k); err == nil && t.pages[pid] == nil {
			if t.pages == nil {
				t.pages = make(map[uint64]*cachedPage)
			}
			t.pages[pid] = &cachedPage{p: p}
		}
		return err
	case 'q':
		if len(k) != 10 {
			return bad("table page reference counts")
		}
		return t.cacheRefs(k, v)
	case 'c':
		if len(k) != 6 {
			return bad("a container")
		}
		c, err := decodeContainer(k, v)
		if err == nil && !bytes.Equal(k, containerKey(c.ID)) {
			return corrupt(k, "holds container %d", c.ID)
		}
		return err
	case 'r':
		if len(k) != 15 || k[6] != '/' {
			return bad("slot reference counts")
		}
		return t.cacheRefs(k, v)
	case 'w':
		if len(k) != 10 {
			return bad("a write intent")
		}
		_, err := decodeU64(k, v)
		return err
	case 'g':
		if len(k) != 10 {
			return bad("a grant list")
		}
		_, err := decodeGrants(k, v)
		return err
	case 'a':
		if len(k) != 2 {
			return bad("the agent registry")
		}
		_, err := decodeGrants(k, v)
		return err
	}
	return corrupt(k, "not a key of any record")
}

// cacheRefs decodes the counts under k and caches them if they are not.
func (t *Tx) cacheRefs(k, v []byte) error {
	p, err := decodeRefs(k, v)
	if err == nil && t.refs[string(k)] == nil {
		if t.refs == nil {
			t.refs = make(map[string]*cachedRefs)
		}
		t.refs[string(k)] = &cachedRefs{p: p}
	}
	return err
}
