package standalone_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"segmap/internal/controller"
	"segmap/internal/nbd/nbdclient"
	"segmap/internal/standalone"
)

// nbdshIncremental is an incremental backup by a libnbd client: it reads
// the segmap:changed:$BASE context of $URI and copies the extents marked
// changed into $FILE (a copy of BASE); it prints the bytes it copied.
const nbdshIncremental = `
import os
ctxname = "segmap:changed:" + os.environ["BASE"]
h.add_meta_context(ctxname)
h.connect_uri(os.environ["URI"])
assert h.can_meta_context(ctxname), "context not negotiated"
size = h.get_size()
exts = []
covered = [0]
def cb(metacontext, offset, entries, err):
    if metacontext != ctxname:
        return 0
    o = offset
    for i in range(0, len(entries), 2):
        if entries[i + 1] & 1:
            exts.append((o, entries[i]))
        o += entries[i]
    covered[0] = o
    return 0
off = 0
while off < size:
    h.block_status(min(size - off, 1 << 30), off, cb)
    assert covered[0] > off, "no progress"
    off = covered[0]
copied = 0
with open(os.environ["FILE"], "r+b") as f:
    for o, n in exts:
        while n > 0:
            m = min(n, 16 << 20)
            f.seek(o)
            f.write(h.pread(m, o))
            o += m
            n -= m
            copied += m
print(copied, flush=True)
`

func fileHash(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m := sha256.New()
	if _, err := io.Copy(m, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(m.Sum(nil))
}

// TestChangedContextBackup backs a disk up incrementally over NBD: a full
// copy of its first snapshot by nbdcopy, then, after writes, trims and a
// second snapshot, an nbdsh (libnbd) client that asks the live disk's
// segmap:changed:s1 context which extents changed and copies only those
// into the copy. The copy then equals the disk, and what was copied is
// about what was written.
func TestChangedContextBackup(t *testing.T) {
	ctx := context.Background()
	const (
		seg  = 1 << 20
		size = 64 << 20
	)
	c, err := standalone.Open(ctx, t.TempDir(), standalone.Options{
		Pool:   []standalone.PoolSpec{{SlotSize: seg, Slots: 200, Count: 1}},
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "vm", Size: size, SegmentSize: seg}); err != nil {
		t.Fatal(err)
	}
	addr := serveNBD(t, c)
	cl, err := nbdclient.Dial(ctx, addr, "vm", nbdclient.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	write := func(off uint64, n int, seed byte) {
		t.Helper()
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(i*7) ^ seed | 1
		}
		if err := cl.WriteAt(ctx, p, off, false); err != nil {
			t.Fatal(err)
		}
	}
	write(0, 48<<20, 1) // most of the disk
	if err := cl.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"vm"}, Names: []string{"s1"}}); err != nil {
		t.Fatal(err)
	}
	uri := func(name string) string { return "nbd://" + addr + "/" + name }
	backup := filepath.Join(t.TempDir(), "backup.img")
	runTool(t, "nbdcopy", uri("s1"), backup)

	// Small writes into shared segments, a whole segment, and a trim.
	written := 0
	for i, off := range []uint64{5*seg + 8192, 17*seg + 100<<10, 30*seg + seg - 4096} {
		write(off, 4096, byte(10+i))
		written += 4096
	}
	write(40*seg, seg, 20)
	written += seg
	if err := cl.Trim(ctx, 44*seg, 2*seg); err != nil {
		t.Fatal(err)
	}
	written += 2 * seg
	if err := cl.Flush(ctx); err != nil {
		t.Fatal(err)
	}

	// nbdinfo shows the context too: the trimmed and the rewritten
	// segments changed whole, the small writes by their 4 KiB.
	var m []struct {
		Offset uint64 `json:"offset"`
		Length uint64 `json:"length"`
		Type   uint32 `json:"type"`
	}
	if err := json.Unmarshal([]byte(runTool(t, "nbdinfo", "--map=segmap:changed:s1", "--json", uri("vm"))), &m); err != nil {
		t.Fatal(err)
	}
	var changed []string
	for _, e := range m {
		if e.Type&1 != 0 {
			changed = append(changed, fmt.Sprintf("%d+%d", e.Offset, e.Length))
		}
	}
	wantMap := []string{
		fmt.Sprint(5*seg+8192, "+4096"), fmt.Sprint(17*seg+100<<10, "+4096"), fmt.Sprint(30*seg+seg-4096, "+4096"),
		fmt.Sprint(40*seg, "+", seg), fmt.Sprint(44*seg, "+", 2*seg),
	}
	if !slices.Equal(changed, wantMap) {
		t.Errorf("nbdinfo --map=segmap:changed:s1: %v, want %v", changed, wantMap)
	}
	// A snapshot of another lineage is no context: nbdinfo fails.
	if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "other", Size: size, SegmentSize: seg}); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("nbdinfo", "--map=segmap:changed:other", uri("vm")).CombinedOutput(); err == nil {
		t.Errorf("nbdinfo --map of another lineage's context succeeded:\n%s", out)
	}

	out := runToolEnv(t, []string{"URI=" + uri("vm"), "BASE=s1", "FILE=" + backup}, "nbdsh", "-c", nbdshIncremental)
	copied, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		t.Fatalf("nbdsh printed %q", out)
	}
	t.Logf("copied %d bytes for %d written", copied, written)
	if want := exportHash(t, uri("vm")); fileHash(t, backup) != want {
		t.Fatalf("the backup does not equal the disk after the incremental copy")
	}
	// Sub-blocks of 4 KiB: the small writes cost about what they wrote.
	if copied < written || copied > written+written/10 {
		t.Errorf("copied %d bytes for %d written: want within 10%%", copied, written)
	}
}
