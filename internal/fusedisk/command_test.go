package fusedisk

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"segmap/internal/tlsconf"
)

// The segmap binary, built once for the tests that run 'segmap fusedisk'
// as the CSI node plugin will: as the end-to-end harness builds it (with
// the race detector unless SEGMAP_E2E_NORACE is set).
var segmapBin struct {
	once sync.Once
	path string
	err  error
}

func buildSegmap(t *testing.T) string {
	t.Helper()
	segmapBin.once.Do(func() {
		dir, err := os.MkdirTemp("", "segmap-fusedisk-")
		if err != nil {
			segmapBin.err = err
			return
		}
		segmapBin.path = filepath.Join(dir, "segmap")
		_, file, _, _ := runtime.Caller(0)
		args := []string{"build", "-race", "-o", segmapBin.path, "./cmd/segmap"}
		if os.Getenv("SEGMAP_E2E_NORACE") != "" {
			args = []string{"build", "-o", segmapBin.path, "./cmd/segmap"}
		}
		cmd := exec.Command("go", args...)
		cmd.Dir = filepath.Join(filepath.Dir(file), "..", "..")
		if out, err := cmd.CombinedOutput(); err != nil {
			segmapBin.err = fmt.Errorf("build segmap: %v: %s", err, out)
		}
	})
	if segmapBin.err != nil {
		t.Fatal(segmapBin.err)
	}
	return segmapBin.path
}

// fusediskProc is a running 'segmap fusedisk'.
type fusediskProc struct {
	t      *testing.T
	cmd    *exec.Cmd
	dir    string
	ready  string // its ready line
	lines  chan string
	exited chan error
}

// startFusedisk runs 'segmap fusedisk' on the export and waits for its
// ready line. When the test ends it is killed if still running and its
// mount removed.
func startFusedisk(t *testing.T, addr, export, dir string, extra ...string) *fusediskProc {
	t.Helper()
	// GORACE: a race-built process sleeps a second as it exits, unless
	// told not to (races still fail it).
	cmd := exec.Command(buildSegmap(t), append([]string{"fusedisk", "--nbd", addr, "--export", export, "--dir", dir}, extra...)...)
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &fusediskProc{t: t, cmd: cmd, dir: dir, lines: make(chan string, 1000), exited: make(chan error, 1)}
	readyc := make(chan string, 1)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			select {
			case readyc <- sc.Text():
			default:
				t.Errorf("segmap fusedisk: unexpected output %q", sc.Text())
			}
		}
	}()
	go func() {
		defer wg.Done()
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			t.Logf("segmap fusedisk: %s", sc.Text())
			select {
			case p.lines <- sc.Text():
			default:
			}
		}
	}()
	go func() {
		wg.Wait() // Wait closes the pipes: read them to the end first
		p.exited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			cmd.Process.Kill()
			<-p.exited
		}
		if mounted(t, dir) {
			t.Errorf("%s still mounted after segmap fusedisk ended", dir)
			exec.Command("umount", "-l", dir).Run()
		}
	})
	select {
	case p.ready = <-readyc:
	case err := <-p.exited:
		p.exited <- err
		t.Fatalf("segmap fusedisk exited before it was ready: %v", err)
	case <-time.After(60 * time.Second):
		t.Fatal("segmap fusedisk: no ready line within 60s")
	}
	return p
}

// waitLog waits for a line of the process's log containing substr.
func (p *fusediskProc) waitLog(substr string) string {
	p.t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case l := <-p.lines:
			if strings.Contains(l, substr) {
				return l
			}
		case <-timeout:
			p.t.Fatalf("segmap fusedisk logged no %q within 30s", substr)
		}
	}
}

// wait waits for the process to exit and returns its error.
func (p *fusediskProc) wait() error {
	p.t.Helper()
	select {
	case err := <-p.exited:
		p.exited <- err
		return err
	case <-time.After(30 * time.Second):
		p.t.Fatal("segmap fusedisk did not exit within 30s")
		return nil
	}
}

func (p *fusediskProc) signal(s os.Signal) {
	p.t.Helper()
	if err := p.cmd.Process.Signal(s); err != nil {
		p.t.Fatal(err)
	}
}

