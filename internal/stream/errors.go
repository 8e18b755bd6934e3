package stream

import "errors"

// Errors of the decoder. Each is wrapped with the record number and the
// byte offset at which the problem was found, so that a refused stream
// says where it went wrong; test for them with errors.Is.
var (
	// ErrNotStream is returned when the stream does not start with the
	// magic bytes: the input is not an export stream at all.
	ErrNotStream = errors.New("stream: not a segmap export stream")
	// ErrVersion is returned for a stream whose format version this
	// package does not read.
	ErrVersion = errors.New("stream: unsupported format version")
	// ErrCorrupt is returned for a stream whose bytes are wrong: a bad
	// checksum, an unknown record type, a length or field out of its
	// limits, an extent that is unaligned, past the end or out of order,
	// an end record that does not match what came before it, or bytes
	// after the end record.
	ErrCorrupt = errors.New("stream: corrupt")
	// ErrTruncated is returned when the input ends before the end record
	// has been read, inside a record or between two records.
	ErrTruncated = errors.New("stream: truncated")
)

// ErrInvalid is returned by the Writer for a call that would write a
// stream the Reader refuses: a bad header, an unaligned extent, one past
// the end or before the previous one, or a write after Close.
var ErrInvalid = errors.New("stream: invalid argument")
