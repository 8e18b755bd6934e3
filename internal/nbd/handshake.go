package nbd

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"slices"

	"segmap/internal/nbd/nbdwire"
)

// handshaker runs the fixed newstyle negotiation of one connection.
type handshaker struct {
	c          *conn
	w          *bufio.Writer
	fixed      bool   // the client set NBD_FLAG_C_FIXED_NEWSTYLE
	noZeroes   bool   // the client set NBD_FLAG_C_NO_ZEROES
	tls        bool   // NBD_OPT_STARTTLS succeeded: c.nc is a *tls.Conn
	structured bool   // NBD_OPT_STRUCTURED_REPLY was acknowledged
	leased     bool   // nbdwire.OptSegmapLease was acknowledged
	buf        []byte // option data, reused
	// meta is what the last NBD_OPT_SET_META_CONTEXT selected, and for
	// which export: it holds only if that export is the one opened.
	meta metaRequest
}

// handshake greets the client and haggles options until the client selects
// an export (the session to serve) or the connection must end (an error;
// errAbort for NBD_OPT_ABORT).
func (c *conn) handshake() (*session, error) {
	h := &handshaker{c: c, w: bufio.NewWriterSize(c.nc, 4096)}
	var greet [18]byte
	be.PutUint64(greet[0:], nbdwire.MagicNBD)
	be.PutUint64(greet[8:], nbdwire.MagicOpts)
	be.PutUint16(greet[16:], nbdwire.HFlagFixedNewstyle|nbdwire.HFlagNoZeroes)
	_, _ = h.w.Write(greet[:]) // bufio: an error sticks, and Flush below reports it
	if err := h.w.Flush(); err != nil {
		return nil, err
	}

	var cf [4]byte
	if _, err := io.ReadFull(c.rd, cf[:]); err != nil {
		return nil, err
	}
	flags := be.Uint32(cf[:])
	if flags&^(nbdwire.CFlagFixedNewstyle|nbdwire.CFlagNoZeroes) != 0 {
		return nil, fmt.Errorf("%w: unknown client flags %#x", errProtocol, flags)
	}
	// A client without NBD_FLAG_C_FIXED_NEWSTYLE is served the same way
	// (the spec allows it); all it can do is NBD_OPT_EXPORT_NAME, and it
	// may not start TLS.
	h.fixed = flags&nbdwire.CFlagFixedNewstyle != 0
	h.noZeroes = flags&nbdwire.CFlagNoZeroes != 0
	if c.srv.tlsRequired && !h.fixed {
		return nil, fmt.Errorf("%w: the client did not set NBD_FLAG_C_FIXED_NEWSTYLE", errTLSRequired)
	}

	for {
		s, err := h.option()
		if err == nil {
			err = h.w.Flush()
		}
		if err != nil {
			if s != nil {
				s.closer.Close()
			}
			return nil, err
		}
		if s != nil {
			return s, nil
		}
	}
}

