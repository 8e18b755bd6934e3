package tlsconf

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"segmap/internal/leaktest"
)

// TestMain fails the run if goroutines outlive the tests: every helper
// here joins what it starts.
func TestMain(m *testing.M) { leaktest.VerifyTestMain(m) }

// cluster creates a CA with controller "controller", agent "host1",
// storage "s1" and the admin certificate.
func cluster(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	err := Init(dir, InitOptions{
		Controllers: []string{"controller"},
		Agents:      []string{"host1"},
		Storage:     []string{"s1"},
		Admin:       true,
	})
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

func load(t *testing.T, dir, role, name string) *Material {
	t.Helper()
	m, err := DirFiles(dir, role, name).Load()
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// result is what both sides of one connection saw.
type result struct {
	serverErr, clientErr error
	server, client       tls.ConnectionState
}

// dialer plays the client on a fresh TCP connection; it owns c.
type dialer func(c net.Conn, r *result)

// tlsDialer handshakes with cfg and then reads the byte the server writes
// once its handshake succeeded: in TLS 1.3 the client's handshake ends
// before the server has checked the client certificate, so only that read
// tells the client whether it was accepted.
func tlsDialer(cfg *tls.Config) dialer {
	return func(c net.Conn, r *result) {
		tc := tls.Client(c, cfg)
		defer tc.Close()
		if r.clientErr = tc.Handshake(); r.clientErr != nil {
			return
		}
		r.client = tc.ConnectionState()
		var b [1]byte
		_, r.clientErr = io.ReadFull(tc, b[:])
	}
}

// plainDialer speaks plaintext where TLS is expected.
func plainDialer(c net.Conn, r *result) {
	defer c.Close()
	if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
		r.clientErr = err
		return
	}
	_, err := io.Copy(io.Discard, c) // until the server hangs up
	r.clientErr = err
}

// connect runs one connection between a TLS server with srv and the
// dialer over loopback TCP. Every step has a deadline and both sides are
// done when it returns.
func connect(t *testing.T, srv *tls.Config, dial dialer) result {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	deadline := time.Now().Add(10 * time.Second)
	var r result
	var wg sync.WaitGroup
	wg.Go(func() {
		c, err := ln.Accept()
		if err != nil {
			r.serverErr = err
			return
		}
		c.SetDeadline(deadline)
		tc := tls.Server(c, srv)
		defer tc.Close()
		if r.serverErr = tc.Handshake(); r.serverErr != nil {
			return
		}
		r.server = tc.ConnectionState()
		if _, r.serverErr = tc.Write([]byte{1}); r.serverErr != nil {
			return
		}
		io.Copy(io.Discard, tc) // until the client closes
	})
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		ln.Close() // unblocks Accept
		wg.Wait()
		t.Fatal(err)
	}
	c.SetDeadline(deadline)
	dial(c, &r)
	wg.Wait()
	return r
}

// accepted fails the test unless both sides completed the connection.
func accepted(t *testing.T, r result) {
	t.Helper()
	if r.serverErr != nil || r.clientErr != nil {
		t.Fatalf("connection refused: server: %v; client: %v", r.serverErr, r.clientErr)
	}
}

// refused fails the test unless both sides failed.
func refused(t *testing.T, r result) {
	t.Helper()
	if r.serverErr == nil || r.clientErr == nil {
		t.Fatalf("connection not refused: server: %v; client: %v", r.serverErr, r.clientErr)
	}
}

// peerRefused reports whether err is a TLS alert the peer sent, that is,
// whether the other side, not this one, ended the handshake. (crypto/tls
// reports those as a net.OpError whose Op is "remote error"; the alert
// type itself is not exported.)
func peerRefused(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "remote error"
}

func TestInitFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs") // Init creates it
	opts := InitOptions{
		Controllers: []string{"c1", "c2"},
		Agents:      []string{"host1"},
		Storage:     []string{"s1"},
		Admin:       true,
		Hosts:       []string{"ctl.example", "10.0.0.5", "::1"},
	}
	if err := Init(dir, opts); err != nil {
		t.Fatal(err)
	}
	want := []string{"ca.crt", "ca.key"}
	for _, id := range []string{"controller-c1", "controller-c2", "agent-host1", "storage-s1", "admin-admin"} {
		want = append(want, id+".crt", id+".key")
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("files:\n got %v\nwant %v", got, want)
	}
	for _, name := range got {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		perm := os.FileMode(0o644)
		if strings.HasSuffix(name, ".key") {
			perm = 0o600
		}
		if st.Mode().Perm() != perm {
			t.Errorf("%s: mode %v, want %v", name, st.Mode().Perm(), perm)
		}
	}
	if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("dir: %v %v, want mode 0700", st.Mode().Perm(), err)
	}

	ca := readCert(t, filepath.Join(dir, "ca.crt"))
	if !ca.IsCA || ca.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Errorf("CA: IsCA %v, key usage %v", ca.IsCA, ca.KeyUsage)
	}
	if pub, ok := ca.PublicKey.(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P256() {
		t.Errorf("CA key %T, want ECDSA P-256", ca.PublicKey)
	}
	if life := ca.NotAfter.Sub(ca.NotBefore); life < DefaultValidity {
		t.Errorf("CA valid for %v, want at least %v", life, DefaultValidity)
	}
	for _, tt := range []struct {
		file, role, name string
		server           bool
	}{
		{"controller-c1.crt", "controller", "c1", true},
		{"agent-host1.crt", "agent", "host1", true},
		{"storage-s1.crt", "storage", "s1", true},
		{"admin-admin.crt", "admin", "admin", false},
	} {
		c := readCert(t, filepath.Join(dir, tt.file))
		role, name, err := identityOf(c)
		if err != nil || role != tt.role || name != tt.name {
			t.Errorf("%s: identity %q %q %v, want %q %q", tt.file, role, name, err, tt.role, tt.name)
		}
		if err := c.CheckSignatureFrom(ca); err != nil {
			t.Errorf("%s: %v", tt.file, err)
		}
		if c.IsCA {
			t.Errorf("%s: a CA", tt.file)
		}
		if got := slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageServerAuth); got != tt.server {
			t.Errorf("%s: server auth %v, want %v", tt.file, got, tt.server)
		}
		if !slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
			t.Errorf("%s: no client auth", tt.file)
		}
		if !tt.server {
			if len(c.DNSNames)+len(c.IPAddresses) != 0 {
				t.Errorf("%s: SANs %v %v on a client certificate", tt.file, c.DNSNames, c.IPAddresses)
			}
			continue
		}
		for _, h := range []string{tt.name, "ctl.example", "10.0.0.5", "::1"} {
			if err := c.VerifyHostname(h); err != nil {
				t.Errorf("%s: %v", tt.file, err)
			}
		}
		if err := c.VerifyHostname("localhost"); err == nil {
			t.Errorf("%s: valid for localhost although hosts were given", tt.file)
		}
	}
	// Every certificate loads.
	for _, id := range [][2]string{{"controller", "c2"}, {"agent", "host1"}, {"admin", "admin"}} {
		m := load(t, dir, id[0], id[1])
		if m.Role() != id[0] || m.Name() != id[1] {
			t.Errorf("loaded %s/%s, want %s/%s", m.Role(), m.Name(), id[0], id[1])
		}
	}
}

func TestInitDefaultHosts(t *testing.T) {
	dir := t.TempDir()
	if err := Init(dir, InitOptions{Controllers: []string{"controller"}}); err != nil {
		t.Fatal(err)
	}
	c := readCert(t, filepath.Join(dir, "controller-controller.crt"))
	for _, h := range []string{"controller", "localhost", "127.0.0.1"} {
		if err := c.VerifyHostname(h); err != nil {
			t.Error(err)
		}
	}
	if life := c.NotAfter.Sub(c.NotBefore); life < DefaultValidity {
		t.Errorf("valid for %v, want %v", life, DefaultValidity)
	}
	if !c.NotBefore.Before(time.Now().Add(-backdate / 2)) {
		t.Errorf("NotBefore %v not backdated", c.NotBefore)
	}
}

