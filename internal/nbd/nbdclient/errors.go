package nbdclient

import "errors"

// Errors answered by an NBD server (spec "Error values"). A request the
// server fails returns a *RemoteError, which errors.Is matches against the
// sentinel of its error value. The client also returns these sentinels
// for requests it refuses without asking, because the server would refuse
// them the same way: a write to a read-only export (ErrEPERM), a range
// beyond the end of the export (ErrEINVAL), WRITE_ZEROES on an export
// that does not advertise it (ErrENOTSUP).
var (
	// ErrEPERM is NBD_EPERM: the operation is not permitted, typically a
	// write to a read-only export.
	ErrEPERM = errors.New("nbd: operation not permitted")
	// ErrEIO is NBD_EIO, the generic failure; unknown error values count
	// as EIO too.
	ErrEIO = errors.New("nbd: input/output error")
	// ErrENOMEM is NBD_ENOMEM: the server is out of memory.
	ErrENOMEM = errors.New("nbd: cannot allocate memory")
	// ErrEINVAL is NBD_EINVAL: a bad request, such as a range past the
	// end of the export or one that breaks the block size constraints.
	ErrEINVAL = errors.New("nbd: invalid argument")
	// ErrENOSPC is NBD_ENOSPC: the storage behind the export is full.
	ErrENOSPC = errors.New("nbd: no space left on device")
	// ErrEOVERFLOW is NBD_EOVERFLOW: a request too large for the server.
	ErrEOVERFLOW = errors.New("nbd: value too large")
	// ErrENOTSUP is NBD_ENOTSUP: the operation is not supported.
	ErrENOTSUP = errors.New("nbd: operation not supported")
	// ErrESHUTDOWN is NBD_ESHUTDOWN: the server is shutting down and
	// refuses new work; the connection is about to end.
	ErrESHUTDOWN = errors.New("nbd: server is shutting down")
)

// Errors about the client and its connection.
var (
	// ErrClientClosed is returned by every request made after Close began,
	// and by requests still in flight when Close gave up waiting.
	ErrClientClosed = errors.New("nbd: client closed")
	// ErrDisconnected is wrapped, together with the cause, by every request
	// in flight when the connection broke (the server hung up, the network
	// failed, the server broke the protocol) and by every later request.
	// The client does not reconnect: dial again.
	ErrDisconnected = errors.New("nbd: connection lost")
	// ErrProtocol means the server sent something the protocol forbids. In
	// the handshake it fails Dial; in a reply it breaks the connection
	// (wrapped with ErrDisconnected), except for a read answered as a
	// success without all its data, which fails that read alone.
	ErrProtocol = errors.New("nbd: server broke the protocol")
	// ErrTLSRequired means the server wants TLS and ClientConfig.TLS is
	// not set.
	ErrTLSRequired = errors.New("nbd: server requires TLS")
	// ErrNotLeased is returned by Lease on a connection whose server did
	// not take segmap's lease.
	ErrNotLeased = errors.New("nbd: connection has no lease")
)
