package nbdclient

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"segmap/internal/heldport"
	"segmap/internal/nbd"
	"segmap/internal/nbd/nbdwire"
)

// ---- helpers ----

// dialClient dials export name at addr, failing the test on error; the
// client is closed at cleanup.
func dialClient(t testing.TB, addr, name string, cfg ClientConfig) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, name, cfg)
	if err != nil {
		t.Fatalf("Dial(%s, %q): %v", addr, name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// clientModes runs f with each way the client can negotiate: structured
// replies with GO, simple replies with GO, simple replies with
// EXPORT_NAME.
func clientModes(t *testing.T, f func(t *testing.T, cfg ClientConfig)) {
	for _, m := range []struct {
		name string
		cfg  ClientConfig
	}{
		{"structured", ClientConfig{}},
		{"simple", ClientConfig{noStructured: true}},
		{"export-name", ClientConfig{noStructured: true, noGo: true}},
	} {
		t.Run(m.name, func(t *testing.T) { f(t, m.cfg) })
	}
}

func randBytes(rng *mrand.Rand, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(rng.Uint32())
	}
	return p
}

var bg = context.Background()

// roundTrip exercises every command on c against a local model of the
// export, which must start as zeros. It uses [base, base+span) only.
func roundTrip(t *testing.T, c *Client, base, span uint64) {
	t.Helper()
	rng := mrand.New(mrand.NewPCG(1, 2))
	model := make([]byte, span)
	check := func(what string) {
		t.Helper()
		got := make([]byte, span)
		if err := c.ReadAt(bg, got, base); err != nil {
			t.Fatalf("%s: ReadAt: %v", what, err)
		}
		if i := firstMismatch(got, model); i >= 0 {
			t.Fatalf("%s: byte %d is %#x, want %#x", what, base+uint64(i), got[i], model[i])
		}
	}
	check("fresh")
	for i, w := range []struct{ off, n uint64 }{
		{0, 1}, {1, 4095}, {4096, 8192}, {777, 10000}, {span - 3, 3}, {span/2 - 1000, 70000},
	} {
		p := randBytes(rng, int(w.n))
		if err := c.WriteAt(bg, p, base+w.off, i%2 == 0); err != nil {
			t.Fatalf("WriteAt(%d, %d): %v", w.off, w.n, err)
		}
		copy(model[w.off:], p)
		got := make([]byte, w.n)
		if err := c.ReadAt(bg, got, base+w.off); err != nil || !bytes.Equal(got, p) {
			t.Fatalf("read back %d bytes at %d: %v, equal %v", w.n, w.off, err, bytes.Equal(got, p))
		}
	}
	check("after writes")
	if err := c.Flush(bg); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if err := c.WriteZeroes(bg, base+4096, 65536, false); err != nil {
		t.Fatalf("WriteZeroes: %v", err)
	}
	clear(model[4096 : 4096+65536])
	if err := c.WriteZeroes(bg, base+span/2, 3*4096, true); err != nil {
		t.Fatalf("WriteZeroes(noHole): %v", err)
	}
	clear(model[span/2 : span/2+3*4096])
	check("after write zeroes")
	// Trim makes contents undefined; rewrite what it covered.
	if err := c.Trim(bg, base+span-65536, 65536); err != nil {
		t.Fatalf("Trim: %v", err)
	}
	p := randBytes(rng, 65536)
	if err := c.WriteAt(bg, p, base+span-65536, false); err != nil {
		t.Fatalf("WriteAt after trim: %v", err)
	}
	copy(model[span-65536:], p)
	check("after trim and rewrite")
	if err := c.Flush(bg); err != nil {
		t.Fatalf("Flush: %v", err)
	}
}

func firstMismatch(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// ---- ParseURI ----

func TestParseURI(t *testing.T) {
	for _, tt := range []struct {
		uri, addr, export string
		bad               bool
	}{
		{uri: "nbd://localhost/disk", addr: "localhost:10809", export: "disk"},
		{uri: "nbd://10.0.0.1:1234/disk", addr: "10.0.0.1:1234", export: "disk"},
		{uri: "nbd://host:10809", addr: "host:10809", export: ""},
		{uri: "nbd://host/", addr: "host:10809", export: ""},
		{uri: "nbd://[::1]:99/a/b", addr: "[::1]:99", export: "a/b"},
		{uri: "nbd://[::1]/x", addr: "[::1]:10809", export: "x"},
		{uri: "nbd://h/with%20space", addr: "h:10809", export: "with space"},
		{uri: "nbds://h/x", bad: true},
		{uri: "nbd+unix:///x?socket=/s", bad: true},
		{uri: "file:///x", bad: true},
		{uri: "nbd:///x", bad: true},
		{uri: "nbd://h:0/x", bad: true},
		{uri: "nbd://h:70000/x", bad: true},
		{uri: "nbd://h:port/x", bad: true},
		{uri: "nbd://u@h/x", bad: true},
		{uri: "nbd://h/x?tls=1", bad: true},
		{uri: "nbd://h/x#f", bad: true},
		{uri: "nbd://h/%00", bad: true},
		{uri: "nbd:h/x", bad: true},
		{uri: "://", bad: true},
	} {
		addr, export, err := ParseURI(tt.uri)
		if tt.bad {
			if err == nil {
				t.Errorf("ParseURI(%q) = %q, %q; want an error", tt.uri, addr, export)
			}
			continue
		}
		if err != nil || addr != tt.addr || export != tt.export {
			t.Errorf("ParseURI(%q) = %q, %q, %v; want %q, %q", tt.uri, addr, export, err, tt.addr, tt.export)
		}
	}
}

func TestRemoteError(t *testing.T) {
	for errno, want := range map[uint32]error{
		nbdwire.EPERM: ErrEPERM, nbdwire.EIO: ErrEIO, nbdwire.ENOMEM: ErrENOMEM, nbdwire.EINVAL: ErrEINVAL, nbdwire.ENOSPC: ErrENOSPC,
		nbdwire.EOVERFLOW: ErrEOVERFLOW, nbdwire.ENOTSUP: ErrENOTSUP, nbdwire.ESHUTDOWN: ErrESHUTDOWN, 4711: ErrEIO,
	} {
		err := fmt.Errorf("wrapped: %w", &RemoteError{Errno: errno, Msg: "m"})
		if !errors.Is(err, want) {
			t.Errorf("errno %d: errors.Is(%v, %v) = false", errno, err, want)
		}
		if want != ErrEIO && errors.Is(err, ErrEIO) { //nolint:errorlint // want is one of the sentinels itself
			t.Errorf("errno %d matches ErrEIO too", errno)
		}
		var re *RemoteError
		if !errors.As(err, &re) || re.Errno != errno || !strings.Contains(err.Error(), "m") {
			t.Errorf("errno %d: %v", errno, err)
		}
	}
}

// ---- against this package's server ----

func TestClientRoundTrip(t *testing.T) {
	clientModes(t, func(t *testing.T, cfg ClientConfig) {
		checkGoroutines(t)
		disk := newMem("disk", 4<<20)
		h := startServer(t, nil, disk)
		c := dialClient(t, h.addr, "disk", cfg)
		if c.Size() != 4<<20 || c.ReadOnly() || !c.CanMultiConn() || c.Export() != "disk" {
			t.Fatalf("size %d, read-only %v, multi-conn %v, export %q", c.Size(), c.ReadOnly(), c.CanMultiConn(), c.Export())
		}
		if mn, pr, mx := c.BlockSize(); mn != 1 || pr != 4096 || mx != 32<<20 {
			t.Fatalf("block sizes %d/%d/%d", mn, pr, mx)
		}
		if c.structured == cfg.noStructured {
			t.Fatalf("structured %v", c.structured)
		}
		roundTrip(t, c, 0, 1<<20)
		roundTrip(t, c, 3<<20, 1<<20)
		if disk.flushes.Load() == 0 || disk.fuaWrites.Load() == 0 || disk.noHoles.Load() != 2 {
			t.Fatalf("flushes %d, FUA writes %d, NO_HOLE zeroes %d", disk.flushes.Load(), disk.fuaWrites.Load(), disk.noHoles.Load())
		}
		// The client's view is the server's.
		got := make([]byte, 1<<20)
		if err := c.ReadAt(bg, got, 0); err != nil || !bytes.Equal(got, disk.snapshot(0, 1<<20)) {
			t.Fatalf("client and server disagree: %v", err)
		}
	})
}

// TestClientSplitsLargeRequests checks that requests above the maximum
// payload are split, and that a zero-length request is not sent.
func TestClientSplitsLargeRequests(t *testing.T) {
	checkGoroutines(t)
	const size = 80 << 20
	disk := newMem("disk", size)
	var largest, count atomic.Int64
	disk.hook = func(ctx context.Context, op string, off, n uint64) error {
		count.Add(1)
		for {
			l := largest.Load()
			if int64(n) <= l || largest.CompareAndSwap(l, int64(n)) {
				return nil
			}
		}
	}
	h := startServer(t, nil, disk)
	c := dialClient(t, h.addr, "disk", ClientConfig{})
	p := randBytes(mrand.New(mrand.NewPCG(3, 4)), size-12345)
	if err := c.WriteAt(bg, p, 12345, false); err != nil {
		t.Fatal(err)
	}
	if n := count.Load(); n != 3 {
		t.Errorf("write of %d bytes took %d requests, want 3", len(p), n)
	}
	got := make([]byte, len(p))
	if err := c.ReadAt(bg, got, 12345); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read back: %v, equal %v", err, bytes.Equal(got, p))
	}
	if l := largest.Load(); l != nbdwire.MaxPayload {
		t.Errorf("largest request %d bytes, want %d", l, nbdwire.MaxPayload)
	}
	count.Store(0)
	if err := c.ReadAt(bg, nil, size); err != nil {
		t.Errorf("empty read at the end: %v", err)
	}
	if err := c.WriteAt(bg, nil, 5, false); err != nil {
		t.Errorf("empty write: %v", err)
	}
	if err := c.WriteZeroes(bg, 0, 0, false); err != nil {
		t.Errorf("empty write zeroes: %v", err)
	}
	if n := count.Load(); n != 0 {
		t.Errorf("empty requests reached the server %d times", n)
	}
}

// TestClientConcurrent runs many goroutines on one client, each owning a
// region that it writes, zeroes and reads back against its own model,
// while readers check a region nobody writes.
func TestClientConcurrent(t *testing.T) {
	clientModes(t, func(t *testing.T, cfg ClientConfig) {
		checkGoroutines(t)
		const workers, region = 8, 256 << 10
		disk := newMem("disk", (workers+1)*region)
		static := pattern(region, 42)
		copy(disk.data[workers*region:], static)
		// Jitter makes replies overtake each other.
		disk.hook = func(ctx context.Context, op string, off, n uint64) error {
			if off%3 == 0 {
				time.Sleep(50 * time.Microsecond)
			}
			return nil
		}
		h := startServer(t, nil, disk)
		c := dialClient(t, h.addr, "disk", cfg)
		seed := time.Now().UnixNano()
		t.Logf("seed %d", seed)

		var wg sync.WaitGroup
		models := make([][]byte, workers)
		for w := range workers {
			models[w] = make([]byte, region)
			wg.Go(func() {
				rng := mrand.New(mrand.NewPCG(uint64(seed), uint64(w)))
				base := uint64(w * region)
				model := models[w]
				for i := range 150 {
					off := rng.Uint64N(region)
					n := 1 + rng.Uint64N(min(region-off, 40000))
					var err error
					switch op := rng.IntN(10); {
					case op < 5:
						p := randBytes(rng, int(n))
						err = c.WriteAt(bg, p, base+off, op == 0)
						copy(model[off:], p)
					case op < 6:
						err = c.WriteZeroes(bg, base+off, n, op%2 == 0)
						clear(model[off : off+n])
					case op < 7:
						err = c.Flush(bg)
					default:
						got := make([]byte, n)
						err = c.ReadAt(bg, got, base+off)
						if err == nil && !bytes.Equal(got, model[off:off+n]) {
							err = fmt.Errorf("read of %d bytes at %d differs at %d", n, off, firstMismatch(got, model[off:off+n]))
						}
					}
					if err != nil {
						t.Errorf("seed %d worker %d step %d: %v", seed, w, i, err)
						return
					}
				}
			})
		}
		for r := range 4 {
			wg.Go(func() {
				got := make([]byte, region/4)
				for i := range 50 {
					off := uint64(workers*region + (i*7919+r*1000)%(region*3/4))
					if err := c.ReadAt(bg, got, off); err != nil {
						t.Errorf("reader %d: %v", r, err)
						return
					}
					rel := off - workers*region
					if !bytes.Equal(got, static[rel:rel+uint64(len(got))]) {
						t.Errorf("reader %d: static region changed", r)
						return
					}
				}
			})
		}
		wg.Wait()
		for w := range workers {
			if !bytes.Equal(disk.snapshot(w*region, region), models[w]) {
				t.Fatalf("seed %d: region %d on the server differs from the model", seed, w)
			}
		}
	})
}

var errNoSpaceClient = errors.New("container full")

func TestClientErrors(t *testing.T) {
	clientModes(t, func(t *testing.T, cfg ClientConfig) {
		checkGoroutines(t)
		disk := newMem("disk", 1<<20)
		disk.hook = func(ctx context.Context, op string, off, n uint64) error {
			switch off {
			case 4096:
				return fmt.Errorf("%s at %d: %w", op, off, errNoSpaceClient)
			case 8192:
				return errors.New("plain failure")
			}
			return nil
		}
		ro := newMem("ro", 1<<20)
		ro.ro = true
		h := startServer(t, func(c *nbd.Config) {
			c.Errno = func(err error) uint32 {
				if errors.Is(err, errNoSpaceClient) {
					return nbdwire.ENOSPC
				}
				return 0
			}
		}, disk, ro)
		c := dialClient(t, h.addr, "disk", cfg)
		p := make([]byte, 512)
		for _, op := range []struct {
			name string
			do   func(off uint64) error
		}{
			{"read", func(off uint64) error { return c.ReadAt(bg, p, off) }},
			{"write", func(off uint64) error { return c.WriteAt(bg, p, off, false) }},
			{"zero", func(off uint64) error { return c.WriteZeroes(bg, off, 512, false) }},
			{"trim", func(off uint64) error { return c.Trim(bg, off, 512) }},
		} {
			err := op.do(4096)
			var re *RemoteError
			if !errors.Is(err, ErrENOSPC) || !errors.As(err, &re) || re.Errno != nbdwire.ENOSPC {
				t.Errorf("%s: %v; want ENOSPC", op.name, err)
			}
			if c.structured && !strings.Contains(re.Msg, "container full") {
				t.Errorf("%s: message %q", op.name, re.Msg)
			}
			if err := op.do(8192); !errors.Is(err, ErrEIO) {
				t.Errorf("%s: %v; want EIO", op.name, err)
			}
			// One failed request fails alone.
			if err := op.do(0); err != nil {
				t.Errorf("%s after a failure: %v", op.name, err)
			}
		}

		// Refused without asking the server.
		if err := c.ReadAt(bg, p, 1<<20-511); !errors.Is(err, ErrEINVAL) {
			t.Errorf("read past the end: %v", err)
		}
		if err := c.WriteZeroes(bg, 1<<20, 1, false); !errors.Is(err, ErrEINVAL) {
			t.Errorf("zero past the end: %v", err)
		}
		if err := c.Trim(bg, 1<<64-1, 2); !errors.Is(err, ErrEINVAL) {
			t.Errorf("trim with overflow: %v", err)
		}
		r := dialClient(t, h.addr, "ro", cfg)
		if !r.ReadOnly() {
			t.Fatal("read-only export not flagged")
		}
		if err := r.WriteAt(bg, p, 0, false); !errors.Is(err, ErrEPERM) {
			t.Errorf("write to read-only: %v", err)
		}
		if err := r.Trim(bg, 0, 512); !errors.Is(err, ErrEPERM) {
			t.Errorf("trim of read-only: %v", err)
		}
		if err := r.WriteZeroes(bg, 0, 512, false); !errors.Is(err, ErrEPERM) && !errors.Is(err, ErrENOTSUP) {
			t.Errorf("zero of read-only: %v", err)
		}
		if err := r.ReadAt(bg, p, 0); err != nil {
			t.Errorf("read of read-only: %v", err)
		}

		_, err := Dial(bg, h.addr, "nosuch", cfg)
		if !errors.Is(err, nbdwire.ErrUnknownExport) {
			t.Errorf("unknown export: %v", err)
		}
	})
}

func TestClientTLSRefusedByServer(t *testing.T) {
	checkGoroutines(t)
	h := startServer(t, nil, newMem("disk", 1<<20))
	_, err := Dial(bg, h.addr, "disk", ClientConfig{TLS: &tls.Config{}})
	if err == nil || !strings.Contains(err.Error(), "NBD_REP_ERR_POLICY") {
		t.Fatalf("Dial with TLS to a plaintext server: %v", err)
	}
}

// TestClientServerClosesMidRequest closes the server while a request is in
// flight: it fails with ErrDisconnected, and so does every later request.
func TestClientServerClosesMidRequest(t *testing.T) {
	checkGoroutines(t)
	disk := newMem("disk", 1<<20)
	g := newGate()
	disk.hook = g.hook
	h := startServer(t, nil, disk)
	c := dialClient(t, h.addr, "disk", ClientConfig{})
	errc := make(chan error, 2)
	go func() { errc <- c.ReadAt(bg, make([]byte, 4096), 0) }()
	go func() { errc <- c.WriteAt(bg, make([]byte, 4096), 0, false) }()
	<-g.entered
	<-g.entered
	h.srv.Close()
	for range 2 {
		if err := <-errc; !errors.Is(err, ErrDisconnected) {
			t.Fatalf("in-flight request: %v; want ErrDisconnected", err)
		}
	}
	if err := c.ReadAt(bg, make([]byte, 1), 512); !errors.Is(err, ErrDisconnected) {
		t.Fatalf("later request: %v; want ErrDisconnected", err)
	}
	if err := c.Flush(bg); !errors.Is(err, ErrDisconnected) {
		t.Fatalf("later flush: %v; want ErrDisconnected", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Close of a broken client: %v", err)
	}
}

// TestClientServerShutdown: a graceful server shutdown answers the request
// in flight; later requests fail.
func TestClientServerShutdown(t *testing.T) {
	checkGoroutines(t)
	disk := newMem("disk", 1<<20)
	copy(disk.data, "payload")
	g := newGate()
	disk.hook = g.hook
	h := startServer(t, nil, disk)
	c := dialClient(t, h.addr, "disk", ClientConfig{})
	errc := make(chan error, 1)
	got := make([]byte, 7)
	go func() { errc <- c.ReadAt(bg, got, 0) }()
	<-g.entered
	done := make(chan error, 1)
	go func() { done <- h.srv.Shutdown(bg) }()
	time.Sleep(20 * time.Millisecond)
	close(g.release)
	if err := <-errc; err != nil || string(got) != "payload" {
		t.Fatalf("in-flight read: %q, %v", got, err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := c.ReadAt(bg, got, 0); !errors.Is(err, ErrDisconnected) && !errors.Is(err, ErrESHUTDOWN) {
		t.Fatalf("read after shutdown: %v", err)
	}
}

// TestClientContextCancel: a request whose context ends returns at once;
// the connection goes on, and the abandoned reply does not touch the
// caller's buffer (the race detector watches).
func TestClientContextCancel(t *testing.T) {
	clientModes(t, func(t *testing.T, cfg ClientConfig) {
		checkGoroutines(t)
		disk := newMem("disk", 1<<20)
		copy(disk.data, "abc")
		g := newGate()
		disk.hook = g.hook
		h := startServer(t, nil, disk)
		c := dialClient(t, h.addr, "disk", cfg)
		ctx, cancel := context.WithCancel(bg)
		buf := make([]byte, 4096)
		errc := make(chan error, 1)
		go func() { errc <- c.ReadAt(ctx, buf, 0) }()
		<-g.entered
		cancel()
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled read: %v", err)
		}
		copy(buf, "mine") // the caller owns buf again
		close(g.release)
		got := make([]byte, 3)
		if err := c.ReadAt(bg, got, 0); err != nil || string(got) != "abc" {
			t.Fatalf("read after cancel: %q, %v", got, err)
		}
		if string(buf[:4]) != "mine" {
			t.Fatalf("abandoned reply wrote into the buffer: %q", buf[:4])
		}
		ctx, cancel = context.WithCancel(bg)
		cancel()
		if err := c.WriteAt(ctx, got, 0, false); !errors.Is(err, context.Canceled) {
			t.Fatalf("write with a cancelled context: %v", err)
		}
	})
}

// TestClientClose: requests in flight when Close begins are answered;
// requests after it fail with ErrClientClosed; the server sees a clean
// disconnect.
func TestClientClose(t *testing.T) {
	checkGoroutines(t)
	disk := newMem("disk", 1<<20)
	copy(disk.data, "payload")
	g := newGate()
	disk.hook = g.hook
	h := startServer(t, nil, disk)
	c := dialClient(t, h.addr, "disk", ClientConfig{})
	errc := make(chan error, 1)
	got := make([]byte, 7)
	go func() { errc <- c.ReadAt(bg, got, 0) }()
	<-g.entered
	closed := make(chan error, 1)
	go func() { closed <- c.Close() }()
	waitFor(t, "Close to begin", func() bool { return c.liveErr() != nil })
	if err := c.ReadAt(bg, make([]byte, 1), 512); !errors.Is(err, ErrClientClosed) {
		t.Fatalf("request during Close: %v", err)
	}
	close(g.release)
	if err := <-errc; err != nil || string(got) != "payload" {
		t.Fatalf("in-flight read: %q, %v", got, err)
	}
	if err := <-closed; err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := c.Close(); !errors.Is(err, ErrClientClosed) {
		t.Fatalf("second Close: %v", err)
	}
	if err := c.Flush(bg); !errors.Is(err, ErrClientClosed) {
		t.Fatalf("Flush after Close: %v", err)
	}
	waitFor(t, "the server to release the export", func() bool { return h.backend.closes.Load() == 1 })
	if strings.Contains(h.logs.String(), "level=WARN") {
		t.Fatalf("server logged warnings:\n%s", h.logs.String())
	}
}

func TestClientHandshakeTimeout(t *testing.T) {
	checkGoroutines(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		nc, err := l.Accept()
		if err == nil {
			io.Copy(io.Discard, nc) // never greets
			nc.Close()
		}
	})
	start := time.Now()
	_, err = Dial(bg, l.Addr().String(), "x", ClientConfig{HandshakeTimeout: 200 * time.Millisecond})
	if !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Dial to a silent server: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Dial took %v", d)
	}

	ctx, cancel := context.WithCancel(bg)
	wg.Go(func() {
		nc, err := l.Accept()
		if err == nil {
			cancel()
			io.Copy(io.Discard, nc)
			nc.Close()
		}
	})
	if _, err := Dial(ctx, l.Addr().String(), "x", ClientConfig{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Dial with a cancelled context: %v", err)
	}
}

// ---- a scripted server, for what real servers do not do on demand ----

// fakeConn is one connection of a scripted NBD server. Its methods report
// failures with t.Errorf and end the goroutine.
type fakeConn struct {
	t  *testing.T
	nc net.Conn
	rd *bufio.Reader
}

// fakeServer accepts one connection and runs script on it in a goroutine;
// it returns the address. Cleanup waits for the script.
func fakeServer(t *testing.T, script func(f *fakeConn)) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		nc, err := l.Accept()
		l.Close()
		if err != nil {
			return
		}
		defer nc.Close()
		script(&fakeConn{t: t, nc: nc, rd: bufio.NewReader(nc)})
	}()
	t.Cleanup(func() {
		l.Close()
		<-done
	})
	return l.Addr().String()
}

