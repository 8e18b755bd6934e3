package fusedisk

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"segmap/internal/leaktest"
	"segmap/internal/nbd"
)

func TestMain(m *testing.M) { leaktest.VerifyTestMain(m) }

const mib = 1 << 20

// TestExt4OnLoop is the CSI node plugin's path: a loop device on the
// file, ext4 on it; files written and synced reach the export. Then the
// export grows; Resize and 'losetup -c' grow the device under the
// mounted file system, and resize2fs grows ext4.
//
// resize2fs runs on the unmounted file system: ext4's online resize
// (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE, which the sandbox the
// tests run in does not grant (a privileged CSI node pod has it).
// TestXFSGrowsOnline grows a mounted file system, which XFS allows with
// CAP_SYS_ADMIN alone.
func TestExt4OnLoop(t *testing.T) {
	requireTools(t, "losetup", "mkfs.ext4", "e2fsck", "resize2fs", "blockdev", "mount", "umount", "df", "sync")
	mem := newMem("vol", 64*mib)
	addr := startServer(t, mem)
	d := mountDisk(t, Config{Addr: addr, Export: "vol"})
	if fi, err := os.Stat(d.Path()); err != nil || fi.Size() != 64*mib {
		t.Fatalf("stat %s: %v, %v; want size %d", d.Path(), fi, err, 64*mib)
	}

	dev := losetup(t, d.Path())
	run(t, "mkfs.ext4", "-q", "-F", "-b", "4096", dev)
	mnt := mountFS(t, dev)
	files := writeBlocks(t, mnt, 8)
	flushes := mem.flushes.Load()
	run(t, "sync", "-f", mnt)
	if mem.flushes.Load() == flushes {
		t.Error("sync of the file system sent no NBD flush")
	}
	for name, p := range files {
		if !mem.hasBlock(p, 0) {
			t.Errorf("%s: its bytes are not in the export after sync", name)
		}
	}

	// Grow the export to 128 MiB, then the file and the device, under
	// the mounted file system.
	before := fsSize(t, mnt)
	mem.grow(128 * mib)
	growDevice(t, d, dev, 128*mib)
	run(t, "umount", mnt)
	run(t, "e2fsck", "-f", "-p", dev)
	run(t, "resize2fs", dev)
	mnt = mountFS(t, dev)
	if after := fsSize(t, mnt); after < before+48*mib {
		t.Errorf("file system size %d after resize2fs, was %d: did not grow by ~64 MiB", after, before)
	}
	checkFiles(t, mnt, files)
	fillNewSpace(t, mem, mnt, 64*mib, 80*mib)
	run(t, "umount", mnt)
	run(t, "e2fsck", "-f", "-n", dev)
}

// TestXFSGrowsOnline grows a mounted XFS file system on the loop device:
// NodeExpandVolume's path.
func TestXFSGrowsOnline(t *testing.T) {
	requireTools(t, "losetup", "mkfs.xfs", "xfs_growfs", "blockdev", "mount", "umount", "df", "sync")
	const size = 320 * mib // mkfs.xfs's minimum is 300 MB
	mem := newMem("vol", size)
	addr := startServer(t, mem)
	d := mountDisk(t, Config{Addr: addr, Export: "vol"})
	dev := losetup(t, d.Path())
	run(t, "mkfs.xfs", "-q", dev)
	mnt := mountFS(t, dev)
	files := writeBlocks(t, mnt, 8)
	run(t, "sync", "-f", mnt)
	for name, p := range files {
		if !mem.hasBlock(p, 0) {
			t.Errorf("%s: its bytes are not in the export after sync", name)
		}
	}
	before := fsSize(t, mnt)
	mem.grow(2 * size)
	growDevice(t, d, dev, 2*size)
	run(t, "xfs_growfs", mnt)
	if after := fsSize(t, mnt); after < before+size*3/4 {
		t.Errorf("file system size %d after xfs_growfs, was %d: did not grow by ~%d", after, before, size)
	}
	checkFiles(t, mnt, files)
	fillNewSpace(t, mem, mnt, size, size+64*mib)
	run(t, "umount", mnt)
}

