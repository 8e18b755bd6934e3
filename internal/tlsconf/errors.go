package tlsconf

import "errors"

// Errors returned by this package, to be tested with errors.Is. Each is
// wrapped with the file or peer it concerns.
var (
	// ErrNotPEM means a file holds no PEM block of the wanted kind
	// (a certificate, or a private key).
	ErrNotPEM = errors.New("no PEM data of the expected type")

	// ErrKeyMismatch means a private key is not the key of the
	// certificate it was paired with.
	ErrKeyMismatch = errors.New("private key does not match the certificate")

	// ErrNotCA means the CA file holds a certificate that may not sign
	// others.
	ErrNotCA = errors.New("not a CA certificate")

	// ErrUntrusted means a certificate was not signed by the cluster CA.
	ErrUntrusted = errors.New("certificate not signed by the cluster CA")

	// ErrExpired means a certificate is outside its validity period
	// (expired, or not valid yet).
	ErrExpired = errors.New("certificate outside its validity period")

	// ErrNoIdentity means a certificate has no usable segmap identity:
	// no Common Name, or not exactly one known role.
	ErrNoIdentity = errors.New("certificate carries no segmap identity")

	// ErrRole means a verified peer has a role that may not connect here.
	ErrRole = errors.New("peer role not allowed")

	// ErrNoPeer means a connection has no verified peer certificate.
	ErrNoPeer = errors.New("no verified peer certificate")

	// ErrInvalidName means an identity name cannot be used: it is empty,
	// too long, or has characters unsafe in a file name or DNS name.
	ErrInvalidName = errors.New("invalid identity name")

	// ErrUnknownRole means a role is not one of the segmap roles.
	ErrUnknownRole = errors.New("unknown role")

	// ErrExists means Init or Issue would overwrite an existing file.
	ErrExists = errors.New("file already exists")
)
