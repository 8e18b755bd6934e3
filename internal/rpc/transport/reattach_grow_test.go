package transport_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"segmap/internal/controller"
	"segmap/internal/meta"
)

// TestReattachLearnsGrow: a grow that the controller committed but did not
// live to send to an agent (a grow is sent after its commit; the
// controller died in between) is learned by the agent when it re-attaches.
// Before, the agent kept its old, shorter table: every later snapshot of
// the disk failed ("set_entry_state [0,+8): entry range outside the
// table") until the agent restarted, and I/O past the old end failed.
// Found by the e2e kill storm (TestKillStormController).
func TestReattachLearnsGrow(t *testing.T) {
	checkGoroutines(t)
	ctx := testContext(t, time.Minute)
	s := newStack(t, stackOptions{})
	a := s.startAgent("a", s.addr)
	s.createDisk(ctx, "d", 4)
	da := a.open(ctx, "d")
	write(t, ctx, da, nil, 0, randBytes(1, 1000))

	// The controller dies right after the grow's commit: the commit is
	// there, the agent never heard of it.
	s.stopController()
	b, err := meta.OpenBolt(filepath.Join(s.dir, "meta.db"))
	if err != nil {
		t.Fatal(err)
	}
	err = b.Update(ctx, func(tx *meta.Tx) error {
		d, err := tx.Disk("d")
		if err != nil {
			return err
		}
		d.Size = 8 * segSize
		return tx.PutDisk(d)
	})
	b.Close()
	if err != nil {
		t.Fatal(err)
	}
	s.startController()
	s.serve()
	// The agent may have re-attached to the old server as it stopped:
	// wait for the size, not for an attach.
	for deadline := time.Now().Add(10 * time.Second); da.Info().Size != 8*segSize; {
		if time.Now().After(deadline) {
			t.Fatalf("10s after the restart the agent serves d at %d bytes, want %d", da.Info().Size, 8*segSize)
		}
		time.Sleep(10 * time.Millisecond)
	}
	sctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if _, err := s.ctrl.Snapshot(sctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"d@1"}}); err != nil {
		t.Errorf("snapshot after the grow: %v", err)
	}
	write(t, ctx, da, nil, 6*segSize, randBytes(2, 1000))
	s.checkClean(ctx)
}
