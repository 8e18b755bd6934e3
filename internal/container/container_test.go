package container_test

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"segmap/internal/container"
	"segmap/internal/container/containertest"
)

func TestMemory(t *testing.T) {
	containertest.Run(t, func(t *testing.T, slotSize, slots int64) container.Container {
		return container.NewMemory(1, slotSize, slots)
	})
}

func TestFile(t *testing.T) {
	containertest.Run(t, func(t *testing.T, slotSize, slots int64) container.Container {
		c, err := container.Create(filepath.Join(t.TempDir(), "c"), container.Header{ID: 2, SlotSize: slotSize, Slots: slots})
		if err != nil {
			t.Fatal(err)
		}
		return c
	})
}

// TestFormattedFile runs the suite on containers made the block-device way:
// Format over a plain file that already has the right size.
func TestFormattedFile(t *testing.T) {
	containertest.Run(t, func(t *testing.T, slotSize, slots int64) container.Container {
		path := filepath.Join(t.TempDir(), "dev")
		// A partial slot at the end is ignored by Format.
		if err := os.WriteFile(path, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, container.HeaderSize+slots*slotSize+slotSize/2); err != nil {
			t.Fatal(err)
		}
		c, err := container.Format(path, 3, slotSize, false)
		if err != nil {
			t.Fatal(err)
		}
		return c
	})
}

// TestMemoryHuge checks that Memory is sparse: a 1 TiB container is cheap
// and its far end works.
func TestMemoryHuge(t *testing.T) {
	c := container.NewMemory(1, 1<<20, 1<<20)
	defer c.Close()
	if c.Size() != 1<<40 {
		t.Fatalf("Size() = %d, want 1 TiB", c.Size())
	}
	p := []byte("the end")
	off := c.Size() - int64(len(p))
	if _, err := c.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	if _, err := c.ReadAt(got, off); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("ReadAt = %q, %v; want %q", got, err, p)
	}
	if err := container.FreeSlot(c, c.Slots()-1); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReadAt(got, off); err != nil || !bytes.Equal(got, make([]byte, len(p))) {
		t.Fatalf("ReadAt after FreeSlot = %q, %v; want zeros", got, err)
	}
}

// create makes a container in a fresh temporary directory.
func create(t *testing.T, h container.Header) (*container.File, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "c")
	c, err := container.Create(path, h)
	if err != nil {
		t.Fatalf("Create(%v) = %v", h, err)
	}
	t.Cleanup(func() { c.Close() })
	return c, path
}

// createClosed makes a container and closes it, returning its path.
func createClosed(t *testing.T, h container.Header) string {
	t.Helper()
	c, path := create(t, h)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

var testHeader = container.Header{ID: 7, SlotSize: 64 << 10, Slots: 4}

func TestReopen(t *testing.T) {
	c, path := create(t, testHeader)
	data := bytes.Repeat([]byte("segmap!"), 20000) // crosses slot 0 into slot 2
	if _, err := c.WriteAt(data, 100); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}

	c, err := container.Open(path, &container.Header{ID: testHeader.ID, SlotSize: testHeader.SlotSize})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Header() != testHeader {
		t.Errorf("reopened header = %v, want %v", c.Header(), testHeader)
	}
	got := make([]byte, len(data))
	if _, err := c.ReadAt(got, 100); err != nil || !bytes.Equal(got, data) {
		t.Errorf("data after reopen differs (err %v)", err)
	}
	if h, err := container.ReadHeader(path); err != nil || h != testHeader {
		t.Errorf("ReadHeader = %v, %v; want %v", h, err, testHeader)
	}
	// Open without expectations works too.
	c2, err := container.Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	c2.Close()
}

func TestOpenNotContainer(t *testing.T) {
	dir := t.TempDir()
	ext4 := make([]byte, 64<<10) // an ext4 superblock magic at 1080
	ext4[1080], ext4[1081] = 0x53, 0xef
	files := map[string][]byte{
		"text":  []byte("just some text\nnot a container\n"),
		"empty": nil,
		"blank": make([]byte, container.HeaderSize+1<<16), // a never-formatted device
		"ext4":  ext4,
	}
	for name, content := range files {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, content, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := container.Open(path, nil); !errors.Is(err, container.ErrNotContainer) {
			t.Errorf("Open(%s) = %v; want ErrNotContainer", name, err)
		}
		if _, err := container.ReadHeader(path); !errors.Is(err, container.ErrNotContainer) {
			t.Errorf("ReadHeader(%s) = %v; want ErrNotContainer", name, err)
		}
	}
	if _, err := container.Open(filepath.Join(dir, "missing"), nil); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Open(missing) = %v; want fs.ErrNotExist", err)
	}
}

