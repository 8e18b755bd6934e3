// Package nbdwire holds what the NBD server (package nbd) and client
// (package nbdclient) share of the Network Block Device protocol, as
// specified in the NBD project's doc/proto.md: the magic numbers, flags,
// option, reply and command codes, error values, sizes, the encoding of
// reply headers and the rules for protocol strings. It does no I/O.
package nbdwire

import (
	"encoding/binary"
	"strconv"
	"strings"
	"unicode/utf8"
)

var be = binary.BigEndian

// Magic numbers (spec "Handshake", "Transmission").
const (
	MagicNBD         uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	MagicOpts        uint64 = 0x49484156454f5054 // "IHAVEOPT"
	MagicOptReply    uint64 = 0x0003e889045565a9
	MagicRequest     uint32 = 0x25609513
	MagicSimpleReply uint32 = 0x67446698
	MagicChunk       uint32 = 0x668e33ef
)

// Handshake flags sent by the server, and client flags sent back.
const (
	HFlagFixedNewstyle uint16 = 1 << 0
	HFlagNoZeroes      uint16 = 1 << 1

	CFlagFixedNewstyle uint32 = 1 << 0
	CFlagNoZeroes      uint32 = 1 << 1
)

// Transmission flags.
const (
	TFlagHasFlags        uint16 = 1 << 0
	TFlagReadOnly        uint16 = 1 << 1
	TFlagSendFlush       uint16 = 1 << 2
	TFlagSendFUA         uint16 = 1 << 3
	TFlagSendTrim        uint16 = 1 << 5
	TFlagSendWriteZeroes uint16 = 1 << 6
	TFlagSendDF          uint16 = 1 << 7
	TFlagCanMultiConn    uint16 = 1 << 8
)

// Command flags.
const (
	CmdFlagFUA      uint16 = 1 << 0
	CmdFlagNoHole   uint16 = 1 << 1
	CmdFlagDF       uint16 = 1 << 2
	CmdFlagReqOne   uint16 = 1 << 3
	CmdFlagFastZero uint16 = 1 << 4
)

// Structured reply flags and chunk types.
const (
	ReplyFlagDone uint16 = 1 << 0

	ChunkNone        uint16 = 0
	ChunkOffsetData  uint16 = 1
	ChunkBlockStatus uint16 = 5
	ChunkError       uint16 = 1<<15 + 1
)

// Metadata contexts (spec "Metadata querying"): the one this package's
// server offers, and the status flags of its extents.
const (
	// MetaBaseAllocation is the base:allocation context.
	MetaBaseAllocation = "base:allocation"

	StateHole uint32 = 1 << 0 // NBD_STATE_HOLE: not allocated
	StateZero uint32 = 1 << 1 // NBD_STATE_ZERO: reads as zeroes
)

// Information types of NBD_REP_INFO.
const (
	InfoExport      uint16 = 0
	InfoName        uint16 = 1
	InfoDescription uint16 = 2
	InfoBlockSize   uint16 = 3
)

// Wire values only the client uses: it must understand every reply a
// server may send.
const (
	MagicOldstyle       uint64  = 0x00420281861253
	ChunkOffsetHole     uint16  = 2
	ChunkErrorOffset    uint16  = 1<<15 + 2
	ChunkErrorBit       uint16  = 1 << 15
	RepErrTLSReqd       RepType = RepErr + 5
	RepErrBlockSizeReqd RepType = RepErr + 8
)

// Sizes and limits.
const (
	// Block size constraints a server advertises in NBD_INFO_BLOCK_SIZE
	// (this package's server: the spec's defaults, so clients that do not
	// ask are served the same way) and a client assumes when none are
	// advertised.
	MinBlockSize       = 1
	PreferredBlockSize = 4096
	MaxPayload         = 32 << 20

	// maxString is the longest string the protocol allows.
	MaxString = 4096
	// MaxErrMsg bounds the message of an error chunk.
	MaxErrMsg = 128

	// Header sizes.
	RequestSize     = 28
	SimpleReplySize = 16
	ChunkHeaderSize = 20
	// zeroPadSize is the reserved zeroes after NBD_OPT_EXPORT_NAME's
	// reply, unless both sides agreed NO_ZEROES.
	ZeroPadSize = 124
)

// option is an NBD_OPT_* code.
type Option uint32

const (
	OptExportName      Option = 1
	OptAbort           Option = 2
	OptList            Option = 3
	OptPeekExport      Option = 4
	OptStartTLS        Option = 5
	OptInfo            Option = 6
	OptGo              Option = 7
	OptStructuredReply Option = 8
	OptListMetaContext Option = 9
	OptSetMetaContext  Option = 10
	OptExtendedHeaders Option = 11
	// OptSegmapLease is segmap's own option (not in the NBD spec): the
	// client asks that the server refuse its requests once the lease it
	// grants with CmdSegmapLease runs out. A server that does not know
	// it answers NBD_REP_ERR_UNSUP, as for any unknown option.
	OptSegmapLease Option = 0x53474c45 // "SGLE"
	// OptSegmapCache is segmap's own option (not in the NBD spec): the
	// client asks who holds the server's write cache, the volatile
	// storage where writes wait for a flush. The server answers with
	// one RepSegmapCache reply carrying CacheIDSize bytes that differ
	// whenever that cache may have been lost since (a storage node
	// gives its machine's boot id: its write cache is the kernel's page
	// cache, which outlives the process but not a reboot). A server
	// that does not know it answers NBD_REP_ERR_UNSUP.
	OptSegmapCache Option = 0x53474343 // "SGCC"
)

// CacheIDSize is the length of the data of a RepSegmapCache reply.
const CacheIDSize = 16

