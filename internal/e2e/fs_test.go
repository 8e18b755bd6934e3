package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
)

// attach exposes an NBD export as a block device: nbdfuse makes it a file
// in a FUSE mount, losetup makes the file a loop device. It returns the
// device; everything is undone when the test ends.
func attach(t *testing.T, uri string, readOnly bool) string {
	t.Helper()
	mnt := t.TempDir()
	pid := filepath.Join(t.TempDir(), "nbdfuse.pid")
	args := []string{"-P", pid}
	if readOnly {
		args = append(args, "-r")
	}
	args = append(args, mnt+"/disk", uri)
	cmd := exec.Command("nbdfuse", args...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(pid); err == nil {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("nbdfuse exited: %v\n%s", err, out)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("nbdfuse not ready\n%s", out)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Cleanup(func() {
		runErr(30*time.Second, "fusermount3", "-u", mnt)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
		}
	})
	losetup := []string{"--find", "--show"}
	if readOnly {
		losetup = append(losetup, "--read-only")
	}
	dev := strings.TrimSpace(run(t, 30*time.Second, "losetup", append(losetup, mnt+"/disk")...))
	if !strings.HasPrefix(dev, "/dev/loop") {
		t.Fatalf("losetup gave %q", dev)
	}
	t.Cleanup(func() { runErr(30*time.Second, "losetup", "-d", dev) })
	return dev
}

// mount mounts dev on a new directory, unmounted when the test ends.
func mount(t *testing.T, dev string, opts string) string {
	t.Helper()
	dir := t.TempDir()
	run(t, 30*time.Second, "mount", "-o", opts, dev, dir)
	t.Cleanup(func() {
		if out, err := runErr(60*time.Second, "umount", dir); err != nil {
			t.Errorf("umount %s: %v\n%s", dir, err, out)
		}
	})
	return dir
}

func writeFiles(t *testing.T, dir string, prefix string, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		p := filepath.Join(dir, fmt.Sprintf("%s-%03d", prefix, i))
		data := []byte(strings.Repeat(fmt.Sprintf("%s %d\n", p, i), 1000+i*37))
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func listFiles(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		if e.Name() != "lost+found" {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	return names
}

// TestFilesystem: ext4 on a segmap disk through nbdfuse and a loop device;
// a snapshot taken with the filesystem frozen holds exactly the files of
// its moment and is clean to e2fsck.
func TestFilesystem(t *testing.T) {
	requireTools(t, "nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "fsfreeze", "mount")
	if os.Geteuid() != 0 {
		t.Fatal("the filesystem test needs root (losetup, mount)")
	}
	u := startUp(t, t.TempDir())
	u.cli("disk", "create", "fs", "--size", "256M")
	dev := attach(t, u.uri("fs"), false)
	run(t, 120*time.Second, "mkfs.ext4", "-q", "-F", dev)
	mnt := mount(t, dev, "rw")
	writeFiles(t, mnt, "before", 40)
	run(t, 60*time.Second, "sync", "-f", mnt)
	want := listFiles(t, mnt)

	// Freeze: the filesystem flushes everything and holds new writes, so
	// the snapshot is of a clean filesystem.
	run(t, 60*time.Second, "fsfreeze", "-f", mnt)
	_, errOut, code := u.cliResult("snapshot", "fs", "--name", "fs@t1")
	run(t, 60*time.Second, "fsfreeze", "-u", mnt)
	if code != 0 {
		t.Fatalf("snapshot: %s", errOut)
	}
	writeFiles(t, mnt, "after", 25)
	os.Remove(filepath.Join(mnt, "before-000"))
	run(t, 60*time.Second, "sync", "-f", mnt)

	snapDev := attach(t, u.uri("fs@t1"), true)
	if out, err := runErr(120*time.Second, "e2fsck", "-fn", snapDev); err != nil {
		t.Fatalf("e2fsck -fn of the snapshot: %v\n%s", err, out)
	}
	snapMnt := mount(t, snapDev, "ro,noload")
	got := listFiles(t, snapMnt)
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("snapshot holds %d files %v, want %d %v", len(got), got, len(want), want)
	}
	for _, n := range []string{"before-000", "before-039"} {
		a, err := os.ReadFile(filepath.Join(snapMnt, n))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(string(a), filepath.Join(mnt, n)) {
			t.Errorf("%s in the snapshot does not hold its data", n)
		}
	}
	// The live filesystem has moved on.
	if live := listFiles(t, mnt); len(live) != len(want)-1+25 {
		t.Errorf("live filesystem has %d files, want %d", len(live), len(want)-1+25)
	}
}
