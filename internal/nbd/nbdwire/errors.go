package nbdwire

import "errors"

// ErrUnknownExport is wrapped by a server's Backend.Open for a name it
// does not serve, and by the client for a server's answer that it has no
// such export. Clients asking with NBD_OPT_GO or NBD_OPT_INFO are told
// NBD_REP_ERR_UNKNOWN and may ask again; NBD_OPT_EXPORT_NAME cannot
// answer an error, so that connection is closed.
var ErrUnknownExport = errors.New("nbd: unknown export")

// NBD error values, sent in the error field of a reply (spec "Error
// values"). A server's Config.Errno (package nbd) returns one of these for
// an Export's error; the client (package nbdclient) maps them to its
// errors.
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

// ErrnoName returns the name of an error value the spec defines ("EIO")
// and true, or "" and false for any other value.
func ErrnoName(errno uint32) (string, bool) {
	switch errno {
	case EPERM:
		return "EPERM", true
	case EIO:
		return "EIO", true
	case ENOMEM:
		return "ENOMEM", true
	case EINVAL:
		return "EINVAL", true
	case ENOSPC:
		return "ENOSPC", true
	case EOVERFLOW:
		return "EOVERFLOW", true
	case ENOTSUP:
		return "ENOTSUP", true
	case ESHUTDOWN:
		return "ESHUTDOWN", true
	}
	return "", false
}
