package standalone_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"segmap/internal/controller"
	"segmap/internal/standalone"
)

// nbdshHasher is an nbdsh process holding one NBD connection open: each
// line written to it makes it read the whole export and answer the
// sha256 of its bytes.
type nbdshHasher struct {
	in  io.WriteCloser
	out *bufio.Reader
}

const nbdshHashScript = `
import sys, hashlib
for line in sys.stdin:
    size = h.get_size()
    m = hashlib.sha256()
    off = 0
    while off < size:
        n = min(4 << 20, size - off)
        m.update(h.pread(n, off))
        off += n
    print(m.hexdigest(), flush=True)
`

func startNbdshHasher(t *testing.T, uri string) *nbdshHasher {
	t.Helper()
	path, err := exec.LookPath("nbdsh")
	if err != nil {
		if os.Getenv("CI") == "" {
			t.Skip("nbdsh not installed")
		}
		t.Fatalf("nbdsh not installed: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	cmd := exec.CommandContext(ctx, path, "-u", uri, "-c", nbdshHashScript)
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH"))
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		in.Close()
		cmd.Wait()
		cancel()
	})
	return &nbdshHasher{in: in, out: bufio.NewReader(out)}
}

// hash reads the export through the held connection.
func (h *nbdshHasher) hash(t *testing.T) string {
	t.Helper()
	if _, err := io.WriteString(h.in, "hash\n"); err != nil {
		t.Fatal(err)
	}
	line, err := h.out.ReadString('\n')
	if err != nil {
		t.Fatalf("nbdsh: %v", err)
	}
	return strings.TrimSpace(line)
}

// exportHash copies an export with nbdcopy and returns its sha256.
func exportHash(t *testing.T, uri string) string {
	t.Helper()
	cmd := exec.Command("nbdcopy", uri, "-")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	m := sha256.New()
	if _, err := io.Copy(m, out); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("nbdcopy %s: %v", uri, err)
	}
	return hex.EncodeToString(m.Sum(nil))
}

// TestRollbackUnderNBD rolls back a disk that fio was writing (and
// verifying) through one NBD connection, while another connection stays
// open: after the rollback that same connection reads the snapshot's
// data, the snapshot taken after the writes still reads what it held, and
// the store checks clean.
func TestRollbackUnderNBD(t *testing.T) {
	ctx := context.Background()
	const size = 32 << 20
	c, err := standalone.Open(ctx, t.TempDir(), standalone.Options{
		Pool:   []standalone.PoolSpec{{SlotSize: 1 << 20, Slots: 160, Count: 1}},
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "vm", Size: size, SegmentSize: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	addr := serveNBD(t, c)
	uri := func(name string) string { return "nbd://" + addr + "/" + name }
	fio := func(args ...string) {
		t.Helper()
		runTool(t, "fio", append([]string{"--ioengine=nbd", "--uri=" + uri("vm"), "--name=w", "--bs=4k",
			"--size=" + "32M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--iodepth=8"}, args...)...)
	}
	snapshot := func(name string) {
		t.Helper()
		if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"vm"}, Names: []string{name}}); err != nil {
			t.Fatal(err)
		}
	}

	fio("--rw=write", "--randseed=1")
	snapshot("s1")
	s1 := exportHash(t, uri("s1"))

	held := startNbdshHasher(t, uri("vm"))
	if got := held.hash(t); got != s1 {
		t.Fatalf("vm reads %s before the writes, s1 %s", got, s1)
	}
	// The writer, with its verify pass; it stops by itself.
	fio("--rw=randwrite", "--randseed=2", "--time_based", "--runtime=3", "--norandommap")
	snapshot("s2")
	s2 := exportHash(t, uri("s2"))
	if s2 == s1 {
		t.Fatal("fio wrote nothing")
	}
	if got := held.hash(t); got != s2 {
		t.Fatalf("the held connection reads %s after the writes, s2 %s", got, s2)
	}

	if _, err := c.Ctrl.Rollback(ctx, "vm", "s1"); err != nil {
		t.Fatal(err)
	}
	if got := held.hash(t); got != s1 {
		t.Errorf("the held connection reads %s after the rollback, want s1's %s", got, s1)
	}
	if got := exportHash(t, uri("s2")); got != s2 {
		t.Errorf("s2 reads %s after the rollback, want %s", got, s2)
	}
	if got := exportHash(t, uri("vm")); got != s1 {
		t.Errorf("a new connection to vm reads %s, want s1's %s", got, s1)
	}
	ps, err := c.Ctrl.Check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ps {
		t.Errorf("check: %v", p)
	}
}
