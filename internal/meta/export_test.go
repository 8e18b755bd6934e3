package meta

import (
	bolt "go.etcd.io/bbolt"

	"segmap/internal/table"
)

// BoltTxID returns the id of the last transaction committed to b's file:
// bbolt counts one per commit.
func BoltTxID(b *Bolt) int {
	var id int
	if err := b.db.View(func(tx *bolt.Tx) error { id = tx.ID(); return nil }); err != nil {
		panic(err)
	}
	return id
}

// FullPartialPage returns the entries of the largest table page: every
// entry partial with table.MaxDepth layers (see fullPartialPage).
func FullPartialPage() []table.Entry { return fullPartialPage()[:] }
