package metatest

import (
	"fmt"
	"reflect"
	"testing"

	"segmap/internal/meta"
)

func testAddContainer(t *testing.T, s meta.Store) {
	var cs []meta.Container
	update(t, s, func(tx *meta.Tx) error {
		cs = cs[:0]
		for i, uri := range []string{"file:///a", "nbd://host/b", ""} {
			c := testContainer(uri, uint64(10*(i+1)))
			c.Used = 7 // ignored: a new container has no counts
			got, err := tx.AddContainer(c)
			if err != nil {
				return fmt.Errorf("AddContainer(%s): %w", uri, err)
			}
			c.ID, c.Used = got.ID, 0
			if !reflect.DeepEqual(got, c) {
				t.Errorf("AddContainer returned %+v, want %+v", got, c)
			}
			cs = append(cs, got)
		}
		return nil
	})
	for i, c := range cs {
		if c.ID == 0 || (i > 0 && c.ID <= cs[i-1].ID) {
			t.Errorf("container %d of %+v: ids must be non-zero and increasing", i, cs)
		}
	}
	view(t, s, func(tx *meta.Tx) error {
		for _, want := range cs {
			got, err := tx.Container(want.ID)
			if err != nil {
				return fmt.Errorf("Container(%d): %w", want.ID, err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("Container(%d) = %+v, want %+v", want.ID, got, want)
			}
		}
		got, err := tx.Containers()
		if err != nil {
			return err
		}
		if !reflect.DeepEqual(got, cs) {
			t.Errorf("Containers() = %+v, want %+v", got, cs)
		}
		return nil
	})
}

func testAddContainerExplicit(t *testing.T, s meta.Store) {
	var auto meta.Container
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if auto, err = tx.AddContainer(testContainer("a", 4)); err != nil {
			return err
		}
		c := testContainer("b", 4)
		c.ID = 1000
		got, err := tx.AddContainer(c)
		if err != nil || got.ID != 1000 {
			t.Errorf("AddContainer(ID 1000) = %+v, %v", got, err)
		}
		return nil
	})
	for _, id := range []uint32{auto.ID, 1000} {
		err := s.Update(t.Context(), func(tx *meta.Tx) error {
			c := testContainer("dup", 4)
			c.ID = id
			_, err := tx.AddContainer(c)
			return err
		})
		wantErr(t, fmt.Sprintf("AddContainer with taken id %d", id), err, meta.ErrExists)
	}
	view(t, s, func(tx *meta.Tx) error {
		cs, err := tx.Containers()
		if err != nil {
			return err
		}
		if len(cs) != 2 || cs[0].URI != "a" || cs[1].ID != 1000 || cs[1].URI != "b" {
			t.Errorf("Containers() = %+v after refused additions", cs)
		}
		return nil
	})
}

func testAddContainerSkipsTaken(t *testing.T, s meta.Store) {
	update(t, s, func(tx *meta.Tx) error {
		for id := uint32(1); id <= 3; id++ {
			c := testContainer("explicit", 4)
			c.ID = id
			if _, err := tx.AddContainer(c); err != nil {
				return err
			}
		}
		return nil
	})
	update(t, s, func(tx *meta.Tx) error {
		c, err := tx.AddContainer(testContainer("auto", 4))
		if err != nil {
			return fmt.Errorf("AddContainer after ids 1-3 were taken explicitly: %w", err)
		}
		if c.ID <= 3 {
			t.Errorf("AddContainer gave id %d, which was taken", c.ID)
		}
		return nil
	})
	view(t, s, func(tx *meta.Tx) error {
		cs, err := tx.Containers()
		if err != nil {
			return err
		}
		if len(cs) != 4 {
			t.Errorf("Containers() = %+v, want 4", cs)
		}
		return nil
	})
}

// testContainerStateRemove checks that a container's state is kept with
// the Used count that SetRefs maintains in the same transaction, and that
// a container is removed only once it holds no slot.
func testContainerStateRemove(t *testing.T, s meta.Store) {
	var c meta.Container
	update(t, s, func(tx *meta.Tx) error {
		var err error
		if c, err = tx.AddContainer(testContainer("a", 2000)); err != nil {
			return err
		}
		if err := tx.SetRefs(loc(c.ID, 1500), 2); err != nil {
			return err
		}
		got, err := tx.SetContainerState(c.ID, meta.ContainerDraining)
		if err != nil || got.State != meta.ContainerDraining || got.Used != 1 {
			t.Errorf("SetContainerState = %+v, %v", got, err)
		}
		return nil
	})
	view(t, s, func(tx *meta.Tx) error {
		got, err := tx.Container(c.ID)
		if err != nil || got.State != meta.ContainerDraining || got.Used != 1 {
			t.Errorf("Container after SetContainerState = %+v, %v", got, err)
		}
		return nil
	})
	err := s.Update(t.Context(), func(tx *meta.Tx) error { return tx.RemoveContainer(c.ID) })
	wantErr(t, "RemoveContainer with a slot used", err, meta.ErrInUse)
	err = s.Update(t.Context(), func(tx *meta.Tx) error {
		_, err := tx.SetContainerState(c.ID, 99)
		return err
	})
	wantErr(t, "SetContainerState(99)", err, meta.ErrInvalid)
	update(t, s, func(tx *meta.Tx) error {
		if err := tx.SetRefs(loc(c.ID, 1500), 0); err != nil {
			return err
		}
		return tx.RemoveContainer(c.ID)
	})
	view(t, s, func(tx *meta.Tx) error {
		_, err := tx.Container(c.ID)
		wantErr(t, "Container after RemoveContainer", err, meta.ErrNotFound)
		n, err := tx.Refs(loc(c.ID, 1500))
		if err != nil || n != 0 {
			t.Errorf("Refs of a removed container's slot = %d, %v", n, err)
		}
		return nil
	})
	// The same container may be added again.
	update(t, s, func(tx *meta.Tx) error {
		nc := testContainer("a", 2000)
		nc.ID = c.ID
		got, err := tx.AddContainer(nc)
		if err != nil || got.Used != 0 || got.State != meta.ContainerOnline {
			t.Errorf("AddContainer after remove = %+v, %v", got, err)
		}
		return nil
	})
}
