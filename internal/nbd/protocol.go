package nbd

import (
	"encoding/binary"

	"segmap/internal/nbd/nbdwire"
)

// This file is the pure core of the server: the decisions about options and
// requests (the wire constants and header encoding are package nbdwire's).
// Nothing here does I/O, starts a goroutine or reads a clock.

var be = binary.BigEndian

// Limits of the server.
const (
	// maxDiscard bounds a WRITE payload the server reads and throws away
	// to answer an error and keep the connection. A longer payload is a
	// denial of service (spec "Size constraints") and ends the connection.
	maxDiscard = 64 << 20

	// maxOptionData bounds the option data the server reads into memory;
	// strings are at most 4096 bytes, so a real option is far smaller.
	// Data up to maxOptionDiscard is skipped and answered
	// NBD_REP_ERR_TOO_BIG; more ends the connection.
	maxOptionData    = 64 << 10
	maxOptionDiscard = 1 << 20

	// maxConnPayload bounds the READ and WRITE payload bytes one
	// connection holds at once; the request reader waits when it is spent.
	maxConnPayload = 128 << 20
)

// params are what a connection negotiated for the transmission phase.
type params struct {
	size       uint64
	flags      uint16 // transmission flags sent to the client
	structured bool   // NBD_OPT_STRUCTURED_REPLY was acknowledged
}

// transmissionFlags returns the transmission flags of an export.
// A read-only export does not advertise the commands that would write
// (TRIM, WRITE_ZEROES) nor FUA; NBD_FLAG_SEND_DF is valid only with
// structured replies.
func transmissionFlags(readOnly, structured bool) uint16 {
	f := nbdwire.TFlagHasFlags | nbdwire.TFlagSendFlush | nbdwire.TFlagCanMultiConn
	if readOnly {
		f |= nbdwire.TFlagReadOnly
	} else {
		f |= nbdwire.TFlagSendFUA | nbdwire.TFlagSendTrim | nbdwire.TFlagSendWriteZeroes
	}
	if structured {
		f |= nbdwire.TFlagSendDF
	}
	return f
}

// allowedFlags returns the command flags a request of type typ may carry.
// NBD_CMD_FLAG_FUA is valid on every command once advertised (spec
// "Command flags"); NO_HOLE belongs to WRITE_ZEROES and DF to READ with
// structured replies. FAST_ZERO is not advertised and so never allowed.
func allowedFlags(typ nbdwire.Command, p params) uint16 {
	var f uint16
	if p.flags&nbdwire.TFlagSendFUA != 0 {
		f |= nbdwire.CmdFlagFUA
	}
	switch typ {
	case nbdwire.CmdRead:
		if p.structured {
			f |= nbdwire.CmdFlagDF
		}
	case nbdwire.CmdWriteZeroes:
		f |= nbdwire.CmdFlagNoHole
	}
	return f
}

// requestHeader is the decoded fixed part of a transmission request.
type requestHeader struct {
	flags  uint16
	typ    nbdwire.Command
	cookie uint64
	off    uint64
	length uint32
}

// decodeRequest decodes a request header; ok is false on a bad magic.
func decodeRequest(b *[nbdwire.RequestSize]byte) (h requestHeader, ok bool) {
	if be.Uint32(b[0:]) != nbdwire.MagicRequest {
		return h, false
	}
	return requestHeader{
		flags:  be.Uint16(b[4:]),
		typ:    nbdwire.Command(be.Uint16(b[6:])),
		cookie: be.Uint64(b[8:]),
		off:    be.Uint64(b[16:]),
		length: be.Uint32(b[24:]),
	}, true
}

// checkRequest decides whether a request may reach the export. A nonzero
// errno is the error to answer instead, with msg for a structured error
// chunk. It never rejects NBD_CMD_DISC, which has no reply.
//
// Choices where the spec leaves room:
//   - a length of 0 is NBD_EINVAL for READ, WRITE, TRIM and WRITE_ZEROES
//     (the spec leaves such requests unspecified, short of disconnecting);
//   - a range past the end of the export is NBD_EINVAL for every command
//     ("Size constraints"); the "Error values" section would prefer
//     NBD_ENOSPC for writes, which here keeps meaning that the export ran
//     out of space;
//   - a READ longer than the maximum payload is NBD_EOVERFLOW with
//     structured replies (spec "NBD_CMD_READ") and NBD_EINVAL without.
func checkRequest(h requestHeader, p params) (errno uint32, msg string) {
	switch h.typ {
	case nbdwire.CmdRead, nbdwire.CmdFlush:
	case nbdwire.CmdWrite, nbdwire.CmdTrim, nbdwire.CmdWriteZeroes:
		if p.flags&nbdwire.TFlagReadOnly != 0 {
			return nbdwire.EPERM, "export is read-only"
		}
	case nbdwire.CmdDisc:
		return 0, ""
	default:
		return nbdwire.EINVAL, "unsupported command"
	}
	if h.flags&^allowedFlags(h.typ, p) != 0 {
		return nbdwire.EINVAL, "invalid command flags"
	}
	switch h.typ {
	case nbdwire.CmdFlush:
		if h.off != 0 || h.length != 0 {
			return nbdwire.EINVAL, "flush offset and length must be zero"
		}
		return 0, ""
	case nbdwire.CmdRead, nbdwire.CmdWrite:
		if h.length > nbdwire.MaxPayload {
			if h.typ == nbdwire.CmdRead && p.structured {
				return nbdwire.EOVERFLOW, "read larger than the maximum payload"
			}
			return nbdwire.EINVAL, "request larger than the maximum payload"
		}
	}
	if h.length == 0 {
		return nbdwire.EINVAL, "zero length"
	}
	if h.off > p.size || uint64(h.length) > p.size-h.off {
		return nbdwire.EINVAL, "request beyond the end of the export"
	}
	return 0, ""
}

// parseInfoRequest decodes the data of NBD_OPT_INFO and NBD_OPT_GO: the
// export name and the list of information requests (2 bytes each). ok is
// false when the declared lengths do not add up to the option length.
func parseInfoRequest(data []byte) (name string, reqs []byte, ok bool) {
	if len(data) < 6 {
		return "", nil, false
	}
	n := uint64(be.Uint32(data))
	if n > uint64(len(data)-6) {
		return "", nil, false
	}
	rest := data[4+n:]
	count := int(be.Uint16(rest))
	reqs = rest[2:]
	if len(reqs) != 2*count {
		return "", nil, false
	}
	return string(data[4 : 4+n]), reqs, true
}

// wantsInfo reports whether the list of information requests asks for t.
func wantsInfo(reqs []byte, t uint16) bool {
	for i := 0; i+1 < len(reqs); i += 2 {
		if be.Uint16(reqs[i:]) == t {
			return true
		}
	}
	return false
}
