package nbd

import "errors"

var (
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