func TestOpenCorruptHeader(t *testing.T) {
	// Every byte of the fields after the magic, and the checksum itself, is
	// covered by the checksum.
	for off := int64(8); off < 36; off++ {
		path := createClosed(t, testHeader)
		flipByte(t, path, off)
		if _, err := container.Open(path, nil); !errors.Is(err, container.ErrCorruptHeader) {
			t.Errorf("byte %d flipped: Open = %v; want ErrCorruptHeader", off, err)
		}
	}
	// A damaged magic means the file is not recognisably ours.
	path := createClosed(t, testHeader)
	flipByte(t, path, 3)
	if _, err := container.Open(path, nil); !errors.Is(err, container.ErrNotContainer) {
		t.Errorf("magic flipped: Open = %v; want ErrNotContainer", err)
	}
}

func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x10
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func TestOpenWrongContainer(t *testing.T) {
	path := createClosed(t, testHeader)
	for _, want := range []container.Header{
		{ID: testHeader.ID + 1, SlotSize: testHeader.SlotSize},
		{ID: testHeader.ID, SlotSize: testHeader.SlotSize * 2},
	} {
		if _, err := container.Open(path, &want); !errors.Is(err, container.ErrWrongContainer) {
			t.Errorf("Open(want %v) = %v; want ErrWrongContainer", want, err)
		}
	}
}

func TestOpenTruncated(t *testing.T) {
	full := container.HeaderSize + testHeader.Slots*testHeader.SlotSize
	for _, size := range []int64{full - 1, full - testHeader.SlotSize, container.HeaderSize, 100} {
		path := createClosed(t, testHeader)
		if err := os.Truncate(path, size); err != nil {
			t.Fatal(err)
		}
		if _, err := container.Open(path, nil); !errors.Is(err, container.ErrTruncated) {
			t.Errorf("truncated to %d bytes: Open = %v; want ErrTruncated", size, err)
		}
	}
}

// TestShrunkUnderneath checks that a file cut short while open gives an
// error, not a short read that looks like success.
func TestShrunkUnderneath(t *testing.T) {
	c, path := create(t, testHeader)
	if err := os.Truncate(path, container.HeaderSize+100); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 200)
	if n, err := c.ReadAt(p, 0); !errors.Is(err, container.ErrTruncated) {
		t.Errorf("ReadAt past the shrunk end = %d, %v; want ErrTruncated", n, err)
	}
}

func TestCreateExisting(t *testing.T) {
	path := createClosed(t, testHeader)
	if _, err := container.Create(path, container.Header{ID: 99, SlotSize: 4096, Slots: 1}); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("Create over an existing container = %v; want fs.ErrExist", err)
	}
	if h, err := container.ReadHeader(path); err != nil || h != testHeader {
		t.Errorf("existing container changed: ReadHeader = %v, %v", h, err)
	}
}

func TestCreateInvalidHeader(t *testing.T) {
	dir := t.TempDir()
	for _, h := range []container.Header{
		{SlotSize: 0, Slots: 1},
		{SlotSize: 1000, Slots: 1},
		{SlotSize: 2048, Slots: 1},
		{SlotSize: 4097, Slots: 1},
		{SlotSize: 3 << 12, Slots: 1},
		{SlotSize: 2 << 30, Slots: 1},
		{SlotSize: 4096, Slots: 0},
		{SlotSize: 4096, Slots: -5},
		{SlotSize: 1 << 30, Slots: 1 << 33},
	} {
		path := filepath.Join(dir, "c")
		if _, err := container.Create(path, h); !errors.Is(err, container.ErrInvalidHeader) {
			t.Errorf("Create(%v) = %v; want ErrInvalidHeader", h, err)
		}
		if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("Create(%v) left a file behind (stat: %v)", h, err)
		}
	}
}

func TestCreateIsSparse(t *testing.T) {
	c, path := create(t, container.Header{ID: 1, SlotSize: 1 << 30, Slots: 64}) // 64 GiB
	st := stat(t, path)
	if st.Size != container.HeaderSize+c.Size() {
		t.Errorf("file size %d, want %d", st.Size, container.HeaderSize+c.Size())
	}
	if used := st.Blocks * 512; used > 1<<20 {
		t.Errorf("new 64 GiB container uses %d bytes; want it sparse", used)
	}
}

