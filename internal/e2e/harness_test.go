package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"segmap/internal/heldport"
)

// bin is the segmap binary built for the tests; etcdBin, the etcd member
// of the HA tests (internal/e2e/etcdnode); scratch, a directory the
// external tools run in.
var bin, etcdBin, scratch string

func TestMain(m *testing.M) {
	// A race-built process sleeps a second as it exits (the race
	// runtime's atexit_sleep_ms, for other threads to report): a second
	// for every CLI command and every server stopped, most of what the
	// end-to-end tests took. Races are still reported, and fail the
	// process, as they happen.
	if os.Getenv("GORACE") == "" {
		if err := os.Setenv("GORACE", "atexit_sleep_ms=0"); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	dir, err := os.MkdirTemp("", "segmap-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = filepath.Join(dir, "segmap")
	scratch = filepath.Join(dir, "scratch")
	if err := os.Mkdir(scratch, 0o700); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	build := exec.Command("go", "build", "-race", "-o", bin, "./cmd/segmap")
	if os.Getenv("SEGMAP_E2E_NORACE") != "" {
		build = exec.Command("go", "build", "-o", bin, "./cmd/segmap")
	}
	build.Dir = root
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build segmap:", err)
		os.Exit(1)
	}
	etcdBin = filepath.Join(dir, "etcdnode")
	build = exec.Command("go", "build", "-o", etcdBin, "./internal/e2e/etcdnode")
	build.Dir = root
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build etcdnode:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// requireTools fails the test if a client it drives is missing: the tests
// never skip for a missing tool; 'make deps' installs them.
func requireTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is missing: run 'make deps' (scripts/deps.sh installs the Debian packages the tests drive)", tool)
		}
	}
}

// up is a running 'segmap up' process.
type up struct {
	t     *testing.T
	dir   string
	admin string // admin API address
	nbd   string // NBD address
	// http is the base URL of the HTTP listener (metrics, dashboard),
	// when the server has one.
	http string
	// clients is an etcd member's client URL.
	clients string
	cmd     *exec.Cmd
	out     *syncBuffer
	done    chan error
	// exited is closed once the process has been waited for: read it,
	// not cmd.ProcessState, which Wait sets in another goroutine.
	exited chan struct{}

	wasKilled bool
}

// hasExited reports whether the process has exited (and been waited for).
func (u *up) hasExited() bool {
	select {
	case <-u.exited:
		return true
	default:
		return false
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startUp runs 'segmap up' on data directory dir with ports chosen by the
// kernel, and waits until it is ready. It is stopped when the test ends.
func startUp(t *testing.T, dir string, extra ...string) *up {
	t.Helper()
	return start(t, dir, append([]string{"up", "--data", dir, "--nbd-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--pool-size", "16G"}, extra...)...)
}

// start runs a segmap server command (up, controller, agent) and waits
// for its 'ready' line, taking the addresses it prints. It is stopped when
// the test ends.
func start(t *testing.T, dir string, args ...string) *up {
	t.Helper()
	return startHeld(t, dir, nil, args...)
}

// startHeld is start for a server that listens on ports the test holds:
// ports[i] is its descriptor fdArg(i), to name in its listen flags, so
// that it comes back on the same address when started again after a kill.
func startHeld(t *testing.T, dir string, ports []*heldport.Port, args ...string) *up {
	t.Helper()
	return startCmd(t, exec.Command(bin, args...), dir, ports)
}

// fdArg names the descriptor that startHeld hands ports[i] over as.
func fdArg(i int) string { return fmt.Sprintf("fd:%d", 3+i) }

// startBin is start for another binary.
func startBin(t *testing.T, binary, dir string, args ...string) *up {
	t.Helper()
	return startCmd(t, exec.Command(binary, args...), dir, nil)
}

// startCmd starts cmd, a server that prints a line starting with "ready"
// once it serves, with ports as its descriptors 3, 4, ..., and waits for
// that line. While the process is down, its ports refuse connections.
func startCmd(t *testing.T, cmd *exec.Cmd, dir string, ports []*heldport.Port) *up {
	t.Helper()
	args := cmd.Args[1:]
	for _, p := range ports {
		f, err := p.File()
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close() // the child has its own copy once started
		cmd.ExtraFiles = append(cmd.ExtraFiles, f)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	u := &up{t: t, dir: dir, cmd: cmd, out: &syncBuffer{}, done: make(chan error, 1), exited: make(chan struct{})}
	cmd.Stderr = u.out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stdout)
		signalled := false
		for sc.Scan() {
			line := sc.Text()
			u.out.Write([]byte(line + "\n"))
			if f, ok := field(line, "admin API on "); ok {
				u.admin = f
			}
			if f, ok := field(line, "NBD on "); ok {
				u.nbd = f
			}
			if f, ok := field(line, "metrics on "); ok {
				u.http = f
			}
			if f, ok := field(line, "clients on "); ok {
				u.clients = f
			}
			if strings.HasPrefix(line, "ready") && !signalled {
				signalled = true
				close(ready)
			}
		}
		err := cmd.Wait()
		close(u.exited)
		for _, p := range ports {
			p.Refuse()
		}
		u.done <- err
	}()
	select {
	case <-ready:
	case err := <-u.done:
		t.Fatalf("segmap %s exited: %v\n%s", args[0], err, u.out)
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("segmap %s not ready in 30s\n%s", args[0], u.out)
	}
	// Cleanups run last first: this one, after the process has stopped.
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("output of segmap %s:\n%s", strings.Join(args, " "), u.out)
		}
	})
	t.Cleanup(func() { u.stop() })
	return u
}

