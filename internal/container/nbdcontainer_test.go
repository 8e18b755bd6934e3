package container_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"segmap/internal/container"
	"segmap/internal/container/containertest"
	"segmap/internal/heldport"
	"segmap/internal/nbd"
	"segmap/internal/nbd/nbdclient"
	"segmap/internal/nbd/nbdwire"
	"segmap/internal/storage"
)

// storageServer serves the files of a fresh directory over NBD in this
// process, as `segmap storage` does. It returns the directory and the
// nbd:// URI prefix of its exports.
func storageServer(t *testing.T, edit func(*nbd.Config)) (dir, uriPrefix string) {
	t.Helper()
	dir = t.TempDir()
	backend, err := storage.NewDir(dir, "")
	if err != nil {
		t.Fatal(err)
	}
	cfg := nbd.Config{Backend: backend, Errno: storage.Errno, Logger: slog.New(slog.DiscardHandler)}
	if edit != nil {
		edit(&cfg)
	}
	return dir, serve(t, cfg)
}

// serve runs an nbd.Server for cfg on a loopback port until cleanup and
// returns the nbd:// URI prefix of its exports.
func serve(t *testing.T, cfg nbd.Config) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := nbd.NewServer(cfg)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-served; !errors.Is(err, nbd.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return "nbd://" + l.Addr().String() + "/"
}

var nbdFiles atomic.Int64

// newExport creates a sparse export file of size bytes in dir and returns
// its name.
func newExport(t *testing.T, dir string, size int64) string {
	t.Helper()
	name := fmt.Sprintf("c%d", nbdFiles.Add(1))
	if err := storage.Create(dir, name, uint64(size)); err != nil {
		t.Fatal(err)
	}
	return name
}

