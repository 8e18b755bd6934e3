package fusedisk

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"segmap/internal/nbd"
	"segmap/internal/nbd/nbdwire"
)

// The real parts the tests run on: segmap's NBD server (package nbd) over
// an in-memory export whose size can change, a TCP relay that can cut
// connections, the kernel's FUSE and loop devices, and e2fsprogs.

// memExport is an in-memory nbd.Export that can grow. It is sparse
// (chunks of memChunk bytes, made when first written), so that tests can
// have exports larger than what they write.
type memExport struct {
	name string
	ro   bool

	mu struct {
		sync.RWMutex
		size   uint64
		chunks map[uint64][]byte // by index
	}
	flushes atomic.Int64
}

const memChunk = 64 << 10

func newMem(name string, size int) *memExport {
	m := &memExport{name: name}
	m.mu.size = uint64(size)
	m.mu.chunks = map[uint64][]byte{}
	return m
}

func (m *memExport) Size() uint64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.mu.size
}

func (m *memExport) ReadOnly() bool { return m.ro }

// grow makes the export size bytes long; connections made from now on
// see the new size.
func (m *memExport) grow(size int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.mu.size = uint64(size)
}

// span calls f for each piece of [off, off+n) within one chunk, with the
// chunk (nil if never written, unless create) and the piece's bounds in
// it and in the range.
func (m *memExport) spanLocked(off, n uint64, create bool, f func(chunk []byte, lo, hi int, at int)) error {
	if off+n > m.mu.size {
		return errors.New("past the end")
	}
	for done := uint64(0); done < n; {
		pos := off + done
		idx, in := pos/memChunk, int(pos%memChunk)
		k := min(uint64(memChunk-in), n-done)
		c := m.mu.chunks[idx]
		if c == nil && create {
			c = make([]byte, memChunk)
			m.mu.chunks[idx] = c
		}
		f(c, in, in+int(k), int(done))
		done += k
	}
	return nil
}

func (m *memExport) ReadAt(ctx context.Context, p []byte, off uint64) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.spanLocked(off, uint64(len(p)), false, func(c []byte, lo, hi, at int) {
		if c == nil {
			clear(p[at : at+hi-lo])
			return
		}
		copy(p[at:], c[lo:hi])
	})
}

func (m *memExport) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.spanLocked(off, uint64(len(p)), true, func(c []byte, lo, hi, at int) {
		copy(c[lo:hi], p[at:])
	})
}

func (m *memExport) Flush(ctx context.Context) error {
	m.flushes.Add(1)
	return nil
}

func (m *memExport) Trim(ctx context.Context, off, n uint64) error {
	return m.WriteZeroes(ctx, off, n, false)
}

func (m *memExport) WriteZeroes(ctx context.Context, off, n uint64, noHole bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.spanLocked(off, n, false, func(c []byte, lo, hi, at int) {
		if c != nil {
			clear(c[lo:hi])
		}
	})
}

// bytes returns a copy of [off, off+n).
func (m *memExport) bytes(off, n int) []byte {
	p := make([]byte, n)
	if err := m.ReadAt(context.Background(), p, uint64(off)); err != nil {
		panic(err)
	}
	return p
}

// hasBlock reports whether the 4 KiB block b is at a 4 KiB-aligned
// offset at or after from in the export.
func (m *memExport) hasBlock(b []byte, from uint64) bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	for idx, c := range m.mu.chunks {
		for in := 0; in < memChunk; in += 4096 {
			if idx*memChunk+uint64(in) >= from && bytes.Equal(c[in:in+4096], b) {
				return true
			}
		}
	}
	return false
}

type memBackend struct{ exports []*memExport }

func (b *memBackend) List(ctx context.Context) ([]nbd.ExportInfo, error) {
	var out []nbd.ExportInfo
	for _, e := range b.exports {
		out = append(out, nbd.ExportInfo{Name: e.name, Size: e.Size(), ReadOnly: e.ro})
	}
	return out, nil
}

func (b *memBackend) Open(ctx context.Context, name string) (nbd.Export, io.Closer, error) {
	for _, e := range b.exports {
		if e.name == name {
			return e, io.NopCloser(nil), nil
		}
	}
	return nil, nil, fmt.Errorf("export %q: %w", name, nbdwire.ErrUnknownExport)
}

// startServer serves exports on 127.0.0.1:0 until the test ends and
// returns its address.
func startServer(t *testing.T, exports ...*memExport) string {
	t.Helper()
	return startServerWith(t, nil, exports...)
}

// startServerTLS is startServer requiring TLS.
func startServerTLS(t *testing.T, cfg *tls.Config, exports ...*memExport) string {
	t.Helper()
	return startServerWith(t, func(c *nbd.Config) { c.TLS, c.TLSRequired = cfg, true }, exports...)
}

