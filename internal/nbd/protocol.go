package nbd

import (
	"encoding/binary"
	"strconv"
	"strings"
	"unicode/utf8"
)

// This file is the pure core of the package: wire constants, header
// encoding, and the decisions about options and requests. Nothing here does
// I/O, starts a goroutine or reads a clock.

var be = binary.BigEndian

// Magic numbers (spec "Handshake", "Transmission").
const (
	magicNBD         uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpts        uint64 = 0x49484156454f5054 // "IHAVEOPT"
	magicOptReply    uint64 = 0x0003e889045565a9
	magicRequest     uint32 = 0x25609513
	magicSimpleReply uint32 = 0x67446698
	magicChunk       uint32 = 0x668e33ef
)

// Handshake flags sent by the server, and client flags sent back.
const (
	hflagFixedNewstyle uint16 = 1 << 0
	hflagNoZeroes      uint16 = 1 << 1

	cflagFixedNewstyle uint32 = 1 << 0
	cflagNoZeroes      uint32 = 1 << 1
)

// Transmission flags.
const (
	tflagHasFlags        uint16 = 1 << 0
	tflagReadOnly        uint16 = 1 << 1
	tflagSendFlush       uint16 = 1 << 2
	tflagSendFUA         uint16 = 1 << 3
	tflagSendTrim        uint16 = 1 << 5
	tflagSendWriteZeroes uint16 = 1 << 6
	tflagSendDF          uint16 = 1 << 7
	tflagCanMultiConn    uint16 = 1 << 8
)

// Command flags.
const (
	cmdFlagFUA      uint16 = 1 << 0
	cmdFlagNoHole   uint16 = 1 << 1
	cmdFlagDF       uint16 = 1 << 2
	cmdFlagReqOne   uint16 = 1 << 3
	cmdFlagFastZero uint16 = 1 << 4
)

// Structured reply flags and chunk types.
const (
	replyFlagDone uint16 = 1 << 0

	chunkNone       uint16 = 0
	chunkOffsetData uint16 = 1
	chunkError      uint16 = 1<<15 + 1
)

// Information types of NBD_REP_INFO.
const (
	infoExport      uint16 = 0
	infoName        uint16 = 1
	infoDescription uint16 = 2
	infoBlockSize   uint16 = 3
)

// Sizes and limits.
const (
	// Block size constraints advertised in NBD_INFO_BLOCK_SIZE: the spec's
	// defaults, so clients that do not ask are served the same way.
	minBlockSize       = 1
	preferredBlockSize = 4096
	maxPayload         = 32 << 20

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

	// maxString is the longest string the protocol allows.
	maxString = 4096
	// maxErrMsg bounds the message of an error chunk.
	maxErrMsg = 128

	// maxConnPayload bounds the READ and WRITE payload bytes one
	// connection holds at once; the request reader waits when it is spent.
	maxConnPayload = 128 << 20

	requestSize     = 28
	simpleReplySize = 16
	chunkHeaderSize = 20
	zeroPadSize     = 124
)

// option is an NBD_OPT_* code.
type option uint32

const (
	optExportName      option = 1
	optAbort           option = 2
	optList            option = 3
	optPeekExport      option = 4
	optStartTLS        option = 5
	optInfo            option = 6
	optGo              option = 7
	optStructuredReply option = 8
	optListMetaContext option = 9
	optSetMetaContext  option = 10
	optExtendedHeaders option = 11
)

var optionNames = [...]string{
	optExportName:      "EXPORT_NAME",
	optAbort:           "ABORT",
	optList:            "LIST",
	optPeekExport:      "PEEK_EXPORT",
	optStartTLS:        "STARTTLS",
	optInfo:            "INFO",
	optGo:              "GO",
	optStructuredReply: "STRUCTURED_REPLY",
	optListMetaContext: "LIST_META_CONTEXT",
	optSetMetaContext:  "SET_META_CONTEXT",
	optExtendedHeaders: "EXTENDED_HEADERS",
}

func (o option) String() string {
	if uint64(o) < uint64(len(optionNames)) && optionNames[o] != "" {
		return "NBD_OPT_" + optionNames[o]
	}
	return "NBD_OPT_" + strconv.FormatUint(uint64(o), 10)
}

// repType is an NBD_REP_* option reply type. Error types have bit 31 set.
type repType uint32

const (
	repAck    repType = 1
	repServer repType = 2
	repInfo   repType = 3

	repErr         repType = 1 << 31
	repErrUnsup    repType = repErr + 1
	repErrPolicy   repType = repErr + 2
	repErrInvalid  repType = repErr + 3
	repErrUnknown  repType = repErr + 6
	repErrShutdown repType = repErr + 7
	repErrTooBig   repType = repErr + 9
)

var repNames = [...]string{repAck: "ACK", repServer: "SERVER", repInfo: "INFO"}

var repErrNames = [...]string{
	"ERR", "ERR_UNSUP", "ERR_POLICY", "ERR_INVALID", "ERR_PLATFORM",
	"ERR_TLS_REQD", "ERR_UNKNOWN", "ERR_SHUTDOWN", "ERR_BLOCK_SIZE_REQD",
	"ERR_TOO_BIG", "ERR_EXT_HEADER_REQD",
}