func (f *fakeConn) must(err error) {
	if err != nil {
		f.t.Errorf("fake server: %v", err)
		runtime.Goexit()
	}
}

func (f *fakeConn) send(parts ...[]byte) {
	_, err := f.nc.Write(bytes.Join(parts, nil))
	f.must(err)
}

func (f *fakeConn) read(n int) []byte {
	b := make([]byte, n)
	_, err := io.ReadFull(f.rd, b)
	f.must(err)
	return b
}

// greet sends the greeting and reads the client flags.
func (f *fakeConn) greet(hflags uint16) uint32 {
	f.send(be.AppendUint64(nil, nbdwire.MagicNBD), be.AppendUint64(nil, nbdwire.MagicOpts), be.AppendUint16(nil, hflags))
	return be.Uint32(f.read(4))
}

func (f *fakeConn) readOpt() (nbdwire.Option, []byte) {
	h := f.read(16)
	if be.Uint64(h) != nbdwire.MagicOpts {
		f.must(fmt.Errorf("option magic %#x", be.Uint64(h)))
	}
	return nbdwire.Option(be.Uint32(h[8:])), f.read(int(be.Uint32(h[12:])))
}

func (f *fakeConn) optReply(opt nbdwire.Option, typ nbdwire.RepType, data []byte) {
	var h [20]byte
	be.PutUint64(h[0:], nbdwire.MagicOptReply)
	be.PutUint32(h[8:], uint32(opt))
	be.PutUint32(h[12:], uint32(typ))
	be.PutUint32(h[16:], uint32(len(data)))
	f.send(h[:], data)
}

