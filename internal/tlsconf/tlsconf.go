// Package tlsconf sets up the mutual TLS that segmap components use to
// authenticate each other.
//
// # Trust model
//
// A segmap cluster has one CA of its own (ca.crt, ca.key; see Init). Every
// component holds a certificate signed by it and presents it on every
// connection, as server and as client: there is no anonymous side. A
// certificate names one identity:
//
//   - the name is the Common Name (e.g. "host1");
//   - the role is an OrganizationalUnit "segmap-role:<role>", exactly one,
//     where role is controller, agent, storage or admin (the CLI).
//
// Trust is in the CA, not in addresses: a verified certificate proves its
// role and name, whatever IP it comes from. Servers therefore check two
// things: that the client certificate chains to the cluster CA (and is
// within its validity period), and that its role is one the service takes
// (an agent port refuses a storage certificate). Clients check the same of
// the server, plus that the server certificate carries the name dialed
// (server certificates have their name and the configured hosts as SANs).
// Only TLS 1.3 is spoken. The CA key signs certificates and nothing else;
// keep it off the machines that run segmap once the certificates are
// issued.
//
// What is not here: revocation (reissue the CA to drop a member) and
// authorization beyond the role; a service that needs the name calls
// PeerIdentity.
package tlsconf

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// Files names the PEM files of one identity: the cluster CA certificate,
// the identity's certificate (optionally followed by intermediates) and its
// private key.
type Files struct {
	CA, Cert, Key string
}

// DirFiles returns the files Init and Issue write in dir for the identity
// role/name.
func DirFiles(dir, role, name string) Files {
	base := filepath.Join(dir, role+"-"+name)
	return Files{CA: filepath.Join(dir, CACertFile), Cert: base + ".crt", Key: base + ".key"}
}

// Material is a loaded, checked identity: the cluster CA and a certificate
// with its key. It is immutable and may be used concurrently.
type Material struct {
	pool       *x509.CertPool
	cert       tls.Certificate
	role, name string
}

// Role returns the role of the certificate.
func (m *Material) Role() string { return m.role }

// Name returns the name (Common Name) of the certificate.
func (m *Material) Name() string { return m.name }

// NotAfter returns when the certificate expires.
func (m *Material) NotAfter() time.Time { return m.cert.Leaf.NotAfter }

// Load reads and checks the files: the CA file must hold a CA certificate,
// the certificate must be signed by it, be valid now and carry a segmap
// identity, and the key must be the certificate's. Errors name the file
// at fault and wrap fs.ErrNotExist, ErrNotPEM, ErrNotCA, ErrKeyMismatch,
// ErrUntrusted, ErrExpired or ErrNoIdentity.
func (f Files) Load() (*Material, error) { return f.loadAt(time.Now()) }

func (f Files) loadAt(now time.Time) (*Material, error) {
	cas, err := readCerts(f.CA)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, c := range cas {
		if !c.IsCA || !c.BasicConstraintsValid {
			return nil, fmt.Errorf("CA file %s: %q: %w", f.CA, c.Subject.CommonName, ErrNotCA)
		}
		pool.AddCert(c)
	}
	chain, err := readCerts(f.Cert)
	if err != nil {
		return nil, err
	}
	leaf := chain[0]
	key, err := readKey(f.Key)
	if err != nil {
		return nil, err
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(leaf.PublicKey) {
		return nil, fmt.Errorf("key %s: %w %s", f.Key, ErrKeyMismatch, f.Cert)
	}
	role, name, err := identityOf(leaf)
	if err != nil {
		return nil, fmt.Errorf("certificate %s: %w", f.Cert, err)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err = leaf.Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	var invalid x509.CertificateInvalidError
	switch {
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		return nil, fmt.Errorf("certificate %s (valid %s to %s): %w", f.Cert,
			leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339), ErrExpired)
	case err != nil:
		return nil, fmt.Errorf("certificate %s: %w %s (%v)", f.Cert, ErrUntrusted, f.CA, err)
	}
	raw := make([][]byte, len(chain))
	for i, c := range chain {
		raw[i] = c.Raw
	}
	return &Material{
		pool: pool,
		cert: tls.Certificate{Certificate: raw, PrivateKey: key, Leaf: leaf},
		role: role,
		name: name,
	}, nil
}

// Server returns a configuration for a server that takes connections only
// from holders of a certificate signed by the cluster CA whose role is
// one of clientRoles (any role if none is given). A refused client fails
// its handshake; the server's handshake error wraps ErrRole for a wrong
// role. Each call returns a new configuration the caller may change.
// Server panics on a role that does not exist.
func (m *Material) Server(clientRoles ...string) *tls.Config {
	allowed := mustRoles(clientRoles)
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{m.cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    m.pool,
		// VerifyConnection, unlike VerifyPeerCertificate, also runs on
		// resumed sessions.
		VerifyConnection: func(cs tls.ConnectionState) error {
			return checkPeer("client", allowed, cs)
		},
	}
}

// Client returns a configuration for connecting to a server whose
// certificate is signed by the cluster CA, names serverName (its name, or
// one of the hosts it was issued for) and has one of serverRoles (any role
// if none is given). It presents this Material's certificate. Each call
// returns a new configuration the caller may change. Client panics on a
// role that does not exist.
func (m *Material) Client(serverName string, serverRoles ...string) *tls.Config {
	allowed := mustRoles(serverRoles)
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{m.cert},
		RootCAs:      m.pool,
		ServerName:   serverName,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return checkPeer("server", allowed, cs)
		},
	}
}

// readCerts reads the CERTIFICATE blocks of a PEM file, at least one.
func readCerts(path string) ([]*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err // *fs.PathError names the file
	}
	var certs []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %s: %w", path, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("certificate %s: %w (want a CERTIFICATE block)", path, ErrNotPEM)
	}
	return certs, nil
}

// readKey reads the first private key of a PEM file, in PKCS #8 (what Init
// writes), SEC 1 or PKCS #1 form.
func readKey(path string) (crypto.Signer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return nil, fmt.Errorf("key %s: %w (want a PRIVATE KEY block)", path, ErrNotPEM)
		}
		var k any
		switch blk.Type {
		case "PRIVATE KEY":
			k, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(blk.Bytes)
		case "RSA PRIVATE KEY":
			k, err = x509.ParsePKCS1PrivateKey(blk.Bytes)
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("key %s: %w", path, err)
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("key %s: unsupported key type %T", path, k)
		}
		return s, nil
	}
}
