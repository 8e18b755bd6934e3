package container_test

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"segmap/internal/container"
)

// at returns a SignatureSpan-byte buffer holding magic at off.
func at(off int, magic string) []byte {
	b := make([]byte, container.SignatureSpan)
	copy(b[off:], magic)
	return b
}

func TestSignature(t *testing.T) {
	mbr := make([]byte, 4096)
	mbr[510], mbr[511] = 0x55, 0xaa
	bootOnly := append([]byte(nil), mbr...)
	mbr[446+4] = 0x83 // Linux
	binary.LittleEndian.PutUint32(mbr[446+12:], 2048)
	header := containerBytes(t)
	damaged := append([]byte(nil), header...)
	damaged[20] ^= 1

	tests := []struct {
		name string
		b    []byte
		want string // a substring of what Signature says; "" for blank
	}{
		{"blank", make([]byte, container.SignatureSpan), ""},
		{"empty", nil, ""},
		{"short", []byte("SEG"), ""},
		{"ext4", at(1080, "\x53\xef"), "ext2/3/4 file system (magic 0xef53 at byte 1080)"},
		{"xfs", at(0, "XFSB"), `XFS file system (magic "XFSB" at byte 0)`},
		{"btrfs", at(65600, "_BHRfS_M"), "btrfs"},
		{"swap", at(4086, "SWAPSPACE2"), "swap area"},
		{"old swap", at(4086, "SWAP-SPACE"), "swap area"},
		{"swap 64k pages", at(65526, "SWAPSPACE2"), "swap area"},
		{"lvm sector 1", at(512, "LABELONE"), "LVM2 physical volume"},
		{"lvm sector 3", at(1536, "LABELONE"), "LVM2"},
		{"gpt", at(512, "EFI PART"), "GPT partition table"},
		{"gpt 4k", at(4096, "EFI PART"), "GPT"},
		{"luks", at(0, "LUKS\xba\xbe"), `LUKS encrypted volume (magic "LUKS\xba\xbe" at byte 0)`},
		{"ntfs", at(3, "NTFS    "), "NTFS"},
		{"fat32", at(82, "FAT32   "), "FAT"},
		{"mbr", mbr, "MBR partition table"},
		{"boot signature only", bootOnly, ""},
		{"container", header, "segmap container 7 (4 slots of 65536 bytes)"},
		{"damaged container", damaged, "damaged segmap container header"},
		{"cut container header", header[:20], "damaged segmap container header"},
		{"container, first bytes only", header[:100], "segmap container 7"},
		{"magic beyond the bytes", at(1080, "\x53\xef")[:1081], ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := container.Signature(tt.b)
			if tt.want == "" && got != "" || tt.want != "" && !strings.Contains(got, tt.want) {
				t.Errorf("Signature = %q, want %q", got, tt.want)
			}
		})
	}
}

// containerBytes returns the first SignatureSpan bytes of a fresh
// container file: id 7, 4 slots of 64 KiB.
func containerBytes(t *testing.T) []byte {
	t.Helper()
	path := filepath.Join(t.TempDir(), "c")
	c, err := container.Create(path, container.Header{ID: 7, SlotSize: 64 << 10, Slots: 4})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b[:container.SignatureSpan]
}

// TestFormatRefuses checks that Format refuses a regular file holding a
// container or a file system, naming it, writes nothing then, and
// overwrites it with force.
func TestFormatRefuses(t *testing.T) {
	const slotSize = 64 << 10
	dir := t.TempDir()
	path := filepath.Join(dir, "ctr")
	c, err := container.Create(path, container.Header{ID: 1, SlotSize: slotSize, Slots: 8})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	_, err = container.Format(path, 2, slotSize, false)
	if !errors.Is(err, container.ErrNotBlank) || !strings.Contains(err.Error(), "segmap container 1 (8 slots") {
		t.Fatalf("Format over a container: %v; want ErrNotBlank naming container 1", err)
	}
	if h, err := container.ReadHeader(path); err != nil || h.ID != 1 {
		t.Fatalf("after a refused Format: header %v, %v; want container 1 untouched", h, err)
	}
	c, err = container.Format(path, 2, slotSize, true)
	if err != nil {
		t.Fatalf("Format with force: %v", err)
	}
	if h := c.Header(); h.ID != 2 || h.Slots != 8 {
		t.Errorf("Format with force made %v", h)
	}
	c.Close()

	// A file system image, as mkfs.ext4 makes it.
	img := filepath.Join(dir, "ext4.img")
	if err := os.WriteFile(img, make([]byte, 4<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(img)
	copy(b[1080:], "\x53\xef")
	if err := os.WriteFile(img, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := container.Format(img, 3, slotSize, false); !errors.Is(err, container.ErrNotBlank) || !strings.Contains(err.Error(), "ext2/3/4") {
		t.Fatalf("Format over ext4: %v; want ErrNotBlank naming ext2/3/4", err)
	}
}

// FuzzSignature checks that Signature never panics on any bytes, and is
// "" for bytes it cannot recognise anything in (all zero).
func FuzzSignature(f *testing.F) {
	f.Add([]byte{})
	f.Add(at(1080, "\x53\xef"))
	f.Add(at(0, "SEGMAPC1"))
	f.Add(at(510, "\x55\xaa"))
	f.Fuzz(func(t *testing.T, b []byte) {
		s := container.Signature(b)
		zero := true
		for _, c := range b {
			zero = zero && c == 0
		}
		if zero && s != "" {
			t.Fatalf("Signature of %d zero bytes = %q", len(b), s)
		}
	})
}
