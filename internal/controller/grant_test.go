package controller_test

import (
	"context"
	"slices"
	"testing"

	"segmap/internal/controller"
	"segmap/internal/table"
)

// TestGrantOnly: GrantOnly sets a disk's grants to exactly the agents
// named, none if it names none, and an agent left out that maps the disk
// forgets it first; Grant and Revoke then work from there.
func TestGrantOnly(t *testing.T) {
	c := newCluster(t)
	ctx := context.Background()
	createDisk(t, c, "v", 4, table.Forward)
	grants := func() ([]string, bool) {
		t.Helper()
		gs, all, err := c.Ctrl.Grants(ctx, "v")
		if err != nil {
			t.Fatal(err)
		}
		return gs, all
	}
	if _, all := grants(); !all {
		t.Fatal("a new disk: not open to every agent")
	}
	d := openDisk(t, c, 0, "v")
	write(t, d, pattern(int(seg), 1), 0)
	if err := c.Ctrl.GrantOnly(ctx, "v", nil); err != nil {
		t.Fatal(err)
	}
	if gs, all := grants(); all || len(gs) != 0 {
		t.Fatalf("after GrantOnly(none): %v all=%t, want no agent", gs, all)
	}
	if err := d.WriteAt(ctx, pattern(int(seg), 2), 0, false); err == nil {
		t.Errorf("host-a wrote to a disk taken from it")
	}
	if _, err := c.Agents[1].Open(ctx, "v"); err == nil {
		t.Errorf("host-b opened a disk no agent may map")
	}
	if err := c.Ctrl.GrantOnly(ctx, "v", []string{"host-b"}); err != nil {
		t.Fatal(err)
	}
	if gs, all := grants(); all || !slices.Equal(gs, []string{"host-b"}) {
		t.Fatalf("after GrantOnly(host-b): %v all=%t", gs, all)
	}
	expect(t, openDisk(t, c, 1, "v"), 0, pattern(int(seg), 1))
	if err := c.Ctrl.Revoke(ctx, "v", []string{"host-b"}); err != nil {
		t.Fatal(err)
	}
	if gs, all := grants(); all || len(gs) != 0 {
		t.Fatalf("after revoking the only one: %v all=%t, want no agent (not every agent)", gs, all)
	}
	if err := c.Ctrl.GrantOnly(ctx, "nope", nil); err == nil {
		t.Errorf("GrantOnly of no disk: no error")
	}
}

// TestSnapshotClosed: a copy made Closed may be mapped by no agent, in
// the same step that makes it, where a plain copy inherits its source's
// grants.
func TestSnapshotClosed(t *testing.T) {
	c := newCluster(t)
	ctx := context.Background()
	createDisk(t, c, "v", 4, table.Forward)
	if err := c.Ctrl.GrantOnly(ctx, "v", []string{"host-a"}); err != nil {
		t.Fatal(err)
	}
	for _, o := range []controller.SnapshotOptions{
		{Sources: []string{"v"}, Names: []string{"open"}, Writable: true},
		{Sources: []string{"v"}, Names: []string{"closed"}, Writable: true, Closed: true},
	} {
		if _, err := c.Ctrl.Snapshot(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	if gs, all, err := c.Ctrl.Grants(ctx, "open"); err != nil || all || !slices.Equal(gs, []string{"host-a"}) {
		t.Errorf("a plain clone's grants: %v all=%t %v, want its source's (host-a)", gs, all, err)
	}
	if gs, all, err := c.Ctrl.Grants(ctx, "closed"); err != nil || all || len(gs) != 0 {
		t.Errorf("a closed clone's grants: %v all=%t %v, want no agent", gs, all, err)
	}
	if _, err := c.Agents[0].Open(ctx, "closed"); err == nil {
		t.Errorf("host-a opened a closed clone")
	}
}
