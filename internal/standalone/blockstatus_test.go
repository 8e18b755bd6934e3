package standalone_test

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"segmap/internal/controller"
	"segmap/internal/nbd/nbdclient"
	"segmap/internal/standalone"
)

// The thin disk of the block status tests: 1 TiB of 1 MiB segments
// (a million of them), written in four places.
const (
	thinSeg  = 1 << 20
	thinSize = 1 << 40
)

// thinWrites are the writes to the thin disk: a 4 KiB piece of segment 1,
// three whole segments at 10 GiB, 64 MiB at 512 GiB, and the last byte.
var thinWrites = []struct {
	off uint64
	n   int
}{
	{thinSeg + 8192, 4096},
	{10 << 30, 3 * thinSeg},
	{512 << 30, 64 << 20},
	{thinSize - 1, 1},
}

// thinMap is the allocation the thin disk must report, in segments:
// data where thinWrites wrote, holes elsewhere.
var thinMap = []struct {
	off, n uint64
	data   bool
}{
	{0, thinSeg, false},
	{thinSeg, thinSeg, true},
	{2 * thinSeg, 10<<30 - 2*thinSeg, false},
	{10 << 30, 3 * thinSeg, true},
	{10<<30 + 3*thinSeg, 512<<30 - (10<<30 + 3*thinSeg), false},
	{512 << 30, 64 << 20, true},
	{512<<30 + 64<<20, thinSize - thinSeg - (512<<30 + 64<<20), false},
	{thinSize - thinSeg, thinSeg, true},
}

// thinCluster serves a 1 TiB thin disk "thin" with thinWrites written
// (byte i of a write is i%251+1), and an empty one, "copy", of the same
// size. It returns the address and the data written.
func thinCluster(t *testing.T) (addr string, written [][]byte) {
	t.Helper()
	ctx := context.Background()
	c, err := standalone.Open(ctx, t.TempDir(), standalone.Options{
		Pool:   []standalone.PoolSpec{{SlotSize: thinSeg, Slots: 160, Count: 1}},
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	for _, name := range []string{"thin", "copy"} {
		if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: name, Size: thinSize, SegmentSize: thinSeg}); err != nil {
			t.Fatal(err)
		}
	}
	addr = serveNBD(t, c)
	cl, err := nbdclient.Dial(ctx, addr, "thin", nbdclient.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	for _, w := range thinWrites {
		p := make([]byte, w.n)
		for i := range p {
			p[i] = byte(i%251 + 1)
		}
		if err := cl.WriteAt(ctx, p, w.off, false); err != nil {
			t.Fatal(err)
		}
		written = append(written, p)
	}
	if err := cl.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	return addr, written
}

// runTool runs an NBD client tool for at most a minute. A missing tool
// skips the test, except under CI. Debian's python comes first for nbdsh.
func runTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	return runToolEnv(t, nil, name, args...)
}

