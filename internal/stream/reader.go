package stream

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// readBuffer is the Reader's buffer. A data payload larger than what the
// buffer holds is read straight into the payload buffer.
const readBuffer = 64 << 10

// firstChunk is how much of a data payload the Reader reads before it
// grows its payload buffer further: a record claims up to MaxData bytes,
// and the buffer grows only as those bytes arrive.
const firstChunk = 64 << 10

// A Record is one data or zero record of a stream.
type Record struct {
	// Type is TypeData or TypeZero.
	Type RecordType
	// Off and Len give the extent, in bytes: multiples of Sector, Len
	// not zero, within the source's size.
	Off, Len uint64
	// Data holds the Len bytes of a data record and is nil for a zero
	// record. It belongs to the Reader and is valid until the next call
	// to Next.
	Data []byte
}

// A Reader decodes a stream, checking each record as it reads it. Its
// methods must be called from one goroutine at a time.
//
// A Reader reads the whole of its input: a stream ends with its end
// record and the input must end there too. Only when Next has returned
// io.EOF has the stream been proved whole and unchanged; an importer
// must not commit what it applied before that.
type Reader struct {
	r    *bufio.Reader
	h    Header
	ext  extents
	pos  int64  // byte offset of the next record
	n    uint64 // number of the next record; the header is record 0
	err  error  // sticky: the error Next returns from now on
	head [headLen]byte
	sum  [crcLen]byte
	body [headerMaxBody]byte // the body of a record other than data
	buf  []byte              // the payload of the last data record
}

// NewReader reads and checks the magic, the version and the header
// record of the stream r holds, and returns a Reader for its records. It
// reads r through a buffer, so it may read past the header.
func NewReader(r io.Reader) (*Reader, error) {
	sr := &Reader{r: bufio.NewReaderSize(r, readBuffer)}
	var pre [preambleLen]byte
	n, err := io.ReadFull(sr.r, pre[:])
	switch {
	case err == nil:
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		if m := min(n, len(magic)); string(pre[:m]) != magic[:m] {
			return nil, fmt.Errorf("%w: starts with %q", ErrNotStream, pre[:m])
		}
		return nil, fmt.Errorf("%w: the input ends at byte %d, before the header record", ErrTruncated, n)
	default:
		return nil, fmt.Errorf("stream: read the magic: %w", err)
	}
	if string(pre[:len(magic)]) != magic {
		return nil, fmt.Errorf("%w: starts with %q", ErrNotStream, pre[:len(magic)])
	}
	if v := binary.LittleEndian.Uint32(pre[len(magic):]); v != Version {
		return nil, fmt.Errorf("%w: version %d at byte %d (this reader reads version %d)", ErrVersion, v, len(magic), Version)
	}
	sr.pos = int64(preambleLen)
	t, body, _, sum, err := sr.readRecord()
	if err != nil {
		return nil, err
	}
	if t != TypeHeader {
		return nil, sr.errorf(ErrCorrupt, t, "the first record must be the header")
	}
	if err := parseHeaderBody(body, &sr.h); err != nil {
		return nil, sr.errorf(ErrCorrupt, t, "%v", err)
	}
	sr.ext = extents{size: sr.h.Source.Size}
	sr.ext.chainSum(sum)
	sr.advance(len(body))
	return sr, nil
}

// Header returns the stream's header. Its Base, if any, must not be
// modified.
func (r *Reader) Header() Header { return r.h }

// Next returns the next data or zero record. After the last one it reads
// the end record, checks it against what came before and that nothing
// follows it, and returns io.EOF. Any other error is final: Next returns
// it from then on. Errors of the stream's bytes wrap ErrCorrupt or
// ErrTruncated and name the record number and its byte offset; an error
// of the underlying reader is returned wrapped as it is.
func (r *Reader) Next() (Record, error) {
	if r.err != nil {
		return Record{}, r.err
	}
	rec, err := r.next()
	if err != nil {
		r.err = err
	}
	return rec, err
}

// next reads one record for Next.
func (r *Reader) next() (Record, error) {
	t, body, payload, sum, err := r.readRecord()
	if err != nil {
		return Record{}, err
	}
	var rec Record
	switch t {
	case TypeHeader:
		return Record{}, r.errorf(ErrCorrupt, t, "a second header record")
	case TypeData:
		rec = Record{Type: t, Off: binary.LittleEndian.Uint64(body), Len: uint64(len(payload)), Data: payload}
	case TypeZero:
		rec = Record{Type: t, Off: binary.LittleEndian.Uint64(body), Len: binary.LittleEndian.Uint64(body[8:])}
		if rec.Len == 0 {
			return Record{}, r.errorf(ErrCorrupt, t, "empty extent at %d", rec.Off)
		}
	case TypeEnd:
		return Record{}, r.end(body)
	}
	if err := r.ext.check(rec.Off, rec.Len); err != nil {
		return Record{}, r.errorf(ErrCorrupt, t, "%v", err)
	}
	r.ext.add(t, rec.Off, rec.Len, sum)
	r.advance(len(body) + len(payload))
	return rec, nil
}

