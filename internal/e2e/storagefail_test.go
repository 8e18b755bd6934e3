package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"segmap/internal/nbd/nbdclient"
)

// TestClusterStorageFails: the storage node of one container is killed
// and stays down while a host reads the whole disk through an agent. Within
// the failure timeout the segments on it fail with EIO, no read waits
// longer than the timeout plus a second, and the others read right; the
// container shows failed and disk info lists the failing extents. The node
// restarts and 'container online' brings the data back intact. Killed
// again, the container is given up: 'disk clear-errors' makes the disk
// read zeros there, and it takes writes again.
func TestClusterStorageFails(t *testing.T) {
	requireTools(t, "qemu-io")
	const timeout = 3 * time.Second
	c := newClusterWith(t, []string{"--storage-timeout", timeout.String()}, []string{"--storage-timeout", timeout.String()}, "host-a", "host-b")
	const segs = 32
	c.cli("disk", "create", "d", "--size", "32M", "--segment-size", "1M")
	if out := run(t, time.Minute, "qemu-io", "-f", "raw", c.uri("host-a", "d"), "-c", "write -P 0x5a 0 32M"); strings.Contains(out, "error") {
		t.Fatalf("write: %s", out)
	}
	want := bytes.Repeat([]byte{0x5a}, 4096)
	addr, export, err := nbdclient.ParseURI(c.uri("host-b", "d"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	cl, err := nbdclient.Dial(ctx, addr, export, nbdclient.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	// pass reads 4 KiB of every segment, and returns the segments that
	// failed with EIO and the longest read.
	pass := func() (failed []int, longest time.Duration) {
		buf := make([]byte, 4096)
		for s := range segs {
			t0 := time.Now()
			err := cl.ReadAt(ctx, buf, uint64(s)<<20)
			longest = max(longest, time.Since(t0))
			switch {
			case errors.Is(err, nbdclient.ErrEIO):
				failed = append(failed, s)
			case err != nil:
				t.Fatalf("read of segment %d: %v", s, err)
			case !bytes.Equal(buf, want):
				t.Fatalf("segment %d reads %x..., want 5a", s, buf[:4])
			}
		}
		return failed, longest
	}
	if failed, _ := pass(); len(failed) > 0 {
		t.Fatalf("segments %v fail before any failure", failed)
	}
	containerState := func(id uint32) string {
		var r struct {
			Containers []struct {
				ID    uint32 `json:"id"`
				State string `json:"state"`
			} `json:"containers"`
		}
		if err := json.Unmarshal([]byte(c.cli("container", "list", "--json")), &r); err != nil {
			t.Fatal(err)
		}
		for _, ct := range r.Containers {
			if ct.ID == id {
				return ct.State
			}
		}
		return "gone"
	}

	for round, giveUp := range []bool{false, true} {
		c.storage[0].kill()
		killed := time.Now()
		var failed []int
		var longest time.Duration
		for {
			f, l := pass()
			longest = max(longest, l)
			if len(f) > 0 && containerState(1) == "failed" {
				failed = f
				break
			}
			if time.Since(killed) > 4*timeout+10*time.Second {
				t.Fatalf("round %d: container 1 is %s and segments %v fail %v after the kill", round, containerState(1), f, time.Since(killed))
			}
		}
		t.Logf("round %d: container 1 failed %v after the kill; segments on it %v; longest read %v", round, time.Since(killed).Round(time.Millisecond), failed, longest.Round(time.Millisecond))
		if longest > timeout+time.Second {
			t.Errorf("round %d: a read waited %v, more than the failure timeout %v plus a second", round, longest, timeout)
		}
		if len(failed) == segs {
			t.Fatalf("round %d: every segment fails; the other container's should read", round)
		}
		// Now the failing segments fail at once.
		if f, l := pass(); len(f) != len(failed) || l > time.Second {
			t.Errorf("round %d: a pass once failed: segments %v fail (want %v), longest read %v", round, f, failed, l)
		}
		// Writes elsewhere go on (the same bytes: the pattern stays),
		// and writes to the failing segments fail at once.
		bad := map[int]bool{}
		for _, s := range failed {
			bad[s] = true
		}
		for s := range segs {
			t0 := time.Now()
			err := cl.WriteAt(ctx, want, uint64(s)<<20+8192, false)
			if took := time.Since(t0); took > time.Second {
				t.Errorf("round %d: a write to segment %d took %v", round, s, took)
			}
			if bad[s] != errors.Is(err, nbdclient.ErrEIO) || !bad[s] && err != nil {
				t.Errorf("round %d: write to segment %d (failing: %v): %v", round, s, bad[s], err)
			}
		}
		if out := c.cli("disk", "info", "d"); !strings.Contains(out, "failing I/O:") {
			t.Errorf("round %d: disk info does not list the failing extents:\n%s", round, out)
		}
		if out := c.cli("check"); !strings.Contains(out, "disk d fails I/O") {
			t.Errorf("round %d: check does not list disk d:\n%s", round, out)
		}
		if !giveUp {
			c.restartStorage(0)
			// Back before the lost segments are given up: the data
			// is there.
			deadline := time.Now().Add(time.Minute)
			for {
				_, errOut, code := runBin(t, "--controller", c.ctlAddr, "--certs", c.certs, "container", "online", "1")
				if code == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("container online 1: %s", errOut)
				}
				time.Sleep(200 * time.Millisecond)
			}
			// The agents' own connections to the node come back
			// within a reconnection step (at most 2 s).
			onlined := time.Now()
			for {
				f, _ := pass()
				if len(f) == 0 {
					break
				}
				if time.Since(onlined) > 10*time.Second {
					t.Fatalf("segments %v still fail %v after container online", f, time.Since(onlined))
				}
				time.Sleep(100 * time.Millisecond)
			}
			t.Logf("round %d: every segment reads its data %v after container online", round, time.Since(onlined).Round(time.Millisecond))
			continue
		}
		if out := c.cli("disk", "clear-errors", "d"); !strings.Contains(out, "now read as zeros") {
			t.Fatalf("clear-errors: %s", out)
		}
		buf := make([]byte, 1<<20)
		for _, s := range failed {
			if err := cl.ReadAt(ctx, buf, uint64(s)<<20); err != nil || !bytes.Equal(buf, make([]byte, 1<<20)) {
				t.Fatalf("segment %d after clear-errors: %v, want zeros", s, err)
			}
			if err := cl.WriteAt(ctx, bytes.Repeat([]byte{0x77}, 1<<20), uint64(s)<<20, true); err != nil {
				t.Fatalf("write to segment %d after clear-errors: %v", s, err)
			}
			if err := cl.ReadAt(ctx, buf, uint64(s)<<20); err != nil || buf[0] != 0x77 || buf[len(buf)-1] != 0x77 {
				t.Fatalf("segment %d after a write: %v", s, err)
			}
		}
		if out := c.cli("check"); strings.Contains(out, "fails I/O") || !strings.Contains(out, "clean") {
			t.Errorf("check after clear-errors:\n%s", out)
		}
	}
}
