package csi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"segmap/internal/nbd/nbdclient"
	"segmap/internal/nbd/nbdwire"
)

// FuseLoop is the Attacher for hosts without the kernel's NBD client:
// 'segmap fusedisk' serves the export as one file in a FUSE mount, and a
// loop device over that file is the block device. Unlike nbdfuse, the
// file follows the disk when it grows (on SIGHUP), and 'losetup -c'
// makes the loop device follow the file, so a mounted volume grows
// online.
//
// The fusedisk process is started in its own session, so that it
// outlives a restart of the node plugin; its pid and the loop device are
// kept in DIR/attach.json, its output in DIR/fusedisk.log.
type FuseLoop struct {
	// NBD is the address of this host's agent's NBD listener.
	NBD string
	// Exe is the segmap binary to run fusedisk from.
	Exe string
	// Logger logs each attach and detach.
	Logger *slog.Logger
}

// attachState is DIR/attach.json.
type attachState struct {
	Export string `json:"export"`
	Pid    int    `json:"pid"`
	Loop   string `json:"loop"`
}

const readyTimeout = 30 * time.Second

func (a *FuseLoop) logger() *slog.Logger {
	if a.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return a.Logger
}

func fuseDir(dir string) string  { return filepath.Join(dir, "fuse") }
func fuseFile(dir string) string { return filepath.Join(dir, "fuse", "disk") }

func readAttach(dir string) (*attachState, error) {
	b, err := os.ReadFile(filepath.Join(dir, "attach.json"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var st attachState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, "attach.json"), err)
	}
	return &st, nil
}

// alive says whether pid runs fusedisk for dir (a pid may be reused).
func alive(pid int, dir string) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(string(b), "\x00")
	stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if i := strings.LastIndexByte(string(stat), ')'); i >= 0 && strings.HasPrefix(string(stat[i:]), ") Z") {
		return false // a zombie
	}
	return len(args) > 2 && args[1] == "fusedisk" && strings.Contains(string(b), fuseDir(dir))
}

// backing is the file loop device dev reads, "" if it is not attached.
func backing(dev string) string {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// loopsOver lists the loop devices that read file.
func loopsOver(file string) []string {
	ps, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	var out []string
	for _, p := range ps {
		if b, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(b)) == file {
			out = append(out, "/dev/"+filepath.Base(filepath.Dir(filepath.Dir(p))))
		}
	}
	return out
}

func (a *FuseLoop) Device(dir string) (string, bool, error) {
	st, err := readAttach(dir)
	if err != nil || st == nil {
		return "", false, err
	}
	if !alive(st.Pid, dir) {
		return st.Loop, false, fmt.Errorf("fusedisk (pid %d) for %s has ended; see %s", st.Pid, dir, filepath.Join(dir, "fusedisk.log"))
	}
	if backing(st.Loop) != fuseFile(dir) {
		return st.Loop, false, fmt.Errorf("loop device %s no longer reads %s", st.Loop, fuseFile(dir))
	}
	return st.Loop, true, nil
}

func (a *FuseLoop) Attach(ctx context.Context, export, dir string) (string, error) {
	if dev, ok, _ := a.Device(dir); ok {
		return dev, nil
	}
	// Whatever a failed or half-done attach left goes first.
	if err := a.Detach(ctx, dir); err != nil {
		return "", err
	}
	// Ask the agent first: a clear error for an export it does not serve.
	if _, err := a.exportSize(ctx, export); err != nil {
		return "", err
	}
	if err := os.MkdirAll(fuseDir(dir), 0o700); err != nil {
		return "", err
	}
	logPath := filepath.Join(dir, "fusedisk.log")
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return "", err
	}
	cmd := exec.Command(a.Exe, "fusedisk", "--nbd", a.NBD, "--export", export, "--dir", fuseDir(dir))
	cmd.Stdout, cmd.Stderr = lf, lf
	// Its own session: a restart of the plugin (or a signal to its
	// process group) leaves the disk served.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	lf.Close()
	if err != nil {
		return "", fmt.Errorf("start fusedisk: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }() // reaps it whenever it ends
	if err := waitReady(ctx, logPath, exited); err != nil {
		// Not ready in time: it may have mounted, or be about to.
		kerr := cmd.Process.Kill()
		if errors.Is(kerr, os.ErrProcessDone) {
			kerr = nil
		}
		werr := <-exited // reaped
		a.logger().Debug("fusedisk stopped before it was ready", "export", export, "err", werr)
		return "", errors.Join(err, kerr, unmountFuse(fuseDir(dir)))
	}
	// From here on, a failure takes back all that was made.
	fail := func(err error) (string, error) { return "", errors.Join(err, a.Detach(ctx, dir)) }
	st := &attachState{Export: export, Pid: cmd.Process.Pid}
	if err := writeAttach(dir, st); err != nil {
		return fail(err)
	}
	out, err := exec.CommandContext(ctx, "losetup", "--find", "--show", fuseFile(dir)).CombinedOutput()
	if err != nil {
		return fail(fmt.Errorf("losetup %s: %w: %s", fuseFile(dir), err, strings.TrimSpace(string(out))))
	}
	st.Loop = strings.TrimSpace(string(out))
	if err := writeAttach(dir, st); err != nil {
		return fail(err)
	}
	a.logger().Info("volume attached", "export", export, "device", st.Loop, "fusedisk_pid", st.Pid)
	return st.Loop, nil
}

func writeAttach(dir string, st *attachState) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	p := filepath.Join(dir, "attach.json")
	if err := os.WriteFile(p+".tmp", b, 0o600); err != nil {
		return err
	}
	return os.Rename(p+".tmp", p)
}

