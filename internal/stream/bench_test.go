package stream

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// benchSize is the source size of the benchmarks' streams: 64 MiB of
// data records, as an export of a snapshot half data, half holes sends.
const benchSize = 64 << 20

// BenchmarkWriter encodes benchSize bytes of data, in extents of 1 MiB
// (one segment) separated by holes, to io.Discard.
func BenchmarkWriter(b *testing.B) {
	p := pattern(0, 1<<20)
	b.SetBytes(benchSize)
	for b.Loop() {
		w, err := NewWriter(io.Discard, Header{Source: snap("bench", 1, 2*benchSize)})
		if err != nil {
			b.Fatal(err)
		}
		for off := uint64(0); off < 2*benchSize; off += 2 << 20 {
			if err := w.Data(off, p); err != nil {
				b.Fatal(err)
			}
		}
		if err := w.Close(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReader decodes the stream BenchmarkWriter writes.
func BenchmarkReader(b *testing.B) {
	var buf bytes.Buffer
	w, err := NewWriter(&buf, Header{Source: snap("bench", 1, 2*benchSize)})
	if err != nil {
		b.Fatal(err)
	}
	p := pattern(0, 1<<20)
	for off := uint64(0); off < 2*benchSize; off += 2 << 20 {
		if err := w.Data(off, p); err != nil {
			b.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(benchSize)
	for b.Loop() {
		r, err := NewReader(bytes.NewReader(buf.Bytes()))
		if err != nil {
			b.Fatal(err)
		}
		for {
			_, err := r.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				b.Fatal(err)
			}
		}
	}
}
