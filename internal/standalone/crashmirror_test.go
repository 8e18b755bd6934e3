package standalone_test

// The crash-point operations of mirrored containers: a replica failing
// (reported directly, or by a write through a disk while the replica's
// storage fails), a replica replaced and rebuilt in full, and a failed
// replica caught up. They run from fxSetupMirror's state: fxSetup's, plus
// mirrored container 3 of three file replicas (seg128 slots, which no
// other container serves) and disk M on it, with replica 2 failed and
// M written since, so that replica 2 misses slots.
//
// Besides the model, each checks the replicas themselves, file by file:
// a healthy replica holds every used slot's bytes as the first healthy
// one does, and a failed one differs from it only in slots recorded as
// written while it was failed (the write intents a catch-up copies).

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"time"

	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/faultinject"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

const (
	// mirID is the mirrored container of fxSetupMirror.
	mirID = 3
	// mirSlots is the slots of each of its replicas.
	mirSlots = 12
)

// mirFile is the path of replica file name (m3a, m3b, ...) of h.
func (h *fx) mirFile(name string) string {
	return filepath.Join(h.dir, "containers", name)
}

// fxSetupMirror is fxSetup's state plus mirrored container 3 over files
// m3a, m3b and m3c, and disk M (seg128 segments) on it: M's segments 0
// and 1 written while every replica was healthy, then m3c failed, then
// segment 1 rewritten in part, segment 2 written and segment 0 trimmed
// (its slot freed). Every write is flushed.
func fxSetupMirror(h *fx) fxModel {
	m := fxSetup(h)
	var uris []string
	for _, n := range []string{"m3a", "m3b", "m3c"} {
		if err := container.CreateFile(h.mirFile(n), mirID, seg128, mirSlots); err != nil {
			h.t.Fatal(err)
		}
		uris = append(uris, container.FileURI(h.mirFile(n)))
	}
	if _, err := h.c.Ctrl.AddMirror(h.ctx, uris); err != nil {
		h.t.Fatalf("add mirror: %v", err)
	}
	create := fxOp{name: "create", run: func(h *fx, m fxModel) (fxModel, error) {
		after := m.clone()
		after["M"] = fxDisk{data: make([]byte, fxSegs*seg128), family: "M"}
		_, err := h.c.Ctrl.CreateDisk(h.ctx, controller.CreateOptions{Name: "M", Size: fxSegs * seg128, SegmentSize: seg128})
		return after, err
	}}
	steps := []fxOp{
		create,
		opWrite(0, "M", 0, pattern(31, 2*seg128)),
		opReportReplica(2),
		opWrite(1, "M", seg128+1000, pattern(32, 5000)),
		opWrite(0, "M", 2*seg128, pattern(33, seg128)),
		opTrim(0, "M", 0, seg128),
	}
	for _, op := range steps {
		var err error
		if m, err = op.run(h, m); err != nil {
			h.t.Fatalf("mirror setup %s: %v", op.name, err)
		}
	}
	ct, err := h.mirror()
	if err != nil {
		h.t.Fatal(err)
	}
	if st := replicaStates(ct); !slices.Equal(st, []meta.ReplicaState{meta.ReplicaHealthy, meta.ReplicaHealthy, meta.ReplicaFailed}) {
		h.t.Fatalf("mirror setup: replicas %v, want healthy, healthy, failed", st)
	}
	return m
}

// mirror returns the record of container mirID.
func (h *fx) mirror() (meta.Container, error) {
	cs, err := h.c.Ctrl.ListContainers(h.ctx)
	if err != nil {
		return meta.Container{}, err
	}
	for _, ct := range cs {
		if ct.ID == mirID {
			return ct, nil
		}
	}
	return meta.Container{}, fmt.Errorf("container %d: not listed", mirID)
}

func replicaStates(ct meta.Container) []meta.ReplicaState {
	var out []meta.ReplicaState
	for _, r := range ct.Replicas {
		out = append(out, r.State)
	}
	return out
}

// usedAndIntents returns the used slots of container mirID (referenced
// by a table) and its write intents.
func (h *fx) usedAndIntents() (used, intents []uint32, err error) {
	err = h.c.Store.View(h.ctx, func(tx *meta.Tx) error {
		used = nil
		for s := range uint32(mirSlots) {
			n, err := tx.Refs(table.Location{Container: mirID, Slot: s})
			if err != nil {
				return err
			}
			if n > 0 {
				used = append(used, s)
			}
		}
		intents, err = tx.Intents(mirID)
		return err
	})
	return used, intents, err
}