// writeBlocks writes n files of one 4 KiB block of random bytes each in
// dir: each lands in one file system block, which can then be looked for
// in the export. It returns the files' contents by name.
func writeBlocks(t *testing.T, dir string, n int) map[string][]byte {
	t.Helper()
	rng := rand.New(rand.NewPCG(1, uint64(n)))
	files := map[string][]byte{}
	for i := range n {
		p := make([]byte, 4096)
		for j := range p {
			p[j] = byte(rng.Uint32())
		}
		name := "f" + strconv.Itoa(i)
		if err := os.WriteFile(filepath.Join(dir, name), p, 0o600); err != nil {
			t.Fatal(err)
		}
		files[name] = p
	}
	return files
}

// checkFiles checks that the files writeBlocks wrote are in dir.
func checkFiles(t *testing.T, dir string, files map[string][]byte) {
	t.Helper()
	for name, p := range files {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || !bytes.Equal(got, p) {
			t.Errorf("%s: %v, equal %v", name, err, bytes.Equal(got, p))
		}
	}
}

// growDevice grows the file with Resize and the loop device with
// 'losetup -c', and checks both see size.
func growDevice(t *testing.T, d *Disk, dev string, size int) {
	t.Helper()
	got, err := d.Resize(context.Background())
	if err != nil || got != uint64(size) {
		t.Fatalf("Resize = %d, %v; want %d", got, err, size)
	}
	if fi, err := os.Stat(d.Path()); err != nil || fi.Size() != int64(size) {
		t.Fatalf("stat after Resize: %v, %v", fi, err)
	}
	run(t, "losetup", "-c", dev)
	if got := strings.TrimSpace(run(t, "blockdev", "--getsize64", dev)); got != strconv.Itoa(size) {
		t.Fatalf("blockdev --getsize64 %s = %s after losetup -c, want %d", dev, got, size)
	}
}

// fillNewSpace writes a file of n bytes into the file system mounted at
// mnt, too big for the space it had before it grew, syncs, and checks
// that some of it is in the export past old.
func fillNewSpace(t *testing.T, mem *memExport, mnt string, old uint64, n int) {
	t.Helper()
	big := make([]byte, n)
	for i := range big {
		big[i] = byte(i/4096) ^ byte(i/(4096*256)) ^ 0x5a
	}
	if err := os.WriteFile(filepath.Join(mnt, "big"), big, 0o600); err != nil {
		t.Fatalf("write %d bytes into the grown file system: %v", n, err)
	}
	run(t, "sync", "-f", mnt)
	found := false
	for blk := 0; blk < n && !found; blk += 4096 * 97 {
		found = mem.hasBlock(big[blk:blk+4096], old)
	}
	if !found {
		t.Error("no block of the big file is in the grown part of the export")
	}
}

