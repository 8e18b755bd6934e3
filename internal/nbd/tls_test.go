package nbd

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"segmap/internal/nbd/nbdclient"
	"segmap/internal/nbd/nbdwire"
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

// startTLS sends NBD_OPT_STARTTLS on c, runs the TLS handshake with cfg
// and returns a client speaking over TLS.
func (c *client) startTLS(cfg *tls.Config) *client {
	c.t.Helper()
	c.expectFinal(nbdwire.OptStartTLS, nil, nbdwire.RepAck)
	tc := tls.Client(c.nc, cfg)
	if err := tc.Handshake(); err != nil {
		c.t.Fatalf("TLS handshake: %v", err)
	}
	return &client{t: c.t, nc: tc, rd: bufio.NewReader(tc)}
}

// TestTLSRequiredOptions walks FORCEDTLS option by option: everything but
// STARTTLS and ABORT is refused before TLS, nothing is after it.
func TestTLSRequiredOptions(t *testing.T) {
	checkGoroutines(t)
	p := newTestPKI(t)
	h := startServer(t, p.serverTLS(true), newMem("disk", 4096))
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle|nbdwire.CFlagNoZeroes)
	meta := metaData("disk")
	for _, o := range []struct {
		opt  nbdwire.Option
		data []byte
	}{
		{nbdwire.OptList, nil},
		{nbdwire.OptInfo, infoData("disk")},
		{nbdwire.OptGo, infoData("disk")},
		{nbdwire.OptGo, infoData("nope")},
		{nbdwire.OptStructuredReply, nil},
		{nbdwire.OptListMetaContext, meta},
		{nbdwire.Option(99), nil},
		{nbdwire.OptInfo, make([]byte, maxOptionData+1)}, // discarded, still TLS_REQD
	} {
		if _, final := c.opt(o.opt, o.data); final.typ != nbdwire.RepErrTLSReqd {
			t.Errorf("%v before TLS: %v (%q), want %v", o.opt, final.typ, final.data, nbdwire.RepErrTLSReqd)
		}
	}
	c.expectFinal(nbdwire.OptStartTLS, []byte{1}, nbdwire.RepErrInvalid)

	s := c.startTLS(p.agent.Client("127.0.0.1", tlsconf.RoleStorage))
	s.expectFinal(nbdwire.OptStartTLS, nil, nbdwire.RepErrInvalid)
	if infos := s.expectFinal(nbdwire.OptList, nil, nbdwire.RepAck); len(infos) != 1 {
		t.Errorf("LIST over TLS: %d exports, want 1", len(infos))
	}
	if ctxs := s.expectFinal(nbdwire.OptListMetaContext, meta, nbdwire.RepAck); len(ctxs) != 1 {
		t.Errorf("LIST_META_CONTEXT over TLS: %d contexts, want 1", len(ctxs))
	}
	s.expectFinal(nbdwire.OptInfo, infoData("disk"), nbdwire.RepAck)
	connectOn(t, s, "disk")
}

func TestTLSRequiredEndsConnection(t *testing.T) {
	checkGoroutines(t)
	p := newTestPKI(t)
	h := startServer(t, p.serverTLS(true), newMem("disk", 4096))

	// EXPORT_NAME cannot be answered an error.
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	c.sendOpt(nbdwire.OptExportName, []byte("disk"))
	c.expectClosed()

	// A client without fixed newstyle cannot ask for TLS.
	c = dialFlags(t, h.addr, 0)
	c.expectClosed()

	// ABORT is answered.
	c = dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	c.expectFinal(nbdwire.OptAbort, nil, nbdwire.RepAck)
	c.expectClosed()

	if n := h.backend.opens.Load(); n != 0 {
		t.Errorf("%d exports opened without TLS", n)
	}
	waitFor(t, "connections to end", func() bool { return h.srv.numConns() == 0 })
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
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	c.expectFinal(nbdwire.OptStartTLS, nil, nbdwire.RepAck)
	c.expectClosed()
	waitFor(t, "connections to end", func() bool { return h.srv.numConns() == 0 })
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

// TestTLSOptional is the SELECTIVETLS mode with every export open to both:
// plaintext works, and STARTTLS forgets what was negotiated before it.
func TestTLSOptional(t *testing.T) {
	checkGoroutines(t)
	p := newTestPKI(t)
	h := startServer(t, p.serverTLS(false), newMem("disk", 2<<20))
	connectOn(t, dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle), "disk")

	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	c.expectFinal(nbdwire.OptStructuredReply, nil, nbdwire.RepAck)
	if ei := parseInfos(t, c.expectFinal(nbdwire.OptInfo, infoData("disk"), nbdwire.RepAck)); ei.flags&nbdwire.TFlagSendDF == 0 {
		t.Fatalf("flags %#x lack DF after STRUCTURED_REPLY", ei.flags)
	}
	s := c.startTLS(p.controller.Client("127.0.0.1", tlsconf.RoleStorage))
	if ei := parseInfos(t, s.expectFinal(nbdwire.OptInfo, infoData("disk"), nbdwire.RepAck)); ei.flags&nbdwire.TFlagSendDF != 0 {
		t.Errorf("flags %#x: structured replies survived STARTTLS", ei.flags)
	}
	s.expectFinal(nbdwire.OptStartTLS, nil, nbdwire.RepErrInvalid)
	s.goExport("disk", true).read(0, 1)

	roundTrip(t, dialClient(t, h.addr, "disk", clientTLS(p.agent)), 0, 1<<20)
	roundTrip(t, dialClient(t, h.addr, "disk", nbdclient.ClientConfig{}), 1<<20, 1<<20)
}

// TestTLSShutdown: Shutdown ends connections in the TLS handshake at once
// and lets a TLS connection's requests in flight finish.
func TestTLSShutdown(t *testing.T) {
	checkGoroutines(t)
	p := newTestPKI(t)
	h := startServer(t, p.serverTLS(true), newMem("disk", 1<<20))
	stuck := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	stuck.expectFinal(nbdwire.OptStartTLS, nil, nbdwire.RepAck)
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

// dialClient, roundTrip: the client (package nbdclient) against this server,
// as in the client's own tests.

// dialClient dials export name at addr, failing the test on error; the
// client is closed at cleanup.
func dialClient(t testing.TB, addr, name string, cfg nbdclient.ClientConfig) *nbdclient.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := nbdclient.Dial(ctx, addr, name, cfg)
	if err != nil {
		t.Fatalf("Dial(%s, %q): %v", addr, name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
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
func roundTrip(t *testing.T, c *nbdclient.Client, base, span uint64) {
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

// clientTLS is how m connects to the storage node on 127.0.0.1.
func clientTLS(m *tlsconf.Material) nbdclient.ClientConfig {
	return nbdclient.ClientConfig{TLS: m.Client("127.0.0.1", tlsconf.RoleStorage)}
}