// end checks the end record's body against the records before it and
// that the input ends after it, and returns io.EOF if all is well.
func (r *Reader) end(body []byte) error {
	want := r.ext.appendEndBody(make([]byte, 0, endBody))
	if string(body) != string(want) {
		return r.errorf(ErrCorrupt, TypeEnd, "says %d records, %d data bytes, %d zero bytes, chain %08x; the stream held %d, %d, %d, chain %08x",
			binary.LittleEndian.Uint64(body), binary.LittleEndian.Uint64(body[8:]), binary.LittleEndian.Uint64(body[16:]), binary.LittleEndian.Uint32(body[24:]),
			r.ext.records, r.ext.dataBytes, r.ext.zeroBytes, r.ext.chain)
	}
	r.advance(len(body))
	switch _, err := r.r.ReadByte(); {
	case err == nil:
		return r.errorf(ErrCorrupt, 0, "bytes after the end record")
	case errors.Is(err, io.EOF):
		return io.EOF
	default:
		return fmt.Errorf("stream: read after the end record, at byte %d: %w", r.pos, err)
	}
}

// readRecord reads the next record whole and checks its length and its
// checksum. It returns the record's type, its body (for a data record,
// the offset field only), a data record's payload and the checksum.
func (r *Reader) readRecord() (t RecordType, body, payload []byte, sum uint32, err error) {
	if n, err := io.ReadFull(r.r, r.head[:]); err != nil {
		if n == 0 && errors.Is(err, io.EOF) {
			return 0, nil, nil, 0, r.errorf(ErrTruncated, 0, "the input ends with no end record")
		}
		return 0, nil, nil, 0, r.readErr(0, "head", n, headLen, err)
	}
	t = RecordType(r.head[0])
	if r.head[1]|r.head[2]|r.head[3] != 0 {
		return t, nil, nil, 0, r.errorf(ErrCorrupt, t, "reserved bytes % x are not zero", r.head[1:4])
	}
	n := binary.LittleEndian.Uint32(r.head[4:])
	var lo, hi uint32
	switch t {
	case TypeHeader:
		lo, hi = headerMinBody, headerMaxBody
	case TypeData:
		lo, hi = dataMinBody, dataMaxBody
	case TypeZero:
		lo, hi = zeroBody, zeroBody
	case TypeEnd:
		lo, hi = endBody, endBody
	default:
		return t, nil, nil, 0, r.errorf(ErrCorrupt, 0, "unknown record type 0x%02x", uint8(t))
	}
	if n < lo || n > hi || (t == TypeData && (n-8)%Sector != 0) {
		return t, nil, nil, 0, r.errorf(ErrCorrupt, t, "body of %d bytes (%s)", n, bodyRule(t, lo, hi))
	}
	fixed := int(n)
	if t == TypeData {
		fixed = 8
	}
	body = r.body[:fixed]
	if got, err := io.ReadFull(r.r, body); err != nil {
		return t, nil, nil, 0, r.readErr(t, "body", got, int(n), err)
	}
	if t == TypeData {
		if payload, err = r.readPayload(int(n) - 8); err != nil {
			return t, nil, nil, 0, r.readErr(t, "body", 8+len(r.buf), int(n), err)
		}
	}
	if got, err := io.ReadFull(r.r, r.sum[:]); err != nil {
		return t, nil, nil, 0, r.readErr(t, "checksum", got, crcLen, err)
	}
	sum = crc32.Update(crc32.Update(crc32.Checksum(r.head[:], castagnoli), castagnoli, body), castagnoli, payload)
	if stored := binary.LittleEndian.Uint32(r.sum[:]); stored != sum {
		return t, nil, nil, 0, r.errorf(ErrCorrupt, t, "checksum %08x, computed %08x", stored, sum)
	}
	return t, body, payload, sum, nil
}

// readPayload reads a data payload of n bytes (at most MaxData) into
// r.buf. The buffer grows only as the bytes arrive, so that a record
// claiming more bytes than the input holds does not cost that much
// memory. On an error r.buf holds what was read.
func (r *Reader) readPayload(n int) ([]byte, error) {
	b := r.buf[:0]
	for len(b) < n {
		chunk := min(n-len(b), max(len(b), firstChunk))
		if cap(b) < len(b)+chunk {
			grown := make([]byte, len(b), len(b)+chunk)
			copy(grown, b)
			b = grown
		}
		got, err := io.ReadFull(r.r, b[len(b):len(b)+chunk])
		b = b[:len(b)+got]
		if err != nil {
			r.buf = b
			return nil, err
		}
	}
	r.buf = b
	return b, nil
}

// advance moves past the record just read, whose body had n bytes.
func (r *Reader) advance(n int) {
	r.pos += int64(headLen + n + crcLen)
	r.n++
}

// errorf returns an error wrapping sentinel that names the current
// record (of type t, 0 if unknown) and its offset.
func (r *Reader) errorf(sentinel error, t RecordType, format string, args ...any) error {
	what := fmt.Sprintf("record %d", r.n)
	if t != 0 {
		what += " (" + t.String() + ")"
	}
	return fmt.Errorf("%w: %s at byte %d: %s", sentinel, what, r.pos, fmt.Sprintf(format, args...))
}

// readErr turns a failed read of part of the current record, of which
// got of want bytes arrived, into ErrTruncated at the end of the input
// and into the underlying reader's error otherwise.
func (r *Reader) readErr(t RecordType, part string, got, want int, err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return r.errorf(ErrTruncated, t, "the input ends %d bytes into the %d-byte %s", got, want, part)
	}
	return fmt.Errorf("stream: read record %d at byte %d: %w", r.n, r.pos, err)
}

// bodyRule says which body lengths a record of type t may have.
func bodyRule(t RecordType, lo, hi uint32) string {
	switch {
	case t == TypeData:
		return fmt.Sprintf("8 plus a multiple of %d, from %d to %d", Sector, lo, hi)
	case lo == hi:
		return fmt.Sprintf("exactly %d", lo)
	}
	return fmt.Sprintf("from %d to %d", lo, hi)
}