// negotiate answers STRUCTURED_REPLY and GO for an export of size bytes
// with the given block sizes.
func (f *fakeConn) negotiate(size uint64, tflags uint16, minB, prefB, maxB uint32) {
	f.greet(nbdwire.HFlagFixedNewstyle | nbdwire.HFlagNoZeroes)
	for {
		opt, data := f.readOpt()
		switch opt {
		case nbdwire.OptStructuredReply:
			f.optReply(opt, nbdwire.RepAck, nil)
		case nbdwire.OptGo:
			f.optReply(opt, nbdwire.RepInfo, fmt.Appendf(nil, "\x00\x01%s", "ignored")) // NBD_INFO_NAME
			info := be.AppendUint16(nil, nbdwire.InfoExport)
			info = be.AppendUint64(info, size)
			f.optReply(opt, nbdwire.RepInfo, be.AppendUint16(info, tflags))
			bs := be.AppendUint16(nil, nbdwire.InfoBlockSize)
			bs = be.AppendUint32(bs, minB)
			bs = be.AppendUint32(bs, prefB)
			f.optReply(opt, nbdwire.RepInfo, be.AppendUint32(bs, maxB))
			f.optReply(opt, nbdwire.RepAck, nil)
			return
		default:
			f.optReply(opt, nbdwire.RepErrUnsup, nil)
			_ = data
		}
	}
}

