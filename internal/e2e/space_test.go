package e2e

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"segmap/internal/container"
)

// spaceStatus is the JSON of 'segmap status' for the space figures.
type spaceStatus struct {
	UsedBytes          string `json:"used_bytes"`
	AllocatedBytes     string `json:"allocated_bytes"`
	AllocatedUnknown   int    `json:"allocated_unknown"`
	SnapshotsHoldBytes string `json:"snapshots_hold_bytes"`
	Containers         []struct {
		URI            string  `json:"uri"`
		AllocatedBytes *string `json:"allocated_bytes"`
	} `json:"containers"`
}

// spaceDisk is a disk of 'segmap disk list --json' with its space figures.
type spaceDisk struct {
	diskInfo
	SnapshotsHold string `json:"snapshots_hold"`
}

// TestCLISpace: status and disk list say what the container files hold on
// storage (checked against stat of each file) and what the snapshots
// hold, and deleting the snapshot gives that space back.
func TestCLISpace(t *testing.T) {
	t.Parallel()
	requireTools(t, "qemu-io")
	u := startUp(t, t.TempDir())
	const seg = 64 << 10
	u.cli("disk", "create", "s", "--size", "8M", "--segment-size", "64K")
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("s"), "-c", "write -P 1 0 4M")

	// status: the allocated bytes are the sum of what stat says of every
	// container file, and each container's figure is its file's.
	status := func(what string) spaceStatus {
		t.Helper()
		var st spaceStatus
		u.cliJSON(&st, "status")
		var sum uint64
		for _, c := range st.Containers {
			path, err := container.FilePath(c.URI)
			if err != nil {
				t.Fatal(err)
			}
			var fi syscall.Stat_t
			if err := syscall.Stat(path, &fi); err != nil {
				t.Fatal(err)
			}
			want := uint64(fi.Blocks) * 512
			if c.AllocatedBytes == nil || mustUint(t, *c.AllocatedBytes) != want {
				t.Errorf("%s: container %s: allocated_bytes %v, stat says %d", what, path, c.AllocatedBytes, want)
			}
			sum += want
		}
		if len(st.Containers) == 0 || st.AllocatedUnknown != 0 || mustUint(t, st.AllocatedBytes) != sum {
			t.Errorf("%s: status allocated_bytes %s (%d unknown) over %d containers, stat says %d in all",
				what, st.AllocatedBytes, st.AllocatedUnknown, len(st.Containers), sum)
		}
		return st
	}
	disks := func() map[string]spaceDisk {
		t.Helper()
		var r struct {
			Disks []spaceDisk `json:"disks"`
		}
		u.cliJSON(&r, "disk", "list")
		m := map[string]spaceDisk{}
		for _, d := range r.Disks {
			m[d.Name] = d
		}
		return m
	}

	st := status("written")
	if got := mustUint(t, st.UsedBytes); got != 64*seg {
		t.Errorf("4 MiB written in 64 KiB segments: used_bytes %d, want %d", got, 64*seg)
	}
	if got := mustUint(t, st.SnapshotsHoldBytes); got != 0 {
		t.Errorf("no snapshot: snapshots_hold_bytes %d", got)
	}
	before := mustUint(t, st.AllocatedBytes)
	if before < 64*seg {
		t.Errorf("4 MiB written, yet the containers hold %d bytes", before)
	}

	// A snapshot, then 1 MiB of the disk written again: 16 segments move
	// to new slots and their old ones are the snapshot's alone.
	u.cli("snapshot", "s", "--name", "s@1")
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("s"), "-c", "write -P 2 0 1M")
	st = status("snapshot and a write")
	if got := mustUint(t, st.SnapshotsHoldBytes); got != 16*seg {
		t.Errorf("snapshots_hold_bytes %d, want %d", got, 16*seg)
	}
	if got := mustUint(t, st.UsedBytes); got != 80*seg {
		t.Errorf("used_bytes %d, want %d", got, 80*seg)
	}
	held := mustUint(t, st.AllocatedBytes)
	if held < before+16*seg {
		t.Errorf("16 segments copied, yet the containers went from %d to %d bytes", before, held)
	}
	ds := disks()
	if d := ds["s"]; mustUint(t, d.SnapshotsHold) != 16*seg || mustUint(t, d.Exclusive) != 16*seg || mustUint(t, d.Shared) != 48*seg {
		t.Errorf("disk s: snapshots_hold %s exclusive %s shared %s, want %d %d %d", d.SnapshotsHold, d.Exclusive, d.Shared, 16*seg, 16*seg, 48*seg)
	}
	if d := ds["s@1"]; !d.ReadOnly || mustUint(t, d.SnapshotsHold) != 0 || mustUint(t, d.Exclusive) != 16*seg {
		t.Errorf("snapshot s@1: read_only %v snapshots_hold %s exclusive %s, want true, 0, %d", d.ReadOnly, d.SnapshotsHold, d.Exclusive, 16*seg)
	}
	out := u.cli("disk", "list")
	lines := strings.Split(out, "\n")
	if !strings.Contains(lines[0], "HELD-BY-SNAPS") {
		t.Errorf("disk list header: %q", lines[0])
	}
	for _, l := range lines[1:] {
		f := strings.Fields(l)
		switch {
		case len(f) > 0 && f[0] == "s" && f[8] != "1M":
			t.Errorf("disk list: s holds %q in snapshots, want 1M:\n%s", f[8], out)
		case len(f) > 0 && f[0] == "s@1" && f[8] != "-":
			t.Errorf("disk list: snapshot s@1 shows %q in HELD-BY-SNAPS, want -:\n%s", f[8], out)
		}
	}
	if out := u.cli("status"); !strings.Contains(out, "held by snapshots: 1M (1048576 bytes)") || !strings.Contains(out, "on storage: ") {
		t.Errorf("status:\n%s", out)
	}

	// Deleting the snapshot gives its slots back, on storage too.
	u.cli("disk", "delete", "s@1")
	st = status("snapshot deleted")
	if got := mustUint(t, st.SnapshotsHoldBytes); got != 0 {
		t.Errorf("snapshot deleted: snapshots_hold_bytes %d", got)
	}
	if got := mustUint(t, st.UsedBytes); got != 64*seg {
		t.Errorf("snapshot deleted: used_bytes %d, want %d", got, 64*seg)
	}
	if got := mustUint(t, st.AllocatedBytes); got > held-16*seg {
		t.Errorf("snapshot deleted: the containers hold %d bytes, want at most %d", got, held-16*seg)
	}
	if d := disks()["s"]; mustUint(t, d.SnapshotsHold) != 0 || mustUint(t, d.Exclusive) != 64*seg {
		t.Errorf("snapshot deleted: disk s: snapshots_hold %s exclusive %s, want 0 and %d", d.SnapshotsHold, d.Exclusive, 64*seg)
	}
}
