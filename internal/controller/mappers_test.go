package controller_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"segmap/internal/controller"
	"segmap/internal/rpc/protocol"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// probe is a protocol.Agent that only records the entries it is sent.
type probe struct {
	mu  sync.Mutex
	set map[uint64]table.Entry // segment -> last entry set
}

func (p *probe) NewTable(context.Context, protocol.Disk) error               { return nil }
func (p *probe) DeleteTable(context.Context, protocol.DiskID) error          { return nil }
func (p *probe) SetEntryState(context.Context, protocol.SetEntryState) error { return nil }
func (p *probe) Quiesce(context.Context, protocol.DiskID, time.Duration) error {
	return nil
}
func (p *probe) Activate(context.Context, protocol.DiskID) error { return nil }
func (p *probe) GetStatus(_ context.Context, id protocol.DiskID) (protocol.DiskStatus, error) {
	return protocol.DiskStatus{Disk: id}, nil
}
func (p *probe) GetEntry(_ context.Context, _ protocol.DiskID, first, n uint64) ([]table.Entry, error) {
	return make([]table.Entry, n), nil
}

func (p *probe) SetEntry(_ context.Context, c protocol.SetEntry) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, e := range c.Entries {
		p.set[c.First+uint64(i)] = e
	}
	return nil
}

func (p *probe) entry(seg uint64) (table.Entry, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	e, ok := p.set[seg]
	return e, ok
}

// TestFaultMovesFaultingAgent: when a fault moves a segment to a new slot
// (an allocation, a forward copy on write, a staged whole-segment move),
// the faulting agent is sent the new entry too, and has it before the
// fault returns: its other I/O on the segment (reads on other connections)
// must not go on at the old location once another agent's write to the new
// one can be acknowledged, whether or not the agent installs the fault's
// reply (it drops one when a command came while the fault was out). (Found
// by TestLinearizable in internal/e2e: an agent whose copy-on-write reply
// was dropped read the snapshot's slot after another agent's write to the
// disk's new slot had been acknowledged.)
func TestFaultMovesFaultingAgent(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name     string
		snapshot bool // snapshot first: the segment is shared
		whole    bool // a whole-segment write: staged, then committed
		// ctrlCopies: the controller copies (else a partial write
		// is staged, the agent copying)
		ctrlCopies bool
	}{
		{"allocate", false, false, false},
		{"forward copy", true, false, false},
		{"forward copy by the controller", true, false, true},
		{"staged move", true, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newClusterOpts(t, standalone.Options{ControllerCopies: tc.ctrlCopies})
			d := createDisk(t, c, "d", 4, table.Forward)
			p := &probe{set: map[uint64]table.Entry{}}
			if err := c.Ctrl.Attach(ctx, "probe", p, nil); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Ctrl.Open(ctx, "probe", "d"); err != nil {
				t.Fatal(err)
			}
			fault := func(f protocol.Fault) protocol.Reply {
				t.Helper()
				f.Agent, f.Disk, f.Segment, f.Count = "probe", protocol.DiskID(d.ID), 1, 1
				r, err := c.Ctrl.Fault(ctx, f)
				if err != nil {
					t.Fatalf("fault %+v: %v", f, err)
				}
				return r
			}
			reason := table.Zero
			if tc.snapshot {
				fault(protocol.Fault{Op: protocol.FaultWrite, Reason: table.Zero}) // allocate
				if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"d@1"}}); err != nil {
					t.Fatal(err)
				}
				reason = table.NoWrite
				p.mu.Lock()
				clear(p.set)
				p.mu.Unlock()
			}
			r := fault(protocol.Fault{Op: protocol.FaultWrite, Reason: reason, Whole: tc.whole})
			if tc.snapshot && !tc.ctrlCopies {
				if r.Stage == nil || r.Stage.Copies() == tc.whole {
					t.Fatalf("a write (whole %v) to a shared segment was not staged, or its copy not asked for: %+v", tc.whole, r)
				}
				if e, ok := p.entry(1); ok {
					t.Fatalf("the probe was sent %v before the staged write was committed", e)
				}
				r = fault(protocol.Fault{Op: protocol.FaultCommit, Token: r.Stage.Token})
			}
			if len(r.Entries) != 1 {
				t.Fatalf("reply %+v, want one entry", r)
			}
			got, ok := p.entry(1)
			if !ok {
				t.Fatalf("the faulting agent was not sent the new entry %v", r.Entries[0])
			}
			if got != r.Entries[0] || !got.Mapped() || got.Is(table.NoWrite) {
				t.Errorf("the faulting agent was sent %v, the fault answered %v; want the same writable entry", got, r.Entries[0])
			}
		})
	}
}

func (p *probe) SetMembership(ctx context.Context, m protocol.Membership) error { return nil }
