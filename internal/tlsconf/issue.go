package tlsconf

import (
	"cmp"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// File names of the cluster CA in a certificate directory; see also
// DirFiles.
const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
)

// DefaultValidity is how long certificates are valid unless told
// otherwise: ten years.
const DefaultValidity = 10 * 365 * 24 * time.Hour

// backdate is subtracted from NotBefore so that a certificate issued on one
// machine is already valid on another whose clock is a little behind.
const backdate = time.Hour

// DefaultHosts are the SANs server certificates get when no hosts are
// given.
var DefaultHosts = []string{"localhost", "127.0.0.1"}

// InitOptions says which identities Init issues certificates for.
type InitOptions struct {
	Controllers []string // names of controllers
	Agents      []string // names of agents
	Storage     []string // names of storage servers
	Admin       bool     // issue the "admin" client certificate for the CLI

	// Hosts are DNS names and IP addresses added to every server
	// certificate besides its name (DefaultHosts if empty).
	Hosts []string

	// Validity is how long the certificates are valid (DefaultValidity
	// if zero). The CA is valid for at least DefaultValidity.
	Validity time.Duration

	// Force lets Init replace an existing CA and certificates. Every
	// certificate signed by the old CA stops being trusted.
	Force bool
}

// Init creates a cluster CA in dir (created if missing) and a certificate
// and key for each identity in opts, in the files DirFiles names. Keys are
// written 0600, certificates 0644, each file atomically. Without
// opts.Force, Init writes nothing if any of the files exists (ErrExists).
func Init(dir string, opts InitOptions) error { return initAt(dir, opts, time.Now()) }

type identity struct{ role, name string }

func initAt(dir string, opts InitOptions, now time.Time) error {
	if opts.Validity < 0 {
		return fmt.Errorf("validity %s: want a positive duration", opts.Validity)
	}
	validity := cmp.Or(opts.Validity, DefaultValidity)
	var ids []identity
	add := func(role string, names []string) {
		for _, n := range names {
			ids = append(ids, identity{role, n})
		}
	}
	add(RoleController, opts.Controllers)
	add(RoleAgent, opts.Agents)
	add(RoleStorage, opts.Storage)
	if opts.Admin {
		add(RoleAdmin, []string{RoleAdmin})
	}
	// Check everything before writing anything.
	paths := []string{filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)}
	seen := map[identity]bool{}
	for _, id := range ids {
		if err := checkName(id.name); err != nil {
			return fmt.Errorf("%s: %w", id.role, err)
		}
		if seen[id] {
			return fmt.Errorf("%s %q given twice", id.role, id.name)
		}
		seen[id] = true
		f := DirFiles(dir, id.role, id.name)
		paths = append(paths, f.Cert, f.Key)
	}
	if _, err := parseHosts(opts.Hosts); err != nil {
		return err
	}
	if !opts.Force {
		for _, p := range paths {
			if err := notExists(p); err != nil {
				return err
			}
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}

	ca, key, err := newCA(now, max(validity, DefaultValidity))
	if err != nil {
		return err
	}
	// Leaves first, the CA last: an interrupted Init leaves no CA that
	// later Issue calls would sign with while some leaves are missing.
	for _, id := range ids {
		if err := issue(dir, ca, key, id.role, id.name, opts.Hosts, validity, now); err != nil {
			return err
		}
	}
	if err := writePEM(filepath.Join(dir, CAKeyFile), "PRIVATE KEY", mustPKCS8(key), 0o600); err != nil {
		return err
	}
	return writePEM(filepath.Join(dir, CACertFile), "CERTIFICATE", ca.Raw, 0o644)
}

// Issue adds one certificate signed by the CA in dir, for the identity
// role/name, in the files DirFiles names. Server roles get name and hosts
// (DefaultHosts if empty) as SANs. validity is how long it is valid
// (DefaultValidity if zero); a negative validity issues a certificate that
// expired that long ago, for tests. Issue refuses to overwrite the
// identity's files (ErrExists).
func Issue(dir, role, name string, hosts []string, validity time.Duration) error {
	return issueAt(dir, role, name, hosts, validity, time.Now())
}