// option reads and answers one option. It returns a session when the
// option selected an export, and an error when the connection must end.
func (h *handshaker) option() (*session, error) {
	var hdr [16]byte
	if _, err := io.ReadFull(h.c.rd, hdr[:]); err != nil {
		return nil, err
	}
	if m := be.Uint64(hdr[0:]); m != nbdwire.MagicOpts {
		return nil, fmt.Errorf("%w: option magic %#x", errProtocol, m)
	}
	opt := nbdwire.Option(be.Uint32(hdr[8:]))
	n := be.Uint32(hdr[12:])
	if n > maxOptionData {
		// Never allocate what the client declared: skip a moderately
		// oversized option, hang up on an absurd one.
		if n > maxOptionDiscard {
			return nil, fmt.Errorf("%w: %v with %d bytes of data", errProtocol, opt, n)
		}
		if _, err := h.c.rd.Discard(int(n)); err != nil {
			return nil, err
		}
		if opt == nbdwire.OptExportName {
			return nil, fmt.Errorf("%w: export name of %d bytes", errProtocol, n)
		}
		if h.needTLS(opt) {
			return nil, h.replyTLSRequired(opt)
		}
		return nil, h.replyErr(opt, nbdwire.RepErrTooBig, "option data too large")
	}
	if cap(h.buf) < int(n) {
		h.buf = make([]byte, n)
	}
	data := h.buf[:n]
	if _, err := io.ReadFull(h.c.rd, data); err != nil {
		return nil, err
	}

	if h.c.srv.isClosed() && opt != nbdwire.OptAbort {
		if opt == nbdwire.OptExportName {
			return nil, ErrServerClosed // it cannot be answered an error
		}
		return nil, h.replyErr(opt, nbdwire.RepErrShutdown, "server shutting down")
	}
	if h.needTLS(opt) {
		if opt == nbdwire.OptExportName {
			return nil, fmt.Errorf("%w: NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS", errTLSRequired)
		}
		return nil, h.replyTLSRequired(opt)
	}

	switch opt {
	case nbdwire.OptExportName:
		return h.exportName(data)
	case nbdwire.OptAbort:
		// The client may hang up without reading the reply.
		_ = h.reply(opt, nbdwire.RepAck)
		h.w.Flush()
		return nil, errAbort
	case nbdwire.OptList:
		return nil, h.list(data)
	case nbdwire.OptInfo, nbdwire.OptGo:
		return h.infoGo(opt, data)
	case nbdwire.OptStructuredReply:
		if len(data) != 0 {
			return nil, h.replyErr(opt, nbdwire.RepErrInvalid, "unexpected option data")
		}
		h.structured = true
		return nil, h.reply(opt, nbdwire.RepAck)
	case nbdwire.OptStartTLS:
		return nil, h.startTLS(data)
	case nbdwire.OptListMetaContext, nbdwire.OptSetMetaContext:
		return nil, h.metaContext(opt, data)
	case nbdwire.OptSegmapLease:
		if !h.c.srv.leases {
			return nil, h.replyErr(opt, nbdwire.RepErrUnsup, "unsupported option")
		}
		if len(data) != 0 {
			return nil, h.replyErr(opt, nbdwire.RepErrInvalid, "unexpected option data")
		}
		h.leased = true
		return nil, h.reply(opt, nbdwire.RepAck)
	case nbdwire.OptSegmapCache:
		if h.c.srv.cacheID == ([nbdwire.CacheIDSize]byte{}) {
			return nil, h.replyErr(opt, nbdwire.RepErrUnsup, "unsupported option")
		}
		if len(data) != 0 {
			return nil, h.replyErr(opt, nbdwire.RepErrInvalid, "unexpected option data")
		}
		return nil, h.reply(opt, nbdwire.RepSegmapCache, h.c.srv.cacheID[:])
	default:
		// EXTENDED_HEADERS and anything unknown.
		return nil, h.replyErr(opt, nbdwire.RepErrUnsup, "unsupported option")
	}
}

// needTLS reports whether opt must be refused because the server requires
// TLS and the client has not started it (FORCEDTLS: only STARTTLS and
// ABORT are answered before TLS).
func (h *handshaker) needTLS(opt nbdwire.Option) bool {
	return h.c.srv.tlsRequired && !h.tls && opt != nbdwire.OptStartTLS && opt != nbdwire.OptAbort
}

// replyTLSRequired refuses an option sent before TLS to a server that
// requires it.
func (h *handshaker) replyTLSRequired(opt nbdwire.Option) error {
	return h.replyErr(opt, nbdwire.RepErrTLSReqd, "TLS is required: send NBD_OPT_STARTTLS first")
}