// startServerWith is startServer with edit, if set, changing the
// server's config first.
func startServerWith(t *testing.T, edit func(*nbd.Config), exports ...*memExport) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := nbd.Config{Backend: &memBackend{exports: exports}, Logger: testLogger(t)}
	if edit != nil {
		edit(&cfg)
	}
	srv := nbd.NewServer(cfg)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("server Close: %v", err)
		}
		if err := <-served; !errors.Is(err, nbd.ErrServerClosed) {
			t.Errorf("Serve returned %v", err)
		}
	})
	return l.Addr().String()
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// tWriter sends logs to t.Log, so that they show only when a test fails.
type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// relay forwards TCP connections to a backend and can cut them all, as a
// restarted agent would.
type relay struct {
	l  net.Listener
	wg sync.WaitGroup

	mu struct {
		sync.Mutex
		backend string
		conns   map[net.Conn]struct{}
	}
}

func startRelay(t *testing.T, backend string) *relay {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &relay{l: l}
	r.mu.backend, r.mu.conns = backend, map[net.Conn]struct{}{}
	r.wg.Add(1)
	go r.accept()
	t.Cleanup(r.close)
	return r
}

func (r *relay) addr() string { return r.l.Addr().String() }

func (r *relay) accept() {
	defer r.wg.Done()
	for {
		c, err := r.l.Accept()
		if err != nil {
			return
		}
		r.mu.Lock()
		backend := r.mu.backend
		r.mu.Unlock()
		b, err := net.Dial("tcp", backend)
		if err != nil {
			c.Close()
			continue
		}
		r.mu.Lock()
		r.mu.conns[c], r.mu.conns[b] = struct{}{}, struct{}{}
		r.mu.Unlock()
		r.wg.Add(2)
		go r.pipe(c, b)
		go r.pipe(b, c)
	}
}

func (r *relay) pipe(dst, src net.Conn) {
	defer r.wg.Done()
	io.Copy(dst, src)
	dst.Close()
	src.Close()
	r.mu.Lock()
	delete(r.mu.conns, dst)
	delete(r.mu.conns, src)
	r.mu.Unlock()
}

// switchTo sends the connections made from now on to backend.
func (r *relay) switchTo(backend string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.mu.backend = backend
}

// cut closes every connection relayed so far.
func (r *relay) cut() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for c := range r.mu.conns {
		c.Close()
	}
}

// close stops accepting, cuts every connection and waits for the relay's
// goroutines.
func (r *relay) close() {
	r.l.Close()
	r.cut()
	r.wg.Wait()
}

// requireTools fails the test if a tool it drives is missing: tests never
// skip for one; 'make deps' (scripts/deps.sh) installs them.
func requireTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is missing: run 'make deps' (scripts/deps.sh installs the Debian packages the tests drive)", tool)
		}
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Fatalf("/dev/fuse: %v (FUSE needs the fuse module; the tests run as root)", err)
	}
}

// run runs a command and fails the test if it fails; it returns stdout.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	var out, errOut bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v: %s%s", name, strings.Join(args, " "), err, out.String(), errOut.String())
	}
	return out.String()
}

// mounted reports whether dir is a mount point in this mount namespace.
func mounted(t *testing.T, dir string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

// mountDisk mounts the export at a new directory and unmounts it when the
// test ends (after the loop devices on it are gone).
func mountDisk(t *testing.T, cfg Config) *Disk {
	t.Helper()
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d, err := Mount(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unmountBusy(d); err != nil {
			t.Errorf("Unmount: %v", err)
		}
		if mounted(t, cfg.Dir) {
			t.Errorf("%s still mounted after Unmount", cfg.Dir)
		}
	})
	return d
}

// unmountBusy unmounts d, retrying for a while as long as the mount is
// busy: a loop device detached by 'losetup -d' lets go of the file
// asynchronously, once its last opener closes it.
func unmountBusy(d *Disk) error {
	var err error
	for range 100 {
		if err = d.Unmount(); !errors.Is(err, syscall.EBUSY) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
	return err
}

// losetup attaches a loop device to file and detaches it when the test
// ends.
func losetup(t *testing.T, file string) string {
	t.Helper()
	dev := strings.TrimSpace(run(t, "losetup", "-f", "--show", file))
	if !strings.HasPrefix(dev, "/dev/loop") {
		t.Fatalf("losetup gave %q", dev)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// mountFS mounts dev at a new directory; cleanup unmounts it unless the
// test did. It returns the directory.
func mountFS(t *testing.T, dev string) string {
	t.Helper()
	dir := t.TempDir()
	run(t, "mount", dev, dir)
	t.Cleanup(func() {
		if mounted(t, dir) {
			if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
				t.Errorf("umount %s: %v: %s", dir, err, out)
			}
		}
	})
	return dir
}
