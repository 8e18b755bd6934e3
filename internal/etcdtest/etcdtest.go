// Package etcdtest runs real etcd servers (go.etcd.io/etcd/server/v3/embed)
// for segmap's tests: one member inside a test process (StartOne), or one
// member of a cluster per process (Start, used by internal/e2e/etcdnode),
// so that tests can kill members with SIGKILL.
package etcdtest

import (
	"errors"
	"fmt"
	"net/url"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Limits of test servers: well above etcd's defaults (128 ops, 1.5 MiB), as
// a controller's etcd must be (see meta.Etcd).
const (
	MaxTxnOps       = 4096
	MaxRequestBytes = 32 << 20
)

// Member configures one member.
type Member struct {
	Name string
	// Dir is its data directory.
	Dir string
	// Client and Peer are the URLs it serves clients and peers on.
	Client, Peer url.URL
	// Cluster is the initial cluster, "name=peerURL,..."; empty for a
	// cluster of this member alone.
	Cluster string
	// NoFsync skips fsync: for tests that never restart a member.
	NoFsync bool
	// Log, if set, logs to stderr at warning level; otherwise silent.
	Log bool
	// CertFile, KeyFile and CAFile, if set, make the member serve its
	// clients over TLS (an https Client URL) and require a client
	// certificate signed by CAFile.
	CertFile, KeyFile, CAFile string
}

// Start starts m and waits until it is ready (has joined a quorum), for up
// to 30 seconds.
func Start(m Member) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Name = m.Name
	cfg.Dir = m.Dir
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{m.Client}, []url.URL{m.Client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{m.Peer}, []url.URL{m.Peer}
	cfg.InitialCluster = m.Cluster
	if m.Cluster == "" {
		cfg.InitialCluster = cfg.InitialClusterFromName(m.Name)
	}
	if m.Log {
		cfg.LogLevel = "warn"
	} else {
		// Silent: even at level error, etcd logs its own orderly
		// shutdown as failures. A failed start still shows, through
		// StartEtcd and Err.
		cfg.Logger, cfg.ZapLoggerBuilder = "zap", embed.NewZapLoggerBuilder(zap.NewNop())
	}
	if m.CertFile != "" {
		cfg.ClientTLSInfo = transport.TLSInfo{CertFile: m.CertFile, KeyFile: m.KeyFile, TrustedCAFile: m.CAFile, ClientCertAuth: true}
	}
	cfg.MaxTxnOps, cfg.MaxRequestBytes = MaxTxnOps, MaxRequestBytes
	cfg.UnsafeNoFsync = m.NoFsync
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("start etcd member %s: %w", m.Name, err)
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("etcd member %s: %w", m.Name, err)
	case <-time.After(30 * time.Second):
		e.Close()
		return nil, errors.New("etcd member " + m.Name + " not ready after 30s")
	}
}

// ClientURL returns the URL e serves clients on, with the port the kernel
// chose if the member was started on port 0.
func ClientURL(e *embed.Etcd) url.URL {
	u := e.Config().ListenClientUrls[0]
	if u.Scheme == "unix" || u.Scheme == "unixs" {
		return u
	}
	u.Host = e.Clients[0].Addr().String()
	return u
}

// StartOne starts a one-member etcd in a temporary directory, stopped when
// t ends, and returns its client URL.
func StartOne(t testing.TB) string {
	t.Helper()
	// Port 0 for both: the kernel chooses, nothing can take the ports
	// between a choice and a bind. A member alone never dials its peer
	// URL, so that it names port 0 costs nothing.
	port0 := url.URL{Scheme: "http", Host: "127.0.0.1:0"}
	e, err := Start(Member{Name: "segmap-test", Dir: t.TempDir(), Client: port0, Peer: port0, NoFsync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	u := ClientURL(e)
	return u.String()
}
