package e2e

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"segmap/internal/heldport"
	"segmap/internal/loopdev"
)

// TestBlockDeviceContainers adds loop devices as containers as a user
// would: one straight to the controller ('container add /dev/loopN
// --format'), one behind a storage node ('storage --device'). Each is
// refused while it holds ext4 or a container, then formatted with
// --force; a disk spread over both reads as zeros where ext4 was (the
// controller zeroes free slots on the device) and reads back what qemu-io
// wrote.
func TestBlockDeviceContainers(t *testing.T) {
	requireTools(t, "qemu-io", "losetup", "mkfs.ext4")
	if os.Geteuid() != 0 {
		t.Fatal("the block-device test needs root (losetup)")
	}
	const devSize = 64 << 20
	u := startUp(t, t.TempDir())

	dev, _ := loopdev.Attach(t, devSize)
	run(t, 30*time.Second, "mkfs.ext4", "-q", "-F", dev)
	_, errOut, code := u.cliResult("container", "add", dev, "--format", "--slot-size", "256K")
	if code == 0 || !strings.Contains(errOut, "ext2/3/4 file system") || !strings.Contains(errOut, dev) {
		t.Fatalf("container add --format over ext4: exit %d %q; want a refusal naming %s and ext2/3/4", code, errOut, dev)
	}
	// (64 MiB - 1 MiB header) / 256 KiB = 252 slots.
	if out := u.cli("container", "add", dev, "--format", "--slot-size", "256K", "--force"); !strings.Contains(out, "file://"+dev+", 252 slots of 256K") {
		t.Errorf("container add --format --force: %s", out)
	}
	if _, errOut, code := u.cliResult("container", "add", dev, "--format", "--slot-size", "256K"); code == 0 || !strings.Contains(errOut, "segmap container") {
		t.Errorf("container add --format over a container: exit %d %q", code, errOut)
	}

	// A storage node serving a second loop device.
	dev2, _ := loopdev.Attach(t, devSize)
	run(t, 30*time.Second, "mkfs.ext4", "-q", "-F", dev2)
	p := heldport.New(t)
	startHeld(t, t.TempDir(), []*heldport.Port{p}, "storage", "--listen", fdArg(0), "--device", "d2="+dev2, "--insecure")
	uri := "nbd://" + p.Addr() + "/d2"
	if _, errOut, code := u.cliResult("container", "add", uri, "--format", "--slot-size", "256K"); code == 0 || !strings.Contains(errOut, "ext2/3/4 file system") {
		t.Fatalf("container add %s --format over ext4: exit %d %q", uri, code, errOut)
	}
	if out := u.cli("container", "add", uri, "--format", "--slot-size", "256K", "--force"); !strings.Contains(out, "252 slots of 256K") {
		t.Errorf("container add %s --format --force: %s", uri, out)
	}

	// 120 MiB of 256 KiB segments: 480 slots, more than either device
	// holds, so both are used.
	u.cli("disk", "create", "b", "--size", "120M", "--segment-size", "256K")
	run(t, 2*time.Minute, "qemu-io", "-f", "raw", u.uri("b"), "-c", "read -P 0 0 120M", "-c", "write -P 0x5b 0 120M", "-c", "flush")
	run(t, 2*time.Minute, "qemu-io", "-r", "-f", "raw", u.uri("b"), "-c", "read -P 0x5b 0 120M")

	var cs struct {
		Containers []struct {
			URI       string  `json:"uri"`
			UsedSlots string  `json:"used_slots"`
			Allocated *string `json:"allocated_bytes"`
		} `json:"containers"`
	}
	out := u.cli("container", "list", "--json")
	if err := json.Unmarshal([]byte(out), &cs); err != nil {
		t.Fatalf("container list --json: %v\n%s", err, out)
	}
	used := map[string]uint64{}
	for _, c := range cs.Containers {
		used[c.URI] = mustUint(t, c.UsedSlots)
		if (c.URI == "file://"+dev || c.URI == uri) && c.Allocated != nil {
			t.Errorf("container %s: allocated_bytes %s, want it absent (unknown for a device)", c.URI, *c.Allocated)
		}
	}
	if used["file://"+dev]+used[uri] != 480 || used["file://"+dev] == 0 || used[uri] == 0 {
		t.Errorf("used slots %v; want 480 spread over %s and %s", used, dev, uri)
	}
	u.cli("check")
}