func TestInitRefusesOverwrite(t *testing.T) {
	dir := cluster(t)
	before := readFile(t, filepath.Join(dir, "ca.crt"))
	err := Init(dir, InitOptions{Agents: []string{"other"}})
	if !errors.Is(err, ErrExists) {
		t.Fatalf("Init over a CA: %v, want ErrExists", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "agent-other.crt")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a refused Init wrote agent-other.crt: %v", err)
	}
	if !bytes.Equal(readFile(t, filepath.Join(dir, "ca.crt")), before) {
		t.Error("a refused Init changed ca.crt")
	}
	// An existing leaf file also stops a fresh Init.
	dir2 := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir2, "agent-a.key"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := Init(dir2, InitOptions{Agents: []string{"a"}}); !errors.Is(err, ErrExists) {
		t.Errorf("Init over agent-a.key: %v, want ErrExists", err)
	}

	if err := Init(dir, InitOptions{Agents: []string{"host1"}, Force: true}); err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(readFile(t, filepath.Join(dir, "ca.crt")), before) {
		t.Error("Init with Force kept the old CA")
	}
	load(t, dir, "agent", "host1")
	// Certificates of the old CA are no longer trusted.
	if _, err := DirFiles(dir, "storage", "s1").Load(); !errors.Is(err, ErrUntrusted) {
		t.Errorf("old certificate after a forced Init: %v, want ErrUntrusted", err)
	}
}

func TestInitBadOptions(t *testing.T) {
	for _, tt := range []struct {
		name string
		opts InitOptions
		want error
	}{
		{"empty name", InitOptions{Agents: []string{""}}, ErrInvalidName},
		{"path", InitOptions{Agents: []string{"../evil"}}, ErrInvalidName},
		{"slash", InitOptions{Storage: []string{"a/b"}}, ErrInvalidName},
		{"space", InitOptions{Controllers: []string{"a b"}}, ErrInvalidName},
		{"too long", InitOptions{Agents: []string{strings.Repeat("a", 64)}}, ErrInvalidName},
		{"bad host", InitOptions{Agents: []string{"a"}, Hosts: []string{"not a host"}}, ErrInvalidName},
		{"twice", InitOptions{Agents: []string{"a", "a"}}, nil},
		{"negative validity", InitOptions{Agents: []string{"a"}, Validity: -time.Hour}, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			err := Init(dir, tt.opts)
			if err == nil || (tt.want != nil && !errors.Is(err, tt.want)) {
				t.Fatalf("Init: %v, want %v", err, tt.want)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Errorf("a refused Init wrote %d files", len(ents))
			}
		})
	}
	for _, ok := range []string{"host1", "a", "node-1.rack_2", "A9"} {
		if err := checkName(ok); err != nil {
			t.Errorf("checkName(%q): %v", ok, err)
		}
	}
}

func TestIssue(t *testing.T) {
	dir := cluster(t)
	if err := Issue(dir, "agent", "host2", []string{"h2.example"}, time.Hour); err != nil {
		t.Fatal(err)
	}
	m := load(t, dir, "agent", "host2")
	if d := time.Until(m.NotAfter()); d <= 0 || d > time.Hour {
		t.Errorf("expires in %v, want within the hour", d)
	}
	if err := m.cert.Leaf.VerifyHostname("h2.example"); err != nil {
		t.Error(err)
	}
	if st, err := os.Stat(filepath.Join(dir, "agent-host2.key")); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("key mode %v %v, want 0600", st.Mode().Perm(), err)
	}

	// Longer than the CA: cut to the CA's end.
	if err := Issue(dir, "storage", "long", nil, 2*DefaultValidity); err != nil {
		t.Fatal(err)
	}
	ca := readCert(t, filepath.Join(dir, "ca.crt"))
	if got := load(t, dir, "storage", "long").NotAfter(); !got.Equal(ca.NotAfter) {
		t.Errorf("NotAfter %v, want the CA's %v", got, ca.NotAfter)
	}

	for _, tt := range []struct {
		name     string
		dir      string
		role, id string
		want     error
	}{
		{"exists", dir, "agent", "host1", ErrExists},
		{"unknown role", dir, "client", "x", ErrUnknownRole},
		{"bad name", dir, "agent", "x/y", ErrInvalidName},
		{"no CA", t.TempDir(), "agent", "x", fs.ErrNotExist},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if err := Issue(tt.dir, tt.role, tt.id, nil, 0); !errors.Is(err, tt.want) {
				t.Errorf("Issue: %v, want %v", err, tt.want)
			}
		})
	}
}

