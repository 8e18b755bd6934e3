package container

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"

	"segmap/internal/nbd/nbdclient"
	"segmap/internal/rpc/protocol"
	"segmap/internal/tlsconf"
)

// This file opens and creates containers by URI: file://PATH (or a plain
// path) for a container file, nbd://HOST[:PORT]/EXPORT for a container on
// an NBD export (a `segmap storage` node, qemu-nbd, nbdkit). It is how
// every component, in one process or many, reaches a container the
// controller names.

// NBDDialTimeout bounds connecting to an nbd:// container and reading its
// header in OpenURI.
const NBDDialTimeout = 30 * time.Second

// OpenURI opens the container info describes by its URI, over plaintext
// for nbd://. A non-zero info.ID (with info.SlotSize) must match the
// container's header. An nbd:// container reconnects by itself (see NBD)
// and logs its outages to slog.Default().
func OpenURI(info protocol.Container) (Container, error) {
	return openURI(info, nil, NBDOptions{})
}

// URIOpener returns how a component holding m opens containers: as
// OpenURI, but nbd:// containers are reached over mutual TLS with m's
// certificate, and the server must present a storage certificate of the
// same CA valid for the URI's host (one from 'segmap certs init --storage
// NAME' is valid for NAME and the --host names, by default localhost and
// 127.0.0.1). There is no fallback to plaintext. A nil m is plaintext.
// The outages of nbd:// containers (see NBD) are logged to log (nil:
// slog.Default()).
//
// opts configure nbd:// containers (their Lease is ignored).
func URIOpener(m *tlsconf.Material, opts NBDOptions) func(protocol.Container) (Container, error) {
	opts.Lease = nil
	return func(info protocol.Container) (Container, error) { return openURI(info, m, opts) }
}

// LeasedOpener is URIOpener for a holder with a lease whose end until
// gives (a zero end: none): nbd:// containers are opened with
// OpenNBDLeased. An agent opens its containers so: a segmap storage node
// then refuses its requests once its lease has run out, and a write held
// up in a paused agent cannot land after the controller went on without
// it. File containers have no such guard. Outages are logged to log, as
// for URIOpener.
func LeasedOpener(m *tlsconf.Material, until func() time.Time, opts NBDOptions) func(protocol.Container) (Container, error) {
	opts.Lease = until
	return func(info protocol.Container) (Container, error) { return openURI(info, m, opts) }
}

func openURI(info protocol.Container, m *tlsconf.Material, opts NBDOptions) (Container, error) {
	var want *Header
	if info.ID != 0 {
		want = &Header{ID: info.ID, SlotSize: int64(info.SlotSize), Slots: int64(info.Slots)}
	}
	if strings.HasPrefix(info.URI, "nbd://") {
		cfg, err := nbdClientConfig(info.URI, m)
		if err != nil {
			return nil, err
		}
		// A registered container's node may be down for up to the
		// failure timeout (OpenNBDWith waits for it).
		ctx, cancel := context.WithTimeout(context.Background(), NBDDialTimeout+opts.withDefaults().FailTimeout)
		defer cancel()
		return OpenNBDWith(ctx, info.URI, want, cfg, opts)
	}
	path, err := FilePath(info.URI)
	if err != nil {
		return nil, err
	}
	return Open(path, want)
}

// nbdClientConfig is how the holder of m (nil: plaintext) connects to the
// storage node of an nbd:// URI: TLS with the URI's host, without its
// port, as the name the node's certificate must carry.
func nbdClientConfig(uri string, m *tlsconf.Material) (nbdclient.ClientConfig, error) {
	if m == nil {
		return nbdclient.ClientConfig{}, nil
	}
	addr, _, err := nbdclient.ParseURI(uri)
	if err != nil {
		return nbdclient.ClientConfig{}, err
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nbdclient.ClientConfig{}, fmt.Errorf("nbd URI %q: %w", uri, err)
	}
	return nbdclient.ClientConfig{TLS: m.Client(host, tlsconf.RoleStorage)}, nil
}

// FilePath returns the path of a file:// URI (or of a plain path).
func FilePath(uri string) (string, error) {
	if !strings.Contains(uri, "://") {
		return uri, nil
	}
	u, err := url.Parse(uri)
	if err != nil || u.Scheme != "file" || u.Path == "" {
		return "", fmt.Errorf("container %q: want file://PATH", uri)
	}
	return u.Path, nil
}

// FileURI returns the file:// URI of path.
func FileURI(path string) string { return "file://" + path }

// CreateURI makes a new container at uri with the given id, as the holder
// of m (nil: plaintext). With slots, it creates a sparse file of slots
// slots (file:// or a path; it must not exist). Without (slots 0), it
// formats what is there: a header written onto the block device or file
// at the path, or onto the nbd:// export, over mutual TLS as URIOpener
// reaches it; the target's size gives the slots. Formatting refuses a
// target that holds a file system, a partition table or a container
// header (ErrNotBlank) unless force.
func CreateURI(ctx context.Context, m *tlsconf.Material, uri string, id uint32, slotSize, slots uint64, force bool) error {
	if strings.HasPrefix(uri, "nbd://") {
		cfg, err := nbdClientConfig(uri, m)
		if err != nil {
			return err
		}
		dctx, cancel := context.WithTimeout(ctx, NBDDialTimeout)
		defer cancel()
		c, err := FormatNBD(dctx, uri, id, int64(slotSize), force, cfg)
		if err != nil {
			return err
		}
		return c.Close()
	}
	path, err := FilePath(uri)
	if err != nil {
		return err
	}
	if slots == 0 {
		c, err := Format(path, id, int64(slotSize), force)
		if err != nil {
			return err
		}
		return c.Close()
	}
	return CreateFile(path, id, slotSize, slots)
}

// CreateFile creates a sparse container file at path.
func CreateFile(path string, id uint32, slotSize, slots uint64) error {
	f, err := Create(path, Header{ID: id, SlotSize: int64(slotSize), Slots: int64(slots)})
	if err != nil {
		return err
	}
	return f.Close()
}
