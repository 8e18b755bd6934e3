package controller_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"segmap/internal/agent"
	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/standalone"
	"segmap/internal/table"
)

// seg is the segment (and slot) size of every disk in these tests.
const seg = 64 << 10

// newCluster starts an in-process segmap in a fresh directory with two
// agents. The default pool is two containers of 64 slots of 64 KiB.
func newCluster(t *testing.T, pool ...standalone.PoolSpec) *standalone.Cluster {
	t.Helper()
	return newClusterOpts(t, standalone.Options{Pool: pool})
}

// newClusterOpts is newCluster with more options: agents host-a and
// host-b, and the default pool, unless opts names others.
func newClusterOpts(t *testing.T, opts standalone.Options) *standalone.Cluster {
	t.Helper()
	if len(opts.Pool) == 0 {
		opts.Pool = []standalone.PoolSpec{{SlotSize: seg, Slots: 64, Count: 2}}
	}
	if len(opts.Agents) == 0 {
		opts.Agents = []string{"host-a", "host-b"}
	}
	c, err := standalone.Open(context.Background(), t.TempDir(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("close cluster: %v", err)
		}
	})
	return c
}

func createDisk(t *testing.T, c *standalone.Cluster, name string, segs uint64, p table.Policy) meta.Disk {
	t.Helper()
	d, err := c.Ctrl.CreateDisk(context.Background(), controller.CreateOptions{Name: name, Size: segs * seg, SegmentSize: seg, Policy: p})
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return d
}

// openDisk opens name on agent i.
func openDisk(t *testing.T, c *standalone.Cluster, i int, name string) *agent.Disk {
	t.Helper()
	d, err := c.Agents[i].Open(context.Background(), name)
	if err != nil {
		t.Fatalf("agent %d open %s: %v", i, name, err)
	}
	return d
}

// pattern returns n bytes that depend on seed and on their position.
func pattern(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = seed ^ byte(i*31+i>>8) | 1
	}
	return p
}

func write(t *testing.T, d *agent.Disk, p []byte, off uint64) {
	t.Helper()
	if err := d.WriteAt(context.Background(), p, off, false); err != nil {
		t.Fatalf("write %s [%d,+%d): %v", d.Info().Name, off, len(p), err)
	}
}

func read(t *testing.T, d *agent.Disk, off, n uint64) []byte {
	t.Helper()
	p := make([]byte, n)
	if err := d.ReadAt(context.Background(), p, off); err != nil {
		t.Fatalf("read %s [%d,+%d): %v", d.Info().Name, off, n, err)
	}
	return p
}

// expect fails unless d reads want at off.
func expect(t *testing.T, d *agent.Disk, off uint64, want []byte) {
	t.Helper()
	got := read(t, d, off, uint64(len(want)))
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && got[i] == want[i] {
			i++
		}
		t.Errorf("%s [%d,+%d): differs at byte %d (offset %d): got %x, want %x",
			d.Info().Name, off, len(want), i, off+uint64(i), got[i:min(i+8, len(got))], want[i:min(i+8, len(want))])
	}
}

// checkClean fails the test if Check finds any problem.
func checkClean(t *testing.T, c *standalone.Cluster) {
	t.Helper()
	ps, err := c.Ctrl.Check(context.Background())
	if err != nil {
		t.Fatalf("check: %v", err)
	}
	for _, p := range ps {
		t.Errorf("check: %v", p)
	}
}