// waitReady waits for fusedisk's ready line in its log, for it to end,
// or for readyTimeout.
func waitReady(ctx context.Context, logPath string, exited <-chan error) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		b, _ := os.ReadFile(logPath)
		if strings.Contains(string(b), "fusedisk: ready") {
			return nil
		}
		select {
		case err := <-exited:
			b, _ := os.ReadFile(logPath)
			return fmt.Errorf("fusedisk ended before it was ready (%v): %s", err, strings.TrimSpace(string(b)))
		case <-ctx.Done():
			return fmt.Errorf("fusedisk not ready after %v: %w", readyTimeout, ctx.Err())
		case <-tick.C:
		}
	}
}

// exportSize asks the agent for the export's size.
func (a *FuseLoop) exportSize(ctx context.Context, export string) (uint64, error) {
	c, err := nbdclient.Dial(ctx, a.NBD, export, nbdclient.ClientConfig{})
	if errors.Is(err, nbdwire.ErrUnknownExport) {
		return 0, fmt.Errorf("%w: %q at %s", ErrNoExport, export, a.NBD)
	}
	if err != nil {
		return 0, fmt.Errorf("the segmap agent at %s: %w", a.NBD, err)
	}
	n := c.Size()
	c.Close()
	return n, nil
}

func (a *FuseLoop) Grow(ctx context.Context, dir string, want uint64) (uint64, error) {
	st, err := readAttach(dir)
	if err != nil {
		return 0, err
	}
	dev, ok, err := a.Device(dir)
	if !ok {
		return 0, fmt.Errorf("grow: nothing attached at %s: %v", dir, err)
	}
	// Follow the disk to its size now, which may be more than asked.
	n, err := a.exportSize(ctx, st.Export)
	if err != nil {
		return 0, fmt.Errorf("grow: %w", err)
	}
	want = max(want, n)
	if err := unix.Kill(st.Pid, unix.SIGHUP); err != nil {
		return 0, fmt.Errorf("grow: signal fusedisk (pid %d): %w", st.Pid, err)
	}
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	for {
		fi, err := os.Stat(fuseFile(dir))
		if err != nil {
			return 0, err
		}
		if uint64(fi.Size()) >= want {
			break
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("grow: %s still has %d bytes, want %d: %w", fuseFile(dir), fi.Size(), want, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	if out, err := exec.CommandContext(ctx, "losetup", "--set-capacity", dev).CombinedOutput(); err != nil {
		return 0, fmt.Errorf("losetup --set-capacity %s: %w: %s", dev, err, strings.TrimSpace(string(out)))
	}
	return deviceSize(dev)
}

func (a *FuseLoop) Detach(ctx context.Context, dir string) error {
	st, err := readAttach(dir)
	if err != nil {
		return err
	}
	// Every loop device over the file goes, not only the one recorded:
	// an Attach that stopped between losetup and writing attach.json
	// made one that is not, and it would hold the FUSE mount (and so
	// fusedisk) forever. Loop devices over those go first.
	loops := loopsOver(fuseFile(dir))
	if st != nil && st.Loop != "" && !slices.Contains(loops, st.Loop) && backing(st.Loop) == fuseFile(dir) {
		loops = append(loops, st.Loop)
	}
	for _, l := range loops {
		for _, over := range append(loopsOver(l), l) {
			if out, err := exec.CommandContext(ctx, "losetup", "--detach", over).CombinedOutput(); err != nil {
				return fmt.Errorf("losetup --detach %s: %w: %s", over, err, strings.TrimSpace(string(out)))
			}
		}
	}
	if err := unmountFuse(fuseDir(dir)); err != nil {
		return err
	}
	if st != nil && st.Pid > 0 {
		// fusedisk exits once its mount is gone.
		deadline := time.Now().Add(10 * time.Second)
		for alive(st.Pid, dir) {
			if time.Now().After(deadline) {
				if err := unix.Kill(st.Pid, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
					return fmt.Errorf("fusedisk (pid %d) does not end: %w", st.Pid, err)
				}
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	if st != nil {
		a.logger().Info("volume detached", "device", st.Loop, "dir", dir)
	}
	return os.RemoveAll(filepath.Join(dir, "attach.json"))
}

// unmountFuse unmounts fusedisk's mount at p, which makes fusedisk exit.
// A loop device lets go of the file a moment after its detach, so a busy
// mount is tried again for a while; a mount still busy after that, or
// one whose fusedisk has died, is detached lazily.
func unmountFuse(p string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, ok, err := mountedAt(p); err != nil || !ok {
			return err
		}
		err := unix.Unmount(p, 0)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			if err := unix.Unmount(p, unix.MNT_DETACH); err != nil {
				return fmt.Errorf("unmount %s: %w", p, err)
			}
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
}
