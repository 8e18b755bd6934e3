package meta

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"sort"

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

// tx implements Tx over a backend's KV transaction. It caches decoded table
// and reference pages, so that a transaction touching many entries of one
// page decodes and encodes it once; dirty pages are written by flush, which
// the backend calls before it commits.
type tx struct {
	kv       KV
	writable bool
	pages    map[string]*cachedPage
	refs     map[string]*cachedRefs
	conts    map[uint32]*Container // containers whose Used changed
}

type cachedPage struct {
	p     *page
	dirty bool
}

type cachedRefs struct {
	p     *refs
	dirty bool
}

func newTx(kv KV, writable bool) *tx {
	return &tx{kv: kv, writable: writable}
}

func (t *tx) put(key, v []byte) error {
	if !t.writable {
		return ErrReadOnly
	}
	return t.kv.Put(key, v)
}

func (t *tx) del(key []byte) error {
	if !t.writable {
		return ErrReadOnly
	}
	return t.kv.Delete(key)
}

// flush writes the cached dirty pages and containers.
func (t *tx) flush() error {
	for k, c := range t.pages {
		if c.dirty {
			if err := t.kv.Put([]byte(k), encodePage(c.p)); err != nil {
				return err
			}
		}
	}
	for k, c := range t.refs {
		if c.dirty {
			if err := t.kv.Put([]byte(k), encodeRefs(c.p)); err != nil {
				return err
			}
		}
	}
	for _, c := range t.conts {
		if err := t.kv.Put(containerKey(c.ID), encodeContainer(*c)); err != nil {
			return err
		}
	}
	return nil
}

