package e2e

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestCLI covers the admin commands the other tests do not: resize,
// container add (creating a file), check --repair, and --json output.
func TestCLI(t *testing.T) {
	t.Parallel()
	requireTools(t, "qemu-io")
	u := startUp(t, t.TempDir())
	u.cli("disk", "create", "r", "--size", "8M", "--segment-size", "64K")
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("r"), "-c", "write -P 9 0 8M")

	// Grow: the old bytes stay, the new space reads as zeros.
	u.cli("disk", "resize", "r", "--size", "16M")
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("r"), "-c", "read -P 9 0 8M", "-c", "read -P 0 8M 8M")
	// Shrink needs --shrink, then gives the space back.
	if _, errOut, code := u.cliResult("disk", "resize", "r", "--size", "4M"); code == 0 || !strings.Contains(errOut, "shrink") {
		t.Fatalf("shrink without --shrink: exit %d %q", code, errOut)
	}
	u.cli("disk", "resize", "r", "--size", "4M", "--shrink")
	var d diskInfo
	u.cliJSON(&d, "disk", "info", "r")
	if mustUint(t, d.Size) != 4<<20 || mustUint(t, d.Allocated) != 4<<20 {
		t.Errorf("after shrink: size %s allocated %s, want 4 MiB each", d.Size, d.Allocated)
	}
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("r"), "-c", "read -P 9 0 4M")

	// A lineage: snapshot, write, roll back, rename, promote, freeze.
	u.cli("snapshot", "r", "--name", "r-gold")
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("r"), "-c", "write -P 7 0 1M")
	if out := u.cli("disk", "rollback", "r", "--to", "r-gold"); !strings.Contains(out, "rolled back disk r to r-gold") {
		t.Errorf("rollback: %s", out)
	}
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("r"), "-c", "read -P 9 0 4M")
	u.cli("disk", "rename", "r-gold", "gold")
	if out := u.cli("disk", "tree", "gold"); !strings.Contains(out, "r  (writable, 4M)\n└── gold  (snapshot, 4M)\n") {
		t.Errorf("tree:\n%s", out)
	}
	var tree []struct {
		Name     string `json:"name"`
		Children []struct {
			Name     string `json:"name"`
			ReadOnly bool   `json:"read_only"`
		} `json:"children"`
	}
	u.cliJSON(&tree, "disk", "tree", "r")
	if len(tree) != 1 || tree[0].Name != "r" || len(tree[0].Children) != 1 || tree[0].Children[0].Name != "gold" || !tree[0].Children[0].ReadOnly {
		t.Errorf("tree --json: %+v", tree)
	}
	u.cli("disk", "set", "gold", "--read-only=false")
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("gold"), "-c", "write -P 5 0 64K")
	u.cli("disk", "set", "gold", "--read-only=true")
	if _, errOut, code := u.cliResult("disk", "rollback", "r", "--to", "nope"); code == 0 || !strings.Contains(errOut, "not found") {
		t.Errorf("rollback to a missing snapshot: exit %d %q", code, errOut)
	}
	u.cli("disk", "create", "other", "--size", "4M", "--segment-size", "64K")
	u.cli("snapshot", "other", "--name", "other-snap")
	if _, errOut, code := u.cliResult("disk", "rollback", "r", "--to", "other-snap"); code == 0 || !strings.Contains(errOut, "lineage") {
		t.Errorf("rollback to another lineage: exit %d %q", code, errOut)
	}
	// A clone of gold, flattened while online: it stands alone after.
	u.cli("snapshot", "gold", "--name", "g2", "--writable")
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("g2"), "-c", "write -P 4 1M 64K")
	out, errOut, code := u.cliResult("disk", "flatten", "g2", "--progress")
	if code != 0 || !strings.Contains(out, "flattened disk g2 (64 segments)") || !strings.Contains(errOut, "flatten disk g2 [########################] 100%  64/64 segments") {
		t.Errorf("flatten: exit %d, %q, %q", code, out, errOut)
	}
	if out := u.cli("disk", "tree", "g2"); !strings.HasPrefix(out, "g2  (writable, 4M)\n") {
		t.Errorf("tree of a flattened clone:\n%s", out)
	}
	run(t, 30*time.Second, "qemu-io", "-r", "-f", "raw", u.uri("g2"), "-c", "read -P 5 0 64K", "-c", "read -P 4 1M 64K", "-c", "read -P 9 1088K 1M")

	// What a delete gives back: other's own writes since its snapshot.
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("other"), "-c", "write -P 3 0 1M")
	if out := u.cli("disk", "delete", "other", "--dry-run"); !strings.Contains(out, "would free 1M (1048576 bytes)") {
		t.Errorf("delete --dry-run: %s", out)
	}
	if out := u.cli("disk", "delete", "other"); !strings.Contains(out, "freed 1M (1048576 bytes)") {
		t.Errorf("delete: %s", out)
	}
	if _, errOut, code := u.cliResult("disk", "set", "gold"); code == 0 || !strings.Contains(errOut, "read-only") {
		t.Errorf("set without a setting: exit %d %q", code, errOut)
	}
	run(t, 30*time.Second, "qemu-io", "-r", "-f", "raw", u.uri("gold"), "-c", "read -P 5 0 64K", "-c", "read -P 9 64K 1M")

	// Add a container: a new file of 1 GiB in 64 KiB slots.
	path := filepath.Join(t.TempDir(), "extra.ctr")
	out = u.cli("container", "add", path, "--size", "1G", "--slot-size", "64K")
	if !strings.Contains(out, "16384 slots") {
		t.Errorf("container add: %s", out)
	}
	var cs struct {
		Containers []struct {
			URI      string `json:"uri"`
			SlotSize string `json:"slot_size"`
		} `json:"containers"`
	}
	u.cliJSON(&cs, "container", "list")
	found := false
	for _, c := range cs.Containers {
		found = found || c.URI == "file://"+path && c.SlotSize == "65536"
	}
	if !found {
		t.Errorf("container list does not show %s: %+v", path, cs)
	}
	// Adding it twice, or adding a file that is not a container, fails.
	if _, errOut, code := u.cliResult("container", "add", path); code == 0 || !strings.Contains(errOut, "exists") {
		t.Errorf("adding a container twice: exit %d %q", code, errOut)
	}
	if _, errOut, code := u.cliResult("container", "add", "/etc/hostname"); code == 0 || !strings.Contains(errOut, "not a segmap container") {
		t.Errorf("adding a foreign file: exit %d %q", code, errOut)
	}

	// check and check --repair on a sound store.
	var chk struct {
		Problems []json.RawMessage `json:"problems"`
		Repaired []json.RawMessage `json:"repaired"`
	}
	u.cliJSON(&chk, "check", "--repair")
	if len(chk.Problems) != 0 || len(chk.Repaired) != 0 {
		t.Errorf("check --repair on a sound store: %+v", chk)
	}
	if out := u.cli("status"); !strings.Contains(out, "AGENT") || !strings.Contains(out, "local") {
		t.Errorf("status:\n%s", out)
	}
	if out := u.cli("version"); !strings.Contains(out, "segmap") {
		t.Errorf("version: %s", out)
	}
}
