package metatest

import (
	"slices"
	"testing"

	"segmap/internal/meta"
)

// testAgents checks the agent registry: empty at first, replaced whole,
// emptied, refusing bad names, read-only in View.
func testAgents(t *testing.T, s meta.Store) {
	view(t, s, func(tx *meta.Tx) error {
		as, err := tx.Agents()
		if err != nil || len(as) != 0 {
			t.Errorf("Agents of a new store = %v, %v; want none", as, err)
		}
		wantErr(t, "SetAgents in View", tx.SetAgents([]string{"a"}), meta.ErrReadOnlyTx)
		return nil
	})
	update(t, s, func(tx *meta.Tx) error { return tx.SetAgents([]string{"host-a", "host-b"}) })
	view(t, s, func(tx *meta.Tx) error {
		as, err := tx.Agents()
		if err != nil || !slices.Equal(as, []string{"host-a", "host-b"}) {
			t.Errorf("Agents = %v, %v; want host-a host-b", as, err)
		}
		return nil
	})
	update(t, s, func(tx *meta.Tx) error {
		wantErr(t, "SetAgents with an empty name", tx.SetAgents([]string{"ok", ""}), meta.ErrInvalid)
		return tx.SetAgents(nil)
	})
	view(t, s, func(tx *meta.Tx) error {
		as, err := tx.Agents()
		if err != nil || len(as) != 0 {
			t.Errorf("Agents after SetAgents(nil) = %v, %v; want none", as, err)
		}
		return nil
	})
}