// used returns the number of used slots over every container.
func used(t *testing.T, c *standalone.Cluster) uint64 {
	t.Helper()
	cs, err := c.Ctrl.ListContainers(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, ct := range cs {
		n += ct.Used
	}
	return n
}

func usage(t *testing.T, c *standalone.Cluster, name string) controller.Usage {
	t.Helper()
	u, err := c.Ctrl.DiskUsage(context.Background(), name)
	if err != nil {
		t.Fatalf("usage %s: %v", name, err)
	}
	return u
}

// commitPending makes the map changes the controller keeps in memory
// durable, as an agent's flush would: the tests read the store.
func commitPending(t *testing.T, c *standalone.Cluster) {
	t.Helper()
	if err := c.Ctrl.CommitPending(context.Background()); err != nil {
		t.Fatalf("commit pending map changes: %v", err)
	}
}

// entry returns the persistent entry seg of disk name (after committing
// what the controller keeps in memory).
func entry(t *testing.T, c *standalone.Cluster, name string, seg uint64) table.Entry {
	t.Helper()
	commitPending(t, c)
	var e table.Entry
	err := c.Store.View(context.Background(), func(tx *meta.Tx) error {
		d, err := tx.Disk(name)
		if err != nil {
			return err
		}
		es, err := tx.Entries(d.ID, seg, 1)
		if err != nil {
			return err
		}
		e = es[0]
		return nil
	})
	if err != nil {
		t.Fatalf("entry %s/%d: %v", name, seg, err)
	}
	return e
}

// agentEntry returns entry seg of d's table on agent i.
func agentEntry(t *testing.T, c *standalone.Cluster, i int, d *agent.Disk, seg uint64) table.Entry {
	t.Helper()
	es, err := c.Agents[i].GetEntry(context.Background(), d.Info().ID, seg, 1)
	if err != nil {
		t.Fatalf("agent %d get entry %s/%d: %v", i, d.Info().Name, seg, err)
	}
	return es[0]
}

func refs(t *testing.T, c *standalone.Cluster, loc table.Location) uint32 {
	t.Helper()
	commitPending(t, c)
	var n uint32
	err := c.Store.View(context.Background(), func(tx *meta.Tx) error {
		var err error
		n, err = tx.Refs(loc)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// readSlot reads slot loc straight from its container file.
func readSlot(t *testing.T, c *standalone.Cluster, loc table.Location) []byte {
	t.Helper()
	ct, err := container.Open(filepath.Join(c.Dir, "containers", fmt.Sprintf("c%d", loc.Container)), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ct.Close()
	p := make([]byte, ct.SlotSize())
	if _, err := ct.ReadAt(p, int64(loc.Slot)*ct.SlotSize()); err != nil {
		t.Fatal(err)
	}
	return p
}

// state is what the controller's bad-input paths must not change.
type state struct {
	Disks []meta.Disk
	Conts []meta.Container
}

func stateOf(t *testing.T, c *standalone.Cluster) state {
	t.Helper()
	ctx := context.Background()
	ds, err := c.Ctrl.Disks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := c.Ctrl.ListContainers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return state{ds, cs}
}

func assertUnchanged(t *testing.T, c *standalone.Cluster, before state) {
	t.Helper()
	if after := stateOf(t, c); !reflect.DeepEqual(before, after) {
		t.Errorf("state changed:\nbefore %+v\nafter  %+v", before, after)
	}
	checkClean(t, c)
}

func TestBadInputChangesNothing(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	createDisk(t, c, "a", 4, table.Forward)
	h := openDisk(t, c, 0, "a")
	data := pattern(4*seg, 1)
	write(t, h, data, 0)
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"a"}, Names: []string{"a-snap"}}); err != nil {
		t.Fatal(err)
	}
	before := stateOf(t, c)
	if len(before.Disks) != 2 || used(t, c) != 4 {
		t.Fatalf("setup: %+v", before)
	}

	create := func(name string, size, segSize uint64) func() error {
		return func() error {
			_, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: name, Size: size, SegmentSize: segSize})
			return err
		}
	}
	snapshot := func(srcs, names []string) func() error {
		return func() error {
			_, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: srcs, Names: names})
			return err
		}
	}
	resize := func(name string, size uint64, shrink bool) func() error {
		return func() error {
			_, err := c.Ctrl.ResizeDisk(ctx, name, size, shrink)
			return err
		}
	}
	for _, tc := range []struct {
		name string
		fn   func() error
		want error
	}{
		{"create empty name", create("", 4*seg, seg), controller.ErrInvalidName},
		{"create name -x", create("-x", 4*seg, seg), controller.ErrInvalidName},
		{"create name .x", create(".x", 4*seg, seg), controller.ErrInvalidName},
		{"create name a/b", create("a/b", 4*seg, seg), controller.ErrInvalidName},
		{"create name a b", create("a b", 4*seg, seg), controller.ErrInvalidName},
		{"create name with newline", create("a\n", 4*seg, seg), controller.ErrInvalidName},
		{"create name 129 chars", create(strings.Repeat("n", 129), 4*seg, seg), controller.ErrInvalidName},
		{"create name 200 chars", create(strings.Repeat("n", 200), 4*seg, seg), controller.ErrInvalidName},
		{"create size 0", create("b", 0, seg), controller.ErrInvalidSize},
		{"create size 1000", create("b", 1000, seg), controller.ErrInvalidSize},
		{"create size past max", create("b", controller.MaxDiskSize+512, seg), controller.ErrInvalidSize},
		{"create size max uint64", create("b", math.MaxUint64, seg), controller.ErrInvalidSize},
		{"create segment 1000", create("b", 4*seg, 1000), controller.ErrInvalidSegmentSize},
		{"create segment 32K", create("b", 4*seg, 32<<10), controller.ErrInvalidSegmentSize},
		{"create segment 128M", create("b", 4*seg, 128<<20), controller.ErrInvalidSegmentSize},
		{"create segment 96K", create("b", 4*seg, 96<<10), controller.ErrInvalidSegmentSize},
		{"create segment 1M without pool", create("b", 4*seg, 1<<20), controller.ErrNoPool},
		{"create segment 128K without pool", create("b", 4*seg, 128<<10), controller.ErrNoPool},
		// The default segment size (1 MiB) is valid; this pool has none.
		{"create default segment without pool", create("b", 4*seg, 0), controller.ErrNoPool},
		{"create bad policy", func() error {
			_, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "b", Size: 4 * seg, SegmentSize: seg, Policy: 9})
			return err
		}, table.ErrBadPolicy},
		{"create duplicate", create("a", 4*seg, seg), controller.ErrExists},
		{"create duplicate of snapshot", create("a-snap", 8*seg, seg), controller.ErrExists},
		{"snapshot missing", snapshot([]string{"nope"}, []string{"s"}), protocol.ErrNotFound},
		{"snapshot one missing of a group", snapshot([]string{"a", "nope"}, []string{"s1", "s2"}), protocol.ErrNotFound},
		{"snapshot onto existing", snapshot([]string{"a"}, []string{"a-snap"}), controller.ErrExists},
		{"snapshot onto itself", snapshot([]string{"a"}, []string{"a"}), protocol.ErrBadRequest},
		{"snapshot more names", snapshot([]string{"a"}, []string{"s1", "s2"}), protocol.ErrBadRequest},
		{"snapshot fewer names", snapshot([]string{"a", "a-snap"}, []string{"s1"}), protocol.ErrBadRequest},
		{"snapshot nothing", snapshot(nil, nil), protocol.ErrBadRequest},
		{"snapshot name repeated", snapshot([]string{"a", "a-snap"}, []string{"s", "s"}), protocol.ErrBadRequest},
		{"snapshot source repeated", snapshot([]string{"a", "a"}, []string{"s1", "s2"}), protocol.ErrBadRequest},
		{"snapshot invalid name", snapshot([]string{"a"}, []string{"-s"}), controller.ErrInvalidName},
		{"delete missing", func() error { return c.Ctrl.DeleteDisk(ctx, "nope") }, protocol.ErrNotFound},
		{"resize missing", resize("nope", 8*seg, false), protocol.ErrNotFound},
		{"resize shrink without flag", resize("a", 2*seg, false), controller.ErrShrink},
		{"resize shrink to a partial segment", resize("a", 2*seg+512, true), controller.ErrInvalidSize},
		{"resize to 0", resize("a", 0, true), controller.ErrInvalidSize},
		{"resize to 1000", resize("a", 1000, false), controller.ErrInvalidSize},
		{"resize past max", resize("a", controller.MaxDiskSize+512, false), controller.ErrInvalidSize},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.fn()
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			assertUnchanged(t, c, before)
			expect(t, h, 0, data)
		})
	}
}

func TestCreateDiskAccepts(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	// A 1 MiB pool, so the default segment size has one.
	if err := c.AddContainer(ctx, 10, controller.DefaultSegmentSize, 4); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		o               controller.CreateOptions
		wantSeg         uint64
		wantPolicy      table.Policy
		wantSegmentsLen uint64
	}{
		{controller.CreateOptions{Name: "x", Size: 512}, controller.DefaultSegmentSize, table.Forward, 1},
		{controller.CreateOptions{Name: "_A-1.b", Size: 3 * seg, SegmentSize: seg, Policy: table.Reverse}, seg, table.Reverse, 3},
		{controller.CreateOptions{Name: "0", Size: 3*seg + 512, SegmentSize: seg}, seg, table.Forward, 4},
		{controller.CreateOptions{Name: strings.Repeat("n", 128), Size: seg, SegmentSize: seg}, seg, table.Forward, 1},
		{controller.CreateOptions{Name: "huge", Size: controller.MaxSegments * seg, SegmentSize: seg}, seg, table.Forward, controller.MaxSegments},
		{controller.CreateOptions{Name: "huger", Size: controller.MaxSegments * controller.DefaultSegmentSize}, controller.DefaultSegmentSize, table.Forward, controller.MaxSegments},
	} {
		d, err := c.Ctrl.CreateDisk(ctx, tc.o)
		if err != nil {
			t.Errorf("create %+v: %v", tc.o, err)
			continue
		}
		if d.Name != tc.o.Name || d.Size != tc.o.Size || d.SegmentSize != tc.wantSeg || d.Policy != tc.wantPolicy || d.Segments() != tc.wantSegmentsLen || d.ReadOnly {
			t.Errorf("create %+v: got %+v", tc.o, d)
		}
		got, err := c.Ctrl.Disk(ctx, tc.o.Name)
		if err != nil || got.ID != d.ID {
			t.Errorf("disk %q after create: %+v, %v", tc.o.Name, got, err)
		}
	}
	if n := used(t, c); n != 0 {
		t.Errorf("creating disks used %d slots", n)
	}
	checkClean(t, c)
}

