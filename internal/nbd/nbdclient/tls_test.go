package nbdclient

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"testing"

	"segmap/internal/tlsconf"
)

// The client against the server over TLS.

// clientTLS is how m connects to the storage node on 127.0.0.1.
func clientTLS(m *tlsconf.Material) ClientConfig {
	return ClientConfig{TLS: m.Client("127.0.0.1", tlsconf.RoleStorage)}
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
