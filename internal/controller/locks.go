package controller

import (
	"context"
	"slices"
	"sync"

	"segmap/internal/meta"
)

// keyedLocks hands out one lock per key, made on first use and dropped
// when no one holds or waits for it, so that a controller with millions of
// segments keeps locks only for those being worked on.
type keyedLocks[K comparable] struct {
	mu struct {
		sync.Mutex
		m map[K]*keyedLock
	}
}

type keyedLock struct {
	sync.RWMutex
	users int // holders and waiters; guarded by keyedLocks.mu
}

// get returns the lock of key, counted as used until put.
func (k *keyedLocks[K]) get(key K) *keyedLock {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.mu.m == nil {
		k.mu.m = make(map[K]*keyedLock)
	}
	l := k.mu.m[key]
	if l == nil {
		l = &keyedLock{}
		k.mu.m[key] = l
	}
	l.users++
	return l
}

// put gives back a lock got from get (after unlocking it).
func (k *keyedLocks[K]) put(key K, l *keyedLock) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if l.users--; l.users == 0 {
		delete(k.mu.m, key)
	}
}

// lock locks key's lock, exclusively or shared, and returns the unlock.
func (k *keyedLocks[K]) lock(key K, exclusive bool) (unlock func()) {
	l := k.get(key)
	if exclusive {
		l.Lock()
		return func() { l.Unlock(); k.put(key, l) }
	}
	l.RLock()
	return func() { l.RUnlock(); k.put(key, l) }
}

// tryLock locks key's lock shared if no one holds it exclusively, and
// reports whether it did.
func (k *keyedLocks[K]) tryLock(key K) (unlock func(), ok bool) {
	l := k.get(key)
	if !l.TryRLock() {
		k.put(key, l)
		return nil, false
	}
	return func() { l.RUnlock(); k.put(key, l) }, true
}

// famSeg names one segment index of one family: the unit of a fault's
// lock. Disks of a family share slots only at the same segment index (see
// meta.Disk.Family), so faults on different indexes never touch the same
// entry or slot.
type famSeg struct {
	fam meta.DiskID
	seg uint64
}

// lockFamily locks family fam: shared for faults, which lock their
// segment too, exclusive for what changes the family as a whole
// (snapshots, deletes, resizes, discards, revokes). It returns the
// unlock.
func (c *Controller) lockFamily(fam meta.DiskID, exclusive bool) (unlock func()) {
	return c.fams.lock(fam, exclusive)
}

// lockFamilies locks families exclusively, in ascending order so that two
// group snapshots cannot deadlock, and commits their map changes kept in
// memory (the caller acts on the store).
func (c *Controller) lockFamilies(ctx context.Context, fams []meta.DiskID) (unlock func(), err error) {
	ids := slices.Clone(fams)
	slices.Sort(ids)
	ids = slices.Compact(ids) // sources of one family: one lock
	unlocks := make([]func(), 0, len(ids))
	for _, f := range ids {
		if err = c.preflush(ctx, f); err != nil {
			break
		}
		unlocks = append(unlocks, c.lockFamily(f, true))
		if err = c.flushFamily(ctx, f, true); err != nil {
			break
		}
	}
	unlock = func() {
		for i := len(unlocks) - 1; i >= 0; i-- {
			unlocks[i]()
		}
	}
	return unlock, err
}

// lockSegment locks segment index seg of family fam, whose lock the
// caller holds shared.
func (c *Controller) lockSegment(fam meta.DiskID, seg uint64) (unlock func()) {
	return c.segs.lock(famSeg{fam, seg}, true)
}

// lockDisk locks the family of disk name exclusively and returns the
// disk's record as it is under the lock: one read before the lock could
// be stale by the time the lock is held (a resize, a delete).
func (c *Controller) lockDisk(ctx context.Context, name string) (meta.Disk, func(), error) {
	for {
		d, err := c.Disk(ctx, name)
		if err != nil {
			return meta.Disk{}, nil, err
		}
		if err := c.preflush(ctx, d.Family); err != nil {
			return meta.Disk{}, nil, err
		}
		unlock := c.lockFamily(d.Family, true)
		nd, err := c.Disk(ctx, name)
		if err == nil && nd.ID == d.ID {
			// A family-wide change reads and writes the store:
			// the changes kept in memory go there first.
			if err := c.flushFamily(ctx, d.Family, true); err != nil {
				unlock()
				return meta.Disk{}, nil, err
			}
			return nd, unlock, nil
		}
		unlock()
		if err != nil {
			return meta.Disk{}, nil, err
		}
		// Deleted and created again meanwhile: another family.
	}
}

// lockPublish locks the publish lock of segment index seg of family fam,
// whose family lock the caller holds shared: exclusively by a fault from
// just before its first commit until its answer (it holds the segment
// lock too), shared by a read fault while it reads the entry. A read
// fault then never sees a change that some agent has not heard of, yet
// does not wait for a copy.
func (c *Controller) lockPublish(fam meta.DiskID, seg uint64, exclusive bool) (unlock func()) {
	return c.pubs.lock(famSeg{fam, seg}, exclusive)
}

// tryLockPublish takes segment seg's publish lock (see lockPublish) shared
// if no fault holds it, and reports whether it did.
func (c *Controller) tryLockPublish(fam meta.DiskID, seg uint64) (unlock func(), ok bool) {
	return c.pubs.tryLock(famSeg{fam, seg})
}