// fsSize is the size of the file system mounted at dir, as df shows it.
func fsSize(t *testing.T, dir string) uint64 {
	t.Helper()
	f := strings.Fields(run(t, "df", "-B1", "--output=size", dir))
	if len(f) != 2 {
		t.Fatalf("df: %q", f)
	}
	n, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestFileEdges checks the file's contract at its edges.
func TestFileEdges(t *testing.T) {
	requireTools(t)
	mem := newMem("vol", 1*mib)
	ro := newMem("ro", 64<<10)
	ro.ro = true
	addr := startServer(t, mem, ro)
	d := mountDisk(t, Config{Addr: addr, Export: "vol"})

	f, err := os.OpenFile(d.Path(), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// A write across the end is short, one at the end fails (one
	// pwrite(2) each: os.File.WriteAt would go on after a short write).
	fd := int(f.Fd())
	n, err := syscall.Pwrite(fd, []byte("0123456789"), mib-4)
	if n != 4 || err != nil {
		t.Errorf("write across the end wrote %d (%v), want 4", n, err)
	}
	if _, err := syscall.Pwrite(fd, []byte("x"), mib); !errors.Is(err, syscall.EFBIG) {
		t.Errorf("write at the end: %v, want EFBIG", err)
	}
	if got := mem.bytes(mib-4, 4); string(got) != "0123" {
		t.Errorf("export's last bytes %q", got)
	}
	// A read across the end is short, one at the end reads nothing.
	buf := make([]byte, 10)
	if n, err := f.ReadAt(buf, mib-4); n != 4 || string(buf[:4]) != "0123" {
		t.Errorf("read across the end: %d %q %v", n, buf[:n], err)
	}
	if n, err := f.ReadAt(buf, mib+100); n != 0 {
		t.Errorf("read past the end: %d %v", n, err)
	}
	// Unaligned I/O in the middle.
	if _, err := f.WriteAt([]byte("hello"), 12345); err != nil {
		t.Fatal(err)
	}
	if got := mem.bytes(12345, 5); string(got) != "hello" {
		t.Errorf("export at 12345: %q", got)
	}
	flushes := mem.flushes.Load()
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if mem.flushes.Load() == flushes {
		t.Error("fsync sent no NBD flush")
	}
	// No truncation, to any other size.
	for _, size := range []int64{0, mib - 1, mib + 1} {
		if err := f.Truncate(size); !errors.Is(err, syscall.EPERM) {
			t.Errorf("truncate to %d: %v, want EPERM", size, err)
		}
	}
	if err := f.Truncate(mib); err != nil {
		t.Errorf("truncate to its own size: %v", err)
	}
	if _, err := os.OpenFile(d.Path(), os.O_RDWR|os.O_TRUNC, 0); !errors.Is(err, syscall.EPERM) {
		t.Errorf("open with O_TRUNC: %v, want EPERM", err)
	}

	// A read-only export gives a read-only file.
	r := mountDisk(t, Config{Addr: addr, Export: "ro"})
	fi, err := os.Stat(r.Path())
	if err != nil || fi.Mode().Perm() != 0o400 || fi.Size() != 64<<10 {
		t.Fatalf("read-only file: %v %v", fi, err)
	}
	if _, err := os.OpenFile(r.Path(), os.O_WRONLY, 0); !errors.Is(err, syscall.EROFS) {
		t.Errorf("open read-only export for writing: %v, want EROFS", err)
	}
	got, err := os.ReadFile(r.Path())
	if err != nil || !bytes.Equal(got, make([]byte, 64<<10)) {
		t.Errorf("read the read-only file: %d bytes, %v", len(got), err)
	}
}

// TestReconnect cuts the NBD connection under a mounted file: the next
// requests dial again and succeed. With the server gone for good, a
// request fails with EIO after RetryFor.
func TestReconnect(t *testing.T) {
	requireTools(t)
	mem := newMem("vol", 1*mib)
	addr := startServer(t, mem)
	r := startRelay(t, addr)
	d := mountDisk(t, Config{Addr: r.addr(), Export: "vol", RetryFor: 2 * time.Second})
	f, err := os.OpenFile(d.Path(), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for i := range 3 {
		r.cut()
		msg := []byte("after cut " + strconv.Itoa(i))
		if _, err := f.WriteAt(msg, int64(i)*4096); err != nil {
			t.Fatalf("write after cut %d: %v", i, err)
		}
		if got := mem.bytes(i*4096, len(msg)); !bytes.Equal(got, msg) {
			t.Fatalf("export after cut %d: %q", i, got)
		}
		r.cut()
		buf := make([]byte, len(msg))
		if _, err := f.ReadAt(buf, int64(i)*4096); err != nil || !bytes.Equal(buf, msg) {
			t.Fatalf("read after cut %d: %q %v", i, buf, err)
		}
	}

	// Gone for good: the relay refuses connections.
	r.close()
	start := time.Now()
	_, err = f.ReadAt(make([]byte, 10), 0)
	took := time.Since(start)
	if !errors.Is(err, syscall.EIO) {
		t.Errorf("read with the server gone: %v, want EIO", err)
	}
	if took < time.Second || took > 20*time.Second {
		t.Errorf("read with the server gone failed after %v, want about RetryFor (2s)", took)
	}
	if _, err := d.Resize(context.Background()); err == nil {
		t.Error("Resize with the server gone succeeded")
	}
}

// TestReconnectLostCache: a connection replaced by one to a server with
// another write cache (it restarted, losing what it had not flushed)
// fails the next fsync, once, if writes were not flushed; a restart of
// a server that keeps its cache does not.
func TestReconnectLostCache(t *testing.T) {
	requireTools(t)
	mem := newMem("vol", 1*mib)
	withCache := func(b byte) func(*nbd.Config) {
		return func(c *nbd.Config) { c.CacheID[0] = b }
	}
	a := startServerWith(t, withCache(1), mem)
	a2 := startServerWith(t, withCache(1), mem) // same cache
	b := startServerWith(t, withCache(2), mem)  // another cache
	r := startRelay(t, a)
	d := mountDisk(t, Config{Addr: r.addr(), Export: "vol"})
	f, err := os.OpenFile(d.Path(), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	write := func(s string) {
		t.Helper()
		if _, err := f.WriteAt([]byte(s), 0); err != nil {
			t.Fatalf("write %s: %v", s, err)
		}
	}

	write("one")
	r.switchTo(a2)
	r.cut()
	write("two") // on a new connection to the same cache
	if err := f.Sync(); err != nil {
		t.Errorf("fsync after a reconnection to the same cache: %v", err)
	}

	write("three")
	r.switchTo(b)
	r.cut()
	if err := f.Sync(); !errors.Is(err, syscall.EIO) {
		t.Errorf("fsync after a reconnection to another cache with unflushed writes: %v, want EIO", err)
	}
	if err := f.Sync(); err != nil {
		t.Errorf("second fsync: %v", err)
	}

	// Nothing unflushed: a new cache is no loss.
	r.switchTo(a)
	r.cut()
	if _, err := f.ReadAt(make([]byte, 3), 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Errorf("fsync after a reconnection with everything flushed: %v", err)
	}
}

// TestUnmount: Unmount and an unmount from outside both end the mount and
// leave no goroutine behind; Unmount refuses while a loop device holds
// the file.
func TestUnmount(t *testing.T) {
	requireTools(t, "losetup", "umount")
	leaktest.Check(t)
	mem := newMem("vol", 4*mib)
	addr := startServer(t, mem)

	dir := t.TempDir()
	ctx := context.Background()
	d, err := Mount(ctx, Config{Addr: addr, Export: "vol", Dir: dir, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if !mounted(t, dir) {
		t.Fatal("not mounted after Mount")
	}
	dev := strings.TrimSpace(run(t, "losetup", "-f", "--show", d.Path()))
	if err := d.Unmount(); !errors.Is(err, syscall.EBUSY) {
		t.Errorf("Unmount with a loop device attached: %v, want EBUSY", err)
	}
	run(t, "losetup", "-d", dev)
	if err := unmountBusy(d); err != nil {
		t.Fatal(err)
	}
	if mounted(t, dir) {
		t.Fatal("still mounted after Unmount")
	}
	d.Wait() // returns at once
	if _, err := d.Resize(ctx); err == nil {
		t.Error("Resize after Unmount succeeded")
	}

	// From outside.
	d, err = Mount(ctx, Config{Addr: addr, Export: "vol", Dir: dir, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	waited := make(chan struct{})
	go func() {
		d.Wait()
		close(waited)
	}()
	run(t, "umount", dir)
	select {
	case <-waited:
	case <-time.After(10 * time.Second):
		t.Fatal("Wait did not return after umount")
	}
	if err := d.Unmount(); err != nil {
		t.Errorf("Unmount after umount: %v", err)
	}
	if mounted(t, dir) {
		t.Fatal("still mounted")
	}
}

// TestConcurrentWithResize runs reads and writes while Resize swaps the
// connection under them: none fails.
func TestConcurrentWithResize(t *testing.T) {
	requireTools(t)
	mem := newMem("vol", 8*mib)
	addr := startServer(t, mem)
	d := mountDisk(t, Config{Addr: addr, Export: "vol"})
	f, err := os.OpenFile(d.Path(), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 4)
	for w := range 4 {
		go func() {
			p := bytes.Repeat([]byte{byte(w + 1)}, 64<<10)
			buf := make([]byte, len(p))
			off := int64(w) * 2 * mib
			for i := 0; ctx.Err() == nil; i++ {
				o := off + int64(i%16)*int64(len(p))
				if _, err := f.WriteAt(p, o); err != nil {
					errc <- err
					return
				}
				if _, err := f.ReadAt(buf, o); err != nil {
					errc <- err
					return
				}
				if !bytes.Equal(buf, p) {
					errc <- errors.New("read back differs")
					return
				}
			}
			errc <- nil
		}()
	}
	for i := range 5 {
		mem.grow((9 + i) * mib)
		if size, err := d.Resize(context.Background()); err != nil || size != uint64((9+i)*mib) {
			t.Errorf("Resize %d: %d %v", i, size, err)
		}
	}
	cancel()
	for range 4 {
		if err := <-errc; err != nil {
			t.Error(err)
		}
	}
	if fi, err := f.Stat(); err != nil || fi.Size() != 13*mib {
		t.Errorf("stat: %v %v", fi, err)
	}
}
