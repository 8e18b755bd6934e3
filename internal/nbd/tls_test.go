package nbd

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"segmap/internal/tlsconf"
)

// testPKI is a cluster CA with a storage server and its clients, made by
// tlsconf as 'segmap certs init' does.
type testPKI struct {
	dir                             string
	storage, agent, controller, adm *tlsconf.Material
}

func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	dir := t.TempDir()
	err := tlsconf.Init(dir, tlsconf.InitOptions{
		Controllers: []string{"controller"},
		Agents:      []string{"a1"},
		Storage:     []string{"s1"},
		Admin:       true,
	})
	if err != nil {
		t.Fatal(err)
	}
	load := func(role, name string) *tlsconf.Material {
		m, err := tlsconf.DirFiles(dir, role, name).Load()
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	return &testPKI{
		dir:        dir,
		storage:    load(tlsconf.RoleStorage, "s1"),
		agent:      load(tlsconf.RoleAgent, "a1"),
		controller: load(tlsconf.RoleController, "controller"),
		adm:        load(tlsconf.RoleAdmin, tlsconf.RoleAdmin),
	}
}

// serverTLS is how a storage node configures TLS: agents and the
// controller may connect.
func (p *testPKI) serverTLS(required bool) func(*Config) {
	return func(c *Config) {
		c.TLS = p.storage.Server(tlsconf.RoleAgent, tlsconf.RoleController)
		c.TLSRequired = required
	}
}

// clientTLS is how m connects to the storage node on 127.0.0.1.
func clientTLS(m *tlsconf.Material) ClientConfig {
	return ClientConfig{TLS: m.Client("127.0.0.1", tlsconf.RoleStorage)}
}

// startTLS sends NBD_OPT_STARTTLS on c, runs the TLS handshake with cfg
// and returns a client speaking over TLS.
func (c *client) startTLS(cfg *tls.Config) *client {
	c.t.Helper()
	c.expectFinal(optStartTLS, nil, repAck)
	tc := tls.Client(c.nc, cfg)
	if err := tc.Handshake(); err != nil {
		c.t.Fatalf("TLS handshake: %v", err)
	}
	return &client{t: c.t, nc: tc, rd: bufio.NewReader(tc)}
}

func TestTLSRequiredClients(t *testing.T) {
	checkGoroutines(t)
	p := newTestPKI(t)
	h := startServer(t, p.serverTLS(true), newMem("disk", 4<<20))
	for i, m := range []*tlsconf.Material{p.agent, p.controller} {
		t.Run(m.Role(), func(t *testing.T) {
			c := dialClient(t, h.addr, "disk", clientTLS(m))
			if _, ok := c.nc.(*tls.Conn); !ok {
				t.Fatalf("connection is a %T", c.nc)
			}
			if !c.structured {
				t.Error("structured replies were not negotiated over TLS")
			}
			roundTrip(t, c, uint64(i)<<20, 1<<20)
		})
	}
	// The certificate is valid for localhost too.
	cfg := ClientConfig{TLS: p.agent.Client("localhost", tlsconf.RoleStorage)}
	roundTrip(t, dialClient(t, h.addr, "disk", cfg), 2<<20, 1<<20)
}

func TestTLSRequiredPlaintextRefused(t *testing.T) {
	checkGoroutines(t)
	p := newTestPKI(t)
	h := startServer(t, p.serverTLS(true), newMem("disk", 4096))
	if _, err := Dial(bg, h.addr, "disk", ClientConfig{}); !errors.Is(err, ErrTLSRequired) {
		t.Errorf("plaintext Dial: %v, want ErrTLSRequired", err)
	}
	if _, err := Dial(bg, h.addr, "disk", ClientConfig{noStructured: true}); !errors.Is(err, ErrTLSRequired) {
		t.Errorf("plaintext Dial with GO: %v, want ErrTLSRequired", err)
	}
	if _, err := Dial(bg, h.addr, "disk", ClientConfig{noStructured: true, noGo: true}); err == nil {
		t.Error("plaintext Dial with EXPORT_NAME succeeded")
	}
	if n := h.backend.opens.Load(); n != 0 {
		t.Errorf("%d exports opened without TLS", n)
	}
}

