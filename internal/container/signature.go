package container

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// This file recognises what a file, block device or NBD export already
// holds before Format writes a header over it: formatting a disk that
// holds a file system, a partition table or another container destroys
// it, so Format and FormatNBD refuse unless forced. The checks are the
// magic numbers blkid(8) and wipefs(8) look for, at the offsets the
// formats define; a target that matches none is taken as blank.

// SignatureSpan is how many bytes from the start of a target Signature
// looks at: enough to reach the btrfs superblock at 64 KiB.
const SignatureSpan = 72 << 10

// signature is one magic number: what it means and where it sits.
type signature struct {
	name  string
	off   int
	magic string
}

// signatures are checked in order; the first found is reported. GPT comes
// before MBR because a GPT disk carries a protective MBR too.
var signatures = []signature{
	{"a LUKS encrypted volume", 0, "LUKS\xba\xbe"},
	{"an XFS file system", 0, "XFSB"},
	{"an ext2/3/4 file system", 1080, "\x53\xef"},
	{"a btrfs file system", 65600, "_BHRfS_M"},
	{"a swap area", 4086, "SWAPSPACE2"},
	{"a swap area", 4086, "SWAP-SPACE"},
	{"a swap area", 8182, "SWAPSPACE2"},
	{"a swap area", 16374, "SWAPSPACE2"},
	{"a swap area", 65526, "SWAPSPACE2"},
	{"an LVM2 physical volume", 0, "LABELONE"},
	{"an LVM2 physical volume", 512, "LABELONE"},
	{"an LVM2 physical volume", 1024, "LABELONE"},
	{"an LVM2 physical volume", 1536, "LABELONE"},
	{"a GPT partition table", 512, "EFI PART"},
	{"a GPT partition table", 4096, "EFI PART"},
	{"an NTFS file system", 3, "NTFS    "},
	{"a FAT file system", 82, "FAT32   "},
	{"a FAT file system", 54, "FAT16   "},
	{"a FAT file system", 54, "FAT12   "},
}

// Signature reports what the bytes b, read from the start of a file or
// device (SignatureSpan bytes, or fewer if it is shorter), already hold:
// a segmap container, a file system, a partition table, a swap area, an
// LVM or LUKS volume. It returns "" if it recognises nothing, otherwise a
// description naming the format and where its magic was found, such as
// "an ext2/3/4 file system (magic 0xef53 at byte 1080)".
func Signature(b []byte) string {
	if len(b) >= len(magic) && [8]byte(b[:len(magic)]) == magic {
		// Only the first headerLen bytes of a header hold anything: b
		// need not reach HeaderSize.
		hb := b
		if len(b) >= headerLen && len(b) < HeaderSize {
			hb = make([]byte, HeaderSize)
			copy(hb, b[:headerLen])
		}
		h, err := decodeHeader(hb)
		if err != nil {
			return fmt.Sprintf("a damaged segmap container header (%v)", err)
		}
		return fmt.Sprintf("segmap container %d (%d slots of %d bytes)", h.ID, h.Slots, h.SlotSize)
	}
	for _, s := range signatures {
		if s.off+len(s.magic) <= len(b) && string(b[s.off:s.off+len(s.magic)]) == s.magic {
			return fmt.Sprintf("%s (magic %s at byte %d)", s.name, showMagic(s.magic), s.off)
		}
	}
	if mbrPartitioned(b) {
		return "an MBR partition table (0x55aa at byte 510, with a partition)"
	}
	return ""
}

// mbrPartitioned reports whether b starts with a DOS master boot record
// that lists a partition. The boot signature alone is not enough: a blank
// disk never has it, but a boot sector of a file system without a magic
// above might; a partition entry with a type makes it a partition table.
func mbrPartitioned(b []byte) bool {
	if len(b) < 512 || b[510] != 0x55 || b[511] != 0xaa {
		return false
	}
	for i := range 4 {
		e := b[446+16*i : 446+16*(i+1)]
		// A used entry has a partition type and a length.
		if e[4] != 0 && binary.LittleEndian.Uint32(e[12:]) != 0 {
			return true
		}
	}
	return false
}

// showMagic prints a magic number as text if it is printable, in hex if
// not (ext's is the little-endian 0xef53).
func showMagic(m string) string {
	if m == "\x53\xef" {
		return "0xef53"
	}
	if i := bytes.IndexFunc([]byte(m), func(r rune) bool { return r < ' ' || r > '~' }); i >= 0 {
		return fmt.Sprintf("%q", m)
	}
	return `"` + m + `"`
}

// checkBlank fails with ErrNotBlank if b holds a signature, unless force.
func checkBlank(b []byte, force bool) error {
	if force {
		return nil
	}
	if s := Signature(b); s != "" {
		return fmt.Errorf("%w: it holds %s; formatting would destroy it (format with force to overwrite it)", ErrNotBlank, s)
	}
	return nil
}
