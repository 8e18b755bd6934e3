// Package loopdev gives tests real block devices: loop devices over
// sparse files, made with losetup(8). A test that needs one fails, never
// skips, when it cannot have one (losetup missing, not root, no loop
// support): 'make deps' installs losetup, and the tests run as root.
package loopdev

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Attach makes a sparse file of size bytes in a temporary directory of t,
// attaches a loop device to it and returns the device's path and the
// file's. The device is detached when t ends.
func Attach(t testing.TB, size int64) (dev, backing string) {
	t.Helper()
	if _, err := exec.LookPath("losetup"); err != nil {
		t.Fatal("losetup is missing: run 'make deps' (it installs the 'mount' package)")
	}
	backing = filepath.Join(t.TempDir(), "loop.img")
	f, err := os.OpenFile(backing, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", backing).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup --find --show %s: %v: %s (loop devices need root and the loop module)", backing, err, out)
	}
	dev = strings.TrimSpace(string(out))
	if !strings.HasPrefix(dev, "/dev/") {
		t.Fatalf("losetup gave %q", dev)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev, backing
}

// Run runs a command a test needs (mkfs.ext4 and the like) and fails the
// test if it fails.
func Run(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}