// readSlot reads slot s of the replica file at uri directly.
func readSlot(uri string, s uint32) ([]byte, error) {
	path, err := container.FilePath(uri)
	if err != nil {
		return nil, err
	}
	f, err := container.Open(path, nil)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	p := make([]byte, seg128)
	if _, err := f.ReadAt(p, int64(s)*seg128); err != nil {
		return nil, err
	}
	return p, nil
}

// checkReplicas checks the replica files of container mirID against its
// record: every healthy replica holds every used slot as the first
// healthy one does, and reads zero in each free slot that it reads zero
// in; a failed one (if intentsCover) differs from it only
// in slots recorded as write intents. It returns the record.
func (h *fx) checkReplicas(intentsCover bool) (meta.Container, error) {
	ct, err := h.mirror()
	if err != nil {
		return ct, err
	}
	used, intents, err := h.usedAndIntents()
	if err != nil {
		return ct, err
	}
	src := slices.IndexFunc(ct.Replicas, func(r meta.Replica) bool { return r.State == meta.ReplicaHealthy })
	if src < 0 {
		return ct, fmt.Errorf("container %d: no healthy replica: %v", mirID, ct.Replicas)
	}
	zero := make([]byte, seg128)
	for s := range uint32(mirSlots) {
		want, err := readSlot(ct.Replicas[src].URI, s)
		if err != nil {
			return ct, err
		}
		isUsed := slices.Contains(used, s)
		if !isUsed && !bytes.Equal(want, zero) {
			continue // a free slot that was never punched
		}
		for i, r := range ct.Replicas {
			// A free slot reads zero on every healthy replica if
			// it does on one: the controller hands out free
			// slots as zeros.
			check := r.State == meta.ReplicaHealthy || (isUsed && intentsCover && r.State == meta.ReplicaFailed && !slices.Contains(intents, s))
			if i == src || !check {
				continue
			}
			got, err := readSlot(r.URI, s)
			if err != nil {
				return ct, err
			}
			if j := firstDiff(got, want); j >= 0 {
				return ct, fmt.Errorf("container %d: slot %d (used %v): %v replica %d (%s) byte %d reads %#x, healthy replica %d reads %#x (replicas %v, intents %v)",
					mirID, s, isUsed, r.State, i, filepath.Base(r.URI), j, got[j], src, want[j], replicaStates(ct), intents)
			}
		}
	}
	return ct, nil
}

// rebuildAll runs RebuildReplica until every replica of container mirID
// is healthy, waiting out a rebuild that runs already (ResumeRebuilds
// starts one after a restart), and checks the replicas.
func (h *fx) rebuildAll() error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := h.c.Ctrl.RebuildReplica(h.ctx, mirID, nil)
		switch {
		case errors.Is(err, controller.ErrRebuilding) && time.Now().Before(deadline):
			time.Sleep(20 * time.Millisecond)
			continue
		case err != nil && !errors.Is(err, controller.ErrNothingToRebuild):
			return fmt.Errorf("rebuild container %d: %w", mirID, err)
		}
		ct, err := h.checkReplicas(false)
		if err != nil {
			return err
		}
		if st := replicaStates(ct); slices.ContainsFunc(st, func(s meta.ReplicaState) bool { return s != meta.ReplicaHealthy }) {
			if time.Now().After(deadline) {
				return fmt.Errorf("container %d: replicas %v after rebuilds", mirID, st)
			}
			continue
		}
		return nil
	}
}

// opReportReplica reports replica i of container mirID failed, as a
// holder whose I/O on it failed would, with M's slot 1 as the slots of
// the failed I/O. After a crash the replica is healthy (and equal) or
// failed, with the slots recorded; recover requires that and brings it
// back.
func opReportReplica(i int) fxOp {
	const slot = 1
	return fxOp{name: "report-replica", mirror: true, run: func(h *fx, m fxModel) (fxModel, error) {
		ct, err := h.mirror()
		if err != nil {
			return m, err
		}
		_, err = h.c.Ctrl.ReportReplica(h.ctx, protocol.ReplicaReport{Container: mirID, Epoch: ct.Epoch, Failed: i, URI: ct.Replicas[i].URI, Cause: "failed by the test", Slots: []uint32{slot}})
		return m.clone(), err
	}, recover: func(h *fx, _ fxModel) (string, error) {
		ct, err := h.checkReplicas(true)
		if err != nil {
			return "", err
		}
		seen := "before"
		switch ct.Replicas[i].State {
		case meta.ReplicaHealthy:
		case meta.ReplicaFailed:
			seen = "after"
			if _, intents, err := h.usedAndIntents(); err != nil || !slices.Contains(intents, slot) {
				return "", fmt.Errorf("replica %d failed, and slot %d is not recorded (intents %v, %v)", i, slot, intents, err)
			}
		default:
			return "", fmt.Errorf("replica %d is %v, want healthy or failed", i, ct.Replicas[i].State)
		}
		return seen, h.rebuildAll()
	}}
}

