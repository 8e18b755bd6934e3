package meta

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"sort"
	"strings"

	"segmap/internal/table"
)

// KV is the ordered key-value transaction a backend provides. Keys and
// values passed in belong to the callee after the call; values returned are
// valid until the transaction ends and must not be modified.
type KV interface {
	// Get returns the value of key, or nil if it does not exist.
	Get(key []byte) ([]byte, error)
	// Put sets key to value.
	Put(key, value []byte) error
	// Delete removes key; removing a missing key is not an error.
	Delete(key []byte) error
	// Scan calls fn for every key with prefix, in key order. fn must not
	// change the store.
	Scan(prefix []byte, fn func(key, value []byte) error) error
}

// Tx is a transaction: the record layout over one backend transaction (a
// KV). It is not safe for concurrent use, and it is valid only inside the
// function it was passed to (Store.View, Store.Update). In a read-only
// transaction the methods that write return ErrReadOnlyTx.
//
// It is a concrete type because there is one implementation of the
// records: a backend provides a KV, the small interface below it, and
// every backend gets the same records, checksums and caching.
//
// Tx caches decoded table and reference pages, so that a transaction
// touching many entries of one page decodes and encodes it once; dirty
// pages are written by flush, which the backend calls before it commits.
type Tx struct {
	kv       KV
	writable bool
	dirs     map[string]*cachedDir  // by key
	pages    map[uint64]*cachedPage // by page id
	refs     map[string]*cachedRefs // counts of slots (r/) and of table pages (q/), by key
	conts    map[uint32]*Container  // containers whose Used changed
}

type cachedDir struct {
	d     *dir
	dirty bool
}

type cachedPage struct {
	p     *page
	dirty bool
	gone  bool // released: deleted at flush
}

type cachedRefs struct {
	p     *refs
	dirty bool
}

func newTx(kv KV, writable bool) *Tx {
	return &Tx{kv: kv, writable: writable}
}

func (t *Tx) put(key, v []byte) error {
	if !t.writable {
		return ErrReadOnlyTx
	}
	return t.kv.Put(key, v)
}

func (t *Tx) del(key []byte) error {
	if !t.writable {
		return ErrReadOnlyTx
	}
	return t.kv.Delete(key)
}

// flush writes the cached dirty directories, pages, reference counts and
// containers, and deletes released pages and empty directories.
func (t *Tx) flush() error {
	for k, c := range t.dirs {
		if !c.dirty {
			continue
		}
		var err error
		if *c.d == (dir{}) {
			err = t.kv.Delete([]byte(k))
		} else {
			err = t.kv.Put([]byte(k), encodeDir(c.d))
		}
		if err != nil {
			return err
		}
	}
	for pid, c := range t.pages {
		var err error
		switch {
		case c.gone:
			err = t.kv.Delete(pageKey(pid))
		case c.dirty:
			err = t.kv.Put(pageKey(pid), encodePage(c.p))
		}
		if err != nil {
			return err
		}
	}

	for k, c := range t.refs {
		if !c.dirty {
			continue
		}
		var err error
		if *c.p == (refs{}) {
			err = t.kv.Delete([]byte(k)) // absent: all zero
		} else {
			err = t.kv.Put([]byte(k), encodeRefs(c.p))
		}
		if err != nil {
			return err
		}
	}
	for _, c := range t.conts {
		if err := t.kv.Put(containerKey(c.ID), encodeContainer(*c)); err != nil {
			return err
		}
	}
	return nil
}

// Disk returns the disk called name, or ErrNotFound.
func (t *Tx) Disk(name string) (Disk, error) {
	v, err := t.kv.Get(nameKey(name))
	if err != nil {
		return Disk{}, err
	}
	if v == nil {
		return Disk{}, fmt.Errorf("disk %q: %w", name, ErrNotFound)
	}
	id, err := decodeU64(nameKey(name), v)
	if err != nil {
		return Disk{}, err
	}
	d, err := t.DiskByID(DiskID(id))
	if err == nil && d.Name != name {
		err = corrupt(nameKey(name), "names disk %d, which is called %q", id, d.Name)
	} else if errors.Is(err, ErrNotFound) {
		err = corrupt(nameKey(name), "names missing disk %d", id)
	}
	return d, err
}

// DiskByID returns disk id, or ErrNotFound.
func (t *Tx) DiskByID(id DiskID) (Disk, error) {
	k := diskKey(id)
	v, err := t.kv.Get(k)
	if err != nil {
		return Disk{}, err
	}
	if v == nil {
		return Disk{}, fmt.Errorf("disk id %d: %w", id, ErrNotFound)
	}
	d, err := decodeDisk(k, v)
	if err == nil && d.ID != id {
		err = corrupt(k, "holds disk %d", d.ID)
	}
	return d, err
}