// TestTLSRequiredOptions walks FORCEDTLS option by option: everything but
// STARTTLS and ABORT is refused before TLS, nothing is after it.
func TestTLSRequiredOptions(t *testing.T) {
	checkGoroutines(t)
	p := newTestPKI(t)
	h := startServer(t, p.serverTLS(true), newMem("disk", 4096))
	c := dialFlags(t, h.addr, cflagFixedNewstyle|cflagNoZeroes)
	meta := infoData("disk")[:8]
	for _, o := range []struct {
		opt  option
		data []byte
	}{
		{optList, nil},
		{optInfo, infoData("disk")},
		{optGo, infoData("disk")},
		{optGo, infoData("nope")},
		{optStructuredReply, nil},
		{optListMetaContext, meta},
		{option(99), nil},
		{optInfo, make([]byte, maxOptionData+1)}, // discarded, still TLS_REQD
	} {
		if _, final := c.opt(o.opt, o.data); final.typ != repErrTLSReqd {
			t.Errorf("%v before TLS: %v (%q), want %v", o.opt, final.typ, final.data, repErrTLSReqd)
		}
	}
	c.expectFinal(optStartTLS, []byte{1}, repErrInvalid)

	s := c.startTLS(p.agent.Client("127.0.0.1", tlsconf.RoleStorage))
	s.expectFinal(optStartTLS, nil, repErrInvalid)
	if infos := s.expectFinal(optList, nil, repAck); len(infos) != 1 {
		t.Errorf("LIST over TLS: %d exports, want 1", len(infos))
	}
	s.expectFinal(optListMetaContext, meta, repErrUnsup)
	s.expectFinal(optInfo, infoData("disk"), repAck)
	connectOn(t, s, "disk")
}

func TestTLSRequiredEndsConnection(t *testing.T) {
	checkGoroutines(t)
	p := newTestPKI(t)
	h := startServer(t, p.serverTLS(true), newMem("disk", 4096))

	// EXPORT_NAME cannot be answered an error.
	c := dialFlags(t, h.addr, cflagFixedNewstyle)
	c.sendOpt(optExportName, []byte("disk"))
	c.expectClosed()

	// A client without fixed newstyle cannot ask for TLS.
	c = dialFlags(t, h.addr, 0)
	c.expectClosed()

	// ABORT is answered.
	c = dialFlags(t, h.addr, cflagFixedNewstyle)
	c.expectFinal(optAbort, nil, repAck)
	c.expectClosed()

	if n := h.backend.opens.Load(); n != 0 {
		t.Errorf("%d exports opened without TLS", n)
	}
	waitFor(t, "connections to end", func() bool { return h.srv.numConns() == 0 })
}

// TestTLSOptional is the SELECTIVETLS mode with every export open to both:
// plaintext works, and STARTTLS forgets what was negotiated before it.
func TestTLSOptional(t *testing.T) {
	checkGoroutines(t)
	p := newTestPKI(t)
	h := startServer(t, p.serverTLS(false), newMem("disk", 2<<20))
	connectOn(t, dialFlags(t, h.addr, cflagFixedNewstyle), "disk")

	c := dialFlags(t, h.addr, cflagFixedNewstyle)
	c.expectFinal(optStructuredReply, nil, repAck)
	if ei := parseInfos(t, c.expectFinal(optInfo, infoData("disk"), repAck)); ei.flags&tflagSendDF == 0 {
		t.Fatalf("flags %#x lack DF after STRUCTURED_REPLY", ei.flags)
	}
	s := c.startTLS(p.controller.Client("127.0.0.1", tlsconf.RoleStorage))
	if ei := parseInfos(t, s.expectFinal(optInfo, infoData("disk"), repAck)); ei.flags&tflagSendDF != 0 {
		t.Errorf("flags %#x: structured replies survived STARTTLS", ei.flags)
	}
	s.expectFinal(optStartTLS, nil, repErrInvalid)
	s.goExport("disk", true).read(0, 1)

	roundTrip(t, dialClient(t, h.addr, "disk", clientTLS(p.agent)), 0, 1<<20)
	roundTrip(t, dialClient(t, h.addr, "disk", ClientConfig{}), 1<<20, 1<<20)
}

// TestTLSNotConfigured: without Config.TLS a client that insists on TLS
// is refused, and does not fall back to plaintext.
func TestTLSNotConfigured(t *testing.T) {
	checkGoroutines(t)
	p := newTestPKI(t)
	h := startServer(t, nil, newMem("disk", 4096))
	if _, err := Dial(bg, h.addr, "disk", clientTLS(p.agent)); err == nil {
		t.Fatal("TLS Dial to a plaintext server succeeded")
	}
	if n := h.backend.opens.Load(); n != 0 {
		t.Errorf("%d exports opened", n)
	}
}

