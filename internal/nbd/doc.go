// Package nbd serves block devices (Exports found by a Backend) over the
// Network Block Device protocol, as specified in the NBD project's
// doc/proto.md. It speaks the fixed newstyle handshake only, with TLS
// (NBD_OPT_STARTTLS) when configured. The client is package nbdclient;
// the wire format both share (codes, flags, error values, headers) is
// package nbdwire.
//
// # Connection states
//
// Every connection runs through these states (connState):
//
//	            accept
//	              │
//	              ▼
//	  ┌────── handshake ───────┐  greeting, then option haggling:
//	  │  INFO, LIST, STRUCTURED_REPLY, LIST_META_CONTEXT,
//	  │    SET_META_CONTEXT, unknown options: answered, stay
//	  │  STARTTLS (Config.TLS): ACK, TLS handshake, haggling starts
//	  │    afresh over TLS (structured replies and the selected
//	  │    metadata context forgotten), stay
//	  │  GO (known export) / EXPORT_NAME (known export)
//	  │           ▼
//	  │     transmission        reader hands requests to workers
//	  │           │ DISC, EOF, bad request magic, absurd length,
//	  │           │ Shutdown, a reply that cannot be written
//	  │           ▼
//	  │       draining          no more reads; requests in flight are
//	  │           │             answered
//	  ▼           ▼
//	closed ◄──────┘             socket closed, then the export's Closer
//
// The handshake ends in closed on ABORT, on EXPORT_NAME of an unknown
// export (it cannot answer an error), on a bad option magic, unknown
// client flags or absurd option data, when HandshakeTimeout passes, and
// when Shutdown or Close begins; with TLS, also when the TLS handshake
// fails, and, under Config.TLSRequired, on EXPORT_NAME before TLS and for
// a client without fixed newstyle.
//
// # TLS
//
// The server runs in one of the spec's modes for all its connections:
// NOTLS without Config.TLS (STARTTLS is answered NBD_REP_ERR_POLICY);
// FORCEDTLS with Config.TLSRequired (before STARTTLS, every option but
// STARTTLS and ABORT is answered NBD_REP_ERR_TLS_REQD, so that no export
// is named, listed or opened in plaintext); and otherwise SELECTIVETLS
// with every export available either way. A second STARTTLS is
// NBD_REP_ERR_INVALID. Who may connect is Config.TLS's business (client
// certificates, VerifyConnection); this package does not look at
// identities.
//
// # Block status
//
// The server offers the metadata context base:allocation for every
// export. NBD_OPT_LIST_META_CONTEXT lists it for the queries
// "base:allocation" and "base:", and for an empty query list;
// NBD_OPT_SET_META_CONTEXT selects it (context id 1) for the query
// "base:allocation", after NBD_OPT_STRUCTURED_REPLY only. Both need a
// known export name; malformed data is NBD_REP_ERR_INVALID, and a SET
// replaces the earlier one even when it fails or selects nothing. Queries
// of other namespaces (at most 16 an option) go to the Backend if it is a
// MetaContexter, which names the contexts they select; the contexts a SET
// selects get ids 2, 3, ... in that order, and the export opened must be
// a ContextExtenter. Without a MetaContexter, those queries are ignored.
//
// NBD_CMD_BLOCK_STATUS is served only if the last SET selected a context
// for the export then opened (else NBD_EINVAL), with the range checks of
// a READ. Its reply has one BLOCK_STATUS chunk per selected context,
// base:allocation first; each describes the range from its offset with
// runs of equal flags merged, never past the request's end, with one
// descriptor under NBD_CMD_FLAG_REQ_ONE; it may cover less than asked (at
// most 65536 descriptors, and one per 512 bytes asked). The flags of
// base:allocation come from the Export's ExtentLister (an Export without
// one is reported as data throughout, flags 0), those of other contexts
// from its ContextExtenter, all 32 bits.
//
// # Replies
//
// Requests are answered with simple replies unless the client negotiated
// NBD_OPT_STRUCTURED_REPLY; then a READ is answered with one OFFSET_DATA
// chunk, a BLOCK_STATUS with one BLOCK_STATUS chunk, other successes with
// a NONE chunk and failures with an ERROR chunk carrying a short message,
// each flagged DONE. Replies may go out in any
// order. A request that fails (a bad range, a read-only export, an Export
// error mapped by Config.Errno, a panic in the Export) fails alone; the
// connection goes on. Only a client that breaks the stream's framing is
// disconnected.
//
// # Leases
//
// With Config.Leases, a client may ask for segmap's lease
// (nbdwire.OptSegmapLease) and grant it with nbdwire.CmdSegmapLease: the
// connection's requests are then refused with EPERM unless the lease holds
// when a worker is about to carry them out (docs/protocol.md, storage
// leases). Without it, the option is answered NBD_REP_ERR_UNSUP.
//
// With Config.CacheID, a client may ask who holds the server's write
// cache (nbdwire.OptSegmapCache), so that after a reconnection it can
// tell whether writes answered but not flushed on the old connection
// survived (docs/protocol.md, write cache identity).
//
// # Concurrency
//
// One goroutine per connection runs the handshake and then reads requests,
// handing each to a worker goroutine; at most Config.MaxInFlight requests
// of a connection are in flight, and the reader waits when that many are.
// Workers call the Export concurrently. A small READ of an Export that is
// a NoWaitReader is first tried on the reader itself, which saves waking a
// worker when the data is in memory. Replies are queued, and whichever
// goroutine finds no one writing writes every queued reply in one writev
// (header and data together); a reply the reader queued goes out at the
// latest when it has no complete request buffered. The Server tracks its
// connections: Shutdown waits for them, Close ends them and waits for
// their goroutines.
//
// # Limits
//
// The server advertises the spec's default block sizes: minimum 1,
// preferred 4096, maximum payload 32 MiB. A READ or WRITE above the
// maximum payload fails with EINVAL (EOVERFLOW for a structured READ);
// the payload of such a WRITE is read and discarded up to 64 MiB, and a
// longer one ends the connection. Option data above 64 KiB is discarded and
// answered NBD_REP_ERR_TOO_BIG, above 1 MiB it ends the connection. Every
// buffer is sized by a checked length; payload buffers come from pools by
// power-of-two size class, and one connection holds at most 128 MiB of
// payload at once, the buffers of BLOCK_STATUS replies (at most 512 KiB
// each) included.
package nbd