func TestAddContainerBadInput(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	createDisk(t, c, "a", 2, table.Forward)
	h := openDisk(t, c, 0, "a")
	data := pattern(2*seg, 2)
	write(t, h, data, 0)
	before := stateOf(t, c)

	dir := t.TempDir()
	text := filepath.Join(dir, "notes.txt")
	textBody := []byte("this is a text file, not a segmap container\n")
	if err := os.WriteFile(text, textBody, 0o600); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		uri  string
		want error
	}{
		{"text file", container.FileURI(text), container.ErrNotContainer},
		{"text file by plain path", text, container.ErrNotContainer},
		{"empty file", container.FileURI(empty), container.ErrNotContainer},
		{"missing file", container.FileURI(filepath.Join(dir, "missing")), fs.ErrNotExist},
		{"same container twice", container.FileURI(filepath.Join(c.Dir, "containers", "c1")), meta.ErrExists},
		{"same container twice by plain path", filepath.Join(c.Dir, "containers", "c2"), meta.ErrExists},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec, err := c.Ctrl.AddContainer(ctx, tc.uri)
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %+v, %v; want %v", rec, err, tc.want)
			}
			assertUnchanged(t, c, before)
			// The existing containers still work.
			expect(t, h, 0, data)
			write(t, h, data[:100], 7)
			expect(t, h, 7, data[:100])
			write(t, h, data[7:107], 7)
		})
	}
	// A foreign file is never written to.
	if got, err := os.ReadFile(text); err != nil || !bytes.Equal(got, textBody) {
		t.Errorf("text file after AddContainer: %q, %v", got, err)
	}
}

// TestHugeDisk creates a 1 TiB disk of 64 KiB segments (16M segments): no
// storage is used until a write, and a write at the very end allocates one
// slot.
func TestHugeDisk(t *testing.T) {
	c := newCluster(t)
	const size = 1 << 40
	d := createDisk(t, c, "huge", size/seg, table.Forward)
	if d.Segments() != 1<<24 {
		t.Fatalf("segments %d", d.Segments())
	}
	checkClean(t, c)
	if u := usage(t, c, "huge"); u != (controller.Usage{}) {
		t.Errorf("usage of a new disk: %+v", u)
	}
	if n := used(t, c); n != 0 {
		t.Errorf("used slots after create: %d", n)
	}

	h := openDisk(t, c, 0, "huge")
	if h.Size() != size {
		t.Fatalf("agent sees size %d", h.Size())
	}
	expect(t, h, size-seg, make([]byte, seg))
	if n := used(t, c); n != 0 {
		t.Errorf("used slots after a read: %d", n)
	}
	write(t, h, []byte{0xa5}, size-1)
	if n := used(t, c); n != 1 {
		t.Errorf("used slots after a one-byte write: %d, want 1", n)
	}
	if u, want := usage(t, c, "huge"), (controller.Usage{Allocated: seg, Exclusive: seg}); u != want {
		t.Errorf("usage: %+v, want %+v", u, want)
	}
	if e := entry(t, c, "huge", 1<<24-1); !e.Mapped() || e.Is(table.NoWrite) {
		t.Errorf("last entry %v, want mapped writable", e)
	}
	if e := entry(t, c, "huge", 0); e != table.ZeroEntry {
		t.Errorf("first entry %v, want Zero", e)
	}
	want := make([]byte, seg)
	want[seg-1] = 0xa5
	expect(t, h, size-seg, want)
	// Through the other agent too.
	expect(t, openDisk(t, c, 1, "huge"), size-seg, want)
	checkClean(t, c)
}

// TestMaxSizeDiskCanBeServed creates the largest disk CreateDisk accepts
// at 64 KiB segments (MaxSegments of them, 16 TiB) and serves it
// through an agent. Opening it must not take memory in proportion to its
// size. It runs in a child process under an address-space limit, since a
// failure is a fatal out-of-memory error that would take down every other
// test in the binary (or, without the limit, the machine).
func TestMaxSizeDiskCanBeServed(t *testing.T) {
	if os.Getenv("SEGMAP_TEST_MAX_DISK_CHILD") == "1" {
		limitAddressSpace(t, 8<<30)
		serveMaxDisk(t)
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestMaxSizeDiskCanBeServed$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), "SEGMAP_TEST_MAX_DISK_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		// The first lines say what failed; the segmap frames, where.
		var show []string
		for i, l := range strings.Split(string(out), "\n") {
			if i < 4 || strings.Contains(l, "segmap/internal/") {
				show = append(show, l)
			}
		}
		t.Fatalf("serving a %d-byte disk of %d-byte segments: child test failed: %v\n%s",
			uint64(controller.MaxSegments*seg), seg, err, strings.Join(show[:min(len(show), 30)], "\n"))
	}
}

// limitAddressSpace makes mappings fail once the process maps more than
// extra bytes beyond what it maps now.
func limitAddressSpace(t *testing.T, extra uint64) {
	t.Helper()
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skipf("no /proc/self/status to size the address-space limit: %v", err)
	}
	var vmKB uint64
	for _, l := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(l, "VmSize:") {
			fmt.Sscanf(strings.TrimSpace(strings.TrimPrefix(l, "VmSize:")), "%d", &vmKB)
		}
	}
	if vmKB == 0 {
		t.Fatalf("no VmSize in /proc/self/status")
	}
	lim := syscall.Rlimit{Cur: vmKB<<10 + extra, Max: vmKB<<10 + extra}
	if err := syscall.Setrlimit(syscall.RLIMIT_AS, &lim); err != nil {
		t.Fatalf("setrlimit: %v", err)
	}
}

func serveMaxDisk(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	const largest = controller.MaxSegments * seg
	// One segment more is refused, and so is the largest size at the
	// smallest segment size.
	for _, size := range []uint64{largest + seg, controller.MaxDiskSize} {
		if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "toobig", Size: size, SegmentSize: seg}); !errors.Is(err, controller.ErrInvalidSize) {
			t.Fatalf("create %d bytes of %d-byte segments: %v, want ErrInvalidSize", size, seg, err)
		}
	}
	d := createDisk(t, c, "max", controller.MaxSegments, table.Forward)
	if d.Size != largest {
		t.Fatalf("size %d", d.Size)
	}
	h := openDisk(t, c, 0, "max")
	write(t, h, []byte{0x5a}, largest-1)
	if got := read(t, h, largest-2, 2); got[0] != 0 || got[1] != 0x5a {
		t.Errorf("last bytes %x, want 005a", got)
	}
	if n := used(t, c); n != 1 {
		t.Errorf("used %d slots, want 1", n)
	}
	if err := h.Close(ctx); err != nil {
		t.Error(err)
	}
	checkClean(t, c)
}