func TestServerAcceptsRole(t *testing.T) {
	dir := cluster(t)
	ctl := load(t, dir, "controller", "controller")
	agent := load(t, dir, "agent", "host1")

	r := connect(t, ctl.Server("agent"), tlsDialer(agent.Client("controller", "controller")))
	accepted(t, r)
	if r.server.Version != tls.VersionTLS13 {
		t.Errorf("version %x, want TLS 1.3", r.server.Version)
	}
	role, name, err := PeerIdentity(r.server)
	if err != nil || role != "agent" || name != "host1" {
		t.Errorf("server sees %q %q %v, want agent host1", role, name, err)
	}
	role, name, err = PeerIdentity(r.client)
	if err != nil || role != "controller" || name != "controller" {
		t.Errorf("client sees %q %q %v, want controller controller", role, name, err)
	}

	// Several roles; no roles means any.
	admin := load(t, dir, "admin", "admin")
	accepted(t, connect(t, ctl.Server("agent", "admin"), tlsDialer(admin.Client("controller"))))
	accepted(t, connect(t, ctl.Server(), tlsDialer(admin.Client("controller"))))
	// The server may be dialed by one of its hosts.
	accepted(t, connect(t, ctl.Server("agent"), tlsDialer(agent.Client("127.0.0.1", "controller"))))
}