func (t *tx) Disk(name string) (Disk, error) {
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

func (t *tx) DiskByID(id DiskID) (Disk, error) {
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

func (t *tx) Disks() ([]Disk, error) {
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

func (t *tx) Grants(id DiskID) ([]string, bool, error) {
	k := grantsKey(id)
	v, err := t.kv.Get(k)
	if err != nil || v == nil {
		return nil, v == nil && err == nil, err
	}
	gs, err := decodeGrants(k, v)
	return gs, false, err
}

func (t *tx) SetGrants(id DiskID, agents []string, all bool) error {
	if !t.writable {
		return ErrReadOnly
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

func (t *tx) Agents() ([]string, error) {
	v, err := t.kv.Get(agentsKey)
	if err != nil || v == nil {
		return nil, err
	}
	return decodeGrants(agentsKey, v)
}

func (t *tx) SetAgents(agents []string) error {
	if !t.writable {
		return ErrReadOnly
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

func (t *tx) NextSeq(name string) (uint64, error) {
	if !t.writable {
		return 0, ErrReadOnly
	}
	return t.nextID("user/" + name)
}

func (t *tx) nextID(name string) (uint64, error) {
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

func (t *tx) CreateDisk(d Disk) (Disk, error) {
	if !t.writable {
		return Disk{}, ErrReadOnly
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
	if d.Family == 0 {
		d.Family = d.ID
	}
	if err := t.put(nameKey(d.Name), encodeU64(id)); err != nil {
		return Disk{}, err
	}
	return d, t.put(diskKey(d.ID), encodeDisk(d))
}

func (t *tx) PutDisk(d Disk) error {
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

func (t *tx) DeleteDisk(id DiskID) error {
	d, err := t.DiskByID(id)
	if err != nil {
		return err
	}
	if err := t.dropTable(id); err != nil {
		return err
	}
	if err := t.del(grantsKey(id)); err != nil {
		return err
	}
	if err := t.del(nameKey(d.Name)); err != nil {
		return err
	}
	return t.del(diskKey(id))
}

// dropTable removes every page of disk id's table, stored or cached.
func (t *tx) dropTable(id DiskID) error {
	var keys [][]byte
	if err := t.kv.Scan(tablePrefix(id), func(k, _ []byte) error {
		keys = append(keys, bytes.Clone(k))
		return nil
	}); err != nil {
		return err
	}
	for _, k := range keys {
		if err := t.del(k); err != nil {
			return err
		}
	}
	for k := range t.pages {
		if bytes.HasPrefix([]byte(k), tablePrefix(id)) {
			delete(t.pages, k)
		}
	}
	return nil
}

// page returns table page pg of disk id, from the cache or the store.
func (t *tx) page(id DiskID, pg uint64) (*cachedPage, error) {
	k := pageKey(id, pg)
	if c, ok := t.pages[string(k)]; ok {
		return c, nil
	}
	v, err := t.kv.Get(k)
	if err != nil {
		return nil, err
	}
	c := &cachedPage{}
	if v == nil {
		p := *zeroPage
		c.p = &p
	} else if c.p, err = decodePage(k, v); err != nil {
		return nil, err
	}
	if t.pages == nil {
		t.pages = make(map[string]*cachedPage)
	}
	t.pages[string(k)] = c
	return c, nil
}

func (t *tx) Entries(id DiskID, first, n uint64) ([]table.Entry, error) {
	if n > math.MaxUint64-first {
		return nil, fmt.Errorf("entries [%d,+%d): %w", first, n, ErrRange)
	}
	out := make([]table.Entry, 0, min(n, 1<<16))
	for s := first; s < first+n; {
		c, err := t.page(id, s/PageEntries)
		if err != nil {
			return nil, err
		}
		i := s % PageEntries
		m := min(PageEntries-i, first+n-s)
		out = append(out, c.p[i:i+m]...)
		s += m
	}
	return out, nil
}

func (t *tx) SetEntries(id DiskID, first uint64, es []table.Entry) error {
	if !t.writable {
		return ErrReadOnly
	}
	if uint64(len(es)) > math.MaxUint64-first {
		return fmt.Errorf("entries [%d,+%d): %w", first, len(es), ErrRange)
	}
	for _, e := range es {
		if !e.State.Valid() || e.State&table.Invalid != 0 {
			return fmt.Errorf("persist entry %v: %w", e, table.ErrBadState)
		}
	}
	for len(es) > 0 {
		c, err := t.page(id, first/PageEntries)
		if err != nil {
			return err
		}
		i := first % PageEntries
		m := copy(c.p[i:], es)
		c.dirty = true
		es = es[m:]
		first += uint64(m)
	}
	return nil
}

func (t *tx) ForEachMapped(id DiskID, fn func(seg uint64, e table.Entry) error) error {
	return t.ForEachPage(id, func(pg uint64, p *page) error {
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

// pageNumbers returns, in order, the page numbers under prefix that are
// stored or cached (cached pages may be newer than the store's).
func (t *tx) pageNumbers(prefix []byte, cached []string) ([]uint64, error) {
	pgs := map[uint64]bool{}
	if err := t.kv.Scan(prefix, func(k, _ []byte) error {
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

// ForEachPage calls fn with every stored (or cached) page of disk id, in
// order. Pages not stored hold only Zero entries.
func (t *tx) ForEachPage(id DiskID, fn func(pg uint64, p *page) error) error {
	keys := make([]string, 0, len(t.pages))
	for k := range t.pages {
		keys = append(keys, k)
	}
	order, err := t.pageNumbers(tablePrefix(id), keys)
	if err != nil {
		return err
	}
	for _, pg := range order {
		c, err := t.page(id, pg)
		if err != nil {
			return err
		}
		if err := fn(pg, c.p); err != nil {
			return err
		}
	}
	return nil
}

func (t *tx) CopyTable(src, dst DiskID) error {
	if !t.writable {
		return ErrReadOnly
	}
	if src == dst {
		return nil
	}
	if err := t.dropTable(dst); err != nil {
		return err
	}
	return t.ForEachPage(src, func(pg uint64, p *page) error {
		c, err := t.page(dst, pg)
		if err != nil {
			return err
		}
		*c.p = *p
		c.dirty = true
		return nil
	})
}

func (t *tx) Containers() ([]Container, error) {
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

func (t *tx) Container(id uint32) (Container, error) {
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

func (t *tx) AddContainer(c Container) (Container, error) {
	if !t.writable {
		return Container{}, ErrReadOnly
	}
	c.Used = 0
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

func (t *tx) refPage(cid uint32, pg uint64) (*cachedRefs, error) {
	k := refsKey(cid, pg)
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

func (t *tx) Refs(loc table.Location) (uint32, error) {
	c, err := t.refPage(loc.Container, uint64(loc.Slot)/PageSlots)
	if err != nil {
		return 0, err
	}
	return c.p[loc.Slot%PageSlots], nil
}

func (t *tx) SetRefs(loc table.Location, n uint32) error {
	if !t.writable {
		return ErrReadOnly
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

func (t *tx) FindFree(cid uint32, from uint32) (uint32, bool, error) {
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

func (t *tx) ForEachRef(cid uint32, fn func(slot uint32, n uint32) error) error {
	keys := make([]string, 0, len(t.refs))
	for k := range t.refs {
		keys = append(keys, k)
	}
	order, err := t.pageNumbers(refsPrefix(cid), keys)
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