func TestAgentIOBadInput(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	const size = 4 * seg
	createDisk(t, c, "r", 4, table.Forward)
	createDisk(t, c, "fresh", 4, table.Forward)
	h := openDisk(t, c, 0, "r")
	fresh := openDisk(t, c, 0, "fresh")
	data := pattern(size, 3)
	write(t, h, data, 0)
	if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"r"}, Names: []string{"rs"}}); err != nil {
		t.Fatal(err)
	}
	snap := openDisk(t, c, 1, "rs")
	used0 := used(t, c)

	buf := pattern(20, 4)
	for _, tc := range []struct {
		name string
		fn   func(d *agent.Disk) error
		want error
	}{
		{"read at end", func(d *agent.Disk) error { return d.ReadAt(ctx, make([]byte, 1), size) }, agent.ErrRange},
		{"read past end", func(d *agent.Disk) error { return d.ReadAt(ctx, make([]byte, 1), size+seg) }, agent.ErrRange},
		{"read straddling end", func(d *agent.Disk) error { return d.ReadAt(ctx, make([]byte, 20), size-10) }, agent.ErrRange},
		{"read at huge offset", func(d *agent.Disk) error { return d.ReadAt(ctx, make([]byte, 20), math.MaxUint64-5) }, agent.ErrRange},
		{"write at end", func(d *agent.Disk) error { return d.WriteAt(ctx, buf[:1], size, false) }, agent.ErrRange},
		{"write past end", func(d *agent.Disk) error { return d.WriteAt(ctx, buf, size+seg, true) }, agent.ErrRange},
		{"write straddling end", func(d *agent.Disk) error { return d.WriteAt(ctx, buf, size-10, false) }, agent.ErrRange},
		{"write straddling end by one", func(d *agent.Disk) error { return d.WriteAt(ctx, buf, size-19, false) }, agent.ErrRange},
		{"write at huge offset", func(d *agent.Disk) error { return d.WriteAt(ctx, buf, math.MaxUint64-5, false) }, agent.ErrRange},
		{"trim straddling end", func(d *agent.Disk) error { return d.Trim(ctx, size-seg, 2*seg) }, agent.ErrRange},
		{"write zeroes straddling end", func(d *agent.Disk) error { return d.WriteZeroes(ctx, size-10, 20, true) }, agent.ErrRange},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.fn(h); !errors.Is(err, tc.want) {
				t.Errorf("written disk: got %v, want %v", err, tc.want)
			}
			if err := tc.fn(fresh); !errors.Is(err, tc.want) {
				t.Errorf("fresh disk: got %v, want %v", err, tc.want)
			}
			expect(t, h, 0, data)
			expect(t, fresh, 0, make([]byte, size))
			if n := used(t, c); n != used0 {
				t.Errorf("used slots %d, want %d", n, used0)
			}
		})
	}

	// Writes to a read-only snapshot.
	for _, tc := range []struct {
		name string
		fn   func() error
	}{
		{"write", func() error { return snap.WriteAt(ctx, buf, 0, false) }},
		{"write fua", func() error { return snap.WriteAt(ctx, buf, seg, true) }},
		{"write zeroes", func() error { return snap.WriteZeroes(ctx, 0, seg, true) }},
		{"trim", func() error { return snap.Trim(ctx, 0, 2*seg) }},
	} {
		t.Run("read-only "+tc.name, func(t *testing.T) {
			if err := tc.fn(); !errors.Is(err, protocol.ErrReadOnly) {
				t.Errorf("got %v, want ErrReadOnly", err)
			}
			expect(t, snap, 0, data)
			expect(t, h, 0, data)
			if n := used(t, c); n != used0 {
				t.Errorf("used slots %d, want %d", n, used0)
			}
		})
	}
	checkClean(t, c)
}

