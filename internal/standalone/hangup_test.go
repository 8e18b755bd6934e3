package standalone_test

import (
	"bytes"
	"context"
	"log/slog"
	"testing"

	"segmap/internal/controller"
	"segmap/internal/nbd/nbdclient"
	"segmap/internal/standalone"
)

// TestHangUpOnLostMapChanges: an NBD client writes to a disk its agent
// alone maps and reads the write back; the controller dies before a flush,
// losing the write's map change. The agent hangs up on that connection,
// as a crashed server would, rather than let the client read the old data
// on it; a new connection reads the disk as it now is. After a flush, a
// controller's death costs nothing: the connection goes on.
func TestHangUpOnLostMapChanges(t *testing.T) {
	ctx := context.Background()
	const segSize = 64 << 10
	c, err := standalone.Open(ctx, t.TempDir(), standalone.Options{
		Pool:   []standalone.PoolSpec{{SlotSize: segSize, Slots: 16, Count: 1}},
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "d", Size: 4 * segSize, SegmentSize: segSize}); err != nil {
		t.Fatal(err)
	}
	addr := serveNBD(t, c)
	dial := func() *nbdclient.Client {
		t.Helper()
		cl, err := nbdclient.Dial(ctx, addr, "d", nbdclient.ClientConfig{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cl.Close() })
		return cl
	}

	cl := dial()
	flushed, lost := bytes.Repeat([]byte{7}, 4096), bytes.Repeat([]byte{9}, 4096)
	if err := cl.WriteAt(ctx, flushed, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := cl.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// A flushed write survives the controller: the connection goes on.
	if err := c.CrashController(ctx); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if err := cl.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, flushed) {
		t.Fatalf("after a flush and a controller crash: read %v, same bytes %v", err, bytes.Equal(got, flushed))
	}

	if err := cl.WriteAt(ctx, lost, segSize, false); err != nil {
		t.Fatal(err)
	}
	if err := cl.ReadAt(ctx, got, segSize); err != nil || !bytes.Equal(got, lost) {
		t.Fatalf("read back the unflushed write: %v", err)
	}
	if err := c.CrashController(ctx); err != nil {
		t.Fatal(err)
	}
	if err := cl.ReadAt(ctx, got, segSize); err == nil {
		t.Fatalf("the connection that read a write its controller lost read on (%x...)", got[:4])
	}
	cl2 := dial()
	if err := cl2.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, flushed) {
		t.Fatalf("new connection, flushed write: %v", err)
	}
	if err := cl2.ReadAt(ctx, got, segSize); err != nil || !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatalf("new connection, lost write: %v; want the zeros the disk held before it", err)
	}
}