func issueAt(dir, role, name string, hosts []string, validity time.Duration, now time.Time) error {
	if err := checkRole(role); err != nil {
		return err
	}
	if err := checkName(name); err != nil {
		return err
	}
	if _, err := parseHosts(hosts); err != nil {
		return err
	}
	f := DirFiles(dir, role, name)
	for _, p := range []string{f.Cert, f.Key} {
		if err := notExists(p); err != nil {
			return fmt.Errorf("%w (remove it to reissue)", err)
		}
	}
	cas, err := readCerts(f.CA)
	if err != nil {
		return err
	}
	ca := cas[0]
	if !ca.IsCA {
		return fmt.Errorf("CA file %s: %w", f.CA, ErrNotCA)
	}
	key, err := readKey(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return err
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(ca.PublicKey) {
		return fmt.Errorf("key %s: %w %s", filepath.Join(dir, CAKeyFile), ErrKeyMismatch, f.CA)
	}
	return issue(dir, ca, key, role, name, hosts, cmp.Or(validity, DefaultValidity), now)
}

func newCA(now time.Time, validity time.Duration) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := newSerial()
	if err != nil {
		return nil, nil, err
	}
	// A CA name of its own per cluster, so that an error about a
	// certificate from another cluster names a different CA.
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			Organization: []string{"segmap"},
			CommonName:   "segmap cluster CA " + hex.EncodeToString(serial.Bytes()[:4]),
		},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	ca, err := x509.ParseCertificate(der)
	return ca, key, err
}

// issue signs and writes a certificate for role/name. Arguments are
// checked.
func issue(dir string, ca *x509.Certificate, signer crypto.Signer, role, name string, hosts []string, validity time.Duration, now time.Time) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial, err := newSerial()
	if err != nil {
		return err
	}
	notAfter := now.Add(validity)
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			Organization:       []string{"segmap"},
			OrganizationalUnit: []string{ouPrefix + role},
			CommonName:         name,
		},
		NotBefore:             earliest(now, notAfter).Add(-backdate),
		NotAfter:              earliest(notAfter, ca.NotAfter), // not past the CA
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	if isServerRole(role) {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		sans, _ := parseHosts(hosts)
		tmpl.DNSNames = []string{name}
		for _, h := range sans {
			if ip := net.ParseIP(h); ip != nil {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			} else if !slices.Contains(tmpl.DNSNames, h) {
				tmpl.DNSNames = append(tmpl.DNSNames, h)
			}
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, signer)
	if err != nil {
		return err
	}
	f := DirFiles(dir, role, name)
	if err := writePEM(f.Key, "PRIVATE KEY", mustPKCS8(key), 0o600); err != nil {
		return err
	}
	return writePEM(f.Cert, "CERTIFICATE", der, 0o644)
}

// parseHosts checks hosts, each a DNS name or an IP address, and returns
// DefaultHosts if there are none.
func parseHosts(hosts []string) ([]string, error) {
	if len(hosts) == 0 {
		return DefaultHosts, nil
	}
	for _, h := range hosts {
		if net.ParseIP(h) != nil {
			continue
		}
		if err := checkName(h); err != nil {
			return nil, fmt.Errorf("host: %w", err)
		}
	}
	return hosts, nil
}

func newSerial() (*big.Int, error) {
	// 127 random bits: positive, and as unguessable as the CA/Browser
	// rules ask.
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

func mustPKCS8(key *ecdsa.PrivateKey) []byte {
	b, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		panic(err) // a P-256 key always marshals
	}
	return b
}

func notExists(path string) error {
	_, err := os.Lstat(path)
	switch {
	case err == nil:
		return fmt.Errorf("%s: %w", path, ErrExists)
	case errors.Is(err, fs.ErrNotExist):
		return nil
	}
	return err
}

// writePEM writes one PEM block to path atomically with mode perm: a
// crash leaves the old file or the new one, never a torn key.
func writePEM(path, typ string, der []byte, perm os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*") // created 0600
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // after a successful rename, a no-op
	err = pem.Encode(tmp, &pem.Block{Type: typ, Bytes: der})
	if err == nil {
		err = tmp.Chmod(perm)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func earliest(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}
