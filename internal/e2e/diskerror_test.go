package e2e

import (
	"strings"
	"testing"
	"time"
)

// TestDiskSetError: `disk set-error` makes a range fail with EIO for a real
// NBD client (qemu-io) while the rest reads and writes; `disk info` and
// `check` name it; `disk clear-errors` makes it read zeros and be
// writable again.
func TestDiskSetError(t *testing.T) {
	t.Parallel()
	requireTools(t, "qemu-io")
	u := startUp(t, t.TempDir())
	u.cli("disk", "create", "d", "--size", "8M", "--segment-size", "1M")
	qio := func(cmds ...string) string {
		args := []string{"-f", "raw", u.uri("d")}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		out, _ := runErr(60*time.Second, "qemu-io", args...)
		return out
	}
	if out := qio("write -P 0x11 0 8M"); strings.Contains(out, "error") {
		t.Fatalf("write: %s", out)
	}
	if out := u.cli("disk", "set-error", "d", "--offset", "2M", "--length", "2M"); !strings.Contains(out, "2097152+2097152") {
		t.Fatalf("set-error: %q", out)
	}
	for _, c := range []string{"read 2M 4k", "read 3M 64k", "write -P 0x22 2M 4k"} {
		if out := qio(c); !strings.Contains(out, "Input/output error") {
			t.Errorf("qemu-io %s in the failing range: %q, want EIO", c, out)
		}
	}
	if out := qio("read -P 0x11 0 2M", "read -P 0x11 4M 4M", "write -P 0x33 5M 4k", "read -P 0x33 5M 4k"); strings.Contains(out, "error") || strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("I/O outside the failing range: %s", out)
	}
	if out := u.cli("disk", "info", "d"); !strings.Contains(out, "failing I/O:  2097152+2097152") {
		t.Errorf("disk info does not show the failing range:\n%s", out)
	}
	if out := u.cli("check"); !strings.Contains(out, "disk d fails I/O on 2M (Error) at 2097152+2097152") || !strings.Contains(out, "clean") {
		t.Errorf("check:\n%s", out)
	}
	if _, errOut, code := u.cliResult("disk", "set-error", "d", "--offset", "1k", "--length", "1M"); code == 0 || !strings.Contains(errOut, "whole segments") {
		t.Errorf("set-error off a segment boundary: exit %d, %q", code, errOut)
	}

	if out := u.cli("disk", "clear-errors", "d"); !strings.Contains(out, "2M of failing segments now read as zeros") {
		t.Fatalf("clear-errors: %q", out)
	}
	if out := qio("read -P 0 2M 2M", "write -P 0x44 2M 2M", "read -P 0x44 2M 2M", "read -P 0x11 0 2M"); strings.Contains(out, "error") || strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("after clear-errors: %s", out)
	}
	if out := u.cli("check"); strings.Contains(out, "fails I/O") || !strings.Contains(out, "clean") {
		t.Errorf("check after clear-errors:\n%s", out)
	}
}
