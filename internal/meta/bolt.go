package meta

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// bucket is the one bbolt bucket that holds every key.
var bucket = []byte("segmap")

// Bolt is the embedded store: one bbolt file, one writer at a time. Its
// Updates are group committed (see group.go): the Updates that arrive
// while a commit is in flight share the next bbolt transaction and its
// one fsync.
type Bolt struct {
	db *bolt.DB
	group
}

func newBolt(db *bolt.DB) *Bolt {
	b := &Bolt{db: db}
	b.init(boltBackend{db}, boltMaxBatch)
	return b
}

// OpenBolt opens (creating if needed) the bbolt store at path. It fails
// rather than waits if another process holds the file.
func OpenBolt(path string) (*Bolt, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, NoFreelistSync: true, FreelistType: bolt.FreelistMapType})
	if err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			return nil, fmt.Errorf("open metadata %s: %w", path, ErrLocked)
		}
		return nil, fmt.Errorf("open metadata %s: %w", path, err)
	}
	if err := db.Update(func(btx *bolt.Tx) error {
		_, err := btx.CreateBucketIfNotExists(bucket)
		return err
	}); err != nil {
		db.Close()
		return nil, fmt.Errorf("open metadata %s: %w", path, err)
	}
	return newBolt(db), nil
}

// Path returns the file the store lives in.
func (b *Bolt) Path() string { return b.db.Path() }

// View implements Store. bbolt panicking on a damaged page fails the View
// with ErrCorrupt (see recoverBoltPanic).
func (b *Bolt) View(ctx context.Context, fn func(*Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	err := b.db.View(func(btx *bolt.Tx) (err error) {
		defer recoverBoltPanic(&err)
		return fn(newTx(boltKV{btx.Bucket(bucket)}, false))
	})
	return mapBoltErr(err)
}

// Update implements Store. It is group committed: see group.go.
func (b *Bolt) Update(ctx context.Context, fn func(*Tx) error) error {
	return b.update(ctx, fn)
}

// boltBackend runs a Bolt's batches: each one bbolt write transaction.
type boltBackend struct{ db *bolt.DB }

func (be boltBackend) begin(context.Context) (batchTx, error) {
	btx, err := be.db.Begin(true)
	if err != nil {
		return nil, mapBoltErr(err)
	}
	return boltBatch{btx}, nil
}

// bbolt transactions are serialised by its writer lock: never stale,
// never too large.
func (boltBackend) stale(error) bool                 { return false }
func (boltBackend) tooLarge(error) bool              { return false }
func (boltBackend) again(context.Context, int) error { return errors.New("meta: bbolt batch retried") }

type boltBatch struct{ tx *bolt.Tx }

func (b boltBatch) kv() KV { return boltKV{b.tx.Bucket(bucket)} }

// commit commits and fsyncs, or, when nothing was written, ends the
// transaction without either.
func (b boltBatch) commit(wrote bool) error {
	if !wrote {
		return mapBoltErr(b.tx.Rollback())
	}
	return mapBoltErr(b.tx.Commit())
}

func (b boltBatch) rollback() { _ = b.tx.Rollback() }

// Close implements Store.
func (b *Bolt) Close() error { return b.db.Close() }

func mapBoltErr(err error) error {
	if errors.Is(err, berrors.ErrDatabaseNotOpen) {
		return ErrClosed
	}
	return err
}

// boltKV is a KV over one bbolt bucket.
type boltKV struct{ b *bolt.Bucket }

func (k boltKV) Get(key []byte) ([]byte, error) { return k.b.Get(key), nil }

func (k boltKV) Put(key, value []byte) error { return k.b.Put(key, value) }

func (k boltKV) Delete(key []byte) error { return k.b.Delete(key) }

func (k boltKV) Scan(prefix []byte, fn func(key, value []byte) error) error {
	c := k.b.Cursor()
	for key, v := c.Seek(prefix); key != nil && bytes.HasPrefix(key, prefix); key, v = c.Next() {
		if err := fn(key, v); err != nil {
			return err
		}
	}
	return nil
}
