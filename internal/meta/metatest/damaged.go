package metatest

import (
	"testing"

	"segmap/internal/meta"
	"segmap/internal/table"
)

// testNoneDamaged: every record the transactions write decodes, so Damaged
// finds nothing in a store used in every way; and a record the transaction
// has not yet committed is not looked at.
func testNoneDamaged(t *testing.T, s meta.Store) {
	damaged := func(tx *meta.Tx) {
		t.Helper()
		es, err := tx.Damaged()
		if err != nil || len(es) != 0 {
			t.Errorf("Damaged = %v, %v; want none", es, err)
		}
	}
	view(t, s, func(tx *meta.Tx) error { damaged(tx); return nil })
	update(t, s, func(tx *meta.Tx) error {
		a, err := tx.CreateDisk(testDisk("a"))
		if err != nil {
			return err
		}
		b, err := tx.CreateDisk(testDisk("b"))
		if err != nil {
			return err
		}
		c, err := tx.AddContainer(testContainer("c", 3*meta.PageSlots))
		if err != nil {
			return err
		}
		if err := tx.SetEntries(a.ID, 5, []table.Entry{at(c.ID, 1), atNW(c.ID, 2)}); err != nil {
			return err
		}
		if err := tx.SetEntries(a.ID, 3*meta.PageEntries*meta.DirPages, []table.Entry{at(c.ID, 2*meta.PageSlots)}); err != nil {
			return err
		}
		for _, l := range []uint32{1, 2, 2 * meta.PageSlots} {
			if err := tx.SetRefs(loc(c.ID, l), 1); err != nil {
				return err
			}
		}
		if err := tx.CopyTable(a.ID, b.ID); err != nil {
			return err
		}
		if err := tx.SetGrants(a.ID, []string{"host-a"}, false); err != nil {
			return err
		}
		if err := tx.SetAgents([]string{"host-a"}); err != nil {
			return err
		}
		if _, err := tx.NextSeq("epoch"); err != nil {
			return err
		}
		damaged(tx) // nothing committed yet
		return nil
	})
	view(t, s, func(tx *meta.Tx) error { damaged(tx); return nil })
	update(t, s, func(tx *meta.Tx) error {
		b, err := tx.Disk("b")
		if err != nil {
			return err
		}
		b.Name = "b2"
		if err := tx.PutDisk(b); err != nil {
			return err
		}
		a, err := tx.Disk("a")
		if err != nil {
			return err
		}
		_, err = tx.DeleteDisk(a.ID)
		return err
	})
	view(t, s, func(tx *meta.Tx) error { damaged(tx); return nil })
}
