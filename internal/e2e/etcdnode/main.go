// Command etcdnode runs one member of an etcd cluster (etcd's own server,
// go.etcd.io/etcd/server/v3/embed, at the version segmap's client uses),
// for the end-to-end tests, which start three and kill them with SIGKILL.
//
//	etcdnode --name e1 --dir DIR --client http://127.0.0.1:0 --peer unix://e1.peer:1 \
//	    --cluster e1=unix://e1.peer:1,e2=...,e3=...
//
// It prints the client URL it serves on ("clients on URL", with the port
// the kernel chose for port 0) and "ready" once the member has joined a
// quorum, and stops on SIGINT or SIGTERM. A unix:// peer URL is a socket
// named by its host part in the working directory.
package main

import (
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"segmap/internal/etcdtest"
)

func main() {
	var m etcdtest.Member
	var client, peer string
	flag.StringVar(&m.Name, "name", "e1", "member name")
	flag.StringVar(&m.Dir, "dir", "", "data directory")
	flag.StringVar(&client, "client", "", "client URL")
	flag.StringVar(&peer, "peer", "", "peer URL")
	flag.StringVar(&m.Cluster, "cluster", "", "initial cluster: name=peerURL,...")
	flag.BoolVar(&m.Log, "log", false, "log warnings to stderr")
	flag.StringVar(&m.CertFile, "cert", "", "TLS certificate for clients (with --key, --ca; the client URL is https)")
	flag.StringVar(&m.KeyFile, "key", "", "TLS key")
	flag.StringVar(&m.CAFile, "ca", "", "CA whose client certificates are accepted")
	flag.Parse()
	if err := run(m, client, peer); err != nil {
		fmt.Fprintln(os.Stderr, "etcdnode:", err)
		os.Exit(1)
	}
}

func run(m etcdtest.Member, client, peer string) error {
	cu, err := url.Parse(client)
	if err != nil || cu.Host == "" {
		return fmt.Errorf("--client %q: want a URL", client)
	}
	pu, err := url.Parse(peer)
	if err != nil || pu.Host == "" {
		return fmt.Errorf("--peer %q: want a URL", peer)
	}
	m.Client, m.Peer = *cu, *pu
	if m.Dir == "" {
		return fmt.Errorf("--dir is required")
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	e, err := etcdtest.Start(m)
	if err != nil {
		return err
	}
	// The URL it got: port 0 in --client is the kernel's choice.
	got := etcdtest.ClientURL(e)
	fmt.Printf("etcd member %s: clients on %s\nready\n", m.Name, got.String())
	select {
	case <-sig:
		e.Close()
		fmt.Println("stopped")
		return nil
	case err := <-e.Err():
		e.Close()
		return err
	}
}
