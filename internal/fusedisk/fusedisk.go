package fusedisk

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"segmap/internal/backoff"
	"segmap/internal/nbd/nbdclient"
	"segmap/internal/nbd/nbdwire"
)

// FileName is the name of the one file in the mount.
const FileName = "disk"

// Defaults of Config.
const (
	DefaultRetryFor       = 30 * time.Second
	DefaultRequestTimeout = 60 * time.Second
)

// reconnect is the schedule of the redials after a lost connection.
var reconnect = backoff.Policy{Initial: 20 * time.Millisecond, Max: 2 * time.Second, Jitter: 0.2}

// Config configures Mount.
type Config struct {
	// Addr is the NBD server's host:port; Export the export's name.
	Addr, Export string
	// Dir is the mount point, an existing directory.
	Dir string
	// TLS, if set, makes the NBD connections use STARTTLS.
	TLS *tls.Config
	// Logger receives reconnections and resizes; default slog.Default().
	Logger *slog.Logger
	// RetryFor is how long a request keeps redialing a lost connection
	// before it fails with EIO. Default DefaultRetryFor.
	RetryFor time.Duration
	// RequestTimeout bounds each attempt of a request on a connection.
	// Default DefaultRequestTimeout.
	RequestTimeout time.Duration
}

// Disk is a mounted export. Its methods are safe for concurrent use.
type Disk struct {
	cfg    Config
	path   string
	log    *slog.Logger
	server *fuse.Server
	file   *file

	// closed is closed once the file system is unmounted and the
	// connection closed; done is cancelled at the same time and ends
	// dials and retries.
	closed   chan struct{}
	done     context.Context
	stop     context.CancelFunc
	waitOnce sync.Once

	mu struct {
		sync.Mutex
		c        *nbdclient.Client // nil while there is none (broken)
		size     uint64            // what the file reports
		readOnly bool
		// dialing, if not nil, is closed when the dial under way ends.
		dialing chan struct{}
		closed  bool

		// Whether writes answered but not flushed may have been lost
		// with a connection: writes counts the writes answered,
		// flushed how many of them a flush covered; cache is the
		// identity of the server's write cache, if it tells it
		// (nbdwire.OptSegmapCache). A new connection to a different
		// cache while some writes are not flushed sets lost, and the
		// next flush fails with EIO, so that the file system above
		// learns that what it wrote may be gone.
		writes, flushed uint64
		cache           [nbdwire.CacheIDSize]byte
		hasCache        bool
		lost            bool
	}
}

// Mount dials the export and serves it as the file Dir/disk. It returns
// once the file is visible. The caller then calls Wait (the mount may be
// unmounted from outside) or Unmount.
func Mount(ctx context.Context, cfg Config) (*Disk, error) {
	if cfg.Addr == "" || cfg.Export == "" || cfg.Dir == "" {
		return nil, fmt.Errorf("%w: Addr, Export and Dir are required", ErrBadConfig)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.RetryFor <= 0 {
		cfg.RetryFor = DefaultRetryFor
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = DefaultRequestTimeout
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, err
	}
	c, err := nbdclient.Dial(ctx, cfg.Addr, cfg.Export, clientConfig(cfg))
	if err != nil {
		return nil, fmt.Errorf("dial %s export %q: %w", cfg.Addr, cfg.Export, err)
	}
	d := &Disk{
		cfg:    cfg,
		path:   filepath.Join(dir, FileName),
		log:    cfg.Logger.With("export", cfg.Export, "dir", dir),
		closed: make(chan struct{}),
	}
	d.done, d.stop = context.WithCancel(context.Background())
	d.mu.c, d.mu.size, d.mu.readOnly = c, c.Size(), c.ReadOnly()
	d.mu.cache, d.mu.hasCache = c.CacheID()
	d.file = &file{d: d, mtime: time.Now()}

	zero := time.Duration(0)
	entry := time.Second
	root := &fs.Inode{}
	opts := &fs.Options{
		MountOptions: fuse.MountOptions{
			FsName: "segmap:" + cfg.Export,
			Name:   "segmap",
			// Large requests: the loop device sends up to its
			// max_sectors_kb in one go.
			MaxWrite:      1 << 20,
			MaxReadAhead:  1 << 20,
			MaxBackground: 64,
			DisableXAttrs: true,
			// Root mounts and unmounts with mount(2) and umount(2),
			// so that Unmount reports the kernel's error (EBUSY);
			// others go through fusermount3.
			DirectMountStrict: os.Geteuid() == 0,
		},
		EntryTimeout:    &entry,
		AttrTimeout:     &zero,
		NegativeTimeout: &zero,
		OnAdd: func(ctx context.Context) {
			ch := root.NewPersistentInode(ctx, d.file, fs.StableAttr{Mode: syscall.S_IFREG, Ino: 2})
			root.AddChild(FileName, ch, false)
		},
	}
	server, err := fs.Mount(dir, root, opts)
	if err != nil {
		d.stop()
		c.Close()
		return nil, fmt.Errorf("mount FUSE at %s: %w", dir, err)
	}
	d.server = server
	d.log.Info("fusedisk: mounted", "file", d.path, "size", c.Size(), "read_only", c.ReadOnly())
	return d, nil
}

// Path returns the path of the file, Dir/disk.
func (d *Disk) Path() string { return d.path }

// Size returns the size the file reports.
func (d *Disk) Size() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mu.size
}