func TestOutOfSpace(t *testing.T) {
	for _, tc := range []struct {
		name string
		free func(t *testing.T, c *standalone.Cluster, a *agent.Disk)
		// trimmed: free discarded disk a's segment 0.
		trimmed bool
	}{
		{"delete another disk", func(t *testing.T, c *standalone.Cluster, a *agent.Disk) {
			if err := c.Ctrl.DeleteDisk(context.Background(), "b"); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"trim a segment", func(t *testing.T, c *standalone.Cluster, a *agent.Disk) {
			if err := a.Trim(context.Background(), 0, seg); err != nil {
				t.Fatal(err)
			}
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			c := newCluster(t, standalone.PoolSpec{SlotSize: seg, Slots: 4, Count: 1})
			createDisk(t, c, "a", 8, table.Forward)
			createDisk(t, c, "b", 8, table.Forward)
			a := openDisk(t, c, 0, "a")
			b := openDisk(t, c, 1, "b")
			// Partial writes: each allocates one slot.
			const off = 1000
			pat := func(s int) []byte { return pattern(4096, byte(s+10)) }
			write(t, b, pat(9), off)
			for s := 0; s < 3; s++ {
				write(t, a, pat(s), uint64(s)*seg+off)
			}
			if n := used(t, c); n != 4 {
				t.Fatalf("used %d slots, want 4", n)
			}
			// The fifth segment does not fit.
			err := a.WriteAt(ctx, pat(3), 3*seg+off, false)
			if !errors.Is(err, protocol.ErrNoSpace) {
				t.Fatalf("write to a full pool: %v, want ErrNoSpace", err)
			}
			// So does a write through the other agent.
			if err := b.WriteAt(ctx, pat(3), 5*seg, false); !errors.Is(err, protocol.ErrNoSpace) {
				t.Fatalf("write to a full pool on the other agent: %v, want ErrNoSpace", err)
			}
			if n := used(t, c); n != 4 {
				t.Errorf("used %d slots after the failed writes, want 4", n)
			}
			checkClean(t, c)
			for s := 0; s < 3; s++ {
				expect(t, a, uint64(s)*seg+off, pat(s))
			}
			expect(t, b, off, pat(9))
			expect(t, a, 3*seg, make([]byte, seg))
			if u := usage(t, c, "a"); u.Allocated != 3*seg {
				t.Errorf("usage of a after the failed write: %+v", u)
			}
			// Overwriting an allocated segment still works.
			write(t, a, pat(5), off)
			write(t, a, pat(0), off)

			tc.free(t, c, a)
			write(t, a, pat(3), 3*seg+off)
			expect(t, a, 3*seg+off, pat(3))
			for s := 1; s < 3; s++ {
				expect(t, a, uint64(s)*seg+off, pat(s))
			}
			if tc.trimmed {
				expect(t, a, 0, make([]byte, seg))
				expect(t, b, off, pat(9))
			} else {
				expect(t, a, off, pat(0))
			}
			if n := used(t, c); n != 4 {
				t.Errorf("used %d slots at the end, want 4", n)
			}
			checkClean(t, c)
		})
	}
}

func TestSnapshotCopyOnWrite(t *testing.T) {
	for _, tc := range []struct {
		name   string
		policy table.Policy
		// whole overwrites all of segment 1, else a piece of it.
		whole bool
		// originMoves: the origin's entry moves to a new slot (else
		// the snapshot's does).
		originMoves bool
	}{
		{"forward partial", table.Forward, false, true},
		{"reverse partial", table.Reverse, false, false},
		// A whole-segment write needs no copy: the writer gets a fresh
		// slot whatever the policy.
		{"forward whole", table.Forward, true, true},
		{"reverse whole", table.Reverse, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			c := newCluster(t)
			createDisk(t, c, "o", 4, tc.policy)
			o := openDisk(t, c, 0, "o")
			o1 := openDisk(t, c, 1, "o")
			old := pattern(4*seg, 5)
			write(t, o, old, 0)
			if u, want := usage(t, c, "o"), (controller.Usage{Allocated: 4 * seg, Exclusive: 4 * seg}); u != want {
				t.Errorf("usage before snapshot: %+v, want %+v", u, want)
			}

			if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"o"}, Names: []string{"s"}}); err != nil {
				t.Fatal(err)
			}
			shared := controller.Usage{Allocated: 4 * seg, Shared: 4 * seg}
			for _, n := range []string{"o", "s"} {
				if u := usage(t, c, n); u != shared {
					t.Errorf("usage of %s after snapshot: %+v, want %+v", n, u, shared)
				}
			}
			if n := used(t, c); n != 4 {
				t.Errorf("used %d slots after snapshot, want 4", n)
			}
			checkClean(t, c)
			s := openDisk(t, c, 0, "s")
			s1 := openDisk(t, c, 1, "s")
			expect(t, s, 0, old)
			expect(t, s1, 0, old)
			var locs [4]table.Location
			for i := range locs {
				eo, es := entry(t, c, "o", uint64(i)), entry(t, c, "s", uint64(i))
				// The same entry, in a table page the two share: No-write
				// follows from the sharing, nothing is written into it.
				if eo != es || !eo.Mapped() {
					t.Fatalf("segment %d after snapshot: origin %v, snapshot %v; want the same entry", i, eo, es)
				}
				locs[i] = eo.Loc
			}

			// Overwrite (part of) segment 1 of the origin.
			now := append([]byte(nil), old...)
			var p []byte
			var off uint64
			if tc.whole {
				p, off = pattern(seg, 6), seg
			} else {
				p, off = pattern(4096, 6), seg+100
			}
			write(t, o, p, off)
			copy(now[off:], p)

			for _, d := range []*agent.Disk{s, s1} {
				expect(t, d, 0, old)
			}
			for _, d := range []*agent.Disk{o, o1} {
				expect(t, d, 0, now)
			}
			// A partial forward write copies only its sub-blocks: the
			// origin's partial entry reads the rest from the
			// snapshot's slot, which both then name.
			sub := tc.policy == table.Forward && !tc.whole
			cow := controller.Usage{Allocated: 4 * seg, Exclusive: seg, Shared: 3 * seg}
			for _, n := range []string{"o", "s"} {
				want := cow
				if sub && n == "s" {
					want = controller.Usage{Allocated: 4 * seg, Shared: 4 * seg}
				}
				if u := usage(t, c, n); u != want {
					t.Errorf("usage of %s after copy-on-write: %+v, want %+v", n, u, want)
				}
			}
			if e := entry(t, c, "o", 1); e.Partial() != sub {
				t.Errorf("origin's segment 1 is %v; partial: %v", e, sub)
			}
			if n := used(t, c); n != 5 {
				t.Errorf("used %d slots after copy-on-write, want 5", n)
			}
			checkClean(t, c)

			eo, es := entry(t, c, "o", 1), entry(t, c, "s", 1)
			if !eo.Mapped() || eo.Is(table.NoWrite) {
				t.Errorf("origin's segment 1 is %v, want mapped writable", eo)
			}
			if !es.Mapped() {
				t.Errorf("snapshot's segment 1 is %v, want mapped", es)
			}
			if eo.Loc == es.Loc {
				t.Errorf("origin and snapshot still share %v", eo.Loc)
			}
			if tc.originMoves {
				if es.Loc != locs[1] {
					t.Errorf("snapshot's segment 1 moved from %v to %v; the origin should have", locs[1], es.Loc)
				}
			} else if eo.Loc != locs[1] {
				t.Errorf("origin's segment 1 moved from %v to %v; the snapshot should have", locs[1], eo.Loc)
			}
			if r := refs(t, c, eo.Loc); r != 1 {
				t.Errorf("refs of the origin's slot %v: %d", eo.Loc, r)
			}
			if r, want := refs(t, c, es.Loc), map[bool]uint32{false: 1, true: 2}[sub]; r != want {
				t.Errorf("refs of the snapshot's slot %v: %d, want %d", es.Loc, r, want)
			}
			// The agents that read after the write hold what the store holds.
			for i, d := range []*agent.Disk{o, o1} {
				if e := agentEntry(t, c, i, d, 1); e.Loc != eo.Loc || !e.Mapped() {
					t.Errorf("agent %d: origin's segment 1 is %v, store has %v", i, e, eo)
				}
			}
			for i, d := range []*agent.Disk{s, s1} {
				if e := agentEntry(t, c, i, d, 1); e.Loc != es.Loc || !e.Mapped() {
					t.Errorf("agent %d: snapshot's segment 1 is %v, store has %v", i, e, es)
				}
			}
			// The other segments are still shared where they were: the
			// write gave the origin its own copy of the table page, so
			// their slots are now counted by two pages.
			for _, i := range []uint64{0, 2, 3} {
				for _, n := range []string{"o", "s"} {
					if e := entry(t, c, n, i); e.Loc != locs[i] || !e.Mapped() {
						t.Errorf("%s segment %d is %v, want it at %v", n, i, e, locs[i])
					}
				}
				if r := refs(t, c, locs[i]); r != 2 {
					t.Errorf("refs of shared slot %v: %d, want 2", locs[i], r)
				}
			}

			// A second write to the same segment copies nothing more.
			write(t, o, pattern(10, 7), seg+5000)
			copy(now[seg+5000:], pattern(10, 7))
			if e := entry(t, c, "o", 1); e.Loc != eo.Loc {
				t.Errorf("origin's segment 1 moved again: %v, was %v", e, eo)
			}
			if n := used(t, c); n != 5 {
				t.Errorf("used %d slots after a second write, want 5", n)
			}
			expect(t, o1, 0, now)
			expect(t, s1, 0, old)
			checkClean(t, c)
		})
	}
}