// Disks returns every disk, ordered by id.
func (t *Tx) Disks() ([]Disk, error) {
	var out []Disk
	err := t.kv.Scan([]byte("d/"), func(k, v []byte) error {
		d, err := decodeDisk(k, v)
		if err != nil {
			return err
		}
		if !bytes.Equal(k, diskKey(d.ID)) {
			return corrupt(k, "holds disk %d", d.ID)
		}
		out = append(out, d)
		return nil
	})
	return out, err
}

// Grants returns the agents allowed to map disk id; all is true
// when any agent may (no list was ever set).
func (t *Tx) Grants(id DiskID) ([]string, bool, error) {
	k := grantsKey(id)
	v, err := t.kv.Get(k)
	if err != nil || v == nil {
		return nil, v == nil && err == nil, err
	}
	gs, err := decodeGrants(k, v)
	return gs, false, err
}

// SetGrants sets the agents allowed to map disk id; all opens it to
// every agent (and agents is ignored).
func (t *Tx) SetGrants(id DiskID, agents []string, all bool) error {
	if !t.writable {
		return ErrReadOnlyTx
	}
	if all {
		return t.del(grantsKey(id))
	}
	if len(agents) > maxGrants {
		return fmt.Errorf("%d agents: %w", len(agents), ErrInvalid)
	}
	for _, a := range agents {
		if a == "" || len(a) > maxName {
			return fmt.Errorf("agent name %q: %w", a, ErrInvalid)
		}
	}
	return t.put(grantsKey(id), encodeGrants(agents))
}

// Agents returns the agents registered as possibly holding a lease
// from a controller (see the controller's Hold).
func (t *Tx) Agents() ([]string, error) {
	v, err := t.kv.Get(agentsKey)
	if err != nil || v == nil {
		return nil, err
	}
	return decodeGrants(agentsKey, v)
}

// SetAgents replaces the list of agents registered as possibly
// holding a lease from a controller (see Agents).
func (t *Tx) SetAgents(agents []string) error {
	if !t.writable {
		return ErrReadOnlyTx
	}
	if len(agents) > maxGrants {
		return fmt.Errorf("%d agents: %w", len(agents), ErrInvalid)
	}
	for _, a := range agents {
		if a == "" || len(a) > maxName {
			return fmt.Errorf("agent name %q: %w", a, ErrInvalid)
		}
	}
	if len(agents) == 0 {
		return t.del(agentsKey)
	}
	return t.put(agentsKey, encodeGrants(agents))
}

// agentsKey holds the agent registry.
var agentsKey = []byte("a/")

// NextSeq increments the named counter and returns its new value
// (the first is 1). The controller's epoch is one.
func (t *Tx) NextSeq(name string) (uint64, error) {
	if !t.writable {
		return 0, ErrReadOnlyTx
	}
	return t.nextID("user/" + name)
}

func (t *Tx) nextID(name string) (uint64, error) {
	k := seqKey(name)
	v, err := t.kv.Get(k)
	if err != nil {
		return 0, err
	}
	var n uint64
	if v != nil {
		if n, err = decodeU64(k, v); err != nil {
			return 0, err
		}
	}
	n++
	return n, t.put(k, encodeU64(n))
}

// CreateDisk stores a new disk, giving it a fresh id (and making it
// its own family if d.Family is 0) and a random UUID if d has none. The name must be free
// (ErrExists). Its table is all Zero.
func (t *Tx) CreateDisk(d Disk) (Disk, error) {
	if !t.writable {
		return Disk{}, ErrReadOnlyTx
	}
	if err := d.validate(); err != nil {
		return Disk{}, err
	}
	if v, err := t.kv.Get(nameKey(d.Name)); err != nil {
		return Disk{}, err
	} else if v != nil {
		return Disk{}, fmt.Errorf("disk %q: %w", d.Name, ErrExists)
	}
	id, err := t.nextID("disk")
	if err != nil {
		return Disk{}, err
	}
	d.ID = DiskID(id)
	if d.UUID == ([16]byte{}) {
		d.UUID = NewUUID()
	}
	if d.Family == 0 {
		d.Family = d.ID
	}
	if err := t.put(nameKey(d.Name), encodeU64(id)); err != nil {
		return Disk{}, err
	}
	return d, t.put(diskKey(d.ID), encodeDisk(d))
}

// PutDisk updates an existing disk's record; the name may change.
func (t *Tx) PutDisk(d Disk) error {
	if err := d.validate(); err != nil {
		return err
	}
	old, err := t.DiskByID(d.ID)
	if err != nil {
		return err
	}
	if old.Name != d.Name {
		if v, err := t.kv.Get(nameKey(d.Name)); err != nil {
			return err
		} else if v != nil {
			return fmt.Errorf("disk %q: %w", d.Name, ErrExists)
		}
		if err := t.del(nameKey(old.Name)); err != nil {
			return err
		}
		if err := t.put(nameKey(d.Name), encodeU64(uint64(d.ID))); err != nil {
			return err
		}
	}
	return t.put(diskKey(d.ID), encodeDisk(d))
}

