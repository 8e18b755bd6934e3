package tlsconf

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"slices"
	"strings"
)

// The segmap roles. A certificate carries exactly one.
const (
	RoleController = "controller" // the metadata controller
	RoleAgent      = "agent"      // a mapping agent serving disks over NBD
	RoleStorage    = "storage"    // a storage server holding containers
	RoleAdmin      = "admin"      // the segmap CLI; a client only
)

// Roles lists every role, in a stable order.
var Roles = []string{RoleController, RoleAgent, RoleStorage, RoleAdmin}

// ouPrefix marks the OrganizationalUnit that carries the role, so that the
// role cannot be confused with an OU some other tool put there.
const ouPrefix = "segmap-role:"

// maxName bounds names: a Common Name holds at most 64 characters and a
// DNS label 63.
const maxName = 63

// isServerRole reports whether certificates of role serve connections as
// well as make them; admin certificates only make them.
func isServerRole(role string) bool { return role != RoleAdmin }

func checkRole(role string) error {
	if !slices.Contains(Roles, role) {
		return fmt.Errorf("%w %q (want one of %s)", ErrUnknownRole, role, strings.Join(Roles, ", "))
	}
	return nil
}

// checkName accepts names that are safe both as a file name component and
// as a DNS name: letters, digits, '.', '-' and '_', starting and ending
// with a letter or digit.
func checkName(name string) error {
	bad := name == "" || len(name) > maxName
	for i, c := range name {
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		edge := i == 0 || i == len(name)-1
		if !alnum && (edge || (c != '.' && c != '-' && c != '_')) {
			bad = true
		}
	}
	if bad || strings.Contains(name, "..") {
		return fmt.Errorf("%w %q: want 1 to %d letters, digits, '.', '-' or '_', starting and ending with a letter or digit", ErrInvalidName, name, maxName)
	}
	return nil
}

// identityOf reads the role and name a certificate carries. It does not
// check who signed the certificate.
func identityOf(c *x509.Certificate) (role, name string, err error) {
	var roles []string
	for _, ou := range c.Subject.OrganizationalUnit {
		if r, ok := strings.CutPrefix(ou, ouPrefix); ok {
			roles = append(roles, r)
		}
	}
	name = c.Subject.CommonName
	switch {
	case len(roles) != 1:
		return "", "", fmt.Errorf("%w: %q has %d roles, want 1", ErrNoIdentity, name, len(roles))
	case checkRole(roles[0]) != nil:
		return "", "", fmt.Errorf("%w: %q has unknown role %q", ErrNoIdentity, name, roles[0])
	case name == "":
		return "", "", fmt.Errorf("%w: no Common Name", ErrNoIdentity)
	}
	return roles[0], name, nil
}

// PeerIdentity returns the role and name of the peer of a connection made
// with a configuration from Material.Server or Material.Client. It uses
// only a certificate the handshake verified against a CA: on a connection
// whose peer sent no certificate, or whose certificate was not verified
// (tls.RequestClientCert, InsecureSkipVerify), it returns ErrNoPeer.
func PeerIdentity(state tls.ConnectionState) (role, name string, err error) {
	if len(state.VerifiedChains) == 0 || len(state.VerifiedChains[0]) == 0 {
		return "", "", ErrNoPeer
	}
	return identityOf(state.VerifiedChains[0][0])
}

// checkPeer is the role check shared by Server and Client. allowed empty
// means any role.
func checkPeer(side string, allowed []string, cs tls.ConnectionState) error {
	role, name, err := PeerIdentity(cs)
	if err != nil {
		return fmt.Errorf("%s certificate: %w", side, err)
	}
	if len(allowed) > 0 && !slices.Contains(allowed, role) {
		return fmt.Errorf("%w: %s %q has role %q, want %s", ErrRole, side, name, role, strings.Join(allowed, " or "))
	}
	return nil
}

// mustRoles panics on a role that does not exist: the roles given to
// Server and Client are constants in the caller, so a typo is a bug that
// would otherwise silently refuse every peer.
func mustRoles(roles []string) []string {
	for _, r := range roles {
		if err := checkRole(r); err != nil {
			panic("tlsconf: " + err.Error())
		}
	}
	return slices.Clone(roles)
}