// TestPunchMakesHole checks that Punch really releases blocks on the test
// file system, rather than only writing zeros.
func TestPunchMakesHole(t *testing.T) {
	const slotSize = 1 << 20
	c, path := create(t, container.Header{ID: 1, SlotSize: slotSize, Slots: 4})
	if !canPunch(t, filepath.Dir(path)) {
		t.Skip("the temporary file system does not support FALLOC_FL_PUNCH_HOLE")
	}
	data := bytes.Repeat([]byte{0xAB}, 2*slotSize)
	if _, err := c.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	before := stat(t, path).Blocks
	if err := container.FreeSlot(c, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	after := stat(t, path).Blocks
	if freed := (before - after) * 512; freed < slotSize {
		t.Errorf("FreeSlot released %d bytes (blocks %d -> %d); want at least %d", freed, before, after, slotSize)
	}
	// Slot 1 is untouched.
	got := make([]byte, slotSize)
	if _, err := c.ReadAt(got, slotSize); err != nil || !bytes.Equal(got, data[:slotSize]) {
		t.Errorf("slot 1 changed by freeing slot 0 (err %v)", err)
	}
}

// canPunch reports whether the file system holding dir supports punching
// holes, using a scratch file.
func canPunch(t *testing.T, dir string) bool {
	f, err := os.CreateTemp(dir, "probe")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(make([]byte, 8192)); err != nil {
		t.Fatal(err)
	}
	err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096)
	return err == nil
}

func stat(t *testing.T, path string) *syscall.Stat_t {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t)
}

func TestFormat(t *testing.T) {
	const slotSize = 64 << 10
	path := filepath.Join(t.TempDir(), "dev")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, container.HeaderSize+5*slotSize+1234); err != nil {
		t.Fatal(err)
	}
	c, err := container.Format(path, 9, slotSize, false)
	if err != nil {
		t.Fatal(err)
	}
	want := container.Header{ID: 9, SlotSize: slotSize, Slots: 5}
	if c.Header() != want {
		t.Errorf("Format made %v, want %v", c.Header(), want)
	}
	if _, err := c.WriteAt([]byte("formatted"), 5*slotSize-9); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	c, err = container.Open(path, &want)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := make([]byte, 9)
	if _, err := c.ReadAt(got, 5*slotSize-9); err != nil || string(got) != "formatted" {
		t.Errorf("after reopen: %q, %v", got, err)
	}
}

func TestFormatInvalid(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dev")
	if err := os.WriteFile(path, make([]byte, container.HeaderSize+4096), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, slotSize := range []int64{0, 1000, 5000, 8192} { // 8192: no whole slot fits
		if _, err := container.Format(path, 1, slotSize, false); !errors.Is(err, container.ErrInvalidHeader) {
			t.Errorf("Format(slot size %d) = %v; want ErrInvalidHeader", slotSize, err)
		}
	}
	if _, err := container.ReadHeader(path); !errors.Is(err, container.ErrNotContainer) {
		t.Errorf("failed Format wrote a header: ReadHeader = %v", err)
	}
	if _, err := container.Format(filepath.Join(t.TempDir(), "missing"), 1, 4096, false); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Format(missing) = %v; want fs.ErrNotExist", err)
	}
}

// TestAllocated checks that a file container reports what du(1) would:
// its allocated blocks, growing with writes and shrinking with punches.
func TestAllocated(t *testing.T) {
	const slotSize = 1 << 20
	c, path := create(t, container.Header{ID: 1, SlotSize: slotSize, Slots: 4})
	check := func(what string) int64 {
		t.Helper()
		got, err := c.Allocated()
		if err != nil {
			t.Fatalf("%s: Allocated: %v", what, err)
		}
		if want := stat(t, path).Blocks * 512; got != want {
			t.Errorf("%s: Allocated %d, stat says %d", what, got, want)
		}
		return got
	}
	fresh := check("fresh")
	if fresh > 64<<10 {
		t.Errorf("fresh container holds %d bytes; want it sparse, its header too", fresh)
	}
	if _, err := c.WriteAt(bytes.Repeat([]byte{1}, 2*slotSize), 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	written := check("two slots written")
	if written < fresh+2*slotSize {
		t.Errorf("two slots written: %d bytes allocated, want at least %d", written, fresh+2*slotSize)
	}
	if canPunch(t, filepath.Dir(path)) {
		if err := container.FreeSlot(c, 1); err != nil {
			t.Fatal(err)
		}
		if punched := check("one slot punched"); punched > written-slotSize {
			t.Errorf("one slot punched: %d bytes allocated, want at most %d", punched, written-slotSize)
		}
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Allocated(); !errors.Is(err, container.ErrClosed) {
		t.Errorf("Allocated after Close: %v, want ErrClosed", err)
	}

	m := container.NewMemory(1, 64<<10, 4)
	if _, err := m.WriteAt([]byte{1}, 64<<10+5); err != nil {
		t.Fatal(err)
	}
	if n, err := m.Allocated(); n != 64<<10 || err != nil {
		t.Errorf("memory with one byte written: Allocated %d, %v; want one 64 KiB chunk", n, err)
	}
	if err := container.FreeSlot(m, 1); err != nil {
		t.Fatal(err)
	}
	if n, err := m.Allocated(); n != 0 || err != nil {
		t.Errorf("memory punched: Allocated %d, %v; want 0", n, err)
	}
}