// failReplicaFault fails every write, punch and flush of the agents on
// replica file name: its storage is broken for them.
func failReplicaFault(name string) faultinject.Fault {
	return faultinject.Fault{Ops: faultinject.OpWrite | faultinject.OpPunch | faultinject.OpFlush, Target: "agent/", Always: true,
		If: func(c faultinject.Call) bool { return filepath.Base(c.Target) == name }}
}

// opMirrorWrite writes p at off of disk M through agent 0 while the
// storage of replica file bad fails every write: the agent reports it,
// the controller marks it failed, and the write succeeds on the others.
// After a crash the replica is healthy and equal, or failed and every
// slot it misses recorded; recover (the storage repaired) requires that
// and brings it back.
func opMirrorWrite(off int, p []byte, bad string) fxOp {
	w := opWrite(0, "M", off, p)
	return fxOp{name: "mirror-write", mirror: true, torn: true, pre: func(h *fx) error {
		h.agent.Load().Inject(failReplicaFault(bad))
		return nil
	}, run: w.run, recover: func(h *fx, _ fxModel) (string, error) {
		h.agent.Load().ClearFaults()
		if _, err := h.checkReplicas(true); err != nil {
			return "", err
		}
		return "", h.rebuildAll()
	}}
}

// opReplaceReplica replaces replica i of container mirID by a new file,
// which is rebuilt in full. After a crash the new replica is healthy
// only if it holds every used slot; settled finishes the rebuild.
func opReplaceReplica(i int) fxOp {
	const name = "m3d"
	return fxOp{name: "replace-replica", mirror: true, pre: func(h *fx) error {
		return container.CreateFile(h.mirFile(name), mirID, seg128, mirSlots)
	}, run: func(h *fx, m fxModel) (fxModel, error) {
		ct, err := h.mirror()
		if err != nil {
			return m, err
		}
		return m.clone(), h.c.Ctrl.ReplaceReplica(h.ctx, mirID, ct.Replicas[i].URI, container.FileURI(h.mirFile(name)), nil)
	}, recover: func(h *fx, _ fxModel) (string, error) {
		_, err := h.checkReplicas(true)
		return "", err
	}, settled: func(h *fx) error {
		return h.rebuildAll()
	}}
}

// opRebuild catches up the failed replica of container mirID: it copies
// the slots recorded while it was failed, and punches those since freed.
// After a crash it is healthy only if it holds every used slot; settled
// finishes the rebuild.
func opRebuild() fxOp {
	return fxOp{name: "rebuild", mirror: true, run: func(h *fx, m fxModel) (fxModel, error) {
		return m.clone(), h.c.Ctrl.RebuildReplica(h.ctx, mirID, nil)
	}, recover: func(h *fx, _ fxModel) (string, error) {
		_, err := h.checkReplicas(true)
		return "", err
	}, settled: func(h *fx) error {
		return h.rebuildAll()
	}}
}

// mirrorCases are the crash-point cases on mirrored container mirID, from
// fxSetupMirror's state (replicas m3a, m3b healthy, m3c failed).
func mirrorCases() []crashCase {
	return []crashCase{
		{"report-replica", opReportReplica(1), ctrlCrash},
		// M's segment 2 is on a slot of its own: written in place.
		{"mirror-write-fails-replica", opMirrorWrite(2*seg128+100, pattern(41, 3000), "m3b"), ctrlCrash},
		// Segment 3 has none: allocated, then written.
		{"mirror-allocate-fails-replica", opMirrorWrite(3*seg128, pattern(42, 7000), "m3b"), ctrlCrash},
		{"replace-replica", opReplaceReplica(2), ctrlCrash},
		{"rebuild", opRebuild(), ctrlCrash},
	}
}
