package storage_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/nbd"
	"segmap/internal/nbd/nbdclient"
	"segmap/internal/nbd/nbdwire"
	"segmap/internal/standalone"
	"segmap/internal/storage"
)

var bg = context.Background()

// node is a storage node running in this process.
type node struct {
	dir, prefix string
	addr        string
	srv         *nbd.Server
	served      chan error
}

// startNode serves dir and devices with export prefix prefix on a
// loopback port, as `segmap storage` does. stop (also run at cleanup) shuts it down.
func startNode(t *testing.T, dir, prefix string, devices ...storage.Device) *node {
	t.Helper()
	backend, err := storage.NewDir(dir, prefix, devices...)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &node{dir: dir, prefix: prefix, addr: l.Addr().String(), served: make(chan error, 1)}
	n.srv = nbd.NewServer(nbd.Config{Backend: backend, Errno: storage.Errno, Logger: slog.New(slog.DiscardHandler), Leases: true})
	go func() { n.served <- n.srv.Serve(l) }()
	t.Cleanup(func() { n.stop(t) })
	return n
}

func (n *node) stop(t *testing.T) {
	if n.srv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(bg, 5*time.Second)
	defer cancel()
	if err := n.srv.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	n.srv.Close()
	if err := <-n.served; !errors.Is(err, nbd.ErrServerClosed) {
		t.Errorf("Serve: %v", err)
	}
	n.srv = nil
}

func (n *node) uri(name string) string { return "nbd://" + n.addr + "/" + n.prefix + name }

func create(t *testing.T, dir, name string, size uint64) {
	t.Helper()
	if err := storage.Create(dir, name, size); err != nil {
		t.Fatal(err)
	}
}

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

