package meta

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// OpenBoltReadOnly opens the existing bbolt store at path for reading only:
// it writes nothing, so the file stays byte for byte as it was, and it shares
// the file with other readers but not with a writer (ErrLocked while a
// controller has it open). Update returns an error.
func OpenBoltReadOnly(path string) (*Bolt, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("open metadata %s: %w", path, err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, ReadOnly: true})
	switch {
	case errors.Is(err, berrors.ErrTimeout):
		return nil, fmt.Errorf("open metadata %s: %w", path, ErrLocked)
	case errors.Is(err, berrors.ErrInvalid), errors.Is(err, berrors.ErrChecksum), errors.Is(err, berrors.ErrVersionMismatch):
		return nil, fmt.Errorf("open metadata %s: bbolt file damaged: %w: %w", path, err, ErrCorrupt)
	case err != nil:
		return nil, fmt.Errorf("open metadata %s: %w", path, err)
	}
	if err := db.View(func(btx *bolt.Tx) (err error) {
		defer func() {
			if r := recover(); r != nil { // bbolt asserts on damaged pages
				err = fmt.Errorf("open metadata %s: bbolt file damaged: %v: %w", path, r, ErrCorrupt)
			}
		}()
		if btx.Bucket(bucket) == nil {
			return fmt.Errorf("open metadata %s: no %q bucket: %w", path, bucket, ErrNotStore)
		}
		return nil
	}); err != nil {
		db.Close()
		return nil, err
	}
	return newBolt(db), nil
}

// maxFileErrors bounds the errors CheckFile returns.
const maxFileErrors = 100

// CheckFile runs bbolt's own check of the file's structure (its pages,
// free list and buckets, below the records) and returns what it finds, at
// most maxFileErrors errors. On a store opened read-only it also verifies
// both of bbolt's meta pages (see checkMetaPages). The records' own checks (Tx.Damaged) may
// panic inside bbolt on a file that fails this one.
//
// On a writable store the check runs in a write transaction that it rolls
// back: bbolt's check reads the free list, which a commit running beside a
// read-only transaction changes (a running controller would see pages its
// own later commits freed reported as damage, or crash on a concurrent map
// write). Commits wait for the check meanwhile.
func (b *Bolt) CheckFile() []error {
	var errs []error
	check := func(btx *bolt.Tx) error {
		for err := range btx.Check() {
			if len(errs) < maxFileErrors {
				errs = append(errs, err)
			}
		}
		return errRollback
	}
	var err error
	if b.db.IsReadOnly() {
		err = b.db.View(check)
	} else {
		err = b.db.Update(check)
	}
	if err != nil && !errors.Is(err, errRollback) {
		errs = append(errs, err)
	}
	if b.db.IsReadOnly() {
		// Opened by OpenBoltReadOnly, so no writer in this process
		// rewrites a meta page while it is read (another process
		// cannot have the file open for writing).
		errs = append(checkMetaPages(b.db.Path(), b.db.Info().PageSize), errs...)
	}
	return errs
}

// bbolt's meta page: after the 16-byte page header, magic, version, page
// size, flags, root bucket (16 bytes), free list, page count and
// transaction id, then the FNV-64a of those 56 bytes, in the machine's
// byte order.
const (
	boltPageHeader = 16
	boltMetaSum    = 56
	boltMagic      = 0xED0CDAED
	boltVersion    = 2
)

// checkMetaPages verifies both of bbolt's meta pages. bbolt itself opens a
// file from whichever is valid and newer, and says nothing when one fails:
// the file is then read as of the transaction before the last, which may
// be lost.
func checkMetaPages(path string, pageSize int) []error {
	f, err := os.Open(path)
	if err != nil {
		return []error{err}
	}
	defer f.Close()
	var errs []error
	for i := range 2 {
		buf := make([]byte, boltPageHeader+boltMetaSum+8)
		if _, err := f.ReadAt(buf, int64(i*pageSize)); err != nil {
			errs = append(errs, fmt.Errorf("bbolt meta page %d: %w", i, err))
			continue
		}
		m := buf[boltPageHeader:]
		h := fnv.New64a()
		h.Write(m[:boltMetaSum])
		var what string
		switch ne := binary.NativeEndian; {
		case ne.Uint32(m) != boltMagic:
			what = "not a meta page (magic)"
		case ne.Uint32(m[4:]) != boltVersion:
			what = fmt.Sprintf("version %d", ne.Uint32(m[4:]))
		case ne.Uint64(m[boltMetaSum:]) != h.Sum64():
			what = "checksum mismatch"
		default:
			continue
		}
		errs = append(errs, fmt.Errorf("bbolt meta page %d: %s: the file is read as of the other meta page, and the last transaction committed may be lost", i, what))
	}
	return errs
}