func TestServerRefuses(t *testing.T) {
	dir := cluster(t)
	ctl := load(t, dir, "controller", "controller")
	srv := ctl.Server("agent")

	otherDir := cluster(t) // another cluster: same names, another CA
	stranger := load(t, otherDir, "agent", "host1")

	if err := Issue(dir, "agent", "old", nil, -time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := DirFiles(dir, "agent", "old").Load(); !errors.Is(err, ErrExpired) {
		t.Fatalf("loading an expired certificate: %v, want ErrExpired", err)
	}
	// Load it as of when it was valid, to see that servers refuse it.
	expired, err := DirFiles(dir, "agent", "old").loadAt(time.Now().Add(-2 * time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	storage := load(t, dir, "storage", "s1")
	noCert := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: ctl.pool, ServerName: "controller"}

	t.Run("other CA", func(t *testing.T) {
		// The stranger trusts our CA, so that it is the server that
		// refuses, and sends its certificate although the server asks for
		// one from our CA (a Go client would otherwise send none).
		cfg := stranger.Client("controller")
		cfg.RootCAs = ctl.pool
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &stranger.cert, nil
		}
		r := connect(t, srv, tlsDialer(cfg))
		refused(t, r)
		var ua x509.UnknownAuthorityError
		if !errors.As(r.serverErr, &ua) {
			t.Errorf("server: %v, want x509.UnknownAuthorityError", r.serverErr)
		}
	})
	t.Run("expired", func(t *testing.T) {
		r := connect(t, srv, tlsDialer(expired.Client("controller")))
		refused(t, r)
		var ci x509.CertificateInvalidError
		if !errors.As(r.serverErr, &ci) || ci.Reason != x509.Expired {
			t.Errorf("server: %v, want an expired certificate", r.serverErr)
		}
		if !peerRefused(r.clientErr) {
			t.Errorf("client: %v, want an alert from the peer", r.clientErr)
		}
	})
	t.Run("no client certificate", func(t *testing.T) {
		r := connect(t, srv, tlsDialer(noCert))
		refused(t, r)
		if !peerRefused(r.clientErr) {
			t.Errorf("client: %v, want an alert from the peer", r.clientErr)
		}
	})
	t.Run("wrong role", func(t *testing.T) {
		r := connect(t, srv, tlsDialer(storage.Client("controller")))
		refused(t, r)
		if !errors.Is(r.serverErr, ErrRole) {
			t.Errorf("server: %v, want ErrRole", r.serverErr)
		}
		if !peerRefused(r.clientErr) {
			t.Errorf("client: %v, want an alert from the peer", r.clientErr)
		}
	})
	t.Run("plaintext", func(t *testing.T) {
		r := connect(t, srv, plainDialer)
		var rh tls.RecordHeaderError
		if !errors.As(r.serverErr, &rh) {
			t.Errorf("server: %v, want tls.RecordHeaderError", r.serverErr)
		}
	})
	t.Run("TLS 1.2", func(t *testing.T) {
		cfg := load(t, dir, "agent", "host1").Client("controller")
		cfg.MaxVersion = tls.VersionTLS12
		refused(t, connect(t, srv, tlsDialer(cfg)))
	})
}

func TestServerRoleCheckedOnResumption(t *testing.T) {
	dir := cluster(t)
	ctl := load(t, dir, "controller", "controller")
	agentCfg := load(t, dir, "agent", "host1").Client("controller")
	agentCfg.ClientSessionCache = tls.NewLRUClientSessionCache(4)

	var keys [32]byte
	agentOnly, storageOnly := ctl.Server("agent"), ctl.Server("storage")
	agentOnly.SetSessionTicketKeys([][32]byte{keys})
	storageOnly.SetSessionTicketKeys([][32]byte{keys})

	accepted(t, connect(t, agentOnly, tlsDialer(agentCfg)))
	r := connect(t, agentOnly, tlsDialer(agentCfg))
	accepted(t, r)
	if !r.server.DidResume {
		t.Fatal("second connection did not resume; the test below would not test resumption")
	}
	r = connect(t, storageOnly, tlsDialer(agentCfg))
	if !errors.Is(r.serverErr, ErrRole) {
		t.Errorf("resumed session with a refused role: server: %v, want ErrRole", r.serverErr)
	}
}

func TestClientRefuses(t *testing.T) {
	dir := cluster(t)
	agent := load(t, dir, "agent", "host1")
	ctl := load(t, dir, "controller", "controller")
	foreignCtl := load(t, cluster(t), "controller", "controller")
	storage := load(t, dir, "storage", "s1")

	t.Run("other CA", func(t *testing.T) {
		r := connect(t, foreignCtl.Server(), tlsDialer(agent.Client("controller", "controller")))
		refused(t, r)
		var ua x509.UnknownAuthorityError
		if !errors.As(r.clientErr, &ua) {
			t.Errorf("client: %v, want x509.UnknownAuthorityError", r.clientErr)
		}
		if !peerRefused(r.serverErr) {
			t.Errorf("server: %v, want an alert from the peer", r.serverErr)
		}
	})
	t.Run("wrong role", func(t *testing.T) {
		// storage-s1 is valid for localhost too: only the role is wrong.
		r := connect(t, storage.Server(), tlsDialer(agent.Client("localhost", "controller")))
		refused(t, r)
		if !errors.Is(r.clientErr, ErrRole) {
			t.Errorf("client: %v, want ErrRole", r.clientErr)
		}
	})
	t.Run("wrong name", func(t *testing.T) {
		r := connect(t, ctl.Server(), tlsDialer(agent.Client("host9", "controller")))
		refused(t, r)
		var he x509.HostnameError
		if !errors.As(r.clientErr, &he) {
			t.Errorf("client: %v, want x509.HostnameError", r.clientErr)
		}
	})
}

func TestUnknownRolePanics(t *testing.T) {
	m := load(t, cluster(t), "agent", "host1")
	for _, f := range []func(){
		func() { m.Server("agnet") },
		func() { m.Client("controller", "") },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Error("no panic on an unknown role")
				}
			}()
			f()
		}()
	}
}

