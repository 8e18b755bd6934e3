package e2e

import (
	"strings"
	"testing"
	"time"
)

// TestClusterStorageRestart: both storage nodes are killed with SIGKILL
// under fio writing with crc32c verification through an agent, and
// started again on the same addresses and data directories well within
// the failure timeout. The agent's containers reconnect by themselves
// (and log it): a write issued while the nodes are down waits and
// completes once they are back, fio completes and verifies, a flush
// afterwards succeeds (the nodes' machine did not reboot, so the writes
// they answered unflushed survived), and the controller finds the tables
// clean.
func TestClusterStorageRestart(t *testing.T) {
	requireTools(t, "fio", "qemu-io")
	c := newCluster(t, "host-a")
	c.cli("disk", "create", "d", "--size", "256M")
	uri := c.uri("host-a", "d")

	w := background(t, "fio", "--ioengine=nbd", "--uri="+uri, "--name=w", "--rw=randwrite",
		"--bs=64k", "--iodepth=8", "--size=64M", "--verify=crc32c", "--verify_backlog=64", "--loops=4", "--randseed=11")
	// Let fio get going, so that the kill most likely lands among its
	// requests; the probe below is in flight across the outage whatever
	// the timing.
	time.Sleep(2 * time.Second)
	for i := range c.storage {
		c.storage[i].kill()
	}
	// A write and its read-back issued while the storage is down: they
	// cannot complete before it is back. It is away from fio's range.
	t0 := time.Now()
	probe := background(t, "fio", "--ioengine=nbd", "--uri="+uri, "--name=p", "--rw=write",
		"--bs=64k", "--offset=128M", "--size=4M", "--verify=crc32c")
	time.Sleep(2 * time.Second)
	for i := range c.storage {
		c.restartStorage(i)
	}
	out, err := probe()
	paused := time.Since(t0)
	if err != nil || strings.Contains(out, "verify failed") || !strings.Contains(out, "err= 0") {
		t.Fatalf("fio writing while the storage was down: %v\n%s", err, out)
	}
	t.Logf("a write issued while the storage was down completed after %v", paused)
	if paused < 2*time.Second {
		t.Errorf("the write issued while the storage was down completed after %v, before the storage was back", paused)
	}
	out, err = w()
	if err != nil || strings.Contains(out, "verify failed") || !strings.Contains(out, "err= 0") {
		t.Fatalf("fio across the storage restart: %v\n%s", err, out)
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "clat (") || strings.Contains(line, "max=") && strings.Contains(line, "lat") {
			t.Logf("fio: %s", strings.TrimSpace(line))
		}
	}
	// The storage nodes' processes restarted, their machine did not:
	// the writes they answered before the kill are still in the page
	// cache (same boot id), so a flush vouches for them.
	if out := run(t, time.Minute, "qemu-io", "-f", "raw", uri, "-c", "flush"); strings.Contains(out, "failed") {
		t.Errorf("flush after the storage restart:\n%s", out)
	}
	logs := c.agents["host-a"].out.String()
	for _, want := range []string{"container storage connection lost", "container storage connection back"} {
		if !strings.Contains(logs, want) {
			t.Errorf("the agent did not log %q:\n%s", want, logs)
		}
	}
	if strings.Contains(logs, "unreachable beyond the failure timeout") {
		t.Errorf("the restart took longer than the failure timeout:\n%s", logs)
	}
	if out := c.cli("check"); !strings.Contains(out, "clean") || strings.Contains(out, "fails I/O") {
		t.Errorf("check after the storage restart:\n%s", out)
	}
	// Back within the failure timeout: nothing was marked failed.
	if out := c.cli("container", "list"); strings.Contains(out, "failed") {
		t.Errorf("a container was marked failed by a restart within the failure timeout:\n%s", out)
	}
}