var optionNames = [...]string{
	OptExportName:      "EXPORT_NAME",
	OptAbort:           "ABORT",
	OptList:            "LIST",
	OptPeekExport:      "PEEK_EXPORT",
	OptStartTLS:        "STARTTLS",
	OptInfo:            "INFO",
	OptGo:              "GO",
	OptStructuredReply: "STRUCTURED_REPLY",
	OptListMetaContext: "LIST_META_CONTEXT",
	OptSetMetaContext:  "SET_META_CONTEXT",
	OptExtendedHeaders: "EXTENDED_HEADERS",
}

func (o Option) String() string {
	if uint64(o) < uint64(len(optionNames)) && optionNames[o] != "" {
		return "NBD_OPT_" + optionNames[o]
	}
	return "NBD_OPT_" + strconv.FormatUint(uint64(o), 10)
}

// repType is an NBD_REP_* option reply type. Error types have bit 31 set.
type RepType uint32

const (
	RepAck    RepType = 1
	RepServer RepType = 2
	RepInfo   RepType = 3
	// RepMetaContext is NBD_REP_META_CONTEXT: a context id and name.
	RepMetaContext RepType = 4
	// RepSegmapCache answers OptSegmapCache with the identity of the
	// server's write cache (CacheIDSize bytes).
	RepSegmapCache RepType = 0x53474343

	RepErr         RepType = 1 << 31
	RepErrUnsup    RepType = RepErr + 1
	RepErrPolicy   RepType = RepErr + 2
	RepErrInvalid  RepType = RepErr + 3
	RepErrUnknown  RepType = RepErr + 6
	RepErrShutdown RepType = RepErr + 7
	RepErrTooBig   RepType = RepErr + 9
)

var repNames = [...]string{RepAck: "ACK", RepServer: "SERVER", RepInfo: "INFO", RepMetaContext: "META_CONTEXT"}

var repErrNames = [...]string{
	"ERR", "ERR_UNSUP", "ERR_POLICY", "ERR_INVALID", "ERR_PLATFORM",
	"ERR_TLS_REQD", "ERR_UNKNOWN", "ERR_SHUTDOWN", "ERR_BLOCK_SIZE_REQD",
	"ERR_TOO_BIG", "ERR_EXT_HEADER_REQD",
}

func (t RepType) String() string {
	switch {
	case uint64(t) < uint64(len(repNames)) && repNames[t] != "":
		return "NBD_REP_" + repNames[t]
	case t >= RepErr && uint64(t-RepErr) < uint64(len(repErrNames)):
		return "NBD_REP_" + repErrNames[t-RepErr]
	}
	return "NBD_REP_" + strconv.FormatUint(uint64(t), 10)
}

// command is an NBD_CMD_* request type.
type Command uint16

const (
	CmdRead        Command = 0
	CmdWrite       Command = 1
	CmdDisc        Command = 2
	CmdFlush       Command = 3
	CmdTrim        Command = 4
	CmdCache       Command = 5
	CmdWriteZeroes Command = 6
	CmdBlockStatus Command = 7
	CmdResize      Command = 8
	// CmdSegmapLease is segmap's own command, sent only on a connection
	// where OptSegmapLease was acknowledged. Its offset carries a lease
	// length R in nanoseconds, counted from when the client received the
	// reply to an earlier CmdSegmapLease, whose cookie's low 32 bits the
	// length field names (R 0: no lease, only a new starting point). If
	// that was the last CmdSegmapLease the server answered, it lets
	// requests through until the time it sent that reply plus R, which is
	// never later than the client's own idea of the lease's end;
	// otherwise the command only starts a new count. See
	// docs/protocol.md.
	CmdSegmapLease Command = 0x5347 // "SG"
)

var commandNames = [...]string{
	CmdRead: "READ", CmdWrite: "WRITE", CmdDisc: "DISC", CmdFlush: "FLUSH",
	CmdTrim: "TRIM", CmdCache: "CACHE", CmdWriteZeroes: "WRITE_ZEROES",
	CmdBlockStatus: "BLOCK_STATUS", CmdResize: "RESIZE",
}

func (c Command) String() string {
	if int(c) < len(commandNames) {
		return "NBD_CMD_" + commandNames[c]
	}
	return "NBD_CMD_" + strconv.FormatUint(uint64(c), 10)
}

// putSimpleReply encodes a simple reply header into b[:simpleReplySize].
func PutSimpleReply(b []byte, errno uint32, cookie uint64) {
	be.PutUint32(b[0:], MagicSimpleReply)
	be.PutUint32(b[4:], errno)
	be.PutUint64(b[8:], cookie)
}

// putChunk encodes a structured reply chunk header into
// b[:chunkHeaderSize].
func PutChunk(b []byte, flags, typ uint16, cookie uint64, length uint32) {
	be.PutUint32(b[0:], MagicChunk)
	be.PutUint16(b[4:], flags)
	be.PutUint16(b[6:], typ)
	be.PutUint64(b[8:], cookie)
	be.PutUint32(b[16:], length)
}

// validString reports whether s is a protocol string: UTF-8, no NUL, at
// most maxString bytes.
func ValidString(s string) bool {
	if len(s) > MaxString || !utf8.ValidString(s) {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] == 0 {
			return false
		}
	}
	return true
}

// clipMessage makes s a valid error message of at most MaxErrMsg bytes.
func ClipMessage(s string) string {
	s = strings.ReplaceAll(strings.ToValidUTF8(s, "?"), "\x00", " ")
	if len(s) > MaxErrMsg {
		i := MaxErrMsg
		for !utf8.RuneStart(s[i]) {
			i--
		}
		s = s[:i]
	}
	return s
}
