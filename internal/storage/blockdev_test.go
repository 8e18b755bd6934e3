package storage_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"segmap/internal/container"
	"segmap/internal/loopdev"
	"segmap/internal/nbd/nbdclient"
	"segmap/internal/storage"
)

// TestDevice serves a loop device as a named export beside a directory:
// the device's size is listed, a container cannot be formatted over the
// ext4 on it without force, and a container on it works through OpenNBD
// (write, punch that reads as zero and frees the backing file's blocks,
// reopen after a restart of the node).
func TestDevice(t *testing.T) {
	const slot = 1 << 20
	const size = 64 << 20
	dev, backing := loopdev.Attach(t, size)
	loopdev.Run(t, "mkfs.ext4", "-q", "-F", dev)

	dir := t.TempDir()
	create(t, dir, "file1", 4<<20)
	create(t, dir, "disk", 4<<20) // hidden by the device of the same name
	// Neither a link to the device nor a device node in the directory is
	// served: devices only by name.
	if err := os.Symlink(dev, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(dev, &st); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mknod(filepath.Join(dir, "node"), syscall.S_IFBLK|0o600, int(st.Rdev)); err != nil {
		t.Fatal(err)
	}

	devs := []storage.Device{{Name: "disk", Path: dev}}
	n := startNode(t, dir, "n-", devs...)
	backend, err := storage.NewDir(dir, "n-", devs...)
	if err != nil {
		t.Fatal(err)
	}
	list, err := backend.List(bg)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, x := range list {
		names = append(names, x.Name)
		if x.Name == "n-disk" && x.Size != size {
			t.Errorf("device export size %d, want %d", x.Size, size)
		}
	}
	if strings.Join(names, " ") != "n-disk n-file1" {
		t.Errorf("exports %v, want [n-disk n-file1]", names)
	}
	for _, name := range []string{"link", "node"} {
		if _, err := nbdclient.Dial(bg, n.addr, "n-"+name, nbdclient.ClientConfig{}); err == nil {
			t.Errorf("%s in the directory is served", name)
		}
	}

	uri := n.uri("disk")
	_, err = container.FormatNBD(bg, uri, 7, slot, false, nbdclient.ClientConfig{})
	if !errors.Is(err, container.ErrNotBlank) || !strings.Contains(err.Error(), "ext2/3/4") {
		t.Fatalf("FormatNBD over ext4: %v; want ErrNotBlank naming ext2/3/4", err)
	}
	c, err := container.FormatNBD(bg, uri, 7, slot, true, nbdclient.ClientConfig{})
	if err != nil {
		t.Fatalf("FormatNBD with force: %v", err)
	}
	if want := (container.Header{ID: 7, SlotSize: slot, Slots: (size - container.HeaderSize) / slot}); c.Header() != want {
		t.Fatalf("header %v, want %v", c.Header(), want)
	}
	c.Close()

	want := &container.Header{ID: 7, SlotSize: slot}
	c, err = container.OpenNBD(bg, uri, want, nbdclient.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	p := bytes.Repeat([]byte("device"), 2*slot/6+1)[:2*slot]
	if _, err := c.WriteAt(p, 10*slot); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	before := 512 * blocks(t, backing)
	if err := container.FreeSlot(c, 10); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 2*slot)
	if _, err := c.ReadAt(got, 10*slot); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:slot], make([]byte, slot)) || !bytes.Equal(got[slot:], p[slot:]) {
		t.Error("after punching slot 10: it does not read as zero, or slot 11 changed")
	}
	if after := 512 * blocks(t, backing); after > before-slot/2 {
		t.Errorf("the loop device's backing file holds %d bytes after the punch, %d before", after, before)
	}
	c.Close()

	n.stop(t)
	n = startNode(t, "", "n-", devs...)
	c, err = container.OpenNBD(bg, n.uri("disk"), want, nbdclient.ClientConfig{})
	if err != nil {
		t.Fatalf("reopen over a node serving the device only: %v", err)
	}
	defer c.Close()
	if _, err := c.ReadAt(got[:6], 11*slot); err != nil || string(got[:6]) != string(p[slot:slot+6]) {
		t.Errorf("after restart: %q, %v", got[:6], err)
	}
}

// TestNewDirDevices checks what NewDir refuses as a device.
func TestNewDirDevices(t *testing.T) {
	dir := t.TempDir()
	create(t, dir, "f", 4096)
	dev, _ := loopdev.Attach(t, 4<<20)
	for _, tt := range []struct {
		name string
		devs []storage.Device
		want error
	}{
		{"regular file", []storage.Device{{Name: "d", Path: filepath.Join(dir, "f")}}, storage.ErrNotBlockDevice},
		{"bad name", []storage.Device{{Name: ".d", Path: dev}}, storage.ErrBadName},
		{"same name twice", []storage.Device{{Name: "d", Path: dev}, {Name: "d", Path: dev}}, storage.ErrBadName},
		{"missing", []storage.Device{{Name: "d", Path: filepath.Join(dir, "none")}}, os.ErrNotExist},
	} {
		if _, err := storage.NewDir("", "", tt.devs...); !errors.Is(err, tt.want) {
			t.Errorf("%s: %v; want %v", tt.name, err, tt.want)
		}
	}
	if _, err := storage.OpenDevice(filepath.Join(dir, "f")); !errors.Is(err, storage.ErrNotBlockDevice) {
		t.Errorf("OpenDevice of a file: %v; want ErrNotBlockDevice", err)
	}
}