func TestPeerIdentity(t *testing.T) {
	dir := cluster(t)
	if _, _, err := PeerIdentity(tls.ConnectionState{}); !errors.Is(err, ErrNoPeer) {
		t.Errorf("no peer: %v, want ErrNoPeer", err)
	}
	c := readCert(t, filepath.Join(dir, "storage-s1.crt"))
	// A certificate that was not verified does not count.
	if _, _, err := PeerIdentity(tls.ConnectionState{PeerCertificates: []*x509.Certificate{c}}); !errors.Is(err, ErrNoPeer) {
		t.Errorf("unverified peer: %v, want ErrNoPeer", err)
	}
	role, name, err := PeerIdentity(tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{c}}})
	if err != nil || role != "storage" || name != "s1" {
		t.Errorf("got %q %q %v, want storage s1", role, name, err)
	}
	// The CA has no role.
	ca := readCert(t, filepath.Join(dir, "ca.crt"))
	if _, _, err := PeerIdentity(tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{ca}}}); !errors.Is(err, ErrNoIdentity) {
		t.Errorf("CA: %v, want ErrNoIdentity", err)
	}
}

func TestLoadErrors(t *testing.T) {
	dir := cluster(t)
	other := cluster(t)
	good := DirFiles(dir, "agent", "host1")
	garbage := filepath.Join(t.TempDir(), "garbage.pem")
	if err := os.WriteFile(garbage, []byte("not a PEM file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.crt")
	with := func(f func(*Files)) Files {
		g := good
		f(&g)
		return g
	}
	for _, tt := range []struct {
		name  string
		files Files
		want  error
		file  string // the error must name it
	}{
		{"missing CA", with(func(f *Files) { f.CA = missing }), fs.ErrNotExist, missing},
		{"missing cert", with(func(f *Files) { f.Cert = missing }), fs.ErrNotExist, missing},
		{"missing key", with(func(f *Files) { f.Key = missing }), fs.ErrNotExist, missing},
		{"garbage CA", with(func(f *Files) { f.CA = garbage }), ErrNotPEM, garbage},
		{"garbage cert", with(func(f *Files) { f.Cert = garbage }), ErrNotPEM, garbage},
		{"garbage key", with(func(f *Files) { f.Key = garbage }), ErrNotPEM, garbage},
		{"key is a cert", with(func(f *Files) { f.Key = good.Cert }), ErrNotPEM, good.Cert},
		{"other key", with(func(f *Files) { f.Key = DirFiles(dir, "storage", "s1").Key }), ErrKeyMismatch, DirFiles(dir, "storage", "s1").Key},
		{"other CA", with(func(f *Files) { f.CA = filepath.Join(other, "ca.crt") }), ErrUntrusted, good.Cert},
		{"cert of another cluster", Files{CA: good.CA, Cert: DirFiles(other, "agent", "host1").Cert, Key: DirFiles(other, "agent", "host1").Key}, ErrUntrusted, DirFiles(other, "agent", "host1").Cert},
		{"CA is a leaf", with(func(f *Files) { f.CA = filepath.Join(dir, "storage-s1.crt") }), ErrNotCA, filepath.Join(dir, "storage-s1.crt")},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m, err := tt.files.Load()
			if !errors.Is(err, tt.want) {
				t.Fatalf("Load: %v, %v; want %v", m, err, tt.want)
			}
			if !strings.Contains(err.Error(), tt.file) {
				t.Errorf("error %q does not name %s", err, tt.file)
			}
		})
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	cs, err := readCerts(path)
	if err != nil {
		t.Fatal(err)
	}
	return cs[0]
}
