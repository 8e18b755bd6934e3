package container

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"testing"
)

// reseal recomputes the checksum of an encoded header after a test edited
// its fields, so that field validation rather than the checksum is tested.
func reseal(b []byte) []byte {
	binary.LittleEndian.PutUint32(b[offCRC:], crc32.Checksum(b[:offCRC], castagnoli))
	return b
}

func TestHeaderRoundTrip(t *testing.T) {
	for _, h := range []Header{
		{ID: 0, SlotSize: MinSlotSize, Slots: 1},
		{ID: 42, SlotSize: 1 << 20, Slots: 1 << 20},
		{ID: 1<<32 - 1, SlotSize: MaxSlotSize, Slots: (1<<63 - 1 - HeaderSize) / MaxSlotSize},
	} {
		b := h.encode()
		if len(b) != HeaderSize {
			t.Fatalf("encode(%v) is %d bytes, want %d", h, len(b), HeaderSize)
		}
		if !bytes.Equal(b[headerLen:], make([]byte, HeaderSize-headerLen)) {
			t.Errorf("encode(%v): padding is not zero", h)
		}
		got, err := decodeHeader(b)
		if err != nil || got != h {
			t.Errorf("decodeHeader(encode(%v)) = %v, %v", h, got, err)
		}
	}
}

// TestHeaderLayout pins the on-disk format: changing it breaks every
// existing container.
func TestHeaderLayout(t *testing.T) {
	b := Header{ID: 0x01020304, SlotSize: 1 << 16, Slots: 5}.encode()
	want := []byte{
		'S', 'E', 'G', 'M', 'A', 'P', 'C', '1',
		1, 0, 0, 0, // version
		4, 3, 2, 1, // id
		0, 0, 1, 0, 0, 0, 0, 0, // slot size
		5, 0, 0, 0, 0, 0, 0, 0, // slots
	}
	if !bytes.Equal(b[:offCRC], want) {
		t.Errorf("header fields = % x\nwant            % x", b[:offCRC], want)
	}
	if got, want := binary.LittleEndian.Uint32(b[offCRC:]), crc32.Checksum(want, crc32.MakeTable(crc32.Castagnoli)); got != want {
		t.Errorf("checksum = %#x, want CRC-32C %#x", got, want)
	}
}

func TestDecodeHeaderErrors(t *testing.T) {
	valid := func() []byte { return Header{ID: 7, SlotSize: 1 << 16, Slots: 10}.encode() }
	tests := []struct {
		name string
		b    []byte
		want error
	}{
		{"empty", nil, ErrNotContainer},
		{"short text", []byte("hello\n"), ErrNotContainer},
		{"zeros", make([]byte, HeaderSize), ErrNotContainer},
		{"lower-case magic", append([]byte("segmapc1"), valid()[8:]...), ErrNotContainer},
		{"magic only", []byte("SEGMAPC1"), ErrTruncated},
		{"short header", valid()[:HeaderSize-1], ErrTruncated},
		{"bad checksum", func() []byte { b := valid(); b[offCRC] ^= 1; return b }(), ErrCorruptHeader},
		{"flipped id", func() []byte { b := valid(); b[offID] ^= 0x80; return b }(), ErrCorruptHeader},
		{"version 2", func() []byte {
			b := valid()
			binary.LittleEndian.PutUint32(b[offVersion:], 2)
			return reseal(b)
		}(), ErrCorruptHeader},
		{"slot size not a power of two", func() []byte {
			b := valid()
			binary.LittleEndian.PutUint64(b[offSlotSize:], 3<<12)
			return reseal(b)
		}(), ErrCorruptHeader},
		{"slot size too small", func() []byte {
			b := valid()
			binary.LittleEndian.PutUint64(b[offSlotSize:], 2048)
			return reseal(b)
		}(), ErrCorruptHeader},
		{"slot size too large", func() []byte {
			b := valid()
			binary.LittleEndian.PutUint64(b[offSlotSize:], 2<<30)
			return reseal(b)
		}(), ErrCorruptHeader},
		{"slot size beyond int64", func() []byte {
			b := valid()
			binary.LittleEndian.PutUint64(b[offSlotSize:], 1<<63)
			return reseal(b)
		}(), ErrCorruptHeader},
		{"no slots", func() []byte {
			b := valid()
			binary.LittleEndian.PutUint64(b[offSlots:], 0)
			return reseal(b)
		}(), ErrCorruptHeader},
		{"too many slots", func() []byte {
			b := valid()
			binary.LittleEndian.PutUint64(b[offSlots:], 1<<62)
			return reseal(b)
		}(), ErrCorruptHeader},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, err := decodeHeader(tt.b)
			if !errors.Is(err, tt.want) {
				t.Errorf("decodeHeader = %v, %v; want %v", h, err, tt.want)
			}
		})
	}
}

func TestHeaderValidate(t *testing.T) {
	tests := []struct {
		h  Header
		ok bool
	}{
		{Header{SlotSize: 4096, Slots: 1}, true},
		{Header{SlotSize: 1 << 30, Slots: 3}, true},
		{Header{SlotSize: 0, Slots: 1}, false},
		{Header{SlotSize: -4096, Slots: 1}, false},
		{Header{SlotSize: 2048, Slots: 1}, false},
		{Header{SlotSize: 4097, Slots: 1}, false},
		{Header{SlotSize: 12288, Slots: 1}, false},
		{Header{SlotSize: 2 << 30, Slots: 1}, false},
		{Header{SlotSize: 4096, Slots: 0}, false},
		{Header{SlotSize: 4096, Slots: -1}, false},
		{Header{SlotSize: 4096, Slots: 1 << 51}, false}, // HeaderSize + 2^63 overflows
	}
	for _, tt := range tests {
		if err := tt.h.validate(); (err == nil) != tt.ok {
			t.Errorf("%v.validate() = %v, want ok=%v", tt.h, err, tt.ok)
		}
	}
}

// FuzzReadHeader feeds arbitrary bytes to the header decoder: it must never
// panic, must fail only with this package's header errors, and whatever it
// accepts must be a valid header that encodes back to the same fields.
func FuzzReadHeader(f *testing.F) {
	valid := Header{ID: 3, SlotSize: 1 << 20, Slots: 100}.encode()
	f.Add(valid)
	f.Add(valid[:headerLen])
	f.Add([]byte{})
	f.Add([]byte("SEGMAPC1"))
	f.Add([]byte("#!/bin/sh\necho not a container\n"))
	f.Add(make([]byte, HeaderSize))
	bad := bytes.Clone(valid)
	bad[offSlots] ^= 0xff
	f.Add(bad)
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeHeader(b)
		if err != nil {
			if !errors.Is(err, ErrNotContainer) && !errors.Is(err, ErrTruncated) && !errors.Is(err, ErrCorruptHeader) {
				t.Fatalf("decodeHeader: unexpected error class: %v", err)
			}
			return
		}
		if verr := h.validate(); verr != nil {
			t.Fatalf("decodeHeader accepted invalid header %v: %v", h, verr)
		}
		if enc := h.encode(); !bytes.Equal(enc[:headerLen], b[:headerLen]) {
			t.Fatalf("decodeHeader(% x) = %v, which encodes as % x", b[:headerLen], h, enc[:headerLen])
		}
	})
}