// Wait returns once the file system is unmounted (by Unmount, or from
// outside with umount or fusermount3 -u) and the NBD connection closed.
func (d *Disk) Wait() {
	d.server.Wait()
	d.waitOnce.Do(func() {
		d.stop()
		d.mu.Lock()
		d.mu.closed = true
		c := d.mu.c
		d.mu.c = nil
		d.mu.Unlock()
		if c != nil {
			c.Close()
		}
		close(d.closed)
		d.log.Info("fusedisk: unmounted")
	})
}

// Unmount unmounts the file system and waits as Wait does. It fails,
// leaving the mount as it was, while the file is in use (a loop device
// still attached to it: EBUSY).
func (d *Disk) Unmount() error {
	select {
	case <-d.closed:
		return nil
	default:
	}
	if err := d.server.Unmount(); err != nil {
		return fmt.Errorf("unmount %s: %w", filepath.Dir(d.path), err)
	}
	d.Wait()
	return nil
}

// Resize learns the export's current size from a new connection, makes
// the file report it, and returns it. The new connection replaces the
// old one; requests in flight on the old one finish there. Once Resize
// returns, stat and LOOP_SET_CAPACITY ('losetup -c') see the new size.
func (d *Disk) Resize(ctx context.Context) (uint64, error) {
	c, err := d.dial(ctx)
	if err != nil {
		return 0, err
	}
	d.mu.Lock()
	if d.mu.closed {
		d.mu.Unlock()
		c.Close()
		return 0, ErrClosed
	}
	old, was := d.mu.c, d.mu.size
	d.mu.c, d.mu.size = c, c.Size()
	d.switchedLocked(c)
	d.mu.Unlock()
	if old != nil {
		// Writes answered on the old connection are made durable
		// before it goes, for a server without multi-conn flushes.
		if !old.ReadOnly() {
			if err := old.Flush(ctx); err != nil {
				d.log.Warn("fusedisk: flush of the replaced connection failed", "err", err)
			}
		}
		old.Close()
	}
	size := c.Size()
	if size < was {
		d.log.Warn("fusedisk: export shrank", "was", was, "size", size)
	}
	// The kernel keeps i_size in the inode: invalidate it and stat, so
	// that it holds the new size for whoever reads it without asking
	// (LOOP_SET_CAPACITY on older kernels).
	if errno := d.file.NotifyContent(0, 0); errno != 0 && errno != syscall.ENOENT {
		d.log.Warn("fusedisk: inode notify failed", "errno", errno)
	}
	fi, err := os.Stat(d.path)
	if err != nil {
		return 0, fmt.Errorf("stat %s after resize: %w", d.path, err)
	}
	if uint64(fi.Size()) != size {
		return 0, fmt.Errorf("stat %s after resize: size %d, want %d", d.path, fi.Size(), size)
	}
	d.log.Info("fusedisk: resized", "was", was, "size", size)
	return size, nil
}

func clientConfig(cfg Config) nbdclient.ClientConfig {
	return nbdclient.ClientConfig{TLS: cfg.TLS, CacheID: true}
}

// switchedLocked notes that c is the new connection: if it writes to
// another cache than the one before and some writes were not flushed,
// they may be lost.
func (d *Disk) switchedLocked(c *nbdclient.Client) {
	id, ok := c.CacheID()
	if ok && d.mu.hasCache && id != d.mu.cache && d.mu.writes > d.mu.flushed {
		d.mu.lost = true
		d.log.Error("fusedisk: the server's write cache changed: writes not yet flushed may be lost; the next flush fails", "unflushed", d.mu.writes-d.mu.flushed)
	}
	d.mu.cache, d.mu.hasCache = id, ok
}

