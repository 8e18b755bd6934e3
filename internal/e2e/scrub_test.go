package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"segmap/internal/container"
)

// TestCheckScrub: 'segmap check --scrub' through 'segmap up' on a
// mirrored container of two replica files: clean after a host wrote
// through it, a mismatch found (exit 3) once one replica's file is
// scribbled on below the mirror, repaired by --scrub --repair, and clean
// again, with the host's data intact.
func TestCheckScrub(t *testing.T) {
	t.Parallel()
	requireTools(t, "qemu-io")
	u := startUp(t, t.TempDir())
	var cs struct {
		Containers []struct {
			ID uint32 `json:"id"`
		} `json:"containers"`
	}
	u.cliJSON(&cs, "container", "list")
	id := uint32(1)
	for _, c := range cs.Containers {
		id = max(id, c.ID+1)
	}
	dir := t.TempDir()
	r0, r1 := filepath.Join(dir, "r0"), filepath.Join(dir, "r1")
	for _, p := range []string{r0, r1} {
		if err := container.CreateFile(p, id, 64<<10, 256); err != nil {
			t.Fatal(err)
		}
	}
	if out := u.cli("container", "add", "--mirror", r0+","+r1); !strings.Contains(out, "added mirrored container") {
		t.Fatalf("container add --mirror: %s", out)
	}
	u.cli("disk", "create", "m", "--size", "4M", "--segment-size", "64K")
	run(t, time.Minute, "qemu-io", "-f", "raw", u.uri("m"), "-c", "write -P 0x5a 0 4M", "-c", "flush")

	check := func(args ...string) (string, int) {
		t.Helper()
		out, errOut, code := u.cliResult(append([]string{"check", "--scrub"}, args...)...)
		return out + errOut, code
	}
	if out, code := check(); code != 0 || !strings.Contains(out, "scrub: 256 slots compared on 1 mirrored container, 0 mismatches") {
		t.Fatalf("check --scrub of a sound mirror: exit %d\n%s", code, out)
	}
	// With --json, its progress: events polled from the scrub's
	// operation, the last with every slot of the container.
	if _, errOut, code := u.cliResult("check", "--scrub", "--json"); code != 0 {
		t.Fatalf("check --scrub --json: exit %d\n%s", code, errOut)
	} else if last := checkEvents(t, errOut, "scrub", "slots"); *last.Total < 256 {
		t.Errorf("scrub progress ended at %d of %d slots, want the container's (256 used)", *last.Done, *last.Total)
	}

	// Slot 0 is used (the disk's 64 segments fill slots 0 to 63).
	f, err := os.OpenFile(r1, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("scribbled"), container.HeaderSize+4096); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	out, code := check()
	if code != 3 || !strings.Contains(out, "replica-mismatch") || !strings.Contains(out, "first at byte 4096") ||
		!strings.Contains(out, " m ") || !strings.Contains(out, "1 mismatch\n") {
		t.Fatalf("check --scrub of a damaged mirror: exit %d\n%s", code, out)
	}
	out, code = check("--repair")
	if code != 0 || !strings.Contains(out, "scrub: repaired 1 mismatch") || !strings.Contains(out, "rewritten from file://"+r0) ||
		!strings.Contains(out, "1 mismatch, 1 repaired") {
		t.Fatalf("check --scrub --repair: exit %d\n%s", code, out)
	}
	if out, code := check(); code != 0 || !strings.Contains(out, "0 mismatches") {
		t.Fatalf("check --scrub after the repair: exit %d\n%s", code, out)
	}
	run(t, time.Minute, "qemu-io", "-r", "-f", "raw", u.uri("m"), "-c", "read -P 0x5a 0 4M")
}