// TestFusediskCommand runs 'segmap fusedisk' as the CSI node plugin will:
// it prints its ready line, grows the file on SIGHUP, refuses to go on
// SIGTERM while a loop device holds the file, and unmounts and exits 0 on
// SIGTERM once it is detached, or when unmounted from outside.
func TestFusediskCommand(t *testing.T) {
	requireTools(t, "go", "losetup", "blockdev", "umount")
	mem := newMem("vol", 64*mib)
	addr := startServer(t, mem)
	dir := t.TempDir()
	p := startFusedisk(t, addr, "vol", dir)
	file := filepath.Join(dir, FileName)
	if want := fmt.Sprintf("fusedisk: ready %s %d", file, 64*mib); p.ready != want {
		t.Fatalf("ready line %q, want %q", p.ready, want)
	}
	if !mounted(t, dir) {
		t.Fatal("not mounted once ready")
	}
	dev := strings.TrimSpace(run(t, "losetup", "-f", "--show", file))
	detached := false
	t.Cleanup(func() {
		if !detached {
			exec.Command("losetup", "-d", dev).Run()
		}
	})

	// SIGHUP: the file grows, and so does the loop device.
	mem.grow(96 * mib)
	p.signal(syscall.SIGHUP)
	p.waitLog(`msg="fusedisk: size" bytes=` + strconv.Itoa(96*mib))
	if fi, err := os.Stat(file); err != nil || fi.Size() != 96*mib {
		t.Fatalf("stat after SIGHUP: %v %v", fi, err)
	}
	run(t, "losetup", "-c", dev)
	if got := strings.TrimSpace(run(t, "blockdev", "--getsize64", dev)); got != strconv.Itoa(96*mib) {
		t.Fatalf("blockdev --getsize64 = %s after losetup -c, want %d", got, 96*mib)
	}

	// SIGTERM with the loop device attached: it stays.
	p.signal(syscall.SIGTERM)
	p.waitLog("cannot unmount")
	if !mounted(t, dir) {
		t.Fatal("unmounted under an attached loop device")
	}
	run(t, "losetup", "-d", dev)
	detached = true
	// The loop device lets go of the file once its last opener closed
	// it: SIGTERM until the process goes.
	for i := 0; ; i++ {
		p.signal(syscall.SIGTERM)
		select {
		case err := <-p.exited:
			p.exited <- err
		case l := <-p.lines:
			if strings.Contains(l, "cannot unmount") && i < 20 {
				continue
			}
			if !strings.Contains(l, "unmounted") {
				t.Fatalf("after SIGTERM: %s", l)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("segmap fusedisk: no exit nor log line within 30s of SIGTERM")
		}
		break
	}
	if err := p.wait(); err != nil {
		t.Fatalf("segmap fusedisk after SIGTERM: %v, want exit 0", err)
	}
	if mounted(t, dir) {
		t.Fatal("still mounted after SIGTERM")
	}

	// Unmounted from outside.
	p = startFusedisk(t, addr, "vol", dir)
	if want := fmt.Sprintf("fusedisk: ready %s %d", file, 96*mib); p.ready != want {
		t.Fatalf("ready line %q, want %q", p.ready, want)
	}
	run(t, "umount", dir)
	if err := p.wait(); err != nil {
		t.Fatalf("segmap fusedisk after umount: %v, want exit 0", err)
	}
}

// TestFusediskCommandTLS: with --certs, 'segmap fusedisk' talks to an NBD
// server that requires TLS, presenting an agent certificate.
func TestFusediskCommandTLS(t *testing.T) {
	requireTools(t, "go", "umount")
	certs := t.TempDir()
	if err := tlsconf.Init(certs, tlsconf.InitOptions{Agents: []string{"server", "node1"}}); err != nil {
		t.Fatal(err)
	}
	m, err := tlsconf.DirFiles(certs, tlsconf.RoleAgent, "server").Load()
	if err != nil {
		t.Fatal(err)
	}
	mem := newMem("vol", mib)
	if err := mem.WriteAt(context.Background(), []byte("over TLS"), 4096, false); err != nil {
		t.Fatal(err)
	}
	addr := startServerTLS(t, m.Server(), mem)
	dir := t.TempDir()
	p := startFusedisk(t, addr, "vol", dir, "--certs", certs, "--cert-name", "node1")
	file := filepath.Join(dir, FileName)
	if want := fmt.Sprintf("fusedisk: ready %s %d", file, mib); p.ready != want {
		t.Fatalf("ready line %q, want %q", p.ready, want)
	}
	b, err := os.ReadFile(file)
	if err != nil || !bytes.Equal(b[4096:4104], []byte("over TLS")) {
		t.Fatalf("read over TLS: %v", err)
	}
	p.signal(syscall.SIGINT)
	if err := p.wait(); err != nil {
		t.Fatalf("segmap fusedisk after SIGINT: %v, want exit 0", err)
	}
}

// TestFusediskCommandOutlivesItsReader: the CSI node plugin reads the
// ready line and the logs through pipes and may restart; with the pipes
// closed, 'segmap fusedisk' goes on serving (a log line it cannot write
// does not kill it) and still exits 0 on SIGTERM.
func TestFusediskCommandOutlivesItsReader(t *testing.T) {
	requireTools(t, "go")
	mem := newMem("vol", mib)
	addr := startServer(t, mem)
	dir := t.TempDir()
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(buildSegmap(t), "fusedisk", "--nbd", addr, "--export", "vol", "--dir", dir)
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0")
	cmd.Stdout, cmd.Stderr = outW, errW
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	outW.Close()
	errW.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		select {
		case <-exited:
		default:
			cmd.Process.Kill()
			<-exited
		}
		if mounted(t, dir) {
			t.Errorf("%s still mounted", dir)
			exec.Command("umount", "-l", dir).Run()
		}
	})
	line, err := bufio.NewReader(outR).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "fusedisk: ready ") {
		t.Fatalf("ready line %q, %v", line, err)
	}
	// The reader goes away.
	outR.Close()
	errR.Close()

	// SIGHUP logs a line: into a closed pipe.
	mem.grow(2 * mib)
	cmd.Process.Signal(syscall.SIGHUP)
	file := filepath.Join(dir, FileName)
	grown := false
	for range 200 {
		if fi, err := os.Stat(file); err == nil && fi.Size() == 2*mib {
			grown = true
			break
		}
		time.Sleep(25 * time.Millisecond)
	}
	if !grown {
		t.Fatal("the file did not grow after SIGHUP")
	}
	if _, err := os.ReadFile(file); err != nil {
		t.Fatalf("read after the reader went away: %v", err)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Fatalf("segmap fusedisk after SIGTERM: %v, want exit 0", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("segmap fusedisk did not exit within 30s of SIGTERM")
	}
}