// DeleteDisk removes the disk record and its table: each of its
// pages loses a reference, and a page left with none is removed and
// releases its slots. It returns the slots whose count reached zero
// (the caller may punch them).
func (t *Tx) DeleteDisk(id DiskID) ([]table.Location, error) {
	d, err := t.DiskByID(id)
	if err != nil {
		return nil, err
	}
	freed, err := t.dropTable(id)
	if err != nil {
		return nil, err
	}
	if err := t.del(grantsKey(id)); err != nil {
		return nil, err
	}
	if err := t.del(nameKey(d.Name)); err != nil {
		return nil, err
	}
	return freed, t.del(diskKey(id))
}

// dirNumbers returns, in order, the directory numbers of disk id that are
// stored or cached (cached ones may be newer than the store's).
func (t *Tx) dirNumbers(id DiskID) ([]uint64, error) {
	return t.pageNumbers(tablePrefix(id), slices.Collect(maps.Keys(t.dirs)))
}

// dropTable releases every page of disk id's table and removes its
// directories; it returns the slots freed.
func (t *Tx) dropTable(id DiskID) ([]table.Location, error) {
	if !t.writable {
		return nil, ErrReadOnlyTx
	}
	dns, err := t.dirNumbers(id)
	if err != nil {
		return nil, err
	}
	var freed []table.Location
	for _, dn := range dns {
		c, err := t.dir(id, dn)
		if err != nil {
			return nil, err
		}
		for i, pid := range c.d {
			if pid == 0 {
				continue
			}
			f, err := t.releasePage(pid)
			if err != nil {
				return nil, err
			}
			freed = append(freed, f...)
			c.d[i] = 0
		}
		c.dirty = true
	}
	return freed, nil
}

// dir returns table directory dn of disk id, from the cache or the store.
func (t *Tx) dir(id DiskID, dn uint64) (*cachedDir, error) {
	k := dirKey(id, dn)
	if c, ok := t.dirs[string(k)]; ok {
		return c, nil
	}
	v, err := t.kv.Get(k)
	if err != nil {
		return nil, err
	}
	c := &cachedDir{d: new(dir)}
	if v != nil {
		if c.d, err = decodeDir(k, v); err != nil {
			return nil, err
		}
	}
	if t.dirs == nil {
		t.dirs = make(map[string]*cachedDir)
	}
	t.dirs[string(k)] = c
	return c, nil
}

// pageID returns the id of table page pg of disk id (0: not stored).
func (t *Tx) pageID(id DiskID, pg uint64) (uint64, error) {
	c, err := t.dir(id, pg/DirPages)
	if err != nil {
		return 0, err
	}
	return c.d[pg%DirPages], nil
}

// pageByID returns stored table page pid.
func (t *Tx) pageByID(pid uint64) (*cachedPage, error) {
	if c, ok := t.pages[pid]; ok {
		if c.gone {
			return nil, fmt.Errorf("table page %d: released: %w", pid, ErrCorrupt)
		}
		return c, nil
	}
	k := pageKey(pid)
	v, err := t.kv.Get(k)
	if err != nil {
		return nil, err
	}
	if v == nil {
		return nil, corrupt(k, "table page %d is missing", pid)
	}
	p, err := decodePage(k, v)
	if err != nil {
		return nil, err
	}
	c := &cachedPage{p: p}
	if t.pages == nil {
		t.pages = make(map[uint64]*cachedPage)
	}
	t.pages[pid] = c
	return c, nil
}

// readPage returns table page pg of disk id, for reading only.
func (t *Tx) readPage(id DiskID, pg uint64) (*page, error) {
	pid, err := t.pageID(id, pg)
	if err != nil || pid == 0 {
		return zeroPage, err
	}
	c, err := t.pageByID(pid)
	if err != nil {
		return nil, err
	}
	return c.p, nil
}

// pageRefPage returns the cached page of reference counts that holds pid's.
// pageRefPage returns the cached record of reference counts that holds
// table page pid's.
func (t *Tx) pageRefPage(pid uint64) (*cachedRefs, error) {
	return t.refsAt(pageRefsKey(pid / PageSlots))
}

// PageRefs returns the reference count of table page pid.
func (t *Tx) PageRefs(pid uint64) (uint32, error) {
	c, err := t.pageRefPage(pid)
	if err != nil {
		return 0, err
	}
	return c.p[pid%PageSlots], nil
}

func (t *Tx) addPageRefs(pid uint64, delta int) (uint32, error) {
	c, err := t.pageRefPage(pid)
	if err != nil {
		return 0, err
	}
	n := &c.p[pid%PageSlots]
	v := int64(*n) + int64(delta)
	if v < 0 || v > math.MaxUint32 {
		return 0, fmt.Errorf("table page %d: reference count %d%+d: %w", pid, *n, delta, ErrCorrupt)
	}
	*n = uint32(v)
	c.dirty = true
	return *n, nil
}