// startTLS answers NBD_OPT_STARTTLS. On success the ACK goes out in
// plaintext, the TLS handshake follows (bounded by the handshake deadline,
// which is on the socket), and haggling starts afresh over TLS: what was
// negotiated before (structured replies) is forgotten, as the spec
// requires. A failed TLS handshake ends the connection.
func (h *handshaker) startTLS(data []byte) error {
	const opt = nbdwire.OptStartTLS
	switch {
	case len(data) != 0:
		return h.replyErr(opt, nbdwire.RepErrInvalid, "unexpected option data")
	case h.c.srv.tls == nil || !h.fixed:
		// NOTLS, or a client that may not ask (no fixed newstyle).
		return h.replyErr(opt, nbdwire.RepErrPolicy, "TLS is not available")
	case h.tls:
		return h.replyErr(opt, nbdwire.RepErrInvalid, "TLS is already on")
	}
	if err := h.reply(opt, nbdwire.RepAck); err != nil {
		return err
	}
	if err := h.w.Flush(); err != nil {
		return err
	}
	// The client must wait for the ACK before its ClientHello; anything
	// it sent before is neither an option nor TLS.
	if n := h.c.rd.Buffered(); n > 0 {
		return fmt.Errorf("%w: %d bytes after NBD_OPT_STARTTLS, before the ACK", errProtocol, n)
	}
	tc := tls.Server(h.c.raw, h.c.srv.tls)
	if err := tc.HandshakeContext(h.c.ctx); err != nil {
		return fmt.Errorf("%w: %w", errTLSHandshake, err)
	}
	h.c.nc = tc
	h.c.rd.Reset(tc)
	h.w.Reset(tc)
	h.tls = true
	h.structured = false
	h.meta = metaRequest{}
	cs := tc.ConnectionState()
	peer := ""
	if len(cs.PeerCertificates) > 0 {
		peer = cs.PeerCertificates[0].Subject.CommonName
	}
	h.c.log.Debug("nbd: TLS on", "version", tls.VersionName(cs.Version), "peer", peer)
	return nil
}

// metaContext answers NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT: one NBD_REP_META_CONTEXT for base:allocation
// if the queries name it, then ACK. SET needs structured replies and
// replaces what an earlier SET selected, even when it fails (spec); a SET
// that selects nothing succeeds and leaves BLOCK_STATUS refused. LIST is
// answered without structured replies too (the spec lets the server
// choose), with context id 0 as the spec asks.
func (h *handshaker) metaContext(opt nbdwire.Option, data []byte) error {
	set := opt == nbdwire.OptSetMetaContext
	if set {
		h.meta = metaRequest{}
		if !h.structured {
			return h.replyErr(opt, nbdwire.RepErrInvalid, "structured replies were not negotiated")
		}
	}
	r, msg := parseMetaRequest(data, !set)
	if msg != "" {
		return h.replyErr(opt, nbdwire.RepErrInvalid, msg)
	}
	if r.name == "" {
		return h.replyErr(opt, nbdwire.RepErrUnknown, "there is no default export")
	}
	if _, ok := h.lookup(r.name); !ok {
		return h.replyErr(opt, nbdwire.RepErrUnknown, "unknown export")
	}
	var others []string
	if mc, ok := h.c.srv.backend.(MetaContexter); ok {
		for _, q := range r.others {
			names, err := mc.MetaContexts(h.c.ctx, r.name, q, !set)
			if err != nil {
				return h.replyErr(opt, nbdwire.RepErrInvalid, nbdwire.ClipMessage(err.Error()))
			}
			for _, n := range names {
				if !slices.Contains(others, n) && nbdwire.ValidString(n) && len(others) < maxContextQueries*64 {
					others = append(others, n)
				}
			}
		}
	}
	r.others = others
	if r.allocation {
		var id [4]byte
		if set {
			be.PutUint32(id[:], allocationID)
		}
		_ = h.reply(opt, nbdwire.RepMetaContext, id[:], []byte(nbdwire.MetaBaseAllocation)) // buffered: an error sticks and the ACK reports it
	}
	for i, n := range others {
		var id [4]byte
		if set {
			be.PutUint32(id[:], uint32(firstContextID+i))
		}
		_ = h.reply(opt, nbdwire.RepMetaContext, id[:], []byte(n))
	}
	if set {
		h.meta = r
	}
	return h.reply(opt, nbdwire.RepAck)
}