// readReq reads a request and the payload of a WRITE; ok is false at EOF.
func (f *fakeConn) readReq() (h requestHeader, payload []byte, ok bool) {
	var b [nbdwire.RequestSize]byte
	if _, err := io.ReadFull(f.rd, b[:]); err != nil {
		return h, nil, false
	}
	h, good := decodeRequest(&b)
	if !good {
		f.must(errors.New("bad request magic"))
	}
	if h.typ == nbdwire.CmdWrite {
		payload = f.read(int(h.length))
	}
	return h, payload, h.typ != nbdwire.CmdDisc
}

func (f *fakeConn) chunk(flags, typ uint16, cookie uint64, payload ...[]byte) {
	p := bytes.Join(payload, nil)
	var h [nbdwire.ChunkHeaderSize]byte
	nbdwire.PutChunk(h[:], flags, typ, cookie, uint32(len(p)))
	f.send(h[:], p)
}

func (f *fakeConn) simple(errno uint32, cookie uint64, data []byte) {
	var h [nbdwire.SimpleReplySize]byte
	nbdwire.PutSimpleReply(h[:], errno, cookie)
	f.send(h[:], data)
}

func u32(v uint32) []byte { return be.AppendUint32(nil, v) }
func u64(v uint64) []byte { return be.AppendUint64(nil, v) }