func TestDeleteFreesSpace(t *testing.T) {
	t.Run("unshared", func(t *testing.T) {
		ctx := context.Background()
		c := newCluster(t)
		createDisk(t, c, "keep", 2, table.Forward)
		keep := openDisk(t, c, 0, "keep")
		kdata := pattern(2*seg, 8)
		write(t, keep, kdata, 0)
		used0 := used(t, c)
		if used0 != 2 {
			t.Fatalf("used %d", used0)
		}

		createDisk(t, c, "x", 4, table.Forward)
		x := openDisk(t, c, 0, "x")
		xOther := openDisk(t, c, 1, "x")
		write(t, x, pattern(3*seg, 9), 0)
		if n := used(t, c); n != used0+3 {
			t.Fatalf("used %d after writing, want %d", n, used0+3)
		}
		var xlocs []table.Location
		for s := uint64(0); s < 3; s++ {
			xlocs = append(xlocs, entry(t, c, "x", s).Loc)
		}
		if err := c.Ctrl.DeleteDisk(ctx, "x"); err != nil {
			t.Fatal(err)
		}
		// Freed slots are punched at once, not only when reused.
		for _, loc := range xlocs {
			if got := readSlot(t, c, loc); !bytes.Equal(got, make([]byte, seg)) {
				t.Errorf("freed slot %v still holds data", loc)
			}
		}
		if n := used(t, c); n != used0 {
			t.Errorf("used %d after delete, want %d", n, used0)
		}
		if _, err := c.Ctrl.Disk(ctx, "x"); !errors.Is(err, protocol.ErrNotFound) {
			t.Errorf("deleted disk: %v, want ErrNotFound", err)
		}
		for _, h := range []*agent.Disk{x, xOther} {
			if err := h.ReadAt(ctx, make([]byte, 1), 0); !errors.Is(err, agent.ErrGone) {
				t.Errorf("read of a deleted disk: %v, want ErrGone", err)
			}
		}
		checkClean(t, c)
		expect(t, keep, 0, kdata)

		// The name is free again, and the new disk reads as zeros even
		// where it gets the freed slots back.
		createDisk(t, c, "x", 4, table.Forward)
		nx := openDisk(t, c, 1, "x")
		expect(t, nx, 0, make([]byte, 4*seg))
		for s := uint64(0); s < 4; s++ {
			write(t, nx, []byte{1}, s*seg)
		}
		want := make([]byte, 4*seg)
		for s := 0; s < 4; s++ {
			want[s*seg] = 1
		}
		expect(t, nx, 0, want)
		checkClean(t, c)
	})

	for _, pol := range []table.Policy{table.Forward, table.Reverse} {
		t.Run("origin of a snapshot "+pol.String(), func(t *testing.T) {
			ctx := context.Background()
			c := newCluster(t)
			createDisk(t, c, "o", 4, pol)
			o := openDisk(t, c, 0, "o")
			data := pattern(4*seg, 10)
			write(t, o, data, 0)
			if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"o"}, Names: []string{"s"}}); err != nil {
				t.Fatal(err)
			}
			s := openDisk(t, c, 1, "s")
			write(t, o, pattern(100, 11), 2*seg+7)
			if n := used(t, c); n != 5 {
				t.Fatalf("used %d, want 5", n)
			}
			if err := c.Ctrl.DeleteDisk(ctx, "o"); err != nil {
				t.Fatal(err)
			}
			if n := used(t, c); n != 4 {
				t.Errorf("used %d after deleting the origin, want 4", n)
			}
			checkClean(t, c)
			expect(t, s, 0, data)
			expect(t, openDisk(t, c, 0, "s"), 0, data)
			if u, want := usage(t, c, "s"), (controller.Usage{Allocated: 4 * seg, Exclusive: 4 * seg}); u != want {
				t.Errorf("usage of the snapshot: %+v, want %+v", u, want)
			}
			// Deleting the snapshot too frees everything.
			if err := c.Ctrl.DeleteDisk(ctx, "s"); err != nil {
				t.Fatal(err)
			}
			if n := used(t, c); n != 0 {
				t.Errorf("used %d after deleting both, want 0", n)
			}
			checkClean(t, c)
		})
	}
}