// exportName answers NBD_OPT_EXPORT_NAME. It cannot return an error to the
// client: an unknown export ends the connection.
func (h *handshaker) exportName(data []byte) (*session, error) {
	name := string(data)
	if name == "" || !nbdwire.ValidString(name) {
		return nil, fmt.Errorf("%w: export %q", nbdwire.ErrUnknownExport, name)
	}
	s, err := h.open(name)
	if err != nil {
		return nil, err
	}
	var b [10 + nbdwire.ZeroPadSize]byte
	be.PutUint64(b[0:], s.size)
	be.PutUint16(b[8:], s.flags)
	n := len(b)
	if h.noZeroes {
		n = 10
	}
	_, _ = h.w.Write(b[:n]) // bufio: an error sticks; the caller flushes
	return s, nil
}

// list answers NBD_OPT_LIST: one NBD_REP_SERVER per export, then ACK. The
// description follows the name in each reply, as the spec allows.
func (h *handshaker) list(data []byte) error {
	const opt = nbdwire.OptList
	if len(data) != 0 {
		return h.replyErr(opt, nbdwire.RepErrInvalid, "unexpected option data")
	}
	infos, err := h.c.srv.backend.List(h.c.ctx)
	if err != nil {
		h.c.log.Warn("nbd: listing exports", "err", err)
		return h.replyErr(opt, nbdwire.RepErrPolicy, "cannot list exports")
	}
	for _, e := range infos {
		var n [4]byte
		be.PutUint32(n[:], uint32(len(e.Name)))
		if err := h.reply(opt, nbdwire.RepServer, n[:], []byte(e.Name), []byte(e.Description)); err != nil {
			return err
		}
	}
	return h.reply(opt, nbdwire.RepAck)
}

// infoGo answers NBD_OPT_INFO and NBD_OPT_GO. INFO looks the export up in
// Backend.List and leaves it alone; GO opens it and, after the ACK, the
// connection is in the transmission phase.
func (h *handshaker) infoGo(opt nbdwire.Option, data []byte) (*session, error) {
	name, reqs, ok := parseInfoRequest(data)
	if !ok {
		return nil, h.replyErr(opt, nbdwire.RepErrInvalid, "malformed information request")
	}
	if !nbdwire.ValidString(name) {
		return nil, h.replyErr(opt, nbdwire.RepErrInvalid, "invalid export name")
	}
	if name == "" {
		return nil, h.replyErr(opt, nbdwire.RepErrUnknown, "there is no default export")
	}

	var (
		info ExportInfo
		s    *session
	)
	if opt == nbdwire.OptGo {
		var err error
		if s, err = h.open(name); err != nil {
			return nil, h.replyOpenErr(opt, name, err)
		}
		info = ExportInfo{Name: name, Size: s.size, ReadOnly: s.flags&nbdwire.TFlagReadOnly != 0}
		if wantsInfo(reqs, nbdwire.InfoDescription) {
			if e, ok := h.lookup(name); ok {
				info.Description = e.Description
			}
		}
	} else {
		e, ok := h.lookup(name)
		if !ok {
			return nil, h.replyErr(opt, nbdwire.RepErrUnknown, "unknown export")
		}
		info = e
	}

	err := h.sendInfo(opt, info, reqs)
	if err == nil {
		err = h.reply(opt, nbdwire.RepAck)
	}
	if err == nil && s != nil {
		// Nothing may be left in the buffer once transmission starts.
		err = h.w.Flush()
	}
	if err != nil && s != nil {
		s.closer.Close()
		s = nil
	}
	return s, err
}

// sendInfo sends the NBD_REP_INFO replies of INFO and GO: the export and
// its block sizes always, name and description when asked.
func (h *handshaker) sendInfo(opt nbdwire.Option, info ExportInfo, reqs []byte) error {
	var exp [12]byte
	be.PutUint16(exp[0:], nbdwire.InfoExport)
	be.PutUint64(exp[2:], info.Size)
	be.PutUint16(exp[10:], transmissionFlags(info.ReadOnly, h.structured))
	_ = h.reply(opt, nbdwire.RepInfo, exp[:]) // buffered: an error sticks and the last reply reports it

	var bs [14]byte
	be.PutUint16(bs[0:], nbdwire.InfoBlockSize)
	be.PutUint32(bs[2:], nbdwire.MinBlockSize)
	be.PutUint32(bs[6:], nbdwire.PreferredBlockSize)
	be.PutUint32(bs[10:], nbdwire.MaxPayload)
	_ = h.reply(opt, nbdwire.RepInfo, bs[:]) // buffered: an error sticks and the last reply reports it

	var t [2]byte
	if wantsInfo(reqs, nbdwire.InfoName) {
		be.PutUint16(t[:], nbdwire.InfoName)
		_ = h.reply(opt, nbdwire.RepInfo, t[:], []byte(info.Name)) // buffered: an error sticks and the last reply reports it
	}
	if wantsInfo(reqs, nbdwire.InfoDescription) {
		be.PutUint16(t[:], nbdwire.InfoDescription)
		return h.reply(opt, nbdwire.RepInfo, t[:], []byte(info.Description))
	}
	return nil
}