func formatNBD(t *testing.T, uri string, id uint32, slotSize int64) *container.NBD {
	t.Helper()
	c, err := container.FormatNBD(context.Background(), uri, id, slotSize, false, nbdclient.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestNBD runs the conformance suite on containers formatted over NBD on
// exports of this package's NBD server, with the storage node's file
// backend.
func TestNBD(t *testing.T) {
	dir, prefix := storageServer(t, nil)
	containertest.Run(t, func(t *testing.T, slotSize, slots int64) container.Container {
		// A partial slot at the end is ignored, as by Format.
		name := newExport(t, dir, container.HeaderSize+slots*slotSize+slotSize/2)
		return formatNBD(t, prefix+name, 4, slotSize)
	})
}

// errNoZero stands for an export that cannot write zeroes.
var errNoZero = errors.New("write zeroes not supported")

type noZeroBackend struct{ *storage.Dir }

func (b noZeroBackend) Open(ctx context.Context, name string) (nbd.Export, io.Closer, error) {
	e, c, err := b.Dir.Open(ctx, name)
	if err != nil {
		return nil, nil, err
	}
	return noZeroExport{e}, c, nil
}

type noZeroExport struct{ nbd.Export }

func (noZeroExport) WriteZeroes(ctx context.Context, off, n uint64, noHole bool) error {
	return errNoZero
}

// TestNBDPunchFallback runs the suite against an export that answers
// WRITE_ZEROES with ENOTSUP: Punch must write zeros instead.
func TestNBDPunchFallback(t *testing.T) {
	dir, prefix := storageServer(t, func(cfg *nbd.Config) {
		cfg.Backend = noZeroBackend{cfg.Backend.(*storage.Dir)}
		cfg.Errno = func(err error) uint32 {
			if errors.Is(err, errNoZero) {
				return nbdwire.ENOTSUP
			}
			return storage.Errno(err)
		}
	})
	containertest.Run(t, func(t *testing.T, slotSize, slots int64) container.Container {
		name := newExport(t, dir, container.HeaderSize+slots*slotSize)
		return formatNBD(t, prefix+name, 5, slotSize)
	})
}

// TestNBDQemu runs the suite on exports served by qemu-nbd, one process per
// container.
func TestNBDQemu(t *testing.T) {
	qemu := needTool(t, "qemu-nbd")
	containertest.Run(t, func(t *testing.T, slotSize, slots int64) container.Container {
		file := filepath.Join(t.TempDir(), "disk")
		if err := os.WriteFile(file, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(file, container.HeaderSize+slots*slotSize); err != nil {
			t.Fatal(err)
		}
		addr := startQemuNBD(t, qemu, file)
		return formatNBD(t, "nbd://"+addr+"/disk", 6, slotSize)
	})
}

func TestNBDReopen(t *testing.T) {
	dir, prefix := storageServer(t, nil)
	uri := prefix + newExport(t, dir, container.HeaderSize+8*65536)
	c := formatNBD(t, uri, 7, 65536)
	if c.ID() != 7 || c.SlotSize() != 65536 || c.Slots() != 8 || c.URI() != uri {
		t.Fatalf("formatted: %v, %s", c.Header(), c.URI())
	}
	p := []byte("kept across reopen")
	if _, err := c.WriteAt(p, 3*65536-5); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	// The file on the storage node is an ordinary container file.
	if h, err := container.ReadHeader(filepath.Join(dir, uri[len(prefix):])); err != nil || h != c.Header() {
		t.Fatalf("ReadHeader of the export file: %v, %v", h, err)
	}
	for _, want := range []*container.Header{nil, {ID: 7, SlotSize: 65536}} {
		c, err := container.OpenNBD(context.Background(), uri, want, nbdclient.ClientConfig{})
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(p))
		if _, err := c.ReadAt(got, 3*65536-5); err != nil || !bytes.Equal(got, p) {
			t.Fatalf("after reopen: %q, %v", got, err)
		}
		if c.Header() != (container.Header{ID: 7, SlotSize: 65536, Slots: 8}) {
			t.Fatalf("header %v", c.Header())
		}
		c.Close()
	}
}

// TestOpenNBDErrors checks that OpenNBD and FormatNBD refuse what Open and
// Format refuse, with the same errors.
func TestOpenNBDErrors(t *testing.T) {
	dir, prefix := storageServer(t, nil)
	ctx := context.Background()
	open := func(name string, want *container.Header) error {
		c, err := container.OpenNBD(ctx, prefix+name, want, nbdclient.ClientConfig{})
		if err == nil {
			c.Close()
		}
		return err
	}
	size := int64(container.HeaderSize + 4*4096)

	blank := newExport(t, dir, size)
	if err := open(blank, nil); !errors.Is(err, container.ErrNotContainer) {
		t.Errorf("blank export: %v; want ErrNotContainer", err)
	}
	tiny := newExport(t, dir, 100)
	if err := open(tiny, nil); !errors.Is(err, container.ErrNotContainer) {
		t.Errorf("tiny export: %v; want ErrNotContainer", err)
	}

	good := newExport(t, dir, size)
	formatNBD(t, prefix+good, 9, 4096).Close()
	if err := open(good, &container.Header{ID: 10, SlotSize: 4096}); !errors.Is(err, container.ErrWrongContainer) {
		t.Errorf("other id: %v; want ErrWrongContainer", err)
	}
	if err := open(good, &container.Header{ID: 9, SlotSize: 8192}); !errors.Is(err, container.ErrWrongContainer) {
		t.Errorf("other slot size: %v; want ErrWrongContainer", err)
	}
	if err := open(good, &container.Header{ID: 9, SlotSize: 4096}); err != nil {
		t.Errorf("right header: %v", err)
	}

	// A byte of the header flipped on the storage node.
	corrupt := newExport(t, dir, size)
	formatNBD(t, prefix+corrupt, 11, 4096).Close()
	flip(t, filepath.Join(dir, corrupt), 20)
	if err := open(corrupt, nil); !errors.Is(err, container.ErrCorruptHeader) {
		t.Errorf("corrupt header: %v; want ErrCorruptHeader", err)
	}

	// The export shrank after formatting.
	short := newExport(t, dir, size)
	formatNBD(t, prefix+short, 12, 4096).Close()
	if err := os.Truncate(filepath.Join(dir, short), size-1); err != nil {
		t.Fatal(err)
	}
	if err := open(short, nil); !errors.Is(err, container.ErrTruncated) {
		t.Errorf("truncated export: %v; want ErrTruncated", err)
	}
	if err := os.Truncate(filepath.Join(dir, short), container.HeaderSize-1); err != nil {
		t.Fatal(err)
	}
	if err := open(short, nil); !errors.Is(err, container.ErrTruncated) {
		t.Errorf("export shorter than the header: %v; want ErrTruncated", err)
	}

	// Format: no room for a slot, bad slot sizes.
	for _, tt := range []struct {
		size, slotSize int64
	}{
		{container.HeaderSize + 4095, 4096},
		{100, 4096},
		{size, 1000},
		{size, 2048},
	} {
		name := newExport(t, dir, tt.size)
		if c, err := container.FormatNBD(ctx, prefix+name, 1, tt.slotSize, false, nbdclient.ClientConfig{}); !errors.Is(err, container.ErrInvalidHeader) {
			if err == nil {
				c.Close()
			}
			t.Errorf("FormatNBD(%d bytes, slot size %d): %v; want ErrInvalidHeader", tt.size, tt.slotSize, err)
		}
	}

	// Not there at all, and a bad URI.
	if err := open("nosuch", nil); !errors.Is(err, nbdwire.ErrUnknownExport) {
		t.Errorf("unknown export: %v", err)
	}
	if _, err := container.OpenNBD(ctx, "file:///x", nil, nbdclient.ClientConfig{}); err == nil {
		t.Error("file:// URI accepted")
	}

	// A read-only export cannot hold a container.
	ro := newExport(t, dir, size)
	formatNBD(t, prefix+ro, 13, 4096).Close()
	if err := os.Chmod(filepath.Join(dir, ro), 0o400); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() != 0 { // root writes anyway
		if err := open(ro, nil); !errors.Is(err, nbdclient.ErrEPERM) {
			t.Errorf("read-only export: %v; want nbdclient.ErrEPERM", err)
		}
	}
}

// TestNBDConnectionLost: when the storage node goes away for good, I/O
// fails with ErrUnreachable once the failure timeout has passed (not
// ErrClosed), and Close still works.
func TestNBDConnectionLost(t *testing.T) {
	dir := t.TempDir()
	backend, err := storage.NewDir(dir, "")
	if err != nil {
		t.Fatal(err)
	}
	srv := nbd.NewServer(nbd.Config{Backend: backend, Logger: slog.New(slog.DiscardHandler)})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	uri := "nbd://" + l.Addr().String() + "/" + newExport(t, dir, container.HeaderSize+4*4096)
	formatNBD(t, uri, 1, 4096).Close()
	c, err := container.OpenNBDWith(context.Background(), uri, nil, nbdclient.ClientConfig{},
		container.NBDOptions{FailTimeout: 100 * time.Millisecond, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	srv.Close()
	<-served
	if _, err := c.ReadAt(make([]byte, 10), 0); !errors.Is(err, container.ErrUnreachable) || errors.Is(err, container.ErrClosed) {
		t.Fatalf("read after the server went away: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := c.ReadAt(make([]byte, 10), 0); !errors.Is(err, container.ErrClosed) {
		t.Fatalf("read after Close: %v", err)
	}
}

func flip(t *testing.T, path string, off int64) {
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
	b[0] ^= 0xff
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// needTool returns the path of a tool; a missing tool skips the test,
// except under CI (CI set), where it fails it.
func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	if os.Getenv("CI") == "" {
		t.Skipf("%s not installed", name)
	}
	t.Fatalf("%s not installed (CI=%q): %v", name, os.Getenv("CI"), err)
	return ""
}

// startQemuNBD serves file as export "disk" with qemu-nbd on a loopback
// port this test holds (socket activation) until cleanup, and returns the
// address.
func startQemuNBD(t *testing.T, qemu, file string) string {
	t.Helper()
	return heldport.Serve(t, qemu, "-f", "raw", "-t", "-e", "8", "--discard=unmap", "-x", "disk", file)
}
