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
	if err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			return nil, fmt.Errorf("open metadata %s: %w", path, ErrLocked)
		}
		return nil, fmt.Errorf("open metadata %s: %w", path, err)
	}
	if err := db.View(func(btx *bolt.Tx) error {
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