// open opens an export for this connection.
func (h *handshaker) open(name string) (*session, error) {
	resume := h.c.waitBackend()
	exp, closer, err := h.c.srv.backend.Open(h.c.ctx, name)
	resume()
	if err != nil {
		return nil, fmt.Errorf("open export %q: %w", name, err)
	}
	if exp == nil {
		if closer != nil {
			closer.Close()
		}
		return nil, fmt.Errorf("open export %q: backend returned no export", name)
	}
	if closer == nil {
		closer = nopCloser{}
	}
	var contexts []string
	if h.structured && h.meta.name == name && len(h.meta.others) > 0 {
		if _, ok := exp.(ContextExtenter); !ok {
			closer.Close()
			return nil, fmt.Errorf("open export %q: contexts %q selected, but the export cannot report them", name, h.meta.others)
		}
		contexts = h.meta.others
	}
	return &session{
		params: params{
			contexts:   contexts,
			size:       exp.Size(),
			flags:      transmissionFlags(exp.ReadOnly(), h.structured),
			structured: h.structured,
			allocation: h.structured && h.meta.allocation && h.meta.name == name,
			leased:     h.leased,
		},
		name:   name,
		exp:    exp,
		closer: closer,
	}, nil
}

// lookup finds an export in Backend.List.
func (h *handshaker) lookup(name string) (ExportInfo, bool) {
	infos, err := h.c.srv.backend.List(h.c.ctx)
	if err != nil {
		h.c.log.Warn("nbd: listing exports", "err", err)
		return ExportInfo{}, false
	}
	for _, e := range infos {
		if e.Name == name {
			return e, true
		}
	}
	return ExportInfo{}, false
}

// replyOpenErr answers an option whose export could not be opened. The spec
// has no error for a failing backend; NBD_REP_ERR_UNKNOWN ("the requested
// export is not available") with a message is the closest.
func (h *handshaker) replyOpenErr(opt nbdwire.Option, name string, err error) error {
	if !errors.Is(err, nbdwire.ErrUnknownExport) {
		h.c.log.Warn("nbd: opening export", "export", name, "err", err)
		return h.replyErr(opt, nbdwire.RepErrUnknown, nbdwire.ClipMessage(err.Error()))
	}
	return h.replyErr(opt, nbdwire.RepErrUnknown, "unknown export")
}

// reply buffers one option reply; parts are its data. The caller flushes.
func (h *handshaker) reply(opt nbdwire.Option, typ nbdwire.RepType, parts ...[]byte) error {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	var hdr [20]byte
	be.PutUint64(hdr[0:], nbdwire.MagicOptReply)
	be.PutUint32(hdr[8:], uint32(opt))
	be.PutUint32(hdr[12:], uint32(typ))
	be.PutUint32(hdr[16:], uint32(n))
	_, err := h.w.Write(hdr[:])
	for _, p := range parts {
		if err != nil {
			break
		}
		_, err = h.w.Write(p)
	}
	return err
}

// replyErr buffers an error reply with a message for the user.
func (h *handshaker) replyErr(opt nbdwire.Option, typ nbdwire.RepType, msg string) error {
	h.c.log.Debug("nbd: option refused", "option", opt, "reply", typ, "msg", msg)
	return h.reply(opt, typ, []byte(msg))
}

type nopCloser struct{}

func (nopCloser) Close() error { return nil }
