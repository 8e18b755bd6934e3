package stream

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
)

// writeBuffer is the Writer's buffer: enough to gather the small records
// of a sparse export into few writes. A data payload bypasses it when it
// is larger than what is left of it.
const writeBuffer = 256 << 10

// A Writer encodes a stream. Its methods must be called from one
// goroutine at a time, with extents in increasing offset order; a call
// that would break the format fails with ErrInvalid and writes nothing,
// and the Writer stays usable. An error of the underlying writer is
// returned by that call and every later one.
type Writer struct {
	w      *bufio.Writer
	ext    extents
	err    error // sticky: the first write error of w
	closed bool
	head   [headLen + 16]byte // scratch for a record's head and fixed body
	sum    [crcLen]byte       // scratch for a record's checksum
}

// NewWriter writes the stream's magic, version and header record to w
// (through a buffer, which records fill and Close flushes) and returns a
// Writer for its records. It fails with ErrInvalid for a header the
// Reader would refuse.
func NewWriter(w io.Writer, h Header) (*Writer, error) {
	if err := h.check(); err != nil {
		return nil, fmt.Errorf("%w: header: %w", ErrInvalid, err)
	}
	sw := &Writer{w: bufio.NewWriterSize(w, writeBuffer), ext: extents{size: h.Source.Size}}
	b := make([]byte, 0, preambleLen+headLen+headerMaxBody+crcLen)
	b = append(b, magic...)
	b = binary.LittleEndian.AppendUint32(b, Version)
	rec := len(b)
	b = appendHead(b, TypeHeader, 0)
	b = appendHeaderBody(b, &h)
	binary.LittleEndian.PutUint32(b[rec+4:], uint32(len(b)-rec-headLen))
	sum := crc32.Checksum(b[rec:], castagnoli)
	b = binary.LittleEndian.AppendUint32(b, sum)
	sw.ext.chainSum(sum)
	if _, err := sw.w.Write(b); err != nil {
		return nil, err
	}
	return sw, nil
}

// Data writes p as the data at offset off of the source, in records of
// at most MaxData bytes. off and len(p) are multiples of Sector; an
// empty p writes nothing. Data does not keep p.
func (w *Writer) Data(off uint64, p []byte) error {
	if err := w.begin(off, uint64(len(p))); err != nil || len(p) == 0 {
		return err
	}
	for len(p) > 0 {
		chunk := p[:min(len(p), MaxData)]
		b := appendHead(w.head[:0], TypeData, 8+len(chunk))
		b = binary.LittleEndian.AppendUint64(b, off)
		sum := crc32.Update(crc32.Update(0, castagnoli, b), castagnoli, chunk)
		w.write(b)
		w.write(chunk)
		w.writeSum(sum)
		if w.err != nil {
			return w.err
		}
		w.ext.add(TypeData, off, uint64(len(chunk)), sum)
		off += uint64(len(chunk))
		p = p[len(chunk):]
	}
	return nil
}

// Zero writes that the n bytes at offset off of the source read as zero
// (never written, or trimmed). off and n are multiples of Sector; n 0
// writes nothing.
func (w *Writer) Zero(off, n uint64) error {
	if err := w.begin(off, n); err != nil || n == 0 {
		return err
	}
	b := appendHead(w.head[:0], TypeZero, zeroBody)
	b = binary.LittleEndian.AppendUint64(b, off)
	b = binary.LittleEndian.AppendUint64(b, n)
	sum := crc32.Checksum(b, castagnoli)
	w.write(b)
	w.writeSum(sum)
	if w.err != nil {
		return w.err
	}
	w.ext.add(TypeZero, off, n, sum)
	return nil
}

// Close writes the end record and flushes the buffer. It does not close
// the underlying writer. A stream whose Close failed or was not called
// is refused by the Reader as truncated.
func (w *Writer) Close() error {
	if w.closed {
		return fmt.Errorf("%w: Close of a closed Writer", ErrInvalid)
	}
	if w.err != nil {
		return w.err
	}
	w.closed = true
	var body [endBody]byte
	b := appendHead(make([]byte, 0, headLen+endBody+crcLen), TypeEnd, endBody)
	b = append(b, w.ext.appendEndBody(body[:0])...)
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
	w.write(b)
	if w.err == nil {
		w.err = w.w.Flush()
	}
	return w.err
}

// begin checks that an extent of n bytes at off may come next.
func (w *Writer) begin(off, n uint64) error {
	if w.closed {
		return fmt.Errorf("%w: write to a closed Writer", ErrInvalid)
	}
	if w.err != nil {
		return w.err
	}
	if n == 0 {
		return nil
	}
	if err := w.ext.check(off, n); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return nil
}

// write writes b unless an earlier write failed.
func (w *Writer) write(b []byte) {
	if w.err == nil {
		_, w.err = w.w.Write(b)
	}
}

// writeSum writes a record's checksum.
func (w *Writer) writeSum(sum uint32) {
	binary.LittleEndian.PutUint32(w.sum[:], sum)
	w.write(w.sum[:])
}
