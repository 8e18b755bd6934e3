package e2e

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"segmap/internal/loopdev"
)

// TestClusterDrainLoopDevice empties a block device under running hosts,
// with real processes throughout: a disk spread over a file container and
// a loop device behind a storage node ('storage --device'), both holding
// its slots; snapshots of it; fio writing with crc32c verification
// through two agents while 'container drain' moves every slot off the
// loop device and 'container remove' removes it. fio verifies, the
// snapshots hash as they did before the drain, a region written before
// it verifies through the other agent, check is clean, and the loop
// device holds no slot: its container is gone from the list, and
// everything reads back with its storage node killed.
func TestClusterDrainLoopDevice(t *testing.T) {
	requireTools(t, "fio", "nbdcopy", "qemu-io", "losetup")
	if os.Geteuid() != 0 {
		t.Fatal("the block-device test needs root (losetup)")
	}
	c := newClusterOf(t, 0, nil, nil, "host-a", "host-b")
	// 256 slots of 1 MiB in a file: room for everything after the
	// drain. 63 on the loop device (64 MiB less the 1 MiB header).
	c.cli("container", "add", filepath.Join(c.dir, "file.ctr"), "--size", "256M", "--slot-size", "1M")
	dev, _ := loopdev.Attach(t, 64<<20)
	loopDir := t.TempDir()
	addr := c.startStorage("loop", loopDir, "--device", "loop="+dev)
	loopURI := "nbd://" + addr + "/loop"
	c.cli("container", "add", loopURI, "--format", "--slot-size", "1M")

	var cs containerList
	ids := func() (file, loop uint32) {
		t.Helper()
		c.cliJSON(&cs, "container", "list")
		for _, ct := range cs.Containers {
			if ct.URI == loopURI {
				loop = ct.ID
			} else {
				file = ct.ID
			}
		}
		return file, loop
	}
	used := func(id uint32) uint64 {
		t.Helper()
		c.cliJSON(&cs, "container", "list")
		for _, ct := range cs.Containers {
			if ct.ID == id {
				return mustUint(t, ct.UsedSlots)
			}
		}
		t.Fatalf("no container %d: %+v", id, cs)
		return 0
	}
	fileID, loopID := ids()

	// Fill the disk: slots are spread round-robin over both containers.
	// The upper half is written by fio, to be verified after the drain.
	c.cli("disk", "create", "d", "--size", "64M")
	run(t, time.Minute, "qemu-io", "-f", "raw", c.uri("host-a", "d"), "-c", "write -P 0x11 0 32M", "-c", "flush")
	fill := []string{"--name=fill", "--rw=write", "--bs=1M", "--offset=32M", "--size=32M",
		"--verify=crc32c", "--randseed=5"}
	fioURI(t, c.uri("host-b", "d"), fill...)
	if f, l := used(fileID), used(loopID); f == 0 || l == 0 || f+l != 64 {
		t.Fatalf("used slots: file %d, loop device %d; want 64 spread over both", f, l)
	}

	hashOf := func(agent, disk string) string {
		t.Helper()
		p := filepath.Join(t.TempDir(), "img")
		run(t, 2*time.Minute, "nbdcopy", c.uri(agent, disk), p)
		h := sha(t, p)
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
		return h
	}
	c.cli("snapshot", "d", "--name", "d@1")
	hashes := map[string]string{"d@1": hashOf("host-a", "d@1")}

	// Two writers, one per agent, on the lower half, going on until they
	// are stopped once the loop device is removed; each block is read
	// back and verified 64 blocks after it was written.
	writer := func(agent, offset string, seed int) (func() (string, error), *os.Process) {
		w, _, p := backgroundProc(t, "fio", "--ioengine=nbd", "--uri="+c.uri(agent, "d"), "--name=w", "--rw=randwrite",
			"--bs=16k", "--iodepth=8", "--offset="+offset, "--size=16M", "--verify=crc32c", "--verify_backlog=64",
			"--loops=100000", "--runtime=300", fmt.Sprintf("--randseed=%d", seed))
		return w, p
	}
	waitA, procA := writer("host-a", "0", 21)
	waitB, procB := writer("host-b", "16M", 22)
	// The writers are writing once the disk has slots of its own again
	// (copied on write away from the snapshot's).
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		var di diskInfo
		c.cliJSON(&di, "disk", "info", "d")
		if mustUint(t, di.Exclusive) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("fio wrote nothing in a minute")
		}
	}
	c.cli("snapshot", "d", "--name", "d@2")
	hashes["d@2"] = hashOf("host-a", "d@2")

	before := used(loopID)
	t0 := time.Now()
	out := c.cli("container", "drain", fmt.Sprint(loopID))
	took := time.Since(t0)
	var moved int
	if _, err := fmt.Sscanf(out, "drained container %d: %d slots moved", new(int), &moved); err != nil {
		t.Fatalf("drain: %q: %v", out, err)
	}
	t.Logf("drain: %d slots (%d MiB) moved in %v, %.1f MiB/s, under two fio writers; segmap says: %s",
		moved, moved, took.Round(time.Millisecond), float64(moved)/took.Seconds(), strings.TrimSpace(out))
	for _, line := range strings.Split(c.ctl.out.String(), "\n") {
		if strings.Contains(line, "container drained") {
			t.Logf("controller: %s", line)
		}
	}
	if uint64(moved) < before {
		t.Errorf("the drain moved %d slots; the loop device held %d before it", moved, before)
	}
	c.cliJSON(&cs, "container", "list")
	for _, ct := range cs.Containers {
		if ct.ID == loopID && (ct.State != "draining" || ct.UsedSlots != "0") {
			t.Errorf("the loop device's container after the drain: %+v", ct)
		}
	}
	if out := c.cli("container", "remove", fmt.Sprint(loopID)); !strings.Contains(out, fmt.Sprintf("removed container %d", loopID)) {
		t.Errorf("remove: %s", out)
	}

	// Stop the writers: fio stops at once on SIGINT, reports and exits
	// with status 128. Every block it wrote, but the last 64, has been
	// verified.
	for _, p := range []*os.Process{procA, procB} {
		if err := p.Signal(syscall.SIGINT); err != nil {
			t.Fatalf("stop fio: %v (it ended before the remove)", err)
		}
	}
	for name, w := range map[string]func() (string, error){"host-a": waitA, "host-b": waitB} {
		out, err := w()
		var ee *exec.ExitError
		stopped := errors.As(err, &ee) && ee.ExitCode() == 128 && strings.Contains(out, "terminating on signal")
		// "issued rwts: total=R,W,...": R blocks read back and verified.
		var verified, written int
		if i := strings.Index(out, "issued rwts: total="); i >= 0 {
			fmt.Sscanf(out[i:], "issued rwts: total=%d,%d", &verified, &written)
		}
		if err != nil && !stopped || strings.Contains(out, "verify failed") || !strings.Contains(out, " err= 0") || verified == 0 {
			t.Fatalf("fio through %s across the drain: %v\n%s", name, err, out)
		}
		t.Logf("fio through %s: %d blocks of 16 KiB written, %d verified", name, written, verified)
		for _, line := range strings.Split(out, "\n") {
			if l := strings.TrimSpace(line); strings.HasPrefix(l, "write:") || strings.HasPrefix(l, "clat (") {
				t.Logf("fio through %s: %s", name, l)
			}
		}
	}

	// Nothing is left on the loop device: everything reads back with its
	// storage node gone.
	c.storage[0].kill()
	c.cliJSON(&cs, "container", "list")
	if len(cs.Containers) != 1 || cs.Containers[0].ID != fileID || cs.Containers[0].State != "online" {
		t.Errorf("containers after the remove: %+v", cs)
	}
	fioURI(t, c.uri("host-a", "d"), append(fill, "--verify_only=1")...)
	for snap, want := range hashes {
		if got := hashOf("host-b", snap); got != want {
			t.Errorf("snapshot %s reads differently after the drain", snap)
		}
	}
	if out := c.cli("check"); !strings.Contains(out, "check: clean") {
		t.Errorf("check after the drain:\n%s", out)
	}
	run(t, time.Minute, "qemu-io", "-f", "raw", c.uri("host-b", "d"), "-c", "write -P 0x22 0 4M", "-c", "read -P 0x22 0 4M")
}