// wrote counts an answered write.
func (d *Disk) wrote() {
	d.mu.Lock()
	d.mu.writes++
	d.mu.Unlock()
}

// flush makes the writes answered so far durable, or fails with
// ErrUnflushedLost (once) if some may have been lost with a connection.
func (d *Disk) flush(ctx context.Context) error {
	d.mu.Lock()
	writes := d.mu.writes
	if d.mu.lost {
		d.mu.lost = false
		d.mu.flushed = writes
		d.mu.Unlock()
		return ErrUnflushedLost
	}
	d.mu.Unlock()
	err := d.do(ctx, func(ctx context.Context, c *nbdclient.Client) error {
		return c.Flush(ctx)
	})
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.mu.lost {
		// A reconnection during the flush: the flush may have gone
		// to the new cache only.
		d.mu.lost = false
		d.mu.flushed = max(d.mu.flushed, writes)
		return ErrUnflushedLost
	}
	d.mu.flushed = max(d.mu.flushed, writes)
	return nil
}

// dial connects to the export anew.
func (d *Disk) dial(ctx context.Context) (*nbdclient.Client, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(d.done, cancel)
	defer stop()
	c, err := nbdclient.Dial(ctx, d.cfg.Addr, d.cfg.Export, clientConfig(d.cfg))
	if err != nil {
		if d.done.Err() != nil {
			return nil, ErrClosed
		}
		return nil, fmt.Errorf("dial %s export %q: %w", d.cfg.Addr, d.cfg.Export, err)
	}
	return c, nil
}

// client returns the current connection, dialing one if there is none
// (one dial at a time; the others wait for it).
func (d *Disk) client(ctx context.Context) (*nbdclient.Client, error) {
	for {
		d.mu.Lock()
		if d.mu.closed {
			d.mu.Unlock()
			return nil, ErrClosed
		}
		if c := d.mu.c; c != nil {
			d.mu.Unlock()
			return c, nil
		}
		if ch := d.mu.dialing; ch != nil {
			d.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		ch := make(chan struct{})
		d.mu.dialing = ch
		d.mu.Unlock()

		c, err := d.dial(ctx)
		d.mu.Lock()
		d.mu.dialing = nil
		close(ch)
		if err != nil {
			d.mu.Unlock()
			return nil, err
		}
		if d.mu.closed || d.mu.c != nil {
			// Unmounted, or a Resize got there first: use its
			// connection (or fail) on the next round.
			d.mu.Unlock()
			c.Close()
			continue
		}
		d.mu.c = c
		d.switchedLocked(c)
		d.mu.Unlock()
		d.log.Info("fusedisk: reconnected")
		return c, nil
	}
}

// broken drops c if it is still the current connection.
func (d *Disk) broken(c *nbdclient.Client, cause error) {
	d.mu.Lock()
	drop := d.mu.c == c
	if drop {
		d.mu.c = nil
	}
	d.mu.Unlock()
	if drop {
		d.log.Warn("fusedisk: connection lost", "err", cause)
		c.Close()
	}
}

// retryable reports whether err means the connection, not the request,
// failed: the request may succeed on another connection.
func retryable(err error) bool {
	return errors.Is(err, nbdclient.ErrDisconnected) ||
		errors.Is(err, nbdclient.ErrClientClosed) ||
		errors.Is(err, nbdclient.ErrESHUTDOWN)
}

// do runs op on the current connection, redialing and retrying while the
// connection is what fails, for up to RetryFor.
func (d *Disk) do(ctx context.Context, op func(ctx context.Context, c *nbdclient.Client) error) error {
	p := reconnect
	p.Limit = d.cfg.RetryFor
	var b *backoff.Backoff
	for {
		c, err := d.client(ctx)
		if err == nil {
			actx, cancel := context.WithTimeout(ctx, d.cfg.RequestTimeout)
			err = op(actx, c)
			cancel()
			if err == nil || !retryable(err) {
				return err
			}
			d.broken(c, err)
		}
		if errors.Is(err, ErrClosed) || ctx.Err() != nil {
			return err
		}
		if b == nil {
			b = backoff.New(p, nil)
		}
		if werr := b.Wait(ctx); werr != nil {
			return err
		}
	}
}