// TestClientBlockConstraints runs the client against a server with a
// 512-byte minimum block and a 4 KiB maximum payload that answers reads in
// several chunks, last part first, zeros as holes. The server fails the
// test on any request that breaks the constraints; the client must still
// read and write any byte range.
func TestClientBlockConstraints(t *testing.T) {
	checkGoroutines(t)
	const size = 64 << 10
	disk := make([]byte, size) // only the script's goroutine touches it
	var requests atomic.Int64
	addr := fakeServer(t, func(f *fakeConn) {
		f.negotiate(size, nbdwire.TFlagHasFlags|nbdwire.TFlagSendFlush|nbdwire.TFlagSendWriteZeroes|nbdwire.TFlagSendTrim, 512, 4096, 4096)
		for {
			h, payload, ok := f.readReq()
			if !ok {
				return
			}
			requests.Add(1)
			if h.typ != nbdwire.CmdFlush && (h.off%512 != 0 || h.length%512 != 0 || h.length == 0 || h.off+uint64(h.length) > size) {
				f.t.Errorf("%v of %d bytes at %d breaks the constraints", h.typ, h.length, h.off)
			}
			if (h.typ == nbdwire.CmdRead || h.typ == nbdwire.CmdWrite) && h.length > 4096 {
				f.t.Errorf("%v of %d bytes above the maximum payload", h.typ, h.length)
			}
			switch h.typ {
			case nbdwire.CmdRead:
				// Three pieces, last first; all-zero pieces as holes.
				n := uint64(h.length)
				cuts := []uint64{0, n / 3, 2 * n / 3, n}
				for i := 2; i >= 0; i-- {
					lo, hi := h.off+cuts[i], h.off+cuts[i+1]
					if hi == lo {
						continue
					}
					if bytes.Count(disk[lo:hi], []byte{0}) == int(hi-lo) {
						f.chunk(0, nbdwire.ChunkOffsetHole, h.cookie, u64(lo), u32(uint32(hi-lo)))
					} else {
						f.chunk(0, nbdwire.ChunkOffsetData, h.cookie, u64(lo), disk[lo:hi])
					}
				}
				f.chunk(nbdwire.ReplyFlagDone, nbdwire.ChunkNone, h.cookie)
			case nbdwire.CmdWrite:
				copy(disk[h.off:], payload)
				f.simple(0, h.cookie, nil) // allowed for non-READ replies
			case nbdwire.CmdWriteZeroes, nbdwire.CmdTrim:
				clear(disk[h.off : h.off+uint64(h.length)])
				f.chunk(nbdwire.ReplyFlagDone, nbdwire.ChunkNone, h.cookie)
			case nbdwire.CmdFlush:
				f.chunk(nbdwire.ReplyFlagDone, nbdwire.ChunkNone, h.cookie)
			}
		}
	})
	c := dialClient(t, addr, "x", ClientConfig{})
	if mn, pr, mx := c.BlockSize(); mn != 512 || pr != 4096 || mx != 4096 {
		t.Fatalf("block sizes %d/%d/%d", mn, pr, mx)
	}
	rng := mrand.New(mrand.NewPCG(5, 6))
	model := make([]byte, size)
	for i := range 200 {
		off := rng.Uint64N(size)
		n := 1 + rng.Uint64N(min(size-off, 10000))
		switch rng.IntN(4) {
		case 0:
			p := randBytes(rng, int(n))
			if err := c.WriteAt(bg, p, off, i%5 == 0); err != nil {
				t.Fatalf("step %d: WriteAt(%d, %d): %v", i, off, n, err)
			}
			copy(model[off:], p)
		case 1:
			if err := c.WriteZeroes(bg, off, n, false); err != nil {
				t.Fatalf("step %d: WriteZeroes(%d, %d): %v", i, off, n, err)
			}
			clear(model[off : off+n])
		default:
			got := make([]byte, n)
			if err := c.ReadAt(bg, got, off); err != nil {
				t.Fatalf("step %d: ReadAt(%d, %d): %v", i, off, n, err)
			}
			if j := firstMismatch(got, model[off:off+n]); j >= 0 {
				t.Fatalf("step %d: read of %d bytes at %d: byte %d is %#x, want %#x", i, n, off, off+uint64(j), got[j], model[off+uint64(j)])
			}
		}
	}
	got := make([]byte, size)
	if err := c.ReadAt(bg, got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("final read: %v", err)
	}
	// Trim only covers whole blocks: nothing for a range inside one.
	before := requests.Load()
	if err := c.Trim(bg, 10, 100); err != nil || requests.Load() != before {
		t.Fatalf("sub-block trim: %v, %d requests", err, requests.Load()-before)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestClientExportNameFallback: a server without GO or structured replies
// is served with EXPORT_NAME and simple replies, with and without the
// 124 zero bytes.
func TestClientExportNameFallback(t *testing.T) {
	for _, noZeroes := range []bool{false, true} {
		t.Run(fmt.Sprintf("noZeroes=%v", noZeroes), func(t *testing.T) {
			checkGoroutines(t)
			addr := fakeServer(t, func(f *fakeConn) {
				hf := nbdwire.HFlagFixedNewstyle
				if noZeroes {
					hf |= nbdwire.HFlagNoZeroes
				}
				cf := f.greet(hf)
				if (cf&nbdwire.CFlagNoZeroes != 0) != noZeroes || cf&nbdwire.CFlagFixedNewstyle == 0 {
					f.t.Errorf("client flags %#x", cf)
				}
				for {
					opt, data := f.readOpt()
					if opt == nbdwire.OptExportName {
						if string(data) != "exp" {
							f.t.Errorf("export name %q", data)
						}
						break
					}
					f.optReply(opt, nbdwire.RepErrUnsup, []byte("old server"))
				}
				b := append(u64(1<<20), be.AppendUint16(nil, nbdwire.TFlagHasFlags|nbdwire.TFlagReadOnly)...)
				if !noZeroes {
					b = append(b, make([]byte, nbdwire.ZeroPadSize)...)
				}
				f.send(b)
				h, _, ok := f.readReq()
				if !ok || h.typ != nbdwire.CmdRead {
					f.must(fmt.Errorf("request %v", h.typ))
				}
				f.simple(0, h.cookie, bytes.Repeat([]byte{7}, int(h.length)))
				f.readReq() // DISC
			})
			c := dialClient(t, addr, "exp", ClientConfig{})
			if c.Size() != 1<<20 || !c.ReadOnly() || c.structured {
				t.Fatalf("size %d, read-only %v, structured %v", c.Size(), c.ReadOnly(), c.structured)
			}
			got := make([]byte, 100)
			if err := c.ReadAt(bg, got, 5); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{7}, 100)) {
				t.Fatalf("read: %v", err)
			}
			c.Close()
		})
	}
}

