package container_test

import (
	"bytes"
	"errors"
	"os"
	"strings"
	"syscall"
	"testing"

	"segmap/internal/container"
	"segmap/internal/container/containertest"
	"segmap/internal/loopdev"
)

// TestBlockDevice runs the conformance suite on containers formatted onto
// loop devices: a block device, whose size st_size does not give and
// whose punches go through the block layer.
func TestBlockDevice(t *testing.T) {
	containertest.Run(t, func(t *testing.T, slotSize, slots int64) container.Container {
		dev, _ := loopdev.Attach(t, container.HeaderSize+slots*slotSize)
		c, err := container.Format(dev, 5, slotSize, false)
		if err != nil {
			t.Fatal(err)
		}
		return c
	})
}

// TestBlockDeviceFormat formats a loop device, refuses it while it holds
// ext4 unless forced, and writes, reads and punches through File on it.
func TestBlockDeviceFormat(t *testing.T) {
	const slotSize = 1 << 20
	const size = 64 << 20
	dev, backing := loopdev.Attach(t, size)

	loopdev.Run(t, "mkfs.ext4", "-q", "-F", dev)
	_, err := container.Format(dev, 1, slotSize, false)
	if !errors.Is(err, container.ErrNotBlank) || !strings.Contains(err.Error(), "ext2/3/4 file system") || !strings.Contains(err.Error(), dev) {
		t.Fatalf("Format over ext4: %v; want ErrNotBlank naming the device and ext2/3/4", err)
	}
	// A device in use (held exclusively, as a mount holds it) is refused
	// even with force.
	held, err := os.OpenFile(dev, os.O_RDWR|syscall.O_EXCL, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := container.Format(dev, 1, slotSize, true); !errors.Is(err, syscall.EBUSY) {
		t.Errorf("Format with force of a device in use: %v; want EBUSY", err)
	}
	held.Close()
	c, err := container.Format(dev, 1, slotSize, true)
	if err != nil {
		t.Fatalf("Format with force: %v", err)
	}
	want := container.Header{ID: 1, SlotSize: slotSize, Slots: (size - container.HeaderSize) / slotSize}
	if c.Header() != want {
		t.Fatalf("Format made %v, want %v", c.Header(), want)
	}
	if _, err := c.Allocated(); !errors.Is(err, container.ErrAllocationUnknown) {
		t.Errorf("Allocated on a block device: %v; want ErrAllocationUnknown", err)
	}

	// Write two slots, punch the first: it reads as zero, the second is
	// intact, and the loop device's backing file gave the blocks back (a
	// real discard, not zeros written).
	data := bytes.Repeat([]byte("segmap!"), 2*slotSize/7+1)[:2*slotSize]
	if _, err := c.WriteAt(data, 3*slotSize); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	before := allocated(t, backing)
	if err := container.FreeSlot(c, 3); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 2*slotSize)
	if _, err := c.ReadAt(got, 3*slotSize); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:slotSize], make([]byte, slotSize)) {
		t.Error("punched slot does not read as zero")
	}
	if !bytes.Equal(got[slotSize:], data[slotSize:]) {
		t.Error("slot next to the punched one changed")
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if after := allocated(t, backing); after > before-slotSize/2 {
		t.Errorf("backing file holds %d bytes after the punch, %d before: the punch released nothing", after, before)
	}
	// An unaligned punch (not whole 512-byte sectors) reads as zero too.
	if err := c.Punch(4*slotSize+100, 1000); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReadAt(got[:2000], 4*slotSize); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:100], data[slotSize:slotSize+100]) || !bytes.Equal(got[100:1100], make([]byte, 1000)) || !bytes.Equal(got[1100:2000], data[slotSize+1100:slotSize+2000]) {
		t.Error("unaligned punch: wrong bytes around or in the range")
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}

	// Open finds it whole; a second Format refuses it as a container.
	c, err = container.Open(dev, &container.Header{ID: 1, SlotSize: slotSize})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	if _, err := c.ReadAt(got[:7], 4*slotSize); err != nil || string(got[:7]) != string(data[slotSize:slotSize+7]) {
		t.Errorf("after reopening: %q, %v", got[:7], err)
	}
	c.Close()
	if _, err := container.Format(dev, 2, slotSize, false); !errors.Is(err, container.ErrNotBlank) || !strings.Contains(err.Error(), "segmap container 1") {
		t.Errorf("Format over a container: %v; want ErrNotBlank naming container 1", err)
	}
}

// allocated returns the bytes a file holds on its file system.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Blocks * 512
}
