package storage

import (
	"encoding/hex"
	"fmt"
	"os"
	"strings"

	"segmap/internal/nbd/nbdwire"
)

// bootIDPath is where Linux gives the id it draws at each boot.
const bootIDPath = "/proc/sys/kernel/random/boot_id"

// CacheID returns the identity of a storage node's write cache, for
// nbd.Config.CacheID: the machine's boot id. Writes the node answered
// without a flush sit in the kernel's page cache, which outlives the
// node's process (a crash or a kill -9 loses nothing answered) but not a
// reboot, which draws a new boot id. A client that reconnects to the same
// id knows its unflushed writes are still there.
func CacheID() ([nbdwire.CacheIDSize]byte, error) {
	b, err := os.ReadFile(bootIDPath)
	if err != nil {
		return [nbdwire.CacheIDSize]byte{}, fmt.Errorf("write cache id: %w", err)
	}
	return parseBootID(string(b))
}

// parseBootID decodes a boot id, a UUID in its text form.
func parseBootID(s string) ([nbdwire.CacheIDSize]byte, error) {
	var id [nbdwire.CacheIDSize]byte
	h := strings.ReplaceAll(strings.TrimSpace(s), "-", "")
	if len(h) != 2*len(id) {
		return id, fmt.Errorf("write cache id: boot id %q is not a UUID", s)
	}
	if _, err := hex.Decode(id[:], []byte(h)); err != nil {
		return id, fmt.Errorf("write cache id: boot id %q: %w", s, err)
	}
	if id == ([nbdwire.CacheIDSize]byte{}) {
		return id, fmt.Errorf("write cache id: boot id %q is zero", s)
	}
	return id, nil
}