// releasePage drops one reference to table page pid; with none left the
// page is removed and each slot it maps loses a reference (every slot of
// a partial entry, the layers under it too). It returns the slots freed.
func (t *Tx) releasePage(pid uint64) ([]table.Location, error) {
	n, err := t.addPageRefs(pid, -1)
	if err != nil || n > 0 {
		return nil, err
	}
	c, err := t.pageByID(pid)
	if err != nil {
		return nil, err
	}
	var freed []table.Location
	for _, e := range c.p {
		err := eachSlot(e, func(l table.Location) error {
			k, err := AddRefs(t, l, -1)
			if err == nil && k == 0 {
				freed = append(freed, l)
			}
			return err
		})
		if err != nil {
			return nil, err
		}
	}
	c.gone = true
	return freed, nil
}

// ownPage returns table page pg of disk id for writing: a page of the
// disk's own. A shared page is copied first (the copy counts a reference
// on each slot it maps, layers of partial entries included); a page not stored is created when create is set
// (and nil is returned when it is not).
func (t *Tx) ownPage(id DiskID, pg uint64, create bool) (*cachedPage, error) {
	if !t.writable {
		return nil, ErrReadOnlyTx
	}
	dc, err := t.dir(id, pg/DirPages)
	if err != nil {
		return nil, err
	}
	slot := &dc.d[pg%DirPages]
	if *slot == 0 {
		if !create {
			return nil, nil
		}
		pid, err := t.nextID("page")
		if err != nil {
			return nil, err
		}
		p := *zeroPage
		c := &cachedPage{p: &p, dirty: true}
		if t.pages == nil {
			t.pages = make(map[uint64]*cachedPage)
		}
		t.pages[pid] = c
		if _, err := t.addPageRefs(pid, 1); err != nil {
			return nil, err
		}
		*slot, dc.dirty = pid, true
		return c, nil
	}
	old := *slot
	c, err := t.pageByID(old)
	if err != nil {
		return nil, err
	}
	n, err := t.PageRefs(old)
	if err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, fmt.Errorf("table page %d of disk %d has no references: %w", old, id, ErrCorrupt)
	}
	if n == 1 {
		return c, nil
	}
	// Copy on write.
	pid, err := t.nextID("page")
	if err != nil {
		return nil, err
	}
	p := *c.p
	for _, e := range p {
		err := eachSlot(e, func(l table.Location) error {
			_, err := AddRefs(t, l, 1)
			return err
		})
		if err != nil {
			return nil, err
		}
	}
	nc := &cachedPage{p: &p, dirty: true}
	t.pages[pid] = nc
	if _, err := t.addPageRefs(old, -1); err != nil {
		return nil, err
	}
	if _, err := t.addPageRefs(pid, 1); err != nil {
		return nil, err
	}
	*slot, dc.dirty = pid, true
	return nc, nil
}

// Entries returns entries [first, first+n) of disk id's table.
func (t *Tx) Entries(id DiskID, first, n uint64) ([]table.Entry, error) {
	if n > math.MaxUint64-first {
		return nil, fmt.Errorf("entries [%d,+%d): %w", first, n, ErrRange)
	}
	out := make([]table.Entry, 0, min(n, 1<<16))
	for s := first; s < first+n; {
		p, err := t.readPage(id, s/PageEntries)
		if err != nil {
			return nil, err
		}
		i := s % PageEntries
		m := min(PageEntries-i, first+n-s)
		out = append(out, p[i:i+m]...)
		s += m
	}
	return out, nil
}

// Entry returns entry seg of disk id's table. Unless the transaction
// has the page decoded already, it decodes that entry alone.
func (t *Tx) Entry(id DiskID, seg uint64) (table.Entry, error) {
	pid, err := t.pageID(id, seg/PageEntries)
	if err != nil || pid == 0 {
		return table.ZeroEntry, err
	}
	if c, ok := t.pages[pid]; ok {
		if c.gone {
			return table.Entry{}, fmt.Errorf("table page %d: released: %w", pid, ErrCorrupt)
		}
		return c.p[seg%PageEntries], nil
	}
	k := pageKey(pid)
	v, err := t.kv.Get(k)
	if err != nil {
		return table.Entry{}, err
	}
	if v == nil {
		return table.Entry{}, corrupt(k, "table page %d is missing", pid)
	}
	return decodePageEntry(k, v, int(seg%PageEntries))
}

