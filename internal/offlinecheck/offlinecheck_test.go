package offlinecheck_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"segmap/internal/controller"
	"segmap/internal/etcdtest"
	"segmap/internal/meta"
	"segmap/internal/offlinecheck"
	"segmap/internal/table"
)

const segSize = 1 << 20

func slot(s uint32) table.Location { return table.Location{Container: 1, Slot: s} }

// fill stores disk "vm" (4 segments) and its snapshot "vm@1" sharing one
// table page: segment 0 is partial, c1/s3{8} over c1/s2{0-3} over c1/s1,
// segment 1 whole at c1/s4, every slot counted once. With damage set, c1/s1
// (a layer only) is counted twice, and segment 2 of vm becomes a partial
// entry whose base does not hold every sub-block (counted right).
func fill(t *testing.T, st meta.Store, damage bool) {
	t.Helper()
	n := table.SubBlockCount(segSize)
	part := table.Over(slot(3), table.Range(8, 9), table.Over(slot(2), table.Range(0, 4), table.At(slot(1), false), n), n)
	if err := part.Part.Valid(part.Loc, n); err != nil {
		t.Fatal(err)
	}
	created := time.Date(2025, 3, 14, 15, 9, 26, 0, time.UTC)
	err := st.Update(t.Context(), func(tx *meta.Tx) error {
		vm, err := tx.CreateDisk(meta.Disk{Name: "vm", Size: 4 * segSize, SegmentSize: segSize, Policy: table.Forward, Created: created})
		if err != nil {
			return err
		}
		snap, err := tx.CreateDisk(meta.Disk{Name: "vm@1", Size: 4 * segSize, SegmentSize: segSize, Policy: table.Forward, Origin: vm.ID, Family: vm.ID, ReadOnly: true, Created: created})
		if err != nil {
			return err
		}
		if _, err := tx.AddContainer(meta.Container{ID: 1, URI: "file:///nonexistent/c1", SlotSize: segSize, Slots: 64}); err != nil {
			return err
		}
		if err := tx.SetEntries(vm.ID, 0, []table.Entry{part, table.At(slot(4), false)}); err != nil {
			return err
		}
		for s := uint32(1); s <= 4; s++ {
			if err := tx.SetRefs(slot(s), 1); err != nil {
				return err
			}
		}
		if err := tx.CopyTable(vm.ID, snap.ID); err != nil {
			return err
		}
		if !damage {
			return nil
		}
		// vm's page is copied (each slot now 2), then the damage.
		bad := table.Entry{Loc: slot(5), Part: &table.Partial{Bits: table.Range(0, 1), Under: []table.Layer{{Loc: slot(6), Bits: table.Range(1, 2)}}}}
		if err := tx.SetEntries(vm.ID, 2, []table.Entry{bad}); err != nil {
			return err
		}
		for s, c := range map[uint32]uint32{1: 3, 5: 1, 6: 1} {
			if err := tx.SetRefs(slot(s), c); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// wantDamage checks that ps are the problems fill's damage makes.
func wantDamage(t *testing.T, ps []controller.Problem) {
	t.Helper()
	if len(ps) != 2 {
		t.Fatalf("problems %v, want two", ps)
	}
	if p := ps[0]; p.Kind != controller.WrongCount || p.Loc != slot(1) || !strings.Contains(p.Detail, "count 3") {
		t.Errorf("first problem %v, want the wrong count 3 of layer slot c1/s1", p)
	}
	if p := ps[1]; p.Kind != controller.InvalidPartial || p.Loc != slot(5) || p.Disk != "vm" || p.Segment != 2 || !strings.Contains(p.Detail, "not all 256 sub-blocks") {
		t.Errorf("second problem %v, want vm segment 2's invalid partial entry c1/s5", p)
	}
}

// TestBoltPartial: the offline check of a stopped controller's file
// counts the layers of partial entries, finds a wrong layer count and an
// invalid partial entry, and a repair refuses them, leaving the file as
// it was.
func TestBoltPartial(t *testing.T) {
	for _, damage := range []bool{false, true} {
		dir := t.TempDir()
		path := filepath.Join(dir, "meta.db")
		st, err := meta.OpenBolt(path)
		if err != nil {
			t.Fatal(err)
		}
		fill(t, st, damage)
		if err := st.Close(); err != nil {
			t.Fatal(err)
		}
		r, err := offlinecheck.Bolt(context.Background(), dir, false)
		if err != nil {
			t.Fatal(err)
		}
		if !damage {
			if len(r.Problems) != 0 {
				t.Fatalf("clean store: %v", r.Problems)
			}
			continue
		}
		wantDamage(t, r.Problems)
		before, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		r, err = offlinecheck.Bolt(context.Background(), dir, true)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(r.Refused, "invalid-partial-entry") || len(r.Repaired) != 0 {
			t.Errorf("repair: refused %q, repaired %v; want a refusal naming invalid-partial-entry", r.Refused, r.Repaired)
		}
		wantDamage(t, r.Problems)
		if after, err := os.ReadFile(path); err != nil || !bytes.Equal(before, after) {
			t.Errorf("refused repair changed the file (%v)", err)
		}
	}
}

// TestEtcdPartial: the same, on a store in etcd.
func TestEtcdPartial(t *testing.T) {
	endpoint := etcdtest.StartOne(t)
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	for _, damage := range []bool{false, true} {
		prefix := "/clean/"
		if damage {
			prefix = "/damaged/"
		}
		st, err := meta.OpenEtcd(t.Context(), cli, prefix)
		if err != nil {
			t.Fatal(err)
		}
		fill(t, st, damage)
		st.Close()
		r, err := offlinecheck.Etcd(t.Context(), cli, prefix)
		if err != nil {
			t.Fatal(err)
		}
		if !damage {
			if len(r.Problems) != 0 {
				t.Fatalf("clean store: %v", r.Problems)
			}
			continue
		}
		wantDamage(t, r.Problems)
	}
}
