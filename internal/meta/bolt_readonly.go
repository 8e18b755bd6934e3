package meta

import (
	"errors"
	"fmt"
	"os"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// ErrNotStore is returned by OpenBoltReadOnly for a bbolt file that holds no
// segmap store.
var ErrNotStore = errors.New("not a segmap metadata store")

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
	return &Bolt{db: db}, nil
}

// maxFileErrors bounds the errors CheckFile returns.
const maxFileErrors = 100

// CheckFile runs bbolt's own check of the file's structure (its pages,
// free list and buckets, below the records) and returns what it finds, at
// most maxFileErrors errors. The records' own checks (Tx.Damaged) may
// panic inside bbolt on a file that fails this one.
func (b *Bolt) CheckFile() []error {
	var errs []error
	err := b.db.View(func(btx *bolt.Tx) error {
		for err := range btx.Check() {
			if len(errs) < maxFileErrors {
				errs = append(errs, err)
			}
		}
		return nil
	})
	if err != nil {
		errs = append(errs, err)
	}
	return errs
}