func TestRepairLeak(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	createDisk(t, c, "a", 4, table.Forward)
	h := openDisk(t, c, 0, "a")
	data := pattern(2*seg, 12)
	write(t, h, data, 0)
	checkClean(t, c)

	leak := table.Location{Container: 1, Slot: 10}
	if r := refs(t, c, leak); r != 0 {
		t.Fatalf("slot %v not free: %d", leak, r)
	}
	used0 := used(t, c)
	if err := c.Store.Update(ctx, func(tx *meta.Tx) error {
		_, err := meta.AddRefs(tx, leak, 1)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	ps, err := c.Ctrl.Check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) != 1 || ps[0].Kind != controller.Leaked || ps[0].Loc != leak {
		t.Fatalf("check: %v, want one leaked slot %v", ps, leak)
	}
	fixed, err := c.Ctrl.Repair(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(fixed) != 1 || fixed[0].Kind != controller.Leaked || fixed[0].Loc != leak {
		t.Errorf("repair: %v, want the leaked slot %v", fixed, leak)
	}
	checkClean(t, c)
	if r := refs(t, c, leak); r != 0 {
		t.Errorf("refs of the repaired slot: %d", r)
	}
	if n := used(t, c); n != used0 {
		t.Errorf("used %d after repair, want %d", n, used0)
	}
	expect(t, h, 0, data)
	// A second repair has nothing to do.
	if fixed, err := c.Ctrl.Repair(ctx); err != nil || len(fixed) != 0 {
		t.Errorf("second repair: %v, %v", fixed, err)
	}
}

// TestCheckFindsDamage damages the store by hand and checks that Check
// names the damage and that Repair leaves everything but leaks alone.
func TestCheckFindsDamage(t *testing.T) {
	type setup struct {
		a      meta.Disk
		l0     table.Location // a's and s's segment 0 (2 references)
		l1     table.Location // a's and s's segment 1 (2 references)
		lonely table.Location // a's segment 2 after the snapshot (1 reference)
	}
	for _, tc := range []struct {
		name   string
		damage func(tx *meta.Tx, s setup) error
		// want are the kinds Check reports, in its order; fixed the
		// kinds Repair reclaims.
		want  []controller.ProblemKind
		fixed []controller.ProblemKind
	}{
		{"wrong count on a shared slot", func(tx *meta.Tx, s setup) error {
			return tx.SetRefs(s.l0, 5)
		}, []controller.ProblemKind{controller.WrongCount}, nil},
		{"wrong count on an exclusive slot", func(tx *meta.Tx, s setup) error {
			return tx.SetRefs(s.lonely, 2)
		}, []controller.ProblemKind{controller.WrongCount}, nil},
		{"referenced free slot", func(tx *meta.Tx, s setup) error {
			return tx.SetRefs(s.l1, 0)
		}, []controller.ProblemKind{controller.ReferencedFree}, nil},
		{"entry out of range", func(tx *meta.Tx, s setup) error {
			return tx.SetEntries(s.a.ID, 3, []table.Entry{table.At(table.Location{Container: 1, Slot: 9999}, false)})
		}, []controller.ProblemKind{controller.OutOfRange}, nil},
		{"entry in a missing container", func(tx *meta.Tx, s setup) error {
			return tx.SetEntries(s.a.ID, 3, []table.Entry{table.At(table.Location{Container: 77, Slot: 0}, false)})
		}, []controller.ProblemKind{controller.OutOfRange}, nil},
		{"shared slot with count 1", func(tx *meta.Tx, s setup) error {
			return tx.SetRefs(s.l0, 1)
		}, []controller.ProblemKind{controller.SharedWritable}, nil},
		{"leak", func(tx *meta.Tx, s setup) error {
			_, err := meta.AddRefs(tx, table.Location{Container: 2, Slot: 20}, 1)
			return err
		}, []controller.ProblemKind{controller.Leaked}, []controller.ProblemKind{controller.Leaked}},
		{"leak and wrong count", func(tx *meta.Tx, s setup) error {
			if _, err := meta.AddRefs(tx, table.Location{Container: 2, Slot: 20}, 1); err != nil {
				return err
			}
			return tx.SetRefs(s.l0, 3)
		}, []controller.ProblemKind{controller.Leaked, controller.WrongCount}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			c := newCluster(t)
			a := createDisk(t, c, "a", 4, table.Forward)
			h := openDisk(t, c, 0, "a")
			write(t, h, pattern(2*seg, 13), 0)
			if _, err := c.Ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"a"}, Names: []string{"s"}}); err != nil {
				t.Fatal(err)
			}
			write(t, h, pattern(10, 14), 2*seg)
			checkClean(t, c)
			st := setup{a: a, l0: entry(t, c, "a", 0).Loc, l1: entry(t, c, "a", 1).Loc, lonely: entry(t, c, "a", 2).Loc}
			if r0, r1, r2 := refs(t, c, st.l0), refs(t, c, st.l1), refs(t, c, st.lonely); r0 != 2 || r1 != 2 || r2 != 1 {
				t.Fatalf("setup refs %d %d %d", r0, r1, r2)
			}

			if err := c.Store.Update(ctx, func(tx *meta.Tx) error { return tc.damage(tx, st) }); err != nil {
				t.Fatal(err)
			}
			ps, err := c.Ctrl.Check(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if got := kinds(ps); !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("check: %v, want kinds %v", ps, tc.want)
			}
			beforeRepair := stateOf(t, c)

			// Repair reclaims leaks only when nothing else is wrong,
			// and otherwise refuses, changing nothing.
			fixed, err := c.Ctrl.Repair(ctx)
			if refuse := tc.fixed == nil; refuse != errors.Is(err, controller.ErrRepairRefused) || !refuse && err != nil {
				t.Fatalf("repair: %v (refusal wanted: %v)", err, refuse)
			}
			if got := kinds(fixed); !reflect.DeepEqual(got, tc.fixed) {
				t.Errorf("repair fixed %v, want kinds %v", fixed, tc.fixed)
			}
			after, err := c.Ctrl.Check(ctx)
			if err != nil {
				t.Fatal(err)
			}
			remain := ps
			if tc.fixed != nil {
				remain = nil
			}
			if !reflect.DeepEqual(after, remain) {
				t.Errorf("after repair: %v, want %v", after, remain)
			}
			if tc.fixed == nil {
				if s := stateOf(t, c); !reflect.DeepEqual(s, beforeRepair) {
					t.Errorf("repair changed the store:\nbefore %+v\nafter  %+v", beforeRepair, s)
				}
			}
		})
	}
}

func kinds(ps []controller.Problem) []controller.ProblemKind {
	var out []controller.ProblemKind
	for _, p := range ps {
		out = append(out, p.Kind)
	}
	return out
}

// TestHold: state changes wait for the hold a restarted controller places
// (one agent lease), reads do not.
func TestHold(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	const hold = 300 * time.Millisecond
	registerGone(t, c)
	start := time.Now()
	if err := c.Ctrl.Hold(hold); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctrl.Disks(ctx); err != nil {
		t.Fatal(err)
	}
	if time.Since(start) >= hold {
		t.Errorf("a read waited for the hold")
	}
	if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "held", Size: seg, SegmentSize: seg}); err != nil {
		t.Fatal(err)
	}
	if time.Since(start) < hold {
		t.Errorf("CreateDisk did not wait for the hold")
	}
}

// TestHoldFaults: during a hold, a read fault is answered at once; a write
// fault waits for the hold, even one that would only load a writable entry.
func TestHoldFaults(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "d", Size: 4 * seg, SegmentSize: seg}); err != nil {
		t.Fatal(err)
	}
	a := c.Agents[0]
	d, err := a.Open(ctx, "d")
	if err != nil {
		t.Fatal(err)
	}
	if err := d.WriteAt(ctx, []byte("x"), 0, false); err != nil {
		t.Fatal(err)
	}
	const hold = 300 * time.Millisecond
	registerGone(t, c)
	start := time.Now()
	if err := c.Ctrl.Hold(hold); err != nil {
		t.Fatal(err)
	}
	id := d.Info().ID
	for _, seg := range []uint64{0, 1} { // allocated, Zero
		if _, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: a.Name(), Disk: id, Segment: seg, Op: protocol.FaultRead}); err != nil {
			t.Fatal(err)
		}
	}
	if time.Since(start) >= hold {
		t.Errorf("read faults waited for the hold")
	}
	var wg sync.WaitGroup
	for _, seg := range []uint64{0, 1} { // a writable entry to load; an allocation
		wg.Go(func() {
			if _, err := c.Ctrl.Fault(ctx, protocol.Fault{Agent: a.Name(), Disk: id, Segment: seg, Op: protocol.FaultWrite}); err != nil {
				t.Error(err)
			}
			if time.Since(start) < hold {
				t.Errorf("write fault on segment %d did not wait for the hold", seg)
			}
		})
	}
	wg.Wait()
}