// TestClientErrorChunks: error chunks of every shape fail their request
// with the error and message they carry; the connection goes on.
func TestClientErrorChunks(t *testing.T) {
	checkGoroutines(t)
	addr := fakeServer(t, func(f *fakeConn) {
		f.negotiate(1<<20, nbdwire.TFlagHasFlags|nbdwire.TFlagSendFlush, 1, 4096, 1<<20)
		for i := 0; ; i++ {
			h, _, ok := f.readReq()
			if !ok {
				return
			}
			switch i {
			case 0: // ERROR_OFFSET after some data
				f.chunk(0, nbdwire.ChunkOffsetData, h.cookie, u64(h.off), make([]byte, 10))
				f.chunk(nbdwire.ReplyFlagDone, nbdwire.ChunkErrorOffset, h.cookie, u32(nbdwire.ENOSPC), []byte{0, 4}, []byte("full"), u64(h.off+10))
			case 1: // an error type nobody knows yet, then NONE
				f.chunk(0, 1<<15+77, h.cookie, u32(nbdwire.EPERM), []byte{0, 2}, []byte("no"), []byte("extra"))
				f.chunk(nbdwire.ReplyFlagDone, nbdwire.ChunkNone, h.cookie)
			case 2: // error value 0 in an error chunk
				f.chunk(nbdwire.ReplyFlagDone, nbdwire.ChunkError, h.cookie, u32(0), []byte{0, 0})
			case 3: // a READ claimed done with half its data: fails alone
				f.chunk(nbdwire.ReplyFlagDone, nbdwire.ChunkOffsetData, h.cookie, u64(h.off), make([]byte, h.length/2))
			default:
				f.chunk(nbdwire.ReplyFlagDone, nbdwire.ChunkOffsetData, h.cookie, u64(h.off), bytes.Repeat([]byte{1}, int(h.length)))
			}
		}
	})
	c := dialClient(t, addr, "x", ClientConfig{})
	p := make([]byte, 100)
	var re *RemoteError
	if err := c.ReadAt(bg, p, 0); !errors.As(err, &re) || re.Errno != nbdwire.ENOSPC || re.Msg != "full" {
		t.Fatalf("ERROR_OFFSET: %v", err)
	}
	if err := c.ReadAt(bg, p, 0); !errors.As(err, &re) || re.Errno != nbdwire.EPERM || re.Msg != "no" {
		t.Fatalf("unknown error chunk: %v", err)
	}
	if err := c.Flush(bg); !errors.Is(err, ErrEIO) {
		t.Fatalf("error 0: %v", err)
	}
	if err := c.ReadAt(bg, p, 0); !errors.Is(err, ErrProtocol) || errors.Is(err, ErrDisconnected) {
		t.Fatalf("short read: %v", err)
	}
	if err := c.ReadAt(bg, p, 0); err != nil || !bytes.Equal(p, bytes.Repeat([]byte{1}, 100)) {
		t.Fatalf("read after errors: %v", err)
	}
}

// TestClientProtocolViolations: a reply the client cannot make sense of
// breaks the connection; the request and every later one fail with
// ErrDisconnected and ErrProtocol.
func TestClientProtocolViolations(t *testing.T) {
	for _, tt := range []struct {
		name  string
		reply func(f *fakeConn, h requestHeader)
	}{
		{"unknown cookie", func(f *fakeConn, h requestHeader) { f.simple(0, h.cookie+1000, nil) }},
		{"bad magic", func(f *fakeConn, h requestHeader) { f.send(u32(0xdeadbeef), make([]byte, 12)) }},
		{"data outside the request", func(f *fakeConn, h requestHeader) {
			f.chunk(nbdwire.ReplyFlagDone, nbdwire.ChunkOffsetData, h.cookie, u64(h.off+1), make([]byte, h.length))
		}},
		{"overlapping data", func(f *fakeConn, h requestHeader) {
			f.chunk(0, nbdwire.ChunkOffsetData, h.cookie, u64(h.off), make([]byte, h.length))
			f.chunk(nbdwire.ReplyFlagDone, nbdwire.ChunkOffsetHole, h.cookie, u64(h.off), u32(1))
		}},
		{"empty hole", func(f *fakeConn, h requestHeader) {
			f.chunk(nbdwire.ReplyFlagDone, nbdwire.ChunkOffsetHole, h.cookie, u64(h.off), u32(0))
		}},
		{"NONE without DONE", func(f *fakeConn, h requestHeader) { f.chunk(0, nbdwire.ChunkNone, h.cookie) }},
		{"unknown chunk type", func(f *fakeConn, h requestHeader) { f.chunk(nbdwire.ReplyFlagDone, 9, h.cookie, u64(0)) }},
		{"error message too long", func(f *fakeConn, h requestHeader) {
			f.chunk(nbdwire.ReplyFlagDone, nbdwire.ChunkError, h.cookie, u32(nbdwire.EIO), []byte{0, 9}, []byte("abc"))
		}},
		{"short error chunk", func(f *fakeConn, h requestHeader) {
			f.chunk(nbdwire.ReplyFlagDone, nbdwire.ChunkError, h.cookie, u32(nbdwire.EIO))
		}},
		{"hang up", func(f *fakeConn, h requestHeader) { f.nc.Close() }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			checkGoroutines(t)
			addr := fakeServer(t, func(f *fakeConn) {
				f.negotiate(1<<20, nbdwire.TFlagHasFlags, 1, 4096, 1<<20)
				h, _, ok := f.readReq()
				if !ok {
					return
				}
				tt.reply(f, h)
				io.Copy(io.Discard, f.rd)
			})
			c := dialClient(t, addr, "x", ClientConfig{})
			err := c.ReadAt(bg, make([]byte, 64), 0)
			if !errors.Is(err, ErrDisconnected) {
				t.Fatalf("ReadAt: %v; want ErrDisconnected", err)
			}
			if tt.name != "hang up" && !errors.Is(err, ErrProtocol) {
				t.Fatalf("ReadAt: %v; want ErrProtocol", err)
			}
			if err2 := c.ReadAt(bg, make([]byte, 1), 0); !errors.Is(err2, ErrDisconnected) {
				t.Fatalf("later ReadAt: %v", err2)
			}
			c.Close()
		})
	}
}

