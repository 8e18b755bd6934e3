package controller_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"segmap/internal/controller"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// silentAgent answers every command but get_status, which it never
// answers: it waits for the end of its context, as a cut-off remote agent
// does.
type silentAgent struct{ fakeAgent }

func (*silentAgent) GetStatus(ctx context.Context, _ protocol.DiskID) (protocol.DiskStatus, error) {
	<-ctx.Done()
	return protocol.DiskStatus{}, ctx.Err()
}

// TestAgentStatus: every attached agent is asked about every disk it
// maps; one that does not answer is reported as such after the timeout,
// and the others' answers are not held up by it.
func TestAgentStatus(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	d := createDisk(t, c, "d", 4, table.Forward)
	createDisk(t, c, "e", 2, table.Forward)
	disk := openDisk(t, c, 0, "d")
	if err := disk.WriteAt(ctx, make([]byte, 10), seg, false); err != nil {
		t.Fatal(err)
	}
	openDisk(t, c, 0, "e")
	attachFake(t, c, "silent", &silentAgent{}, "d")

	const timeout = 200 * time.Millisecond
	start := time.Now()
	as, err := c.Ctrl.AgentStatus(ctx, timeout)
	if err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > timeout+2*time.Second {
		t.Errorf("AgentStatus took %v with a %v timeout", took, timeout)
	}
	byName := map[string]controller.AgentStatus{}
	for _, a := range as {
		byName[a.Name] = a
	}
	if len(as) != 3 || len(byName["host-b"].Disks) != 0 {
		t.Fatalf("agents %+v, want host-a, host-b (no disks) and silent", as)
	}
	a := byName["host-a"].Disks
	if len(a) != 2 || a[0].Name != "d" || a[1].Name != "e" {
		t.Fatalf("host-a's disks %+v, want d and e", a)
	}
	for _, ds := range a {
		if ds.Err != nil {
			t.Fatalf("host-a, disk %s: %v", ds.Name, ds.Err)
		}
	}
	want := protocol.DiskStatus{Disk: protocol.DiskID(d.ID), Segments: 4, Loaded: 1, Invalid: 3, Mapped: 1}
	if got := a[0].Status; got != want {
		t.Errorf("host-a's status of d after one write: %+v, want %+v", got, want)
	}
	s := byName["silent"].Disks
	if len(s) != 1 || s[0].Name != "d" || !errors.Is(s[0].Err, protocol.ErrUnavailable) {
		t.Errorf("silent agent's disks %+v, want d with ErrUnavailable", s)
	}
}

func (x *silentAgent) SetMembership(ctx context.Context, m protocol.Membership) error { return nil }
