package nbd

import "errors"

var (
	// ErrServerClosed is returned by Serve after Shutdown or Close.
	ErrServerClosed = errors.New("nbd: server closed")
	// ErrHangUp, wrapped in an Export's error, ends the connection
	// instead of answering: the client sees the server go away, as if
	// it had crashed (its unflushed writes may be lost, and it must not
	// read on over the same connection as if they were not).
	ErrHangUp = errors.New("nbd: export hung up")
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