func (t repType) String() string {
	switch {
	case uint64(t) < uint64(len(repNames)) && repNames[t] != "":
		return "NBD_REP_" + repNames[t]
	case t >= repErr && uint64(t-repErr) < uint64(len(repErrNames)):
		return "NBD_REP_" + repErrNames[t-repErr]
	}
	return "NBD_REP_" + strconv.FormatUint(uint64(t), 10)
}

// command is an NBD_CMD_* request type.
type command uint16

const (
	cmdRead        command = 0
	cmdWrite       command = 1
	cmdDisc        command = 2
	cmdFlush       command = 3
	cmdTrim        command = 4
	cmdCache       command = 5
	cmdWriteZeroes command = 6
	cmdBlockStatus command = 7
	cmdResize      command = 8
)

var commandNames = [...]string{
	cmdRead: "READ", cmdWrite: "WRITE", cmdDisc: "DISC", cmdFlush: "FLUSH",
	cmdTrim: "TRIM", cmdCache: "CACHE", cmdWriteZeroes: "WRITE_ZEROES",
	cmdBlockStatus: "BLOCK_STATUS", cmdResize: "RESIZE",
}

func (c command) String() string {
	if int(c) < len(commandNames) {
		return "NBD_CMD_" + commandNames[c]
	}
	return "NBD_CMD_" + strconv.FormatUint(uint64(c), 10)
}

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
	f := tflagHasFlags | tflagSendFlush | tflagCanMultiConn
	if readOnly {
		f |= tflagReadOnly
	} else {
		f |= tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes
	}
	if structured {
		f |= tflagSendDF
	}
	return f
}

// allowedFlags returns the command flags a request of type typ may carry.
// NBD_CMD_FLAG_FUA is valid on every command once advertised (spec
// "Command flags"); NO_HOLE belongs to WRITE_ZEROES and DF to READ with
// structured replies. FAST_ZERO is not advertised and so never allowed.
func allowedFlags(typ command, p params) uint16 {
	var f uint16
	if p.flags&tflagSendFUA != 0 {
		f |= cmdFlagFUA
	}
	switch typ {
	case cmdRead:
		if p.structured {
			f |= cmdFlagDF
		}
	case cmdWriteZeroes:
		f |= cmdFlagNoHole
	}
	return f
}

// requestHeader is the decoded fixed part of a transmission request.
type requestHeader struct {
	flags  uint16
	typ    command
	cookie uint64
	off    uint64
	length uint32
}

// decodeRequest decodes a request header; ok is false on a bad magic.
func decodeRequest(b *[requestSize]byte) (h requestHeader, ok bool) {
	if be.Uint32(b[0:]) != magicRequest {
		return h, false
	}
	return requestHeader{
		flags:  be.Uint16(b[4:]),
		typ:    command(be.Uint16(b[6:])),
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
	case cmdRead, cmdFlush:
	case cmdWrite, cmdTrim, cmdWriteZeroes:
		if p.flags&tflagReadOnly != 0 {
			return EPERM, "export is read-only"
		}
	case cmdDisc:
		return 0, ""
	default:
		return EINVAL, "unsupported command"
	}
	if h.flags&^allowedFlags(h.typ, p) != 0 {
		return EINVAL, "invalid command flags"
	}
	switch h.typ {
	case cmdFlush:
		if h.off != 0 || h.length != 0 {
			return EINVAL, "flush offset and length must be zero"
		}
		return 0, ""
	case cmdRead, cmdWrite:
		if h.length > maxPayload {
			if h.typ == cmdRead && p.structured {
				return EOVERFLOW, "read larger than the maximum payload"
			}
			return EINVAL, "request larger than the maximum payload"
		}
	}
	if h.length == 0 {
		return EINVAL, "zero length"
	}
	if h.off > p.size || uint64(h.length) > p.size-h.off {
		return EINVAL, "request beyond the end of the export"
	}
	return 0, ""
}

// putSimpleReply encodes a simple reply header into b[:simpleReplySize].
func putSimpleReply(b []byte, errno uint32, cookie uint64) {
	be.PutUint32(b[0:], magicSimpleReply)
	be.PutUint32(b[4:], errno)
	be.PutUint64(b[8:], cookie)
}

// putChunk encodes a structured reply chunk header into
// b[:chunkHeaderSize].
func putChunk(b []byte, flags, typ uint16, cookie uint64, length uint32) {
	be.PutUint32(b[0:], magicChunk)
	be.PutUint16(b[4:], flags)
	be.PutUint16(b[6:], typ)
	be.PutUint64(b[8:], cookie)
	be.PutUint32(b[16:], length)
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

// validString reports whether s is a protocol string: UTF-8, no NUL, at
// most maxString bytes.
func validString(s string) bool {
	if len(s) > maxString || !utf8.ValidString(s) {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] == 0 {
			return false
		}
	}
	return true
}

// clipMessage makes s a valid error message of at most maxErrMsg bytes.
func clipMessage(s string) string {
	s = strings.ReplaceAll(strings.ToValidUTF8(s, "?"), "\x00", " ")
	if len(s) > maxErrMsg {
		i := maxErrMsg
		for !utf8.RuneStart(s[i]) {
			i--
		}
		s = s[:i]
	}
	return s
}
