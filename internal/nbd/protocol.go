package nbd

import (
	"bytes"
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

	// maxExtents bounds the descriptors of one NBD_REPLY_TYPE_BLOCK_STATUS
	// chunk (the spec asks for at most 2^20); a reply that reaches it
	// covers less than was asked, which the spec allows.
	maxExtents = 1 << 16
)

// allocationID is the id of the base:allocation context in
// NBD_REP_META_CONTEXT and NBD_REPLY_TYPE_BLOCK_STATUS. It is the only
// context, and ids are the server's choice.
const allocationID = 1

// firstContextID is the id of the first context a MetaContexter names;
// the others follow in the order SET_META_CONTEXT selected them.
const firstContextID = 2

// maxContextQueries bounds the queries of other namespaces that one
// META_CONTEXT option may carry; the rest are ignored, as unknown ones
// are.
const maxContextQueries = 16

// params are what a connection negotiated for the transmission phase.
type params struct {
	size       uint64
	flags      uint16 // transmission flags sent to the client
	structured bool   // NBD_OPT_STRUCTURED_REPLY was acknowledged
	// allocation: base:allocation was selected for this export, so
	// NBD_CMD_BLOCK_STATUS is served.
	allocation bool
	// contexts are the other contexts selected for this export (see
	// MetaContexter), with ids firstContextID, firstContextID+1, ...
	contexts []string
	// leased: nbdwire.OptSegmapLease was acknowledged; requests are
	// served only while the client's lease holds (see conn.lease).
	leased bool
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
	case nbdwire.CmdBlockStatus:
		f |= nbdwire.CmdFlagReqOne
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
//     structured replies (spec "NBD_CMD_READ") and NBD_EINVAL without;
//   - BLOCK_STATUS without a selected context is NBD_EINVAL (spec
//     "Metadata querying"), like an unknown command.
func checkRequest(h requestHeader, p params) (errno uint32, msg string) {
	switch h.typ {
	case nbdwire.CmdRead, nbdwire.CmdFlush:
	case nbdwire.CmdBlockStatus:
		if !p.allocation && len(p.contexts) == 0 {
			return nbdwire.EINVAL, "no metadata context selected"
		}
	case nbdwire.CmdWrite, nbdwire.CmdTrim, nbdwire.CmdWriteZeroes:
		if p.flags&nbdwire.TFlagReadOnly != 0 {
			return nbdwire.EPERM, "export is read-only"
		}
	case nbdwire.CmdDisc:
		return 0, ""
	case nbdwire.CmdSegmapLease:
		switch {
		case !p.leased:
			return nbdwire.EINVAL, "unsupported command"
		case h.flags != 0:
			return nbdwire.EINVAL, "invalid command flags"
		}
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

// metaRequest is the decoded data of NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT.
type metaRequest struct {
	name string
	// allocation: the queries name base:allocation (LIST: also "base:"
	// or no query at all).
	allocation bool
	// others are the queries of other namespaces (at most
	// maxContextQueries), for the Backend's MetaContexter; after a SET,
	// the contexts they selected.
	others []string
}

// parseMetaRequest decodes the data of LIST_META_CONTEXT (list set) or
// SET_META_CONTEXT: the export name, then a count of queries, each a
// length and a string. msg is empty on success and otherwise says why the
// option is NBD_REP_ERR_INVALID: lengths that do not add up to the option
// length, a string that is not a protocol string, a query without a
// namespace. Queries of unknown namespaces, and unknown leaf-names of
// base:, are ignored as the spec requires; "base:" is a wildcard for LIST
// and selects nothing for SET. It allocates nothing but the name.
func parseMetaRequest(data []byte, list bool) (r metaRequest, msg string) {
	if len(data) < 8 {
		return r, "option data too short"
	}
	n := uint64(be.Uint32(data))
	if n > uint64(len(data)-8) {
		return r, "export name longer than the option data"
	}
	name := data[4 : 4+n]
	rest := data[4+n:]
	count := be.Uint32(rest)
	rest = rest[4:]
	if !nbdwire.ValidString(string(name)) {
		return r, "invalid export name"
	}
	r.name = string(name)
	if count == 0 && list {
		r.allocation = true
	}
	for i := uint32(0); i < count; i++ {
		if len(rest) < 4 {
			return metaRequest{}, "fewer queries than counted"
		}
		qn := uint64(be.Uint32(rest))
		if qn > uint64(len(rest)-4) {
			return metaRequest{}, "query longer than the option data"
		}
		q := rest[4 : 4+qn]
		rest = rest[4+qn:]
		if !nbdwire.ValidString(string(q)) {
			return metaRequest{}, "invalid query string"
		}
		ns, leaf, ok := bytes.Cut(q, []byte(":"))
		if !ok || len(ns) == 0 {
			return metaRequest{}, "query without a namespace"
		}
		if string(ns) != "base" {
			if len(r.others) < maxContextQueries {
				r.others = append(r.others, string(q))
			}
			continue
		}
		if string(leaf) == "allocation" || (list && len(leaf) == 0) {
			r.allocation = true
		}
	}
	if len(rest) != 0 {
		return metaRequest{}, "data after the last query"
	}
	return r, ""
}

// extentList encodes the descriptors of one NBD_REPLY_TYPE_BLOCK_STATUS
// chunk from the runs an ExtentLister or a MetaContexter reports. Flags
// the context does not define are dropped (reserved); runs of equal flags
// are merged; the descriptors cover the request from its offset and never
// past its end (a run that goes on beyond is cut, which the spec always
// allows); with REQ_ONE there is exactly one. It stops early when buf is
// full: the reply then covers less than was asked, which the spec allows
// as long as one descriptor is sent.
type extentList struct {
	buf    []byte // the chunk payload: context id, then descriptors
	left   uint64 // bytes of the request not described yet
	reqOne bool
	// run is the descriptor being merged; runLen 0 means none yet.
	runLen   uint64
	runFlags ExtentFlags
	mask     ExtentFlags // the flags the context defines
}

// newExtentList starts the payload of a chunk of context id in buf for a
// request of length n; mask is the flags the context defines. buf must
// hold the context id and at least one descriptor.
func newExtentList(buf []byte, id uint32, mask ExtentFlags, n uint32, reqOne bool) extentList {
	be.PutUint32(buf, id)
	return extentList{buf: buf[:4:len(buf)], left: uint64(n), reqOne: reqOne, mask: mask}
}

// add appends the next run of length bytes; false means that no more runs
// are wanted.
func (l *extentList) add(length uint64, flags ExtentFlags) bool {
	if length == 0 {
		return l.left > 0
	}
	length = min(length, l.left)
	flags &= l.mask // the other bits are reserved
	if l.runLen > 0 && flags != l.runFlags {
		if l.reqOne || len(l.buf)+16 > cap(l.buf) {
			// One descriptor only, or room for just this one.
			l.left = 0
			return false
		}
		l.emit()
	}
	l.runLen += length
	l.runFlags = flags
	l.left -= length
	return l.left > 0
}

// emit appends the run being merged as a descriptor.
func (l *extentList) emit() {
	var d [8]byte
	be.PutUint32(d[0:], uint32(l.runLen)) // at most the request length
	be.PutUint32(d[4:], uint32(l.runFlags))
	l.buf = append(l.buf, d[:]...)
	l.runLen = 0
}

// payload ends the list and returns the chunk payload. If no run was
// reported the whole request is described as allocated data (flags 0),
// the status the spec allows for any block.
func (l *extentList) payload() []byte {
	if l.runLen == 0 && len(l.buf) == 4 {
		l.runLen, l.runFlags = l.left, 0
	}
	if l.runLen > 0 {
		l.emit()
	}
	return l.buf
}

// extentBufSize is the chunk payload size to hold for a BLOCK_STATUS of
// length n: a descriptor per 512 bytes (the granularity the spec asks
// servers to prefer) plus the two unaligned ends, within maxExtents.
func extentBufSize(n uint32) int {
	return 4 + 8*int(min(uint64(n)/512+2, maxExtents))
}