// runToolEnv is runTool with env added to the tool's environment.
func runToolEnv(t *testing.T, env []string, name string, args ...string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "" {
			t.Skipf("%s not installed", name)
		}
		t.Fatalf("%s not installed: %v", name, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = append(append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH"), "LANG=C"), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// checkNbdinfoMap checks nbdinfo --map of export uri against thinMap, or,
// if empty is set, against one hole.
func checkNbdinfoMap(t *testing.T, uri string, empty bool) {
	t.Helper()
	out := runTool(t, "nbdinfo", "--map", "--json", uri)
	var got []struct {
		Offset uint64 `json:"offset"`
		Length uint64 `json:"length"`
		Type   uint32 `json:"type"`
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	want := thinMap
	if empty {
		want = append(want[:0:0], thinMap[0])
		want[0].n = thinSize
	}
	if len(got) != len(want) {
		t.Fatalf("nbdinfo --map %s: %d extents, want %d:\n%s", uri, len(got), len(want), out)
	}
	for i, w := range want {
		typ := uint32(3) // hole, zero
		if w.data {
			typ = 0
		}
		if g := got[i]; g.Offset != w.off || g.Length != w.n || g.Type != typ {
			t.Errorf("extent %d: %+v, want offset %d length %d type %d", i, g, w.off, w.n, typ)
		}
	}
}

// thinNbdinfoMap checks nbdinfo --map of the thin disk, and of "copy"
// before anything is copied into it.
func thinNbdinfoMap(t *testing.T, addr string) {
	checkNbdinfoMap(t, "nbd://"+addr+"/thin", false)
	checkNbdinfoMap(t, "nbd://"+addr+"/copy", true)
}

// thinQemuImgMap checks qemu-img map of the thin disk.
func thinQemuImgMap(t *testing.T, addr string) {
	out := runTool(t, "qemu-img", "map", "--output=json", "-f", "raw", "nbd://"+addr+"/thin")
	var got []struct {
		Start  uint64 `json:"start"`
		Length uint64 `json:"length"`
		Data   bool   `json:"data"`
		Zero   bool   `json:"zero"`
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if len(got) != len(thinMap) {
		t.Fatalf("qemu-img map: %d extents, want %d:\n%s", len(got), len(thinMap), out)
	}
	for i, w := range thinMap {
		if g := got[i]; g.Start != w.off || g.Length != w.n || g.Data != w.data || g.Zero == w.data {
			t.Errorf("extent %d: %+v, want start %d length %d data %v", i, g, w.off, w.n, w.data)
		}
	}
}

// thinNbdcopy copies the 1 TiB thin disk to another thin disk and
// to a sparse file: block status lets nbdcopy skip the holes, so each copy
// takes seconds, not the hours of reading 1 TiB.
func thinNbdcopy(t *testing.T, addr string, written [][]byte) {
	ctx := context.Background()
	src := "nbd://" + addr + "/thin"

	start := time.Now()
	runTool(t, "nbdcopy", "--flush", src, "nbd://"+addr+"/copy")
	t.Logf("nbdcopy to a thin disk: %v", time.Since(start))
	checkNbdinfoMap(t, "nbd://"+addr+"/copy", false)
	cl, err := nbdclient.Dial(ctx, addr, "copy", nbdclient.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	for i, w := range thinWrites {
		got := make([]byte, w.n)
		if err := cl.ReadAt(ctx, got, w.off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, written[i]) {
			t.Errorf("copy differs at %d+%d", w.off, w.n)
		}
	}

	dst := filepath.Join(t.TempDir(), "thin.img")
	start = time.Now()
	runTool(t, "nbdcopy", src, dst)
	t.Logf("nbdcopy to a sparse file: %v", time.Since(start))
	f, err := os.Open(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || fi.Size() != thinSize {
		t.Fatalf("copied file: %v, %v", fi, err)
	}
	for i, w := range thinWrites {
		// The written bytes, and the rest of their segments zero.
		seg := w.off / thinSeg * thinSeg
		got := make([]byte, (w.off+uint64(w.n)+thinSeg-1)/thinSeg*thinSeg-seg)
		if _, err := f.ReadAt(got, int64(seg)); err != nil {
			t.Fatal(err)
		}
		want := make([]byte, len(got))
		copy(want[w.off-seg:], written[i])
		if !bytes.Equal(got, want) {
			t.Errorf("file copy differs around %d+%d", w.off, w.n)
		}
	}
}

// thinQemuImgConvert converts the 1 TiB thin disk to a qcow2
// image: qemu-img reads block status and writes only the data, so the
// image holds about what was written, and it compares equal to a sparse
// copy made by nbdcopy (two local files: the compare seeks over holes
// instead of reading a terabyte over NBD).
func thinQemuImgConvert(t *testing.T, addr string) {
	src := "nbd://" + addr + "/thin"
	dst := filepath.Join(t.TempDir(), "thin.qcow2")
	start := time.Now()
	runTool(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, dst)
	t.Logf("qemu-img convert: %v", time.Since(start))
	var st syscall.Stat_t
	if err := syscall.Stat(dst, &st); err != nil {
		t.Fatal(err)
	}
	var data uint64
	for _, w := range thinWrites {
		data += uint64(w.n+thinSeg-1) / thinSeg * thinSeg
	}
	if used := uint64(st.Blocks) * 512; used > data+16<<20 {
		t.Errorf("qcow2 image holds %d bytes, want at most the %d written plus 16 MiB of metadata", used, data)
	}
	raw := filepath.Join(t.TempDir(), "thin.img")
	runTool(t, "nbdcopy", src, raw)
	runTool(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, dst)
}

// TestThinDisk maps, copies and converts the 1 TiB thin disk with real NBD
// clients, over one cluster: the copies go to disk "copy" and to files,
// and nothing writes "thin".
func TestThinDisk(t *testing.T) {
	addr, written := thinCluster(t)
	t.Run("nbdinfo-map", func(t *testing.T) { thinNbdinfoMap(t, addr) })
	t.Run("qemu-img-map", func(t *testing.T) { thinQemuImgMap(t, addr) })
	t.Run("nbdcopy", func(t *testing.T) { thinNbdcopy(t, addr, written) })
	t.Run("qemu-img-convert", func(t *testing.T) { thinQemuImgConvert(t, addr) })
}