// registerGone adds an agent "gone", which never attaches, to the agent
// registry: a hold then lasts its full time.
func registerGone(t *testing.T, c *standalone.Cluster) {
	t.Helper()
	err := c.Store.Update(t.Context(), func(tx *meta.Tx) error {
		reg, err := tx.Agents()
		if err != nil {
			return err
		}
		return tx.SetAgents(append(reg, "gone"))
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestHoldEndsEarly: a hold ends as soon as every registered agent has
// attached (each has fenced itself first), and does not wait for the
// registry at all when every registered agent is attached already; after
// a full hold the registry is cut down to the agents attached.
func TestHoldEndsEarly(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t)
	// Every registered agent is attached: no wait.
	start := time.Now()
	if err := c.Ctrl.Hold(time.Hour); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "a", Size: seg, SegmentSize: seg}); err != nil {
		t.Fatal(err)
	}
	if time.Since(start) > 10*time.Second {
		t.Fatalf("hold lasted %v with every registered agent attached", time.Since(start))
	}
	// "gone" is registered and not attached: the hold waits for it,
	// and ends when it attaches.
	registerGone(t, c)
	if err := c.Ctrl.Hold(time.Hour); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "b", Size: seg, SegmentSize: seg})
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("CreateDisk during the hold returned %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	ag := agent.New(agent.Config{Name: "gone", Controller: c.Ctrl, OpenContainer: container.OpenURI})
	if err := ag.Attach(ctx, c.Ctrl); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the hold did not end when the last registered agent attached")
	}
	// A full hold cuts the registry down to the attached agents.
	if err := c.Ctrl.Detach(ctx, "gone"); err != nil {
		t.Fatal(err)
	}
	if err := c.Ctrl.Hold(50 * time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "c", Size: seg, SegmentSize: seg}); err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, a := range c.Agents {
		want = append(want, a.Name())
	}
	slices.Sort(want)
	if err := c.Store.View(ctx, func(tx *meta.Tx) error {
		reg, err := tx.Agents()
		if err != nil || !slices.Equal(reg, want) {
			t.Errorf("registry after a full hold: %v, %v; want %v", reg, err, want)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// TestFreeSlotsZeroedAfterRestart: a slot freed in the store whose punch
// was lost (a crash between the commit and the punch) holds its old data;
// allocation does not punch slots one by one any more, so a restarted
// controller zeroes every free slot of a container before its first
// allocation from it, and a new disk reads zeros.
func TestFreeSlotsZeroedAfterRestart(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, standalone.PoolSpec{SlotSize: seg, Slots: 4, Count: 1})
	createDisk(t, c, "a", 1, table.Forward)
	h := openDisk(t, c, 0, "a")
	write(t, h, pattern(seg, 21), 0)
	e := entry(t, c, "a", 0)
	// The crash: entry and count dropped, the slot not punched.
	if err := c.Store.Update(ctx, func(tx *meta.Tx) error {
		if err := tx.SetEntries(meta.DiskID(h.Info().ID), 0, []table.Entry{table.ZeroEntry}); err != nil {
			return err
		}
		return tx.SetRefs(e.Loc, 0)
	}); err != nil {
		t.Fatal(err)
	}
	if err := c.RestartController(ctx); err != nil {
		t.Fatal(err)
	}
	checkClean(t, c)
	// Every slot of the one container gets handed out: the old one too.
	for i := range 4 {
		name := fmt.Sprintf("n%d", i)
		createDisk(t, c, name, 1, table.Forward)
		d := openDisk(t, c, 1, name)
		write(t, d, []byte("x"), 0)
		expect(t, d, 0, append([]byte("x"), make([]byte, seg-1)...))
	}
}

// TestPreallocate: a preallocated disk maps every segment at creation,
// reads as zeros, takes writes without allocating, and one that does not
// fit is refused and leaves nothing behind.
func TestPreallocate(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, standalone.PoolSpec{SlotSize: seg, Slots: 40, Count: 1})
	// Dirty a slot and free it, so that preallocation must not expose it.
	createDisk(t, c, "old", 1, table.Forward)
	write(t, openDisk(t, c, 0, "old"), pattern(seg, 5), 0)
	if err := c.Ctrl.DeleteDisk(ctx, "old"); err != nil {
		t.Fatal(err)
	}
	var calls [][2]uint64
	d, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "p", Size: 30 * seg, SegmentSize: seg, Preallocate: true,
		Progress: func(done, total uint64) { calls = append(calls, [2]uint64{done, total}) }})
	if err != nil {
		t.Fatal(err)
	}
	if want := [][2]uint64{{0, 30}, {30, 30}}; !slices.Equal(calls, want) {
		t.Errorf("progress of a preallocation in one transaction: %v, want %v", calls, want)
	}
	if u := usage(t, c, "p"); u.Allocated != 30*seg {
		t.Errorf("preallocated disk: allocated %d, want %d", u.Allocated, 30*seg)
	}
	h := openDisk(t, c, 0, "p")
	expect(t, h, 0, make([]byte, 30*seg))
	before := used(t, c)
	write(t, h, pattern(3*seg, 6), 5*seg+7)
	if n := used(t, c); n != before {
		t.Errorf("writes to a preallocated disk allocated %d slots", n-before)
	}
	checkClean(t, c)
	// 11 more segments do not fit in the 10 slots left.
	if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "big", Size: 11 * seg, SegmentSize: seg, Preallocate: true}); !errors.Is(err, protocol.ErrNoSpace) {
		t.Errorf("preallocating past the pool: %v, want ErrNoSpace", err)
	}
	if _, err := c.Ctrl.Disk(ctx, "big"); !errors.Is(err, protocol.ErrNotFound) {
		t.Errorf("the disk that did not fit: %v, want it gone", err)
	}
	if n := used(t, c); n != 30 {
		t.Errorf("%d slots used after the failed preallocation, want 30", n)
	}
	checkClean(t, c)
	_ = d
}

// TestPreallocateProgress: a preallocation of several transactions
// reports the segments mapped after each, up to the disk's.
func TestPreallocateProgress(t *testing.T) {
	const segs = controller.PreallocateChunk*2 + 100
	c := newCluster(t, standalone.PoolSpec{SlotSize: controller.MinSegmentSize, Slots: segs, Count: 1})
	var calls [][2]uint64
	_, err := c.Ctrl.CreateDisk(context.Background(), controller.CreateOptions{Name: "p", Size: segs * controller.MinSegmentSize, SegmentSize: controller.MinSegmentSize, Preallocate: true,
		Progress: func(done, total uint64) { calls = append(calls, [2]uint64{done, total}) }})
	if err != nil {
		t.Fatal(err)
	}
	want := [][2]uint64{{0, segs}, {controller.PreallocateChunk, segs}, {2 * controller.PreallocateChunk, segs}, {segs, segs}}
	if !slices.Equal(calls, want) {
		t.Errorf("progress %v, want %v", calls, want)
	}
}
