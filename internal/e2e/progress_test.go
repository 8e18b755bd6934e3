package e2e

import (
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// progressEvent is a --json progress event (docs/progress.md).
type progressEvent struct {
	Op      string   `json:"op"`
	Target  string   `json:"target"`
	Unit    string   `json:"unit"`
	Done    *uint64  `json:"done"`
	Total   *uint64  `json:"total"`
	Percent *float64 `json:"percent"`
	Rate    *float64 `json:"rate"`
	Final   bool     `json:"final"`
	Error   string   `json:"error"`
}

// operationInfo is an operation of 'segmap operations --json'.
type operationInfo struct {
	ID     string `json:"id"` // protojson writes uint64 as a string
	Kind   string `json:"kind"`
	Target string `json:"target"`
	Done   string `json:"done"`
	Total  string `json:"total"`
	Unit   string `json:"unit"`
	State  string `json:"state"`
	Error  string `json:"error"`
}

// checkEvents parses a command's standard error as --json progress
// events of op and checks them: every line valid JSON, done never going
// down, one final event last, with done == total.
func checkEvents(t *testing.T, stderr, op, unit string) progressEvent {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	var last progressEvent
	var prev uint64
	for i, l := range lines {
		var e progressEvent
		if err := json.Unmarshal([]byte(l), &e); err != nil {
			t.Fatalf("%s: line %d of standard error is not JSON: %v\n%s", op, i+1, err, stderr)
		}
		if e.Op != op || e.Unit != unit || e.Done == nil || e.Total == nil || e.Rate == nil {
			t.Fatalf("%s: event %q: want op %s, unit %s, done, total and rate", op, l, op, unit)
		}
		if *e.Done < prev {
			t.Errorf("%s: done went from %d down to %d", op, prev, *e.Done)
		}
		prev = *e.Done
		if e.Final != (i == len(lines)-1) {
			t.Errorf("%s: event %d of %d has final %v", op, i+1, len(lines), e.Final)
		}
		last = e
	}
	if *last.Done != *last.Total || *last.Total == 0 || last.Error != "" {
		t.Errorf("%s: final event done %d, total %d, error %q: want done == total > 0", op, *last.Done, *last.Total, last.Error)
	}
	return last
}

// TestProgress runs long operations through the CLI as a script would:
// an export of a snapshot of a 256 MiB disk and a drain, with --json. Their
// progress events are valid JSON lines, done never goes down and the last
// has done == total; 'segmap operations' shows the export running while
// it runs and done, with every byte counted, afterwards; on a pipe
// without --json nothing is written, and --progress forces the bar.
func TestProgress(t *testing.T) {
	t.Parallel()
	requireTools(t, "qemu-io")
	u := startUp(t, t.TempDir())
	dir := t.TempDir()
	write := func(disk, size string) {
		t.Helper()
		u.cli("disk", "create", disk, "--size", "256M", "--segment-size", "64K")
		if out := run(t, 60*time.Second, "qemu-io", "-f", "raw", u.uri(disk), "-c", "write -P 0x5a 0 "+size); strings.Contains(out, "error") {
			t.Fatalf("qemu-io:\n%s", out)
		}
		u.cli("snapshot", disk, "--name", disk+"@s")
	}
	// More than the bytes gRPC and a pipe buffer hold.
	write("big", "64M")

	ops := func() []operationInfo {
		t.Helper()
		var r struct {
			Operations []operationInfo `json:"operations"`
		}
		u.cliJSON(&r, "operations")
		return r.Operations
	}
	if got := ops(); len(got) != 0 {
		t.Fatalf("operations before any: %+v", got)
	}

	// The export, watched from another client while it runs: its
	// standard output is a pipe the test reads only once the listing
	// has shown it running, so it cannot end before (flow control holds
	// the controller's sends).
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--controller", u.admin, "export", "big@s", "--json")
	var errOut syncBuffer
	cmd.Stdout, cmd.Stderr = pw, &errOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	t.Cleanup(func() { cmd.Process.Kill() })
	seen := false
	for deadline := time.Now().Add(15 * time.Second); !seen && time.Now().Before(deadline); {
		for _, o := range ops() {
			if o.Kind == "export" && o.State == "running" {
				if o.Target != "big@s" || o.Unit != "bytes" {
					t.Errorf("running export listed as %+v", o)
				}
				seen = true
			}
		}
	}
	if !seen {
		t.Error("segmap operations never showed the export running")
	}
	n, err := io.Copy(io.Discard, pr)
	if err != nil {
		t.Fatal(err)
	}
	pr.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("export: %v\n%s", err, errOut.String())
	}
	out := errOut.String()
	last := checkEvents(t, out, "export", "bytes")
	if *last.Total != uint64(n) || n < 64<<20 {
		t.Errorf("export counted %d bytes, wrote %d of a snapshot holding 64 MiB", *last.Total, n)
	}
	var exp *operationInfo
	for _, o := range ops() {
		if o.Kind == "export" {
			exp = &o
		}
	}
	if exp == nil || exp.State != "done" || exp.Done != strconv.FormatUint(*last.Done, 10) || exp.Total != exp.Done {
		t.Errorf("export listed after its end as %+v; want done, with the %d bytes the client got", exp, *last.Done)
	}
	if table := u.cli("ops"); !strings.Contains(table, "export") || !strings.Contains(table, "done") || !strings.Contains(table, "(100%)") {
		t.Errorf("segmap ops:\n%s", table)
	}

	// A drain of the container that holds most of it, with --json.
	var cs struct {
		Containers []struct {
			ID        int    `json:"id"`
			SlotSize  string `json:"slot_size"`
			UsedSlots string `json:"used_slots"`
		} `json:"containers"`
	}
	u.cliJSON(&cs, "container", "list")
	id, most := 0, 0
	for _, c := range cs.Containers {
		if n, _ := strconv.Atoi(c.UsedSlots); c.SlotSize == "65536" && n > most {
			id, most = c.ID, n
		}
	}
	if most == 0 {
		t.Fatalf("no 64K container holds a slot: %+v", cs)
	}
	stdout, stderr, code := u.cliResult("container", "drain", strconv.Itoa(id), "--json")
	if code != 0 {
		t.Fatalf("drain: exit %d\n%s%s", code, stdout, stderr)
	}
	if last := checkEvents(t, stderr, "drain", "slots"); *last.Total != uint64(most) {
		t.Errorf("drain moved %d slots, container %d held %d", *last.Total, id, most)
	}
	if got := ops(); len(got) != 2 || got[1].Kind != "drain" || got[1].State != "done" || got[1].Target != "container "+strconv.Itoa(id) {
		t.Errorf("operations after the drain: %+v", got)
	}

	// On a pipe without --json: nothing but the result. --progress: the
	// bar, redrawn in place.
	write("small", "4M")
	_, stderr, code = u.cliResult("export", "small@s", "-o", filepath.Join(dir, "s2.stream"))
	if code != 0 || stderr != "" {
		t.Errorf("export on a pipe: exit %d, standard error %q, want nothing", code, stderr)
	}
	_, stderr, code = u.cliResult("export", "small@s", "-o", filepath.Join(dir, "s3.stream"), "--progress")
	if code != 0 || !strings.Contains(stderr, "\r\x1b[Kexport small@s [") || !strings.HasSuffix(stderr, "\n") || !strings.Contains(stderr, "100%") {
		t.Errorf("export --progress: exit %d, standard error %q, want a bar ending at 100%%", code, stderr)
	}
	if _, stderr, code = u.cliResult("export", "small@s", "-o", filepath.Join(dir, "s4.stream"), "--progress", "--no-progress"); code != 2 {
		t.Errorf("--progress --no-progress: exit %d (%s), want 2", code, stderr)
	}
}
