// Package stream encodes and decodes segmap's export stream: the bytes
// `segmap export` writes and `segmap import` reads, a snapshot's contents
// (full) or what changed since a base snapshot (incremental). The format
// is specified in docs/stream.md; this package is its only
// implementation, and does no I/O but on the io.Writer or io.Reader it
// is given.
//
// A stream is a preamble (magic, version), a header record naming the
// source snapshot and, for an incremental stream, its base, then data
// and zero records in increasing offset order, then an end record:
//
//	preamble ─▶ header ─▶ { data | zero }* ─▶ end ─▶ end of input
//
// Invariants the Writer keeps and the Reader checks, each record as it
// comes, with O(1) state:
//
//   - every record carries its length and a CRC-32C of its bytes; the
//     Reader checks the length against the record type's limits before
//     it reads the body, so it never holds more than MaxData bytes of
//     payload, whatever a record claims;
//   - every extent is Sector-aligned, non-empty, within the source's size
//     and starts at or after the end of the previous one;
//   - the end record counts the records and their bytes and carries a
//     CRC-32C of every earlier record's checksum, so that a stream cut at
//     a record boundary, or with records dropped or reordered, is refused;
//     nothing may follow it.
//
// Only when Reader.Next has returned io.EOF is the stream proved whole:
// an importer applies records as they come, somewhere it can drop, and
// commits only then.
package stream
