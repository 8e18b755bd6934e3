package controller

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"
)

// TestOperations: the registry lists running operations with their
// counts, ends them done or failed on the controller's clock, and keeps
// only the last KeptOperations finished ones.
func TestOperations(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	c := &Controller{now: func() time.Time { return now }}
	if ops := c.Operations(); len(ops) != 0 {
		t.Fatalf("operations of a new controller: %+v", ops)
	}
	a := c.StartOperation(OpDrain, "container 3", UnitSlots)
	now = now.Add(time.Second)
	b := c.StartOperation(OpExport, "vm1@mon", UnitBytes)
	a.Progress(5, 10)
	b.SetTotal(1 << 20)
	b.Add(4096)
	b.Add(4096)
	ops := c.Operations()
	if len(ops) != 2 || ops[0].ID != 1 || ops[1].ID != 2 {
		t.Fatalf("operations %+v, want ids 1 and 2", ops)
	}
	if o := ops[0]; o.Kind != OpDrain || o.Target != "container 3" || o.Done != 5 || o.Total != 10 || o.State != OpRunning || !o.Finished.IsZero() {
		t.Errorf("drain %+v", o)
	}
	if o := ops[1]; o.Done != 8192 || o.Total != 1<<20 || o.Unit != UnitBytes || !o.Started.Equal(time.Unix(1_700_000_001, 0)) {
		t.Errorf("export %+v", o)
	}
	now = now.Add(time.Second)
	a.Progress(10, 10)
	a.Finish(nil)
	a.Progress(3, 10) // after the end: ignored
	b.Finish(fmt.Errorf("send: %w", context.Canceled))
	b.Finish(errors.New("twice"))
	ops = c.Operations()
	if o := ops[0]; o.State != OpDone || o.Done != 10 || !o.Finished.Equal(now) || o.Err != "" {
		t.Errorf("finished drain %+v", o)
	}
	if o := ops[1]; o.State != OpFailed || o.Err != "canceled" || o.State.String() != "failed" {
		t.Errorf("canceled export %+v", o)
	}
	for range KeptOperations + 3 {
		c.StartOperation(OpScrub, "", UnitSlots).Finish(nil)
	}
	running := c.StartOperation(OpFlatten, "disk d", UnitSegments)
	ops = c.Operations()
	if len(ops) != KeptOperations+1 {
		t.Fatalf("%d operations, want %d finished and 1 running", len(ops), KeptOperations)
	}
	if ops[len(ops)-1].Kind != OpFlatten || ops[len(ops)-1].State != OpRunning || ops[0].Kind != OpScrub {
		t.Errorf("operations %+v: want the oldest dropped, the running one kept", ops)
	}
	running.Finish(nil)
	var nilOp *Op
	nilOp.Progress(1, 2) // a nil Op records nothing
	nilOp.Finish(nil)
}