func TestTLSBadClients(t *testing.T) {
	checkGoroutines(t)
	p := newTestPKI(t)
	other := newTestPKI(t) // another cluster
	h := startServer(t, p.serverTLS(true), newMem("disk", 4096))

	// The other cluster's agent does not trust this server.
	_, err := Dial(bg, h.addr, "disk", clientTLS(other.agent))
	var uerr x509.UnknownAuthorityError
	if !errors.As(err, &uerr) {
		t.Errorf("Dial with another cluster's CA: %v, want x509.UnknownAuthorityError", err)
	}

	otherCert := other.agent.Client("127.0.0.1").Certificates
	for _, tc := range []struct {
		name string
		edit func(*tls.Config)
	}{
		// Sent whatever CAs the server asks for (Go's client would
		// otherwise send none).
		{"certificate of another CA", func(c *tls.Config) {
			c.Certificates = nil
			c.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
				return &otherCert[0], nil
			}
		}},
		{"no certificate", func(c *tls.Config) { c.Certificates = nil }},
		{"admin role", func(c *tls.Config) { *c = *p.adm.Client("127.0.0.1", tlsconf.RoleStorage) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := clientTLS(p.agent)
			tc.edit(cfg.TLS)
			_, err := Dial(bg, h.addr, "disk", cfg)
			if err == nil {
				t.Fatal("Dial succeeded")
			}
			if errors.Is(err, ErrTLSRequired) {
				t.Errorf("Dial: %v: the TLS handshake should fail, not the options", err)
			}
		})
	}
	if n := h.backend.opens.Load(); n != 0 {
		t.Errorf("%d exports opened by refused clients", n)
	}
}

// TestTLSHandshakeTimeout: a client that gets the ACK and never starts the
// TLS handshake is dropped when HandshakeTimeout passes.
func TestTLSHandshakeTimeout(t *testing.T) {
	checkGoroutines(t)
	p := newTestPKI(t)
	h := startServer(t, func(c *Config) {
		p.serverTLS(true)(c)
		c.HandshakeTimeout = 200 * time.Millisecond
	}, newMem("disk", 4096))
	c := dialFlags(t, h.addr, cflagFixedNewstyle)
	c.expectFinal(optStartTLS, nil, repAck)
	c.expectClosed()
	waitFor(t, "connections to end", func() bool { return h.srv.numConns() == 0 })
}

// TestTLSShutdown: Shutdown ends connections in the TLS handshake at once
// and lets a TLS connection's requests in flight finish.
func TestTLSShutdown(t *testing.T) {
	checkGoroutines(t)
	p := newTestPKI(t)
	h := startServer(t, p.serverTLS(true), newMem("disk", 1<<20))
	stuck := dialFlags(t, h.addr, cflagFixedNewstyle)
	stuck.expectFinal(optStartTLS, nil, repAck)
	c := dialClient(t, h.addr, "disk", clientTLS(p.agent))
	roundTrip(t, c, 0, 1<<20)
	if err := h.srv.Shutdown(bg); err != nil {
		t.Fatal(err)
	}
	stuck.expectClosed()
	if err := c.ReadAt(bg, make([]byte, 1), 0); err == nil {
		t.Error("read after Shutdown succeeded")
	}
}

func TestNewServerTLSRequiredNeedsTLS(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error("NewServer did not panic")
		}
	}()
	NewServer(Config{Backend: &memBackend{}, TLSRequired: true})
}

// TestTLSNbdinfo reads the export with libnbd over TLS, presenting an
// agent's certificate, and checks that libnbd without TLS is refused.
func TestTLSNbdinfo(t *testing.T) {
	needTool(t, "nbdinfo")
	checkGoroutines(t)
	p := newTestPKI(t)
	h := startServer(t, p.serverTLS(true), newMem("disk", 1<<20))

	// libnbd (gnutls) wants ca-cert.pem, client-cert.pem, client-key.pem.
	dir := t.TempDir()
	agent := tlsconf.DirFiles(p.dir, tlsconf.RoleAgent, "a1")
	for from, to := range map[string]string{agent.CA: "ca-cert.pem", agent.Cert: "client-cert.pem", agent.Key: "client-key.pem"} {
		b, err := os.ReadFile(from)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, to), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	out := mustRunTool(t, "nbdinfo", "--json", "nbds://"+h.addr+"/disk?tls-certificates="+dir)
	var info struct {
		Exports []struct {
			Size uint64 `json:"export-size"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo output: %v\n%s", err, out)
	}
	if len(info.Exports) != 1 || info.Exports[0].Size != 1<<20 {
		t.Errorf("nbdinfo over TLS: %+v\n%s", info, out)
	}
	if out, err := runTool(t, "nbdinfo", "nbd://"+h.addr+"/disk"); err == nil {
		t.Errorf("nbdinfo without TLS succeeded:\n%s", out)
	}
}
