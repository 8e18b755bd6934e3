package nbdclient

import (
	"testing"

	"segmap/internal/nbd"
	"segmap/internal/nbd/nbdwire"
)

// TestCacheID: a client that asks learns the server's write cache id, and
// Done is closed once the connection is gone; a server without an id, or
// a client that does not ask, gives none, and the connection is served
// all the same.
func TestCacheID(t *testing.T) {
	checkGoroutines(t)
	id := [nbdwire.CacheIDSize]byte{1, 2, 3, 15: 16}
	disk := newMem("disk", 1<<20)
	with := startServer(t, func(c *nbd.Config) { c.CacheID = id }, disk)
	without := startServer(t, nil, disk)
	for _, tt := range []struct {
		name   string
		addr   string
		ask    bool
		wantOK bool
	}{
		{"asked, given", with.addr, true, true},
		{"not asked", with.addr, false, false},
		{"asked, not given", without.addr, true, false},
	} {
		c := dialClient(t, tt.addr, "disk", ClientConfig{CacheID: tt.ask})
		got, ok := c.CacheID()
		if ok != tt.wantOK || ok && got != id {
			t.Errorf("%s: CacheID %x, %v; want %v", tt.name, got, ok, tt.wantOK)
		}
		if err := c.ReadAt(bg, make([]byte, 512), 0); err != nil {
			t.Errorf("%s: read: %v", tt.name, err)
		}
		select {
		case <-c.Done():
			t.Errorf("%s: Done closed on a live connection", tt.name)
		default:
		}
		c.Close()
		<-c.Done()
	}
}
