package nbd

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// These tests drive the server with real NBD clients (libnbd's nbdinfo,
// nbdcopy and nbdsh, qemu-io, fio). A missing tool skips the test, except
// under CI (CI set), where it fails it.

// needTool returns the path of a client tool.
func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	if os.Getenv("CI") == "" {
		t.Skipf("%s not installed", name)
	}
	t.Fatalf("%s not installed (CI=%q): %v", name, os.Getenv("CI"), err)
	return ""
}

// toolServer serves "disk" (64 MiB) and the read-only "ro" (1 MiB).
func toolServer(t *testing.T) (h *harness, uri string, disk *memExport) {
	t.Helper()
	disk = newMem("disk", 64<<20)
	ro := newMem("ro", 1<<20)
	ro.ro = true
	h = startServer(t, nil, disk, ro)
	return h, "nbd://" + h.addr, disk
}

// runTool runs a client tool with a time limit and returns its combined
// output. Debian's python must come first for nbdsh.
func runTool(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	path := needTool(t, name)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH"), "LANG=C")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func mustRunTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := runTool(t, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func TestToolNbdinfoList(t *testing.T) {
	checkGoroutines(t)
	_, uri, _ := toolServer(t)
	out := mustRunTool(t, "nbdinfo", "--list", "--json", uri)
	var res struct {
		Exports []struct {
			Name     string `json:"export-name"`
			Size     uint64 `json:"export-size"`
			ReadOnly bool   `json:"is_read_only"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	got := map[string]uint64{}
	for _, e := range res.Exports {
		got[e.Name] = e.Size
		if e.ReadOnly != (e.Name == "ro") {
			t.Errorf("%s: is_read_only %v", e.Name, e.ReadOnly)
		}
	}
	if len(got) != 2 || got["disk"] != 64<<20 || got["ro"] != 1<<20 {
		t.Fatalf("exports %v\n%s", got, out)
	}
	// The plain listing names both with their sizes.
	out = mustRunTool(t, "nbdinfo", "--list", uri)
	for _, want := range []string{`export="disk"`, "export-size: 67108864", `export="ro"`, "export-size: 1048576"} {
		if !strings.Contains(out, want) {
			t.Errorf("nbdinfo --list lacks %q:\n%s", want, out)
		}
	}
}

func TestToolNbdinfoExport(t *testing.T) {
	checkGoroutines(t)
	_, uri, _ := toolServer(t)
	out := mustRunTool(t, "nbdinfo", uri+"/disk")
	for _, want := range []string{
		"export-size: 67108864", "block_size_minimum: 1", "block_size_preferred: 4096",
		"block_size_maximum: 33554432", "can_flush: true", "can_fua: true", "can_trim: true",
		"can_zero: true", "can_multi_conn: true", "is_read_only: false", "using structured packets",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("nbdinfo lacks %q:\n%s", want, out)
		}
	}
	if out, err := runTool(t, "nbdinfo", uri+"/nope"); err == nil {
		t.Errorf("nbdinfo of an unknown export succeeded:\n%s", out)
	}
}

func TestToolQemuIO(t *testing.T) {
	checkGoroutines(t)
	_, uri, disk := toolServer(t)
	out := mustRunTool(t, "qemu-io", "-f", "raw", uri+"/disk",
		"-c", "write -P 0xab 123 70000", "-c", "read -P 0xab 123 70000",
		"-c", "write -z 200000 5000", "-c", "read -P 0 200000 5000",
		"-c", "discard 300000 4096", "-c", "flush")
	if strings.Contains(out, "fail") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	if got := disk.snapshot(123, 70000); !bytes.Equal(got, bytes.Repeat([]byte{0xab}, 70000)) {
		t.Fatal("qemu-io's write did not reach the export")
	}
	// A pattern mismatch is caught: qemu-io really compares.
	out, _ = runTool(t, "qemu-io", "-f", "raw", uri+"/disk", "-c", "read -P 0xcd 123 512")
	if !strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io did not notice a wrong pattern:\n%s", out)
	}
}

func TestToolQemuIOReadOnly(t *testing.T) {
	checkGoroutines(t)
	_, uri, _ := toolServer(t)
	for _, args := range [][]string{
		{"-f", "raw", uri + "/ro", "-c", "write -P 0xab 0 512"},
		{"-r", "-f", "raw", uri + "/ro", "-c", "write -P 0xab 0 512"},
	} {
		if out, err := runTool(t, "qemu-io", args...); err == nil || strings.Contains(out, "wrote") {
			t.Errorf("qemu-io %v: write to a read-only export succeeded (%v):\n%s", args, err, out)
		}
	}
	mustRunTool(t, "qemu-io", "-r", "-f", "raw", uri+"/ro", "-c", "read -P 0 0 4096")
}

// TestToolNbdshServerErrors sends requests qemu would refuse on its own,
// with libnbd's checks off, so the server's answers are seen.
func TestToolNbdshServerErrors(t *testing.T) {
	checkGoroutines(t)
	_, uri, _ := toolServer(t)
	script := `
import errno
h.set_strict_mode(0)
def fails(f, code):
    try:
        f()
    except nbd.Error as e:
        # libnbd gives the errno's name
        assert e.errno in (code, errno.errorcode[code]), (e.errno, e.string)
        return
    raise AssertionError("no error")
h.connect_uri(URI + "/ro")
fails(lambda: h.pwrite(b"x" * 512, 0), errno.EPERM)
fails(lambda: h.zero(512, 0), errno.EPERM)
assert h.pread(512, 0) == bytes(512)
h.shutdown()
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(URI + "/disk")
fails(lambda: h.pread(512, 64 * 1024 * 1024 - 256), errno.EINVAL)
fails(lambda: h.pwrite(b"y" * 512, 64 * 1024 * 1024), errno.EINVAL)
fails(lambda: h.pread(33 * 1024 * 1024, 0), errno.EOVERFLOW)
h.pwrite(b"z" * 512, 0, nbd.CMD_FLAG_FUA)
assert h.pread(512, 0) == b"z" * 512
h.shutdown()
print("ok")
`
	out := mustRunTool(t, "nbdsh", "-c", "URI = '"+uri+"'", "-c", script)
	if !strings.Contains(out, "ok") {
		t.Fatalf("nbdsh:\n%s", out)
	}
}

func TestToolNbdcopy(t *testing.T) {
	checkGoroutines(t)
	_, uri, disk := toolServer(t)
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src.img"), filepath.Join(dir, "dst.img")
	data := make([]byte, 16<<20)
	rand.Read(data)
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	mustRunTool(t, "nbdcopy", "--flush", src, uri+"/disk")
	if !bytes.Equal(disk.snapshot(0, len(data)), data) {
		t.Fatal("export differs from the source after nbdcopy in")
	}
	mustRunTool(t, "nbdcopy", uri+"/disk", dst)
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 64<<20 {
		t.Fatalf("copied out %d bytes", len(got))
	}
	if !bytes.Equal(got[:len(data)], data) {
		t.Fatal("copied out data differs")
	}
	if !bytes.Equal(got[len(data):], make([]byte, len(got)-len(data))) {
		t.Fatal("the rest of the export is not zero")
	}
}

func TestToolFio(t *testing.T) {
	checkGoroutines(t)
	needTool(t, "fio")
	h, uri, _ := toolServer(t)
	// fio's nbd engine takes the export from --uri (no --filename). Each of
	// the two jobs (two connections) verifies its own 32 MiB half:
	// jobs writing the same blocks would fail each other's verification.
	out := mustRunTool(t, "fio", "--name=nbd", "--ioengine=nbd", "--uri="+uri+"/disk", "--verify_state_save=0",
		"--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=32M", "--offset_increment=32M",
		"--verify=crc32c", "--numjobs=2", "--output-format=terse", "--terse-version=3")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	jobs := 0
	for _, l := range lines {
		f := strings.Split(l, ";")
		if len(f) < 5 || f[0] != "3" {
			continue
		}
		jobs++
		if f[4] != "0" {
			t.Errorf("fio job error %s:\n%s", f[4], out)
		}
	}
	if jobs != 2 {
		t.Fatalf("%d fio job reports:\n%s", jobs, out)
	}
	if strings.Contains(out, "verify:") {
		t.Fatalf("fio verification failed:\n%s", out)
	}
	waitFor(t, "fio's connections to close", func() bool { return h.srv.numConns() == 0 })
	if o, c := h.backend.opens.Load(), h.backend.closes.Load(); o != c || o < 2 {
		t.Fatalf("%d opens, %d closes", o, c)
	}
}

// mapTestDisk writes a pattern into toolServer's disk: data at
// [1 MiB, 1 MiB+4 KiB) and [8 MiB, 10 MiB), the rest zero.
func mapTestDisk(disk *memExport) {
	copy(disk.data[1<<20:], pattern(4096, 3))
	copy(disk.data[8<<20:], pattern(2<<20, 4))
}

func TestToolNbdinfoMap(t *testing.T) {
	checkGoroutines(t)
	_, uri, disk := toolServer(t)
	mapTestDisk(disk)
	out := mustRunTool(t, "nbdinfo", "--map", "--json", uri+"/disk")
	var got []struct {
		Offset uint64 `json:"offset"`
		Length uint64 `json:"length"`
		Type   uint32 `json:"type"`
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	const h = 3
	want := []struct {
		off, n uint64
		typ    uint32
	}{
		{0, 1 << 20, h}, {1 << 20, 4096, 0}, {1<<20 + 4096, 7<<20 - 4096, h}, {8 << 20, 2 << 20, 0}, {10 << 20, 54 << 20, h},
	}
	if len(got) != len(want) {
		t.Fatalf("nbdinfo --map: %d extents, want %d:\n%s", len(got), len(want), out)
	}
	for i, w := range want {
		if g := got[i]; g.Offset != w.off || g.Length != w.n || g.Type != w.typ {
			t.Errorf("extent %d: %+v, want %+v", i, g, w)
		}
	}
	// The contexts the server lists.
	out = mustRunTool(t, "nbdinfo", "--list", "--content", uri)
	if !strings.Contains(out, "base:allocation") {
		t.Errorf("nbdinfo --list does not show base:allocation:\n%s", out)
	}
}

func TestToolQemuImgMap(t *testing.T) {
	checkGoroutines(t)
	_, uri, disk := toolServer(t)
	mapTestDisk(disk)
	out := mustRunTool(t, "qemu-img", "map", "--output=json", "-f", "raw", uri+"/disk")
	var got []struct {
		Start  uint64 `json:"start"`
		Length uint64 `json:"length"`
		Data   bool   `json:"data"`
		Zero   bool   `json:"zero"`
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	want := []struct {
		start, n   uint64
		data, zero bool
	}{
		{0, 1 << 20, false, true}, {1 << 20, 4096, true, false}, {1<<20 + 4096, 7<<20 - 4096, false, true},
		{8 << 20, 2 << 20, true, false}, {10 << 20, 54 << 20, false, true},
	}
	if len(got) != len(want) {
		t.Fatalf("qemu-img map: %d extents, want %d:\n%s", len(got), len(want), out)
	}
	for i, w := range want {
		if g := got[i]; g.Start != w.start || g.Length != w.n || g.Data != w.data || g.Zero != w.zero {
			t.Errorf("extent %d: %+v, want %+v", i, g, w)
		}
	}
}

// TestToolNbdshBlockStatus checks the metadata context and the block status
// replies through libnbd, REQ_ONE and a range ending mid-extent included.
func TestToolNbdshBlockStatus(t *testing.T) {
	checkGoroutines(t)
	_, uri, disk := toolServer(t)
	mapTestDisk(disk)
	script := `
h.add_meta_context("base:allocation")
h.connect_uri(URI + "/disk")
assert h.can_meta_context("base:allocation")
got = []
def cb(ctx, off, entries, err):
    got.append((ctx, off, list(entries)))
    return 0
h.block_status(2 << 20, 0, cb)
assert got == [("base:allocation", 0, [1 << 20, 3, 4096, 0, (1 << 20) - 4096, 3])], got
got.clear()
h.block_status(1 << 20, 512, cb, nbd.CMD_FLAG_REQ_ONE)
assert got == [("base:allocation", 512, [(1 << 20) - 512, 3])], got
got.clear()
h.block_status(100, 1 << 20, cb, nbd.CMD_FLAG_REQ_ONE)
assert got == [("base:allocation", 1 << 20, [100, 0])], got
h.set_strict_mode(0)
try:
    h.block_status(1024, 64 * 1024 * 1024 - 512, cb)
    raise AssertionError("no error past the end")
except nbd.Error as e:
    pass
h.shutdown()
h = nbd.NBD()
h.connect_uri(URI + "/disk")
assert not h.can_meta_context("base:allocation")
h.shutdown()
print("ok")
`
	out := mustRunTool(t, "nbdsh", "-c", "URI = '"+uri+"'", "-c", script)
	if !strings.Contains(out, "ok") {
		t.Fatalf("nbdsh:\n%s", out)
	}
}