func TestClientHandshakeErrors(t *testing.T) {
	for _, tt := range []struct {
		name   string
		script func(f *fakeConn)
		want   error
	}{
		{"not NBD", func(f *fakeConn) { f.send([]byte("SSH-2.0-OpenSSH_9.2\r\n")) }, ErrProtocol},
		{"oldstyle", func(f *fakeConn) { f.send(u64(nbdwire.MagicNBD), u64(nbdwire.MagicOldstyle), make([]byte, 200)) }, ErrProtocol},
		{"TLS required", func(f *fakeConn) {
			f.greet(nbdwire.HFlagFixedNewstyle)
			opt, _ := f.readOpt()
			f.optReply(opt, nbdwire.RepErrTLSReqd, []byte("TLS first"))
		}, ErrTLSRequired},
		{"unknown export", func(f *fakeConn) {
			f.greet(nbdwire.HFlagFixedNewstyle)
			f.readOpt()
			f.optReply(nbdwire.OptStructuredReply, nbdwire.RepAck, nil)
			f.readOpt()
			f.optReply(nbdwire.OptGo, nbdwire.RepErrUnknown, []byte("no such export"))
		}, nbdwire.ErrUnknownExport},
		{"GO without export info", func(f *fakeConn) {
			f.greet(nbdwire.HFlagFixedNewstyle)
			f.readOpt()
			f.optReply(nbdwire.OptStructuredReply, nbdwire.RepAck, nil)
			f.readOpt()
			f.optReply(nbdwire.OptGo, nbdwire.RepAck, nil)
		}, ErrProtocol},
		{"bad block size", func(f *fakeConn) {
			f.negotiate(1<<20, nbdwire.TFlagHasFlags, 3, 4096, 1<<20)
		}, ErrProtocol},
		{"reply to another option", func(f *fakeConn) {
			f.greet(nbdwire.HFlagFixedNewstyle)
			f.readOpt()
			f.optReply(nbdwire.OptList, nbdwire.RepAck, nil)
		}, ErrProtocol},
		{"EXPORT_NAME hang up", func(f *fakeConn) {
			f.greet(0) // not fixed newstyle: straight to EXPORT_NAME
			f.readOpt()
		}, nbdwire.ErrUnknownExport},
	} {
		t.Run(tt.name, func(t *testing.T) {
			checkGoroutines(t)
			addr := fakeServer(t, func(f *fakeConn) {
				tt.script(f)
				f.nc.(*net.TCPConn).CloseWrite()
				io.Copy(io.Discard, f.rd)
			})
			c, err := Dial(bg, addr, "x", ClientConfig{})
			if !errors.Is(err, tt.want) {
				if c != nil {
					c.Close()
				}
				t.Fatalf("Dial: %v; want %v", err, tt.want)
			}
		})
	}
}

// ---- against real servers ----

// startTool starts a server tool with args on a port this test holds,
// handed to it by socket activation (never a port found free and then
// bound by the tool), and returns its address. It is killed at cleanup.
func startTool(t *testing.T, name string, args ...string) (addr string) {
	t.Helper()
	return heldport.Serve(t, needTool(t, name), args...)
}

func startQemuNBD(t *testing.T, file string, extra ...string) string {
	args := append([]string{"-f", "raw", "-t", "-e", "8", "-x", "disk"}, extra...)
	return startTool(t, "qemu-nbd", append(args, file)...)
}

func TestClientQemuNBD(t *testing.T) {
	checkGoroutines(t)
	file := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(file, 64<<20); err != nil {
		t.Fatal(err)
	}
	addr := startQemuNBD(t, file, "--discard=unmap")
	c := dialClient(t, addr, "disk", ClientConfig{})
	if c.Size() != 64<<20 || c.ReadOnly() || !c.structured {
		t.Fatalf("size %d, read-only %v, structured %v", c.Size(), c.ReadOnly(), c.structured)
	}
	// Sparse reads come back as data and hole chunks.
	roundTrip(t, c, 0, 2<<20)
	roundTrip(t, c, 40<<20, 1<<20)
	p := randBytes(mrand.New(mrand.NewPCG(7, 8)), 5<<20)
	if err := c.WriteAt(bg, p, 10<<20+3, true); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(bg); err != nil {
		t.Fatal(err)
	}
	onDisk, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(onDisk[10<<20+3:][:len(p)], p) {
		t.Fatal("flushed write is not in the file")
	}
	// Several clients at once on one qemu-nbd.
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			c2, err := Dial(bg, addr, "disk", ClientConfig{})
			if err != nil {
				t.Error(err)
				return
			}
			defer c2.Close()
			got := make([]byte, len(p))
			if err := c2.ReadAt(bg, got, 10<<20+3); err != nil || !bytes.Equal(got, p) {
				t.Errorf("client %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if _, err := Dial(bg, addr, "other", ClientConfig{}); !errors.Is(err, nbdwire.ErrUnknownExport) {
		t.Fatalf("unknown export on qemu-nbd: %v", err)
	}
}

func TestClientNbdkit(t *testing.T) {
	for _, tt := range []struct {
		name string
		args []string
		cfg  ClientConfig
	}{
		{"memory", nil, ClientConfig{}},
		{"simple-replies", []string{"--no-sr"}, ClientConfig{}},
		{"export-name", nil, ClientConfig{noGo: true}},
		{"block-size-policy", []string{"--filter=blocksize-policy"}, ClientConfig{}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			checkGoroutines(t)
			args := append([]string{"--foreground", "--exit-with-parent"}, tt.args...)
			args = append(args, "memory", "64M")
			if tt.name == "block-size-policy" {
				args = append(args, "blocksize-minimum=512", "blocksize-maximum=64K", "blocksize-error-policy=error")
			}
			addr := startTool(t, "nbdkit", args...)
			c := dialClient(t, addr, "", tt.cfg)
			if c.Size() != 64<<20 || c.ReadOnly() {
				t.Fatalf("size %d, read-only %v", c.Size(), c.ReadOnly())
			}
			if tt.name == "block-size-policy" {
				if mn, _, mx := c.BlockSize(); mn != 512 || mx != 64<<10 {
					t.Fatalf("block sizes %d, %d", mn, mx)
				}
			}
			roundTrip(t, c, 0, 2<<20)
			roundTrip(t, c, 62<<20, 2<<20)
			// Large zeroing and trimming.
			if err := c.WriteZeroes(bg, 1000, 8<<20, false); err != nil {
				t.Fatalf("large WriteZeroes: %v", err)
			}
			zeros := make([]byte, 8<<20+2000)
			if err := c.ReadAt(bg, zeros, 0); err != nil || bytes.Count(zeros[1000:8<<20+1000], []byte{0}) != 8<<20 {
				t.Fatalf("read after large WriteZeroes: %v", err)
			}
			if err := c.Trim(bg, 16<<20, 8<<20); err != nil {
				t.Fatalf("large Trim: %v", err)
			}
			// A large unaligned write, split and patched at both ends.
			p := randBytes(mrand.New(mrand.NewPCG(9, 10)), 3<<20+77)
			if err := c.WriteAt(bg, p, 5<<20+311, true); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(p))
			if err := c.ReadAt(bg, got, 5<<20+311); err != nil || !bytes.Equal(got, p) {
				t.Fatalf("read back: %v", err)
			}
		})
	}
}

