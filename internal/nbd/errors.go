package nbd

import "errors"

// NBD error values, sent in the error field of a reply (spec "Error
// values"). Config.Errno returns one of these for an Export's error.
const (
	// EPERM: operation not permitted, e.g. a write to a read-only export.
	EPERM uint32 = 1
	// EIO: input/output error; the answer to any Export error that
	// Config.Errno does not map, and to a panic in an Export method.
	EIO uint32 = 5
	// ENOMEM: cannot allocate memory. The spec asks servers to avoid it.
	ENOMEM uint32 = 12
	// EINVAL: invalid argument: an unknown command or flag, a zero length,
	// a range beyond the end of the export, a payload above the maximum.
	EINVAL uint32 = 22
	// ENOSPC: no space left on device.
	ENOSPC uint32 = 28
	// EOVERFLOW: value too large; a structured READ above the maximum
	// payload.
	EOVERFLOW uint32 = 75
	// ENOTSUP: operation not supported.
	ENOTSUP uint32 = 95
	// ESHUTDOWN: the server is being shut down.
	ESHUTDOWN uint32 = 108
)

var (
	// ErrUnknownExport is wrapped by Backend.Open for a name it does not
	// serve. Clients asking with NBD_OPT_GO or NBD_OPT_INFO are told
	// NBD_REP_ERR_UNKNOWN and may ask again; NBD_OPT_EXPORT_NAME cannot
	// answer an error, so that connection is closed.
	ErrUnknownExport = errors.New("nbd: unknown export")
	// ErrServerClosed is returned by Serve after Shutdown or Close.
	ErrServerClosed = errors.New("nbd: server closed")
)

// Reasons a connection ends; logged, never returned to callers.
var (
	// errAbort: the client ended the handshake with NBD_OPT_ABORT.
	errAbort = errors.New("client aborted the handshake")
	// errDisconnect: the client sent NBD_CMD_DISC.
	errDisconnect = errors.New("client disconnected")
	// errProtocol: the client broke a mandatory rule of the protocol (a
	// bad magic, unknown client flags, an absurd length); the server hangs
	// up, as the spec allows.
	errProtocol = errors.New("protocol violation")
	// errPanic stands for a panic in an Export method or in Config.Errno.
	errPanic = errors.New("export panicked")
)

// Reasons the TLS policy ends a connection; logged, never returned to
// callers.
var (
	// errTLSRequired: the server requires TLS and the client went for an
	// export without it (NBD_OPT_EXPORT_NAME, which cannot be answered an
	// error) or cannot negotiate it (no fixed newstyle).
	errTLSRequired = errors.New("client did not negotiate the TLS the server requires")
	// errTLSHandshake: the TLS handshake after NBD_OPT_STARTTLS failed,
	// e.g. the client's certificate was refused. The ACK is sent by then,
	// so the connection cannot go on in plaintext.
	errTLSHandshake = errors.New("TLS handshake failed")
)