// kill stops the process with SIGKILL, as a crash would.
func (u *up) kill() {
	u.t.Helper()
	if u.hasExited() || u.killed() {
		return
	}
	u.cmd.Process.Kill()
	<-u.done
	u.wasKilled = true
}

func (u *up) killed() bool { return u.wasKilled }

// field returns the first word after prefix in line.
func field(line, prefix string) (string, bool) {
	i := strings.Index(line, prefix)
	if i < 0 {
		return "", false
	}
	f := strings.Fields(line[i+len(prefix):])
	if len(f) == 0 {
		return "", false
	}
	return f[0], true
}

// stop sends SIGTERM and waits for a clean exit.
func (u *up) stop() {
	t := u.t
	t.Helper()
	if u.hasExited() || u.killed() {
		return
	}
	u.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-u.done:
		if err != nil {
			t.Errorf("segmap %s did not stop cleanly: %v\n%s", u.cmd.Args[1], err, u.out)
		}
		if !strings.Contains(u.out.String(), "stopped") {
			t.Errorf("segmap %s did not say it stopped:\n%s", u.cmd.Args[1], u.out)
		}
	case <-time.After(60 * time.Second):
		u.cmd.Process.Kill()
		t.Errorf("segmap %s did not stop within 60s\n%s", u.cmd.Args[1], u.out)
	}
	if strings.Contains(u.out.String(), "DATA RACE") {
		t.Errorf("segmap %s reported a data race:\n%s", u.cmd.Args[1], u.out)
	}
}

func (u *up) uri(name string) string { return "nbd://" + u.nbd + "/" + name }

// cli runs a segmap admin command against u and returns its output; the
// test fails if it fails.
func (u *up) cli(args ...string) string {
	u.t.Helper()
	out, errOut, code := u.cliResult(args...)
	if code != 0 {
		u.t.Fatalf("segmap %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// cliResult runs a segmap admin command and returns stdout, stderr and the
// exit status.
func (u *up) cliResult(args ...string) (string, string, int) {
	u.t.Helper()
	return runBin(u.t, append([]string{"--controller", u.admin}, args...)...)
}

func runBin(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	if ee := (*exec.ExitError)(nil); errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("segmap %v: %v", args, err)
	}
	return out.String(), errOut.String(), code
}

// cliJSON runs a command with --json and decodes its output into v.
func (u *up) cliJSON(v any, args ...string) {
	u.t.Helper()
	out := u.cli(append(args, "--json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		u.t.Fatalf("segmap %v --json: %v\n%s", args, err, out)
	}
}

// diskInfo is the JSON of 'segmap disk info'.
type diskInfo struct {
	Name      string `json:"name"`
	Size      string `json:"size"` // protojson writes uint64 as a string
	Allocated string `json:"allocated"`
	Exclusive string `json:"exclusive"`
	Shared    string `json:"shared"`
	Origin    string `json:"origin"`
	ReadOnly  bool   `json:"read_only"`
}

type statusInfo struct {
	UsedBytes  string `json:"used_bytes"`
	FreeBytes  string `json:"free_bytes"`
	TotalBytes string `json:"total_bytes"`
}

// run runs an external tool with a time limit and returns its combined
// output; the test fails if it fails.
func run(t *testing.T, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	out, err := runErr(timeout, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func runErr(timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = scratch // fio leaves verify state files in its working directory
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:/usr/sbin:/bin:/sbin:"+os.Getenv("PATH"))
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	err := cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %v", timeout)
	}
	return b.String(), err
}

// python runs a Python 3 script with libnbd's binding (Debian's python,
// where python3-libnbd lives) and returns its output.
func python(t *testing.T, timeout time.Duration, script string, args ...string) string {
	t.Helper()
	return run(t, timeout, "/usr/bin/python3", append([]string{"-c", script}, args...)...)
}

// background starts a command and returns a function that waits for it.
func background(t *testing.T, name string, args ...string) func() (string, error) {
	t.Helper()
	wait, _ := backgroundOut(t, name, args...)
	return wait
}

// backgroundOut is background that also gives the output so far.
func backgroundOut(t *testing.T, name string, args ...string) (func() (string, error), *syncBuffer) {
	t.Helper()
	wait, b, _ := backgroundProc(t, name, args...)
	return wait, b
}

// backgroundProc is backgroundOut that also gives the process, for a test
// that stops it with a signal.
func backgroundProc(t *testing.T, name string, args ...string) (func() (string, error), *syncBuffer, *os.Process) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = scratch
	b := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = b, b
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	// Kill, not cmd.ProcessState, which Wait sets in another goroutine:
	// killing a process already waited for does nothing.
	t.Cleanup(func() { cmd.Process.Kill() })
	return func() (string, error) {
		err := <-done
		return b.String(), err
	}, b, cmd.Process
}

func sha(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := newHash()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

// soakDuration is how long the long form of a test runs (`make soak` sets
// SEGMAP_SOAK to a Go duration); 0 for the short form.
func soakDuration(t *testing.T) time.Duration {
	t.Helper()
	v := os.Getenv("SEGMAP_SOAK")
	if v == "" {
		return 0
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		t.Fatalf("SEGMAP_SOAK=%q: want a Go duration such as 30m", v)
	}
	return d
}