// SetEntries replaces entries [first, first+len(es)) of disk id's
// table, first unsharing the pages it changes (see Unshare). The
// caller keeps slot reference counts right for the entries it
// replaces (every slot of e.Slots). A partial entry is stored with a
// copy of its layers; one whose layout a page cannot hold (see
// badPartLayout) is refused with ErrInvalid. Its full shape
// (table.Partial.Valid) is the caller's to keep.
func (t *Tx) SetEntries(id DiskID, first uint64, es []table.Entry) error {
	if !t.writable {
		return ErrReadOnlyTx
	}
	if uint64(len(es)) > math.MaxUint64-first {
		return fmt.Errorf("entries [%d,+%d): %w", first, len(es), ErrRange)
	}
	for _, e := range es {
		if !e.State.Valid() || e.State&table.Invalid != 0 {
			return fmt.Errorf("persist entry %v: %w", e, table.ErrBadState)
		}
		if e.Partial() {
			if why := badPartLayout(e.Part); why != "" {
				return fmt.Errorf("persist entry %v: %s: %w", e, why, ErrInvalid)
			}
		}
	}
	for len(es) > 0 {
		i := first % PageEntries
		m := min(uint64(len(es)), PageEntries-i)
		// Zero entries into a page that is not stored change nothing.
		create := false
		for _, e := range es[:m] {
			create = create || table.Entry{Loc: e.Loc, State: e.State} != table.ZeroEntry
		}
		c, err := t.ownPage(id, first/PageEntries, create)
		if err != nil {
			return err
		}
		if c != nil {
			for j, e := range es[:m] {
				switch {
				case e.Partial():
					e.Part = clonePart(e.Part)
				case e.Part != nil:
					e.Part = nil // a voided entry names no layer
				}
				c.p[i+uint64(j)] = e
			}
			c.dirty = true
		}
		es = es[m:]
		first += m
	}
	return nil
}

// PageShared says whether the page holding entry seg of disk id is
// shared with another disk.
func (t *Tx) PageShared(id DiskID, seg uint64) (bool, error) {
	pid, err := t.pageID(id, seg/PageEntries)
	if err != nil || pid == 0 {
		return false, err
	}
	n, err := t.PageRefs(pid)
	return n > 1, err
}

// Unshare gives disk id a page of its own for every shared page that
// holds entries [first, first+n): a copy, which counts one more
// reference on each slot it maps (every layer of a partial entry too). Afterwards a slot's count tells
// whether one of those entries is shared.
func (t *Tx) Unshare(id DiskID, first, n uint64) error {
	if !t.writable {
		return ErrReadOnlyTx
	}
	if n == 0 {
		return nil
	}
	if n > math.MaxUint64-first {
		return fmt.Errorf("entries [%d,+%d): %w", first, n, ErrRange)
	}
	for pg := first / PageEntries; pg <= (first+n-1)/PageEntries; pg++ {
		if _, err := t.ownPage(id, pg, false); err != nil {
			return err
		}
	}
	return nil
}

