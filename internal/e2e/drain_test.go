package e2e

import (
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// containerList is the JSON of 'segmap container list'.
type containerList struct {
	Containers []struct {
		ID        uint32 `json:"id"`
		URI       string `json:"uri"`
		State     string `json:"state"`
		UsedSlots string `json:"used_slots"`
	} `json:"containers"`
}

// TestContainerDrain empties a container as a user would: data written
// with qemu-io onto a pool of one container, a snapshot, partial writes
// over it; a second container added; 'container remove 1' refused while
// it holds slots; 'container drain 1' while qemu-io writes; every disk
// reads back what it should, check is clean, container 1 is draining
// and empty, and 'container remove 1' removes it.
func TestContainerDrain(t *testing.T) {
	t.Parallel()
	requireTools(t, "qemu-io")
	u := startUp(t, t.TempDir(), "--pool-files", "1")
	u.cli("disk", "create", "d", "--size", "16M") // 1 MiB segments, on container 1
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("d"), "-c", "write -P 1 0 8M", "-c", "flush")
	u.cli("snapshot", "d", "--name", "s")
	// Partial writes into shared segments, and whole ones.
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("d"),
		"-c", "write -P 2 4K 4K", "-c", "write -P 3 1028K 8K", "-c", "write -P 4 2M 1M", "-c", "flush")

	var cs containerList
	u.cliJSON(&cs, "container", "list")
	if len(cs.Containers) != 1 || cs.Containers[0].ID != 1 || cs.Containers[0].State != "online" {
		t.Fatalf("containers before the drain: %+v", cs)
	}
	u.cli("container", "add", filepath.Join(t.TempDir(), "c2"), "--size", "256M")
	if _, errOut, code := u.cliResult("container", "remove", "1"); code == 0 || !strings.Contains(errOut, "holds") || !strings.Contains(errOut, "slots") {
		t.Errorf("remove of a container in use: exit %d %q", code, errOut)
	}

	writer := background(t, "qemu-io", "-f", "raw", u.uri("d"), "-c", "write -P 5 8M 4M", "-c", "write -P 6 12M 64K", "-c", "flush")
	out, errOut, code := u.cliResult("container", "drain", "1", "--progress")
	if code != 0 || !strings.Contains(out, "drained container 1") || !strings.Contains(errOut, "/s") {
		t.Fatalf("drain: exit %d, %q, %q", code, out, errOut)
	}
	if wout, err := writer(); err != nil {
		t.Fatalf("qemu-io during the drain: %v\n%s", err, wout)
	}

	u.cliJSON(&cs, "container", "list")
	for _, c := range cs.Containers {
		if c.ID == 1 && (c.State != "draining" || c.UsedSlots != "0") {
			t.Errorf("container 1 after the drain: %+v", c)
		}
	}
	if out := u.cli("status"); !strings.Contains(out, "draining") {
		t.Errorf("status does not show the draining container:\n%s", out)
	}
	readBack := func() {
		t.Helper()
		run(t, 30*time.Second, "qemu-io", "-r", "-f", "raw", u.uri("d"),
			"-c", "read -P 1 0 4K", "-c", "read -P 2 4K 4K", "-c", "read -P 1 8K 1020K",
			"-c", "read -P 3 1028K 8K", "-c", "read -P 1 1036K 1012K", "-c", "read -P 4 2M 1M",
			"-c", "read -P 1 3M 5M", "-c", "read -P 5 8M 4M", "-c", "read -P 6 12M 64K", "-c", "read -P 0 12352K 3776K")
		run(t, 30*time.Second, "qemu-io", "-r", "-f", "raw", u.uri("s"), "-c", "read -P 1 0 8M", "-c", "read -P 0 8M 8M")
	}
	readBack()
	if out := u.cli("check"); !strings.Contains(out, "check: clean") {
		t.Errorf("check after the drain:\n%s", out)
	}

	if out := u.cli("container", "remove", "1"); !strings.Contains(out, "removed container 1") {
		t.Errorf("remove: %s", out)
	}
	u.cliJSON(&cs, "container", "list")
	if len(cs.Containers) != 1 || cs.Containers[0].ID == 1 {
		t.Errorf("containers after the remove: %+v", cs)
	}
	readBack()
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("d"), "-c", "write -P 7 0 1M", "-c", "read -P 7 0 1M")
}