// TestListWithNbdinfo serves a directory with files, hidden files, a
// directory and a symbolic link, and lists it with nbdinfo: only the
// regular files are exports, under the prefix.
func TestListWithNbdinfo(t *testing.T) {
	nbdinfo := needTool(t, "nbdinfo")
	dir := t.TempDir()
	create(t, dir, "disk1", 64<<20)
	create(t, dir, "disk2", 5<<20+512)
	for name, err := range map[string]error{
		".hidden": os.WriteFile(filepath.Join(dir, ".hidden"), []byte("x"), 0o600),
		"subdir":  os.Mkdir(filepath.Join(dir, "subdir"), 0o700),
		"link":    os.Symlink(filepath.Join(dir, "disk1"), filepath.Join(dir, "link")),
	} {
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	n := startNode(t, dir, "node1-")
	ctx, cancel := context.WithTimeout(bg, time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, nbdinfo, "--list", "--json", "nbd://"+n.addr).CombinedOutput()
	if err != nil {
		t.Fatalf("nbdinfo: %v\n%s", err, out)
	}
	var res struct {
		Exports []struct {
			Name     string `json:"export-name"`
			Size     uint64 `json:"export-size"`
			ReadOnly bool   `json:"is_read_only"`
		} `json:"exports"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	got := map[string]uint64{}
	for _, e := range res.Exports {
		got[e.Name] = e.Size
		if e.ReadOnly {
			t.Errorf("%s is read-only", e.Name)
		}
	}
	if want := map[string]uint64{"node1-disk1": 64 << 20, "node1-disk2": 5<<20 + 512}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("exports %v, want %v\n%s", got, want, out)
	}
}

// TestOnlyRegularFiles: what is not listed cannot be opened either.
func TestOnlyRegularFiles(t *testing.T) {
	dir := t.TempDir()
	create(t, dir, "disk", 1<<20)
	for _, err := range []error{
		os.WriteFile(filepath.Join(dir, ".hidden"), make([]byte, 4096), 0o600),
		os.Mkdir(filepath.Join(dir, "subdir"), 0o700),
		os.Symlink(filepath.Join(dir, "disk"), filepath.Join(dir, "link")),
		os.Symlink("/etc/passwd", filepath.Join(dir, "passwd")),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	n := startNode(t, dir, "p/")
	for _, name := range []string{"p/.hidden", "p/subdir", "p/link", "p/passwd", "p/nosuch", "disk", "p/", "p/../disk", "p/subdir/../disk"} {
		c, err := nbdclient.Dial(bg, n.addr, name, nbdclient.ClientConfig{})
		if err == nil {
			c.Close()
		}
		if !errors.Is(err, nbdwire.ErrUnknownExport) {
			t.Errorf("export %q: %v; want ErrUnknownExport", name, err)
		}
	}
	c, err := nbdclient.Dial(bg, n.addr, "p/disk", nbdclient.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

// TestRawBytes: the export is the file's bytes, through every command.
func TestRawBytes(t *testing.T) {
	dir := t.TempDir()
	create(t, dir, "raw", 4<<20)
	n := startNode(t, dir, "")
	c, err := nbdclient.Dial(bg, n.addr, "raw", nbdclient.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Size() != 4<<20 || c.ReadOnly() || !c.CanMultiConn() {
		t.Fatalf("size %d, read-only %v, multi-conn %v", c.Size(), c.ReadOnly(), c.CanMultiConn())
	}
	model := make([]byte, 4<<20)
	p := bytes.Repeat([]byte("segmap storage "), 70000)
	if err := c.WriteAt(bg, p, 3, true); err != nil {
		t.Fatal(err)
	}
	copy(model[3:], p)
	if err := c.WriteZeroes(bg, 100000, 200000, false); err != nil {
		t.Fatal(err)
	}
	clear(model[100000:300000])
	if err := c.WriteZeroes(bg, 400000, 5000, true); err != nil {
		t.Fatal(err)
	}
	clear(model[400000:405000])
	if err := c.Trim(bg, 1<<20, 1<<20); err != nil {
		t.Fatal(err)
	}
	clear(model[1<<20 : 2<<20]) // a punched hole reads as zero
	if err := c.Flush(bg); err != nil {
		t.Fatal(err)
	}
	onDisk, err := os.ReadFile(filepath.Join(dir, "raw"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(onDisk, model) {
		t.Fatal("file contents differ from what was written over NBD")
	}
	got := make([]byte, len(model))
	if err := c.ReadAt(bg, got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("read back over NBD: %v", err)
	}
}

// TestContainerOverStorage formats a container over the storage node,
// uses it through OpenNBD, restarts the node and finds the bytes again.
func TestContainerOverStorage(t *testing.T) {
	dir := t.TempDir()
	const slot = 1 << 20
	create(t, dir, "c1", container.HeaderSize+16*slot)
	n := startNode(t, dir, "node-")
	uri := n.uri("c1")

	c, err := container.FormatNBD(bg, uri, 42, slot, false, nbdclient.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if c.Header() != (container.Header{ID: 42, SlotSize: slot, Slots: 16}) {
		t.Fatalf("header %v", c.Header())
	}
	c.Close()

	want := &container.Header{ID: 42, SlotSize: slot}
	c, err = container.OpenNBD(bg, uri, want, nbdclient.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	p := bytes.Repeat([]byte{0xa5}, 2*slot) // slots 5 (second half) to 7 (first half)
	if _, err := c.WriteAt(p, 5*slot+slot/2); err != nil {
		t.Fatal(err)
	}
	if err := container.FreeSlot(c, 6); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	c.Close()

	n.stop(t)
	n = startNode(t, dir, "node-")
	c, err = container.OpenNBD(bg, n.uri("c1"), want, nbdclient.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := make([]byte, 3*slot)
	if _, err := c.ReadAt(got, 5*slot); err != nil {
		t.Fatal(err)
	}
	wantBytes := make([]byte, 3*slot)
	copy(wantBytes[slot/2:slot], p)          // slot 5, second half
	copy(wantBytes[2*slot:2*slot+slot/2], p) // slot 7, first half; slot 6 freed
	if !bytes.Equal(got, wantBytes) {
		t.Fatal("container contents lost across a restart of the storage node")
	}
	// The file is an ordinary container file too.
	if h, err := container.ReadHeader(filepath.Join(dir, "c1")); err != nil || h.ID != 42 {
		t.Fatalf("ReadHeader: %v, %v", h, err)
	}
}

// TestPunchReleasesSpace: WRITE_ZEROES without NO_HOLE (and TRIM) give the
// blocks back; with NO_HOLE they stay allocated.
func TestPunchReleasesSpace(t *testing.T) {
	dir := t.TempDir()
	create(t, dir, "f", 8<<20)
	path := filepath.Join(dir, "f")
	x, err := storage.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	if err := x.WriteAt(bg, bytes.Repeat([]byte{1}, 8<<20), 0, true); err != nil {
		t.Fatal(err)
	}
	full := blocks(t, path)
	if err := x.WriteZeroes(bg, 0, 2<<20, true); err != nil {
		t.Fatal(err)
	}
	if b := blocks(t, path); b < full {
		t.Errorf("NO_HOLE zeroing released blocks: %d -> %d", full, b)
	}
	if err := x.WriteZeroes(bg, 2<<20, 2<<20, false); err != nil {
		t.Fatal(err)
	}
	if err := x.Trim(bg, 4<<20, 2<<20); err != nil {
		t.Fatal(err)
	}
	punched := blocks(t, path)
	if probe := canPunch(t, dir); probe && punched > full-(4<<20)/512+64 {
		t.Errorf("punching 4 MiB released too little: %d -> %d blocks", full, punched)
	}
	got := make([]byte, 8<<20)
	if err := x.ReadAt(bg, got, 0); err != nil {
		t.Fatal(err)
	}
	if bytes.Count(got[:4<<20], []byte{0}) != 4<<20 || bytes.Count(got[6<<20:], []byte{1}) != 2<<20 {
		t.Fatal("zeroed or kept ranges read wrong")
	}
	if x.Size() != 8<<20 {
		t.Fatalf("size %d", x.Size())
	}
	if st, _ := os.Stat(path); st.Size() != 8<<20 {
		t.Fatalf("file size changed to %d", st.Size())
	}
}

func blocks(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks
}

// canPunch reports whether the file system of dir punches holes.
func canPunch(t *testing.T, dir string) bool {
	f, err := os.CreateTemp(dir, ".probe")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(f.Name())
	defer f.Close()
	f.Write(make([]byte, 8192))
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096) == nil
}

func TestCreate(t *testing.T) {
	dir := t.TempDir()
	if err := storage.Create(dir, "new", 1<<30); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(dir, "new"))
	if err != nil || st.Size() != 1<<30 || st.Mode().Perm() != 0o600 {
		t.Fatalf("created file: %v, %v", st, err)
	}
	if b := blocks(t, filepath.Join(dir, "new")); b > 64 {
		t.Errorf("new file is not sparse: %d blocks", b)
	}
	if err := storage.Create(dir, "new", 1<<20); !errors.Is(err, fs.ErrExist) {
		t.Errorf("create over an existing file: %v", err)
	}
	if st, _ := os.Stat(filepath.Join(dir, "new")); st.Size() != 1<<30 {
		t.Errorf("existing file changed")
	}
	for _, name := range []string{"", ".x", "a/b", "..", "a\x00b", strings.Repeat("n", 256), "\xff"} {
		if err := storage.Create(dir, name, 4096); !errors.Is(err, storage.ErrBadName) {
			t.Errorf("Create(%q): %v; want ErrBadName", name, err)
		}
	}
	if err := storage.Create(dir, "zero", 0); err == nil {
		t.Error("a zero-size file was created")
	}
	if err := storage.Create(filepath.Join(dir, "missing"), "x", 4096); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Create in a missing directory: %v", err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("directory holds %d entries, want only the new file: %v", len(ents), ents)
	}
}

func TestNewDir(t *testing.T) {
	dir := t.TempDir()
	if _, err := storage.NewDir(filepath.Join(dir, "missing"), ""); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing directory: %v", err)
	}
	create(t, dir, "f", 4096)
	if _, err := storage.NewDir(filepath.Join(dir, "f"), ""); err == nil {
		t.Error("a file accepted as directory")
	}
	if _, err := storage.NewDir(dir, "a\x00"); err == nil {
		t.Error("prefix with NUL accepted")
	}
}

func TestErrno(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want uint32
	}{
		{fmt.Errorf("w: %w", unix.ENOSPC), nbdwire.ENOSPC},
		{&os.PathError{Op: "write", Path: "x", Err: unix.EDQUOT}, nbdwire.ENOSPC},
		{unix.EFBIG, nbdwire.ENOSPC},
		{unix.EROFS, nbdwire.EPERM},
		{unix.EACCES, nbdwire.EPERM},
		{unix.ENOMEM, nbdwire.ENOMEM},
		{unix.EIO, nbdwire.EIO},
		{storage.ErrShortRead, nbdwire.EIO},
		{errors.New("other"), nbdwire.EIO},
	} {
		if got := storage.Errno(tt.err); got != tt.want {
			t.Errorf("Errno(%v) = %d, want %d", tt.err, got, tt.want)
		}
	}
}

// TestShrunkFile: a read past the end of a file truncated underneath fails
// that read with EIO; the connection goes on.
func TestShrunkFile(t *testing.T) {
	dir := t.TempDir()
	create(t, dir, "f", 1<<20)
	n := startNode(t, dir, "")
	c, err := nbdclient.Dial(bg, n.addr, "f", nbdclient.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := os.Truncate(filepath.Join(dir, "f"), 4096); err != nil {
		t.Fatal(err)
	}
	if err := c.ReadAt(bg, make([]byte, 8192), 0); !errors.Is(err, nbdclient.ErrEIO) {
		t.Fatalf("read past the new end: %v", err)
	}
	if err := c.ReadAt(bg, make([]byte, 4096), 0); err != nil {
		t.Fatalf("read inside: %v", err)
	}
}

// TestSegmapOverStorageNode runs a whole segmap (controller and agent in
// this process) whose containers live on a storage node: they are
// formatted over NBD, registered by nbd:// URI (container.OpenURI), and a
// disk written through the agent survives a restart of both the storage
// node and segmap.
func TestSegmapOverStorageNode(t *testing.T) {
	const slot = 64 << 10
	sdir := t.TempDir()
	n := startNode(t, sdir, "")
	for i, name := range []string{"c1", "c2"} {
		create(t, sdir, name, container.HeaderSize+32*slot)
		c, err := container.FormatNBD(bg, n.uri(name), uint32(i+1), slot, false, nbdclient.ClientConfig{})
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	data := t.TempDir()
	cl, err := standalone.Open(bg, data, standalone.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"c1", "c2"} {
		rec, err := cl.Ctrl.AddContainer(bg, n.uri(name))
		if err != nil {
			cl.Close()
			t.Fatal(err)
		}
		if rec.SlotSize != slot || rec.Slots != 32 {
			t.Errorf("container %s: %+v", name, rec)
		}
	}
	if _, err := cl.Ctrl.CreateDisk(bg, controller.CreateOptions{Name: "vm", Size: 40 * slot, SegmentSize: slot}); err != nil {
		cl.Close()
		t.Fatal(err)
	}
	d, err := cl.Agents[0].Open(bg, "vm")
	if err != nil {
		cl.Close()
		t.Fatal(err)
	}
	p := bytes.Repeat([]byte("over nbd "), 100000) // spans many segments, so both containers
	if err := d.WriteAt(bg, p, 12345, false); err != nil {
		cl.Close()
		t.Fatal(err)
	}
	if err := d.Flush(bg); err != nil {
		cl.Close()
		t.Fatal(err)
	}
	if err := cl.Close(); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"c1", "c2"} {
		if b := blocks(t, filepath.Join(sdir, name)); b <= (container.HeaderSize/512)+8 {
			t.Errorf("%s holds no data (%d blocks)", name, b)
		}
	}

	// Restart the storage node on the same address, then segmap.
	addr := n.addr
	n.stop(t)
	backend, err := storage.NewDir(sdir, "")
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := nbd.NewServer(nbd.Config{Backend: backend, Errno: storage.Errno, Logger: slog.New(slog.DiscardHandler)})
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	defer func() {
		srv.Close()
		<-served
	}()
	cl, err = standalone.Open(bg, data, standalone.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	d, err = cl.Agents[0].Open(bg, "vm")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	if err := d.ReadAt(bg, got, 12345); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("disk after restarts: %v, equal %v", err, bytes.Equal(got, p))
	}
}

// TestLeasedContainer: a container opened with a lease on a storage node
// is served while the holder's lease holds, refuses every request with
// ErrLeaseOver (writing nothing) once it has run out, and is served again
// once the holder renews it; one opened without a lease is not limited.
func TestLeasedContainer(t *testing.T) {
	dir := t.TempDir()
	const slot = 1 << 20
	create(t, dir, "c1", container.HeaderSize+4*slot)
	n := startNode(t, dir, "node-")
	c, err := container.FormatNBD(bg, n.uri("c1"), 7, slot, false, nbdclient.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	var end atomic.Int64
	until := func() time.Time { return time.Unix(0, end.Load()) }
	end.Store(time.Now().Add(300 * time.Millisecond).UnixNano())
	c, err = container.OpenNBDLeased(bg, n.uri("c1"), &container.Header{ID: 7, SlotSize: slot}, nbdclient.ClientConfig{}, until)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.WriteAt(bytes.Repeat([]byte{1}, 4096), 0); err != nil {
		t.Fatalf("write under the lease: %v", err)
	}
	time.Sleep(time.Until(until()))
	if _, err := c.WriteAt(bytes.Repeat([]byte{2}, 4096), 0); !errors.Is(err, container.ErrLeaseOver) {
		t.Fatalf("write after the lease: %v, want ErrLeaseOver", err)
	}
	if err := c.Flush(); !errors.Is(err, container.ErrLeaseOver) {
		t.Fatalf("flush after the lease: %v, want ErrLeaseOver", err)
	}
	end.Store(time.Now().Add(time.Minute).UnixNano())
	c.RenewLease()
	got := make([]byte, 4096)
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := c.ReadAt(got, 0)
		if err == nil {
			break
		}
		if !errors.Is(err, container.ErrLeaseOver) || time.Now().After(deadline) {
			t.Fatalf("read after renewing: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if !bytes.Equal(got, bytes.Repeat([]byte{1}, 4096)) {
		t.Fatalf("the refused write landed: got %x...", got[:8])
	}

	free, err := container.OpenNBD(bg, n.uri("c1"), nil, nbdclient.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer free.Close()
	if _, err := free.ReadAt(got, 0); err != nil {
		t.Fatalf("a container opened without a lease: %v", err)
	}
}