// ForEachMapped calls fn for every entry of disk id's table that holds
// a location (neither Zero, Error nor Invalid), in segment order.
func (t *Tx) ForEachMapped(id DiskID, fn func(seg uint64, e table.Entry) error) error {
	return t.forEachPage(id, func(pg uint64, p *page) error {
		for i, e := range p {
			if e.Mapped() {
				if err := fn(pg*PageEntries+uint64(i), e); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

// TablePages returns the stored pages of disk id's table, in order.
func (t *Tx) TablePages(id DiskID) ([]PageRef, error) {
	return t.TablePageRange(id, 0, math.MaxUint64)
}

// TablePageRange returns the stored pages of disk id's table whose index
// is in [first, first+n) (clipped to the largest index), in order. It
// reads only the directories that cover those pages, so a look at a part
// of a large table costs that part.
func (t *Tx) TablePageRange(id DiskID, first, n uint64) ([]PageRef, error) {
	if n == 0 {
		return nil, nil
	}
	last := first + min(n-1, math.MaxUint64-first) // inclusive
	dns, err := t.dirNumbers(id)
	if err != nil {
		return nil, err
	}
	var out []PageRef
	for _, dn := range dns {
		if dn < first/DirPages || dn > last/DirPages {
			continue
		}
		c, err := t.dir(id, dn)
		if err != nil {
			return nil, err
		}
		for i, pid := range c.d {
			pg := dn*DirPages + uint64(i)
			if pid != 0 && pg >= first && pg <= last {
				out = append(out, PageRef{Index: pg, ID: pid})
			}
		}
	}
	return out, nil
}

// Page returns the entries of the stored table page pid.
func (t *Tx) Page(pid uint64) ([]table.Entry, error) {
	c, err := t.pageByID(pid)
	if err != nil {
		return nil, err
	}
	return slices.Clone(c.p[:]), nil
}

// ForEachStoredPage calls fn, in id order, for every table page that
// is stored or has a non-zero reference count, with that count.
func (t *Tx) ForEachStoredPage(fn func(pid uint64, refs uint32, stored bool) error) error {
	ids := map[uint64]bool{}
	if err := t.kv.Scan([]byte("p/"), func(k, _ []byte) error {
		if len(k) != 2+8 {
			return corrupt(k, "not a table page key")
		}
		ids[pageNo(k)] = true
		return nil
	}); err != nil {
		return err
	}
	for pid, c := range t.pages {
		ids[pid] = !c.gone
	}
	ns := map[uint64]bool{}
	if err := t.kv.Scan([]byte("q/"), func(k, _ []byte) error {
		if len(k) != 2+8 {
			return corrupt(k, "not a page reference key")
		}
		ns[pageNo(k)] = true
		return nil
	}); err != nil {
		return err
	}
	for k := range t.refs {
		if strings.HasPrefix(k, "q/") {
			ns[pageNo([]byte(k))] = true
		}
	}
	for n := range ns {
		c, err := t.pageRefPage(n * PageSlots)
		if err != nil {
			return err
		}
		for i, r := range c.p {
			if pid := n*PageSlots + uint64(i); r != 0 && !ids[pid] {
				ids[pid] = false
			}
		}
	}
	order := make([]uint64, 0, len(ids))
	for pid := range ids {
		order = append(order, pid)
	}
	slices.Sort(order)
	for _, pid := range order {
		r, err := t.PageRefs(pid)
		if err != nil {
			return err
		}
		stored := ids[pid]
		if c, ok := t.pages[pid]; ok {
			stored = !c.gone
		}
		if err := fn(pid, r, stored); err != nil {
			return err
		}
	}
	return nil
}

// eachSlot calls fn for every slot a mapped entry names (e.Slots), until
// fn fails.
func eachSlot(e table.Entry, fn func(table.Location) error) error {
	var err error
	e.Slots(func(l table.Location) {
		if err == nil {
			err = fn(l)
		}
	})
	return err
}

// forEachPage calls fn with every stored page of disk id's table, in
// order. Pages not stored hold only Zero entries.
func (t *Tx) forEachPage(id DiskID, fn func(pg uint64, p *page) error) error {
	prs, err := t.TablePages(id)
	if err != nil {
		return err
	}
	for _, pr := range prs {
		c, err := t.pageByID(pr.ID)
		if err != nil {
			return err
		}
		if err := fn(pr.Index, c.p); err != nil {
			return err
		}
	}
	return nil
}

// CopyTable makes dst's table a copy of src's by sharing its pages:
// its cost grows with the number of pages, not of entries, and no
// slot's count changes. dst's previous table is released as by
// DeleteDisk.
func (t *Tx) CopyTable(src, dst DiskID) error {
	if !t.writable {
		return ErrReadOnlyTx
	}
	if src == dst {
		return nil
	}
	if _, err := t.dropTable(dst); err != nil {
		return err
	}
	dns, err := t.dirNumbers(src)
	if err != nil {
		return err
	}
	for _, dn := range dns {
		sc, err := t.dir(src, dn)
		if err != nil {
			return err
		}
		dc, err := t.dir(dst, dn)
		if err != nil {
			return err
		}
		for _, pid := range sc.d {
			if pid != 0 {
				if _, err := t.addPageRefs(pid, 1); err != nil {
					return err
				}
			}
		}
		*dc.d = *sc.d
		dc.dirty = true
	}
	return nil
}

// ReplaceTable makes dst's table a copy of src's, as CopyTable does, and
// returns the slots whose count reached zero as dst's previous pages were
// released (the caller may punch them). A page dst already shares with
// src stays as it is: the cost grows with the pages that differ, so
// rolling a disk back to a snapshot it mostly shares is cheap at any size.
func (t *Tx) ReplaceTable(src, dst DiskID) ([]table.Location, error) {
	if !t.writable {
		return nil, ErrReadOnlyTx
	}
	if src == dst {
		return nil, nil
	}
	sdns, err := t.dirNumbers(src)
	if err != nil {
		return nil, err
	}
	ddns, err := t.dirNumbers(dst)
	if err != nil {
		return nil, err
	}
	var freed []table.Location
	for _, dn := range slices.Compact(slices.Sorted(slices.Values(append(slices.Clone(sdns), ddns...)))) {
		sc, err := t.dir(src, dn)
		if err != nil {
			return nil, err
		}
		dc, err := t.dir(dst, dn)
		if err != nil {
			return nil, err
		}
		for i, pid := range sc.d {
			old := dc.d[i]
			if old == pid {
				continue
			}
			if pid != 0 {
				if _, err := t.addPageRefs(pid, 1); err != nil {
					return nil, err
				}
			}
			if old != 0 {
				f, err := t.releasePage(old)
				if err != nil {
					return nil, err
				}
				freed = append(freed, f...)
			}
			dc.d[i] = pid
			dc.dirty = true
		}
	}
	return freed, nil
}

// Containers returns every container, ordered by id.
func (t *Tx) Containers() ([]Container, error) {
	var out []Container
	err := t.kv.Scan([]byte("c/"), func(k, v []byte) error {
		c, err := decodeContainer(k, v)
		if err != nil {
			return err
		}
		if !bytes.Equal(k, containerKey(c.ID)) {
			return corrupt(k, "holds container %d", c.ID)
		}
		if d, ok := t.conts[c.ID]; ok {
			c = *d
		}
		out = append(out, c)
		return nil
	})
	return out, err
}

// Container returns container id, or ErrNotFound.
func (t *Tx) Container(id uint32) (Container, error) {
	if c, ok := t.conts[id]; ok {
		return *c, nil
	}
	k := containerKey(id)
	v, err := t.kv.Get(k)
	if err != nil {
		return Container{}, err
	}
	if v == nil {
		return Container{}, fmt.Errorf("container %d: %w", id, ErrNotFound)
	}
	c, err := decodeContainer(k, v)
	if err == nil && c.ID != id {
		err = corrupt(k, "holds container %d", c.ID)
	}
	return c, err
}

// AddContainer stores a new container record, giving it a fresh id
// when c.ID is 0.
func (t *Tx) AddContainer(c Container) (Container, error) {
	if !t.writable {
		return Container{}, ErrReadOnlyTx
	}
	c.Used, c.State = 0, ContainerOnline
	if err := c.validate(); err != nil {
		return Container{}, err
	}
	if c.ID == 0 {
		for {
			id, err := t.nextID("container")
			if err != nil {
				return Container{}, err
			}
			if id > math.MaxUint32 {
				return Container{}, fmt.Errorf("container ids exhausted: %w", ErrInvalid)
			}
			_, err = t.Container(uint32(id))
			if errors.Is(err, ErrNotFound) {
				c.ID = uint32(id)
				break
			}
			if err != nil {
				return Container{}, err
			}
		}
	} else if _, err := t.Container(c.ID); err == nil {
		return Container{}, fmt.Errorf("container %d: %w", c.ID, ErrExists)
	} else if !errors.Is(err, ErrNotFound) {
		return Container{}, err
	}
	return c, t.put(containerKey(c.ID), encodeContainer(c))
}

// SetContainerState sets container id's state and returns its record.
func (t *Tx) SetContainerState(id uint32, st ContainerState) (Container, error) {
	if !t.writable {
		return Container{}, ErrReadOnlyTx
	}
	if !st.Valid() {
		return Container{}, fmt.Errorf("container %d: state %d: %w", id, st, ErrInvalid)
	}
	ct, err := t.Container(id)
	if err != nil {
		return Container{}, err
	}
	ct.State = st
	// Written at flush, with the Used counts SetRefs keeps there.
	if t.conts == nil {
		t.conts = make(map[uint32]*Container)
	}
	t.conts[id] = &ct
	return ct, nil
}

// PutContainer stores container c's record as given, but for its Used
// count, which only SetRefs changes.
func (t *Tx) PutContainer(c Container) error {
	if !t.writable {
		return ErrReadOnlyTx
	}
	old, err := t.Container(c.ID)
	if err != nil {
		return err
	}
	c.Used = old.Used
	if err := c.validate(); err != nil {
		return err
	}
	if t.conts == nil {
		t.conts = make(map[uint32]*Container)
	}
	t.conts[c.ID] = &c
	return nil
}

// AddIntents records that slots of mirrored container cid were written,
// or are about to be, while a replica may miss them (a write-intent
// record: the replica catches up by copying those slots).
func (t *Tx) AddIntents(cid uint32, slots []uint32) error {
	for _, s := range slots {
		if err := t.put(intentKey(cid, s), encodeU64(1)); err != nil {
			return err
		}
	}
	return nil
}

// HasIntent reports whether slot of container cid is recorded by
// AddIntents.
func (t *Tx) HasIntent(cid, slot uint32) (bool, error) {
	v, err := t.kv.Get(intentKey(cid, slot))
	return v != nil, err
}

// Intents returns the slots of container cid recorded by AddIntents, in
// order.
func (t *Tx) Intents(cid uint32) ([]uint32, error) {
	var out []uint32
	err := t.kv.Scan(intentPrefix(cid), func(k, _ []byte) error {
		if len(k) != 10 {
			return corrupt(k, "not a write intent")
		}
		out = append(out, binary.BigEndian.Uint32(k[6:]))
		return nil
	})
	return out, err
}

// ClearIntents deletes the slots of container cid recorded by AddIntents.
func (t *Tx) ClearIntents(cid uint32) error {
	slots, err := t.Intents(cid)
	if err != nil {
		return err
	}
	for _, s := range slots {
		if err := t.del(intentKey(cid, s)); err != nil {
			return err
		}
	}
	return nil
}

// RemoveContainer deletes container id's record. It must hold no slot
// (Used zero: ErrInUse otherwise); its reference records, all zero, go
// with it.
func (t *Tx) RemoveContainer(id uint32) error {
	if !t.writable {
		return ErrReadOnlyTx
	}
	ct, err := t.Container(id)
	if err != nil {
		return err
	}
	if ct.Used != 0 {
		return fmt.Errorf("container %d holds %d slots: %w", id, ct.Used, ErrInUse)
	}
	var keys [][]byte
	if err := t.kv.Scan(refsPrefix(id), func(k, v []byte) error {
		keys = append(keys, bytes.Clone(k))
		return nil
	}); err != nil {
		return err
	}
	for _, k := range keys {
		c, err := t.refsAt(k)
		if err != nil {
			return err
		}
		if *c.p != (refs{}) {
			return corrupt(k, "container %d has no slot used, but counts here", id)
		}
		c.dirty = true // deleted at flush: all zero
	}
	for k, c := range t.refs {
		if strings.HasPrefix(k, string(refsPrefix(id))) && *c.p != (refs{}) {
			return fmt.Errorf("container %d: a slot counted in this transaction: %w", id, ErrInUse)
		}
	}
	if err := t.ClearIntents(id); err != nil {
		return err
	}
	delete(t.conts, id)
	return t.kv.Delete(containerKey(id))
}

func (t *Tx) refPage(cid uint32, pg uint64) (*cachedRefs, error) {
	return t.refsAt(refsKey(cid, pg))
}

// refsAt returns the record of reference counts (of slots or of table
// pages) under key k, from the cache or the store; a record not stored
// holds only zeros.
func (t *Tx) refsAt(k []byte) (*cachedRefs, error) {
	if c, ok := t.refs[string(k)]; ok {
		return c, nil
	}
	v, err := t.kv.Get(k)
	if err != nil {
		return nil, err
	}
	c := &cachedRefs{p: new(refs)}
	if v != nil {
		if c.p, err = decodeRefs(k, v); err != nil {
			return nil, err
		}
	}
	if t.refs == nil {
		t.refs = make(map[string]*cachedRefs)
	}
	t.refs[string(k)] = c
	return c, nil
}

// Refs returns the reference count of a slot.
func (t *Tx) Refs(loc table.Location) (uint32, error) {
	c, err := t.refPage(loc.Container, uint64(loc.Slot)/PageSlots)
	if err != nil {
		return 0, err
	}
	return c.p[loc.Slot%PageSlots], nil
}

// SetRefs sets the reference count of a slot and keeps the container's
// Used count in step.
func (t *Tx) SetRefs(loc table.Location, n uint32) error {
	if !t.writable {
		return ErrReadOnlyTx
	}
	ct, err := t.Container(loc.Container)
	if err != nil {
		return err
	}
	if uint64(loc.Slot) >= ct.Slots {
		return fmt.Errorf("slot %v of a %d-slot container: %w", loc, ct.Slots, ErrRange)
	}
	c, err := t.refPage(loc.Container, uint64(loc.Slot)/PageSlots)
	if err != nil {
		return err
	}
	old := &c.p[loc.Slot%PageSlots]
	switch {
	case *old == 0 && n != 0:
		ct.Used++
	case *old != 0 && n == 0:
		ct.Used--
	}
	if (*old == 0) != (n == 0) {
		if t.conts == nil {
			t.conts = make(map[uint32]*Container)
		}
		t.conts[ct.ID] = &ct
	}
	*old = n
	c.dirty = true
	return nil
}

// FindFree returns a free slot of container cid, searching from slot
// from upward and wrapping around; ok is false if there is none.
func (t *Tx) FindFree(cid uint32, from uint32) (uint32, bool, error) {
	ct, err := t.Container(cid)
	if err != nil {
		return 0, false, err
	}
	if ct.Used >= ct.Slots {
		return 0, false, nil
	}
	if uint64(from) >= ct.Slots {
		from = 0
	}
	// Walk slots from `from` to the end, then from 0 to `from`.
	for _, r := range [][2]uint64{{uint64(from), ct.Slots}, {0, uint64(from)}} {
		for s := r[0]; s < r[1]; {
			c, err := t.refPage(cid, s/PageSlots)
			if err != nil {
				return 0, false, err
			}
			end := min((s/PageSlots+1)*PageSlots, r[1])
			for ; s < end; s++ {
				if c.p[s%PageSlots] == 0 {
					return uint32(s), true, nil
				}
			}
		}
	}
	return 0, false, nil
}

// ForEachRef calls fn for every slot of container cid with a non-zero
// count, in slot order.
func (t *Tx) ForEachRef(cid uint32, fn func(slot uint32, n uint32) error) error {
	order, err := t.pageNumbers(refsPrefix(cid), slices.Collect(maps.Keys(t.refs)))
	if err != nil {
		return err
	}
	for _, pg := range order {
		c, err := t.refPage(cid, pg)
		if err != nil {
			return err
		}
		for i, n := range c.p {
			if n != 0 {
				if err := fn(uint32(pg*PageSlots+uint64(i)), n); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// pageNumbers returns, in order, the page numbers under prefix that are
// stored or cached (cached pages may be newer than the store's).
func (t *Tx) pageNumbers(prefix []byte, cached []string) ([]uint64, error) {
	pgs := map[uint64]bool{}
	if err := t.kv.Scan(prefix, func(k, _ []byte) error {
		if len(k) != len(prefix)+8 {
			return corrupt(k, "not a key under %q", prefix)
		}
		pgs[pageNo(k)] = true
		return nil
	}); err != nil {
		return nil, err
	}
	pre := string(prefix)
	for _, k := range cached {
		if len(k) == len(pre)+8 && k[:len(pre)] == pre {
			pgs[pageNo([]byte(k))] = true
		}
	}
	order := make([]uint64, 0, len(pgs))
	for pg := range pgs {
		order = append(order, pg)
	}
	sort.Slice(order, func(i, j int) bool { return order[i] < order[j] })
	return order, nil
}