// TestClientTLS upgrades to TLS with nbdkit, which requires it, using a
// certificate authority made for the test.
func TestClientTLS(t *testing.T) {
	checkGoroutines(t)
	needTool(t, "nbdkit")
	dir := t.TempDir()
	pool := writeTestPKI(t, dir)
	addr := startTool(t, "nbdkit", "--foreground", "--exit-with-parent",
		"--tls=require", "--tls-certificates="+dir, "memory", "16M")
	c := dialClient(t, addr, "", ClientConfig{TLS: &tls.Config{RootCAs: pool}})
	roundTrip(t, c, 0, 1<<20)
	if _, ok := c.nc.(*tls.Conn); !ok {
		t.Fatalf("connection is a %T", c.nc)
	}
	if _, err := Dial(bg, addr, "", ClientConfig{}); !errors.Is(err, ErrTLSRequired) {
		t.Fatalf("plaintext Dial: %v", err)
	}
	_, err := Dial(bg, addr, "", ClientConfig{TLS: &tls.Config{}})
	var uerr x509.UnknownAuthorityError
	if !errors.As(err, &uerr) {
		t.Fatalf("Dial without trusting the CA: %v", err)
	}
}

// writeTestPKI writes ca-cert.pem, server-cert.pem and server-key.pem for
// 127.0.0.1 into dir, in the layout of nbdkit --tls-certificates, and
// returns a pool trusting the CA.
func writeTestPKI(t *testing.T, dir string) *x509.CertPool {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "segmap test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	for name, block := range map[string]*pem.Block{
		"ca-cert.pem":     {Type: "CERTIFICATE", Bytes: caDER},
		"server-cert.pem": {Type: "CERTIFICATE", Bytes: der},
		"server-key.pem":  {Type: "PRIVATE KEY", Bytes: keyDER},
	} {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return pool
}

// ---- fuzzing the client's decoders ----

// clientScript builds what a server says: the greeting, the option replies
// to STRUCTURED_REPLY and GO for an export of 1 MiB, then replies.
func clientScript(replies ...[]byte) []byte {
	opt := func(o nbdwire.Option, typ nbdwire.RepType, data []byte) []byte {
		b := be.AppendUint64(nil, nbdwire.MagicOptReply)
		b = be.AppendUint32(b, uint32(o))
		b = be.AppendUint32(b, uint32(typ))
		b = be.AppendUint32(b, uint32(len(data)))
		return append(b, data...)
	}
	info := be.AppendUint16(nil, nbdwire.InfoExport)
	info = be.AppendUint64(info, 1<<20)
	info = be.AppendUint16(info, nbdwire.TFlagHasFlags|nbdwire.TFlagSendFlush|nbdwire.TFlagSendWriteZeroes)
	bs := be.AppendUint16(nil, nbdwire.InfoBlockSize)
	bs = be.AppendUint32(bs, 1)
	bs = be.AppendUint32(bs, 4096)
	bs = be.AppendUint32(bs, 1<<20)
	parts := [][]byte{
		u64(nbdwire.MagicNBD), u64(nbdwire.MagicOpts), be.AppendUint16(nil, nbdwire.HFlagFixedNewstyle|nbdwire.HFlagNoZeroes),
		opt(nbdwire.OptStructuredReply, nbdwire.RepAck, nil),
		opt(nbdwire.OptGo, nbdwire.RepInfo, info), opt(nbdwire.OptGo, nbdwire.RepInfo, bs), opt(nbdwire.OptGo, nbdwire.RepAck, nil),
	}
	return bytes.Join(append(parts, replies...), nil)
}

func chunkBytes(flags, typ uint16, cookie uint64, payload ...[]byte) []byte {
	p := bytes.Join(payload, nil)
	h := make([]byte, nbdwire.ChunkHeaderSize)
	nbdwire.PutChunk(h, flags, typ, cookie, uint32(len(p)))
	return append(h, p...)
}

// FuzzClient feeds the client arbitrary server output after it has sent
// four requests (cookies 1 to 4: a 4 KiB read at 0, a 100-byte read at
// 5000, a write, a flush). Whatever the bytes, the client must not panic
// or hang, and every request must end with a result.
func FuzzClient(f *testing.F) {
	f.Add(clientScript())
	f.Add(clientScript(
		chunkBytes(0, nbdwire.ChunkOffsetHole, 1, u64(2048), u32(2048)),
		chunkBytes(nbdwire.ReplyFlagDone, nbdwire.ChunkOffsetData, 1, u64(0), make([]byte, 2048)),
		chunkBytes(nbdwire.ReplyFlagDone, nbdwire.ChunkOffsetData, 2, u64(5000), make([]byte, 100)),
		func() []byte { b := make([]byte, nbdwire.SimpleReplySize); nbdwire.PutSimpleReply(b, 0, 3); return b }(),
		chunkBytes(nbdwire.ReplyFlagDone, nbdwire.ChunkErrorOffset, 4, u32(nbdwire.EIO), []byte{0, 1}, []byte("x"), u64(0)),
	))
	f.Add(clientScript(
		chunkBytes(nbdwire.ReplyFlagDone, nbdwire.ChunkError, 2, u32(nbdwire.ENOSPC), []byte{0, 3}, []byte("abc")),
		chunkBytes(0, 1<<15+9, 1, u32(nbdwire.EIO), []byte{0, 0}),
		chunkBytes(nbdwire.ReplyFlagDone, nbdwire.ChunkNone, 1),
	))
	f.Fuzz(func(t *testing.T, script []byte) {
		nc := newScriptConn(script)
		c, err := handshakeClient(bg, nc, "script:1", "x", ClientConfig{})
		if err != nil {
			return
		}
		var calls []*clientReq
		read1, read2 := make([]byte, 4096), make([]byte, 100)
		for _, p := range []piece{
			{typ: nbdwire.CmdRead, off: 0, n: 4096, buf: read1},
			{typ: nbdwire.CmdRead, off: 5000, n: 100, buf: read2},
			{typ: nbdwire.CmdWrite, off: 0, n: 10, payload: make([]byte, 10)},
			{typ: nbdwire.CmdFlush},
		} {
			cl, err := c.send(bg, p)
			if err != nil {
				t.Fatalf("send: %v", err)
			}
			calls = append(calls, cl)
		}
		c.readerDone = make(chan struct{})
		go c.readLoop()
		for _, cl := range calls {
			select {
			case <-cl.done:
			case <-time.After(10 * time.Second):
				t.Fatal("a request never ended")
			}
		}
		c.Close()
	})
}
