package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"segmap/internal/ha"
)

// etcdFlags are the flags of the commands that keep the metadata in etcd.
type etcdFlags struct {
	endpoints, prefix string
	cacert, cert, key string
	ttl               time.Duration
}

func (f *etcdFlags) add(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.endpoints, "etcd", "", "keep the metadata in etcd: comma-separated client URLs of its members (http://HOST:2379 or https://...)")
	fl.StringVar(&f.prefix, "etcd-prefix", "/segmap/", "key prefix of this segmap cluster in etcd")
	fl.StringVar(&f.cacert, "etcd-cacert", "", "CA bundle that signs the etcd members' certificates (TLS to etcd)")
	fl.StringVar(&f.cert, "etcd-cert", "", "client certificate for etcd (with --etcd-key)")
	fl.StringVar(&f.key, "etcd-key", "", "client key for etcd")
	fl.DurationVar(&f.ttl, "etcd-ttl", ha.DefaultTTL, "the leader's etcd session TTL (whole seconds): a dead leader is replaced after about this long")
}

// client returns a client of the etcd cluster. Its keepalive notices a
// silent member within a few seconds and moves to another; its send limit
// is above anything etcd accepts, so that etcd's --max-request-bytes is the
// limit that applies.
func (f *etcdFlags) client() (*clientv3.Client, error) {
	eps, err := ha.ParseAddrs(f.endpoints)
	if err != nil {
		return nil, usageError{fmt.Errorf("--etcd: %w", err)}
	}
	if f.prefix == "" || f.prefix[len(f.prefix)-1] != '/' {
		return nil, usageError{fmt.Errorf("--etcd-prefix %q: want a prefix ending in /", f.prefix)}
	}
	if f.ttl < time.Second || f.ttl%time.Second != 0 {
		return nil, usageError{fmt.Errorf("--etcd-ttl %v: want whole seconds, at least 1s", f.ttl)}
	}
	cfg := clientv3.Config{
		Endpoints:            eps,
		DialTimeout:          5 * time.Second,
		DialKeepAliveTime:    2 * time.Second,
		DialKeepAliveTimeout: 2 * time.Second,
		MaxCallSendMsgSize:   64 << 20,
		Logger:               zap.NewNop(),
	}
	if f.cacert != "" || f.cert != "" || f.key != "" {
		if cfg.TLS, err = f.tls(); err != nil {
			return nil, err
		}
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("etcd %s: %w", f.endpoints, err)
	}
	return cli, nil
}

func (f *etcdFlags) tls() (*tls.Config, error) {
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if f.cacert != "" {
		pem, err := os.ReadFile(f.cacert)
		if err != nil {
			return nil, fmt.Errorf("--etcd-cacert: %w", err)
		}
		c.RootCAs = x509.NewCertPool()
		if !c.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--etcd-cacert %s: no PEM certificate in it", f.cacert)
		}
	}
	if (f.cert == "") != (f.key == "") {
		return nil, usageError{fmt.Errorf("--etcd-cert and --etcd-key go together")}
	}
	if f.cert != "" {
		kp, err := tls.LoadX509KeyPair(f.cert, f.key)
		if err != nil {
			return nil, fmt.Errorf("etcd client certificate: %w", err)
		}
		c.Certificates = []tls.Certificate{kp}
	}
	return c, nil
}

// reachable reads from etcd once, so that a wrong address or certificate
// fails a command that cannot wait (segmap up) within seconds.
func (f *etcdFlags) reachable(ctx context.Context, cli *clientv3.Client) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := cli.Get(ctx, f.prefix, clientv3.WithCountOnly()); err != nil {
		hint := ""
		if f.cert == "" {
			hint = " (an etcd that requires TLS needs --etcd-cacert, --etcd-cert and --etcd-key)"
		}
		return fmt.Errorf("cannot reach etcd %s: %w%s", f.endpoints, err, hint)
	}
	return nil
}
