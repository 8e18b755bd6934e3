package transport_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	pb "segmap/api/segmapv1"
	"segmap/internal/agent"
	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/heldport"
	"segmap/internal/leaktest"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/rpc/transport"
	"segmap/internal/table"
)

// segSize is the segment (and slot) size of every disk in these tests.
const segSize = 64 << 10

var quiet = slog.New(slog.DiscardHandler)

// ---- leak checks -------------------------------------------------------------

// ours are the goroutines the leak checks count: those running segmap
// code, or gRPC's.
var ours = leaktest.Matching("segmap/internal/", "google.golang.org/grpc")

// TestMain fails the package if goroutines running segmap code are still
// alive a few seconds after the last test or benchmark.
func TestMain(m *testing.M) { leaktest.VerifyTestMain(m, ours) }

// checkGoroutines fails t if, after its cleanups, goroutines running segmap
// code are left. Call it first, so that its cleanup runs last.
func checkGoroutines(t *testing.T) {
	t.Helper()
	leaktest.Check(t, ours)
}

// ---- an in-process controller, served over loopback gRPC ---------------------

type stackOptions struct {
	// lease and commandTimeout configure the transport.Server.
	lease, commandTimeout time.Duration
	// containers files of slots slots each make the pool.
	containers int
	slots      uint64
	// unary, if set, intercepts the server's unary calls.
	unary grpc.UnaryServerInterceptor
}

// stack is a controller over bbolt in a temporary directory, served by a
// transport.Server on 127.0.0.1. Its store passes through gate, so that a test
// can hold chosen store calls (and with them the controller).
type stack struct {
	t    testing.TB
	opts stackOptions
	dir  string
	gate *gate

	bolt   *meta.Bolt
	ctrl   *controller.Controller
	epoch  uint64
	port   *heldport.Port
	addr   string
	srv    *transport.Server
	gs     *grpc.Server
	served chan error
}

func newStack(t testing.TB, o stackOptions) *stack {
	t.Helper()
	if o.lease == 0 {
		o.lease = 600 * time.Millisecond
	}
	if o.commandTimeout == 0 {
		// Longer than the lease: a command to an agent that stops
		// renewing ends with its lease, not with this.
		o.commandTimeout = 10 * time.Second
	}
	if o.containers == 0 {
		o.containers = 2
	}
	if o.slots == 0 {
		o.slots = 256
	}
	s := &stack{t: t, opts: o, dir: t.TempDir(), gate: &gate{}}
	t.Cleanup(s.shutdown)
	s.startController()
	ctx := context.Background()
	for i := 1; i <= o.containers; i++ {
		path := filepath.Join(s.dir, fmt.Sprintf("c%d", i))
		if err := container.CreateFile(path, uint32(i), segSize, o.slots); err != nil {
			t.Fatal(err)
		}
		if _, err := s.ctrl.AddContainer(ctx, container.FileURI(path)); err != nil {
			t.Fatal(err)
		}
	}
	s.serve()
	return s
}

// startController opens the store and starts a controller with a new epoch.
func (s *stack) startController() {
	s.t.Helper()
	b, err := meta.OpenBolt(filepath.Join(s.dir, "meta.db"))
	if err != nil {
		s.t.Fatal(err)
	}
	s.bolt = b
	s.ctrl = controller.New(controller.Config{Store: gatedStore{b, s.gate}, OpenContainer: container.OpenURI, Logger: quiet})
	if s.epoch, err = s.ctrl.NewEpoch(context.Background()); err != nil {
		s.t.Fatal(err)
	}
}

// serve serves the mapping protocol for s.ctrl on the stack's port, the
// same for every serve: the test holds it, so that a restarted server
// comes back on the address its agents know and nobody can take the
// port while it is down (it refuses connections then).
func (s *stack) serve() {
	s.t.Helper()
	if s.port == nil {
		s.port = heldport.New(s.t)
		s.addr = s.port.Addr()
	}
	f, err := s.port.File()
	if err != nil {
		s.t.Fatal(err)
	}
	l, err := net.FileListener(f)
	f.Close()
	if err != nil {
		s.t.Fatal(err)
	}
	opts := []grpc.ServerOption{grpc.WaitForHandlers(true)}
	if s.opts.unary != nil {
		opts = append(opts, grpc.UnaryInterceptor(s.opts.unary))
	}
	s.gs = grpc.NewServer(opts...)
	s.srv = transport.NewServer(transport.ServerConfig{
		Ctrl: s.ctrl, Epoch: s.epoch, Lease: s.opts.lease, CommandTimeout: s.opts.commandTimeout, Logger: quiet,
	})
	pb.RegisterMappingServer(s.gs, s.srv)
	served := make(chan error, 1)
	gs := s.gs
	go func() { served <- gs.Serve(l) }()
	s.served = served
}

// stopServer stops serving: every stream and connection ends.
func (s *stack) stopServer() {
	if s.gs == nil {
		return
	}
	s.srv.Close()
	s.gs.Stop()
	<-s.served
	s.gs = nil
	s.port.Refuse()
}

// stopController stops the server, the controller and the store, as a
// controller process that exits would.
func (s *stack) stopController() {
	s.stopServer()
	if s.ctrl != nil {
		s.ctrl.Close()
		s.bolt.Close()
		s.ctrl = nil
	}
}

func (s *stack) shutdown() {
	s.gate.open()
	s.stopController()
}

func (s *stack) createDisk(ctx context.Context, name string, segments uint64) meta.Disk {
	s.t.Helper()
	d, err := s.ctrl.CreateDisk(ctx, controller.CreateOptions{Name: name, Size: segments * segSize, SegmentSize: segSize})
	if err != nil {
		s.t.Fatal(err)
	}
	return d
}

// usedSlots returns how many slots the pool has handed out.
func (s *stack) usedSlots(ctx context.Context) uint64 {
	s.t.Helper()
	cs, err := s.ctrl.ListContainers(ctx)
	if err != nil {
		s.t.Fatal(err)
	}
	var n uint64
	for _, c := range cs {
		n += c.Used
	}
	return n
}

// checkClean fails the test if the store breaks an invariant.
func (s *stack) checkClean(ctx context.Context) {
	s.t.Helper()
	ps, err := s.ctrl.Check(ctx)
	if err != nil {
		s.t.Fatal(err)
	}
	for _, p := range ps {
		s.t.Errorf("check: %v", p)
	}
}

// ---- remote agents -------------------------------------------------------------

// node is a mapping agent connected to the controller over gRPC and kept
// attached by transport.RunAgent.
type node struct {
	t        testing.TB
	name     string
	conn     *grpc.ClientConn
	client   *transport.Client
	agent    *agent.Agent
	attaches atomic.Int64
	attached chan struct{} // a token after each attach
	stop     context.CancelFunc
	done     chan struct{}
}

func dial(t testing.TB, target string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(target, append(transport.DialOptions(), grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		t.Fatal(err)
	}
	return conn
}

// startAgent starts agent name talking to the controller at target (the
// server's address, or a proxy's) and waits for its first attach.
func (s *stack) startAgent(name, target string) *node {
	s.t.Helper()
	n := &node{t: s.t, name: name, attached: make(chan struct{}, 1), done: make(chan struct{})}
	n.conn = dial(s.t, target)
	n.client = transport.NewClient(n.conn, quiet)
	n.agent = agent.New(agent.Config{Name: name, Controller: n.client, OpenContainer: container.OpenURI})
	ctx, cancel := context.WithCancel(context.Background())
	n.stop = cancel
	go func() {
		defer close(n.done)
		transport.RunAgent(ctx, n.agent, n.client, quiet, func() {
			n.attaches.Add(1)
			select {
			case n.attached <- struct{}{}:
			default:
			}
		})
	}()
	s.t.Cleanup(n.close)
	if !n.waitAttaches(1, 10*time.Second) {
		s.t.Fatalf("agent %s did not attach", name)
	}
	return n
}

// waitAttaches waits until the agent has attached k times in all, and
// reports whether it has.
func (n *node) waitAttaches(k int64, within time.Duration) bool {
	timer := time.NewTimer(within)
	defer timer.Stop()
	for n.attaches.Load() < k {
		select {
		case <-n.attached:
		case <-timer.C:
			return n.attaches.Load() >= k
		}
	}
	return true
}

func (n *node) close() {
	n.stop()
	<-n.done
	if err := n.agent.Close(); err != nil {
		n.t.Errorf("close agent %s: %v", n.name, err)
	}
	n.conn.Close()
}

func (n *node) open(ctx context.Context, disk string) *agent.Disk {
	n.t.Helper()
	d, err := n.agent.Open(ctx, disk)
	if err != nil {
		n.t.Fatalf("agent %s: open %s: %v", n.name, disk, err)
	}
	return d
}

// ---- a TCP proxy that can hold its traffic ---------------------------------------

// proxy forwards TCP connections to target. hold stops the forwarding
// without closing anything (the peers see a network that went silent);
// resume forwards what was held, in order; cut closes every connection.
type proxy struct {
	l      net.Listener
	target string
	wg     sync.WaitGroup
	mu     struct {
		sync.Mutex
		held    bool
		release chan struct{}
		closed  bool
		conns   map[net.Conn]bool
	}
}

func newProxy(t testing.TB, target string) *proxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{l: l, target: target}
	p.mu.conns = map[net.Conn]bool{}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *proxy) addr() string { return p.l.Addr().String() }

func (p *proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.l.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		if p.mu.closed {
			p.mu.Unlock()
			c.Close()
			u.Close()
			return
		}
		p.mu.conns[c], p.mu.conns[u] = true, true
		p.wg.Add(2)
		p.mu.Unlock()
		go p.pump(u, c)
		go p.pump(c, u)
	}
}

func (p *proxy) pump(dst, src net.Conn) {
	defer p.wg.Done()
	defer func() {
		src.Close()
		dst.Close()
		p.mu.Lock()
		delete(p.mu.conns, src)
		delete(p.mu.conns, dst)
		p.mu.Unlock()
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if !p.pass() {
				return
			}
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// pass waits while the proxy holds its traffic; false once it is closed.
func (p *proxy) pass() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.mu.held && !p.mu.closed {
		ch := p.mu.release
		p.mu.Unlock()
		<-ch
		p.mu.Lock()
	}
	return !p.mu.closed
}

func (p *proxy) hold() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.mu.held {
		p.mu.held = true
		p.mu.release = make(chan struct{})
	}
}

func (p *proxy) resume() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.held {
		p.mu.held = false
		close(p.mu.release)
	}
}

// cut closes every connection (new ones are accepted).
func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.mu.conns {
		c.Close()
	}
}

func (p *proxy) close() {
	p.mu.Lock()
	p.mu.closed = true
	if p.mu.held {
		p.mu.held = false
		close(p.mu.release)
	}
	for c := range p.mu.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.l.Close()
	p.wg.Wait()
}

// ---- a store whose calls can be held ---------------------------------------------

// gate holds the store calls that match, until open.
type gate struct {
	mu      sync.Mutex
	match   func(ctx context.Context, update bool) bool
	entered chan struct{}
	release chan struct{}
}

// arm makes the store calls that match wait until open; the channel gets
// a token when one does.
func (g *gate) arm(match func(ctx context.Context, update bool) bool) <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.match = match
	g.entered = make(chan struct{}, 1)
	g.release = make(chan struct{})
	return g.entered
}

func (g *gate) open() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.match != nil {
		g.match = nil
		close(g.release)
	}
}

func (g *gate) pass(ctx context.Context, update bool) {
	g.mu.Lock()
	match, entered, release := g.match, g.entered, g.release
	g.mu.Unlock()
	if match == nil || !match(ctx, update) {
		return
	}
	select {
	case entered <- struct{}{}:
	default:
	}
	<-release
}

type gatedStore struct {
	meta.Store
	g *gate
}

func (s gatedStore) View(ctx context.Context, fn func(*meta.Tx) error) error {
	s.g.pass(ctx, false)
	return s.Store.View(ctx, fn)
}

func (s gatedStore) Update(ctx context.Context, fn func(*meta.Tx) error) error {
	s.g.pass(ctx, true)
	return s.Store.Update(ctx, fn)
}

// inAttach matches the store calls made for an agent's Attach stream.
func inAttach(ctx context.Context, _ bool) bool {
	m, ok := grpc.Method(ctx)
	return ok && m == pb.Mapping_Attach_FullMethodName
}

// ---- data helpers -------------------------------------------------------------------

func randBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(r.Uint32())
	}
	return p
}

// image is what a disk must read as.
type image []byte

func (m image) write(off uint64, p []byte) { copy(m[off:], p) }

func write(t testing.TB, ctx context.Context, d *agent.Disk, m image, off uint64, p []byte) {
	t.Helper()
	if err := d.WriteAt(ctx, p, off, false); err != nil {
		t.Fatalf("write [%d,+%d): %v", off, len(p), err)
	}
	if m != nil {
		m.write(off, p)
	}
}

// expect checks that [off, off+n) of d reads as want does there.
func expect(t testing.TB, ctx context.Context, who string, d *agent.Disk, want image, off, n uint64) {
	t.Helper()
	got := make([]byte, n)
	if err := d.ReadAt(ctx, got, off); err != nil {
		t.Fatalf("%s: read [%d,+%d): %v", who, off, n, err)
	}
	if i := firstDiff(got, want[off:off+n]); i >= 0 {
		seg := (off + uint64(i)) / segSize
		t.Fatalf("%s: byte %d (segment %d) reads %#x, want %#x", who, off+uint64(i), seg, got[i], want[off+uint64(i)])
	}
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return len(a)
}

// code returns the protocol code a gRPC error carries, or -1.
func code(err error) pb.Code {
	st, ok := status.FromError(err)
	if !ok || int(st.Code()) < 1000 {
		return -1
	}
	return pb.Code(int(st.Code()) - 1000)
}

func wantCode(t testing.TB, what string, err error, want pb.Code) {
	t.Helper()
	if got := code(err); got != want {
		t.Errorf("%s: got %v (code %v), want code %v", what, err, got, want)
	}
}

func testContext(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// ---- two agents, one disk ----------------------------------------------------------

// TestTwoAgentsOneDisk: what one agent writes, the other reads, before and
// after a snapshot, through every kind of fault (load, allocate, clear
// NoWrite, copy-on-write, staged whole-segment write); the snapshot keeps
// what the disk held when it was taken; the store stays sound.
func TestTwoAgentsOneDisk(t *testing.T) {
	checkGoroutines(t)
	ctx := testContext(t, time.Minute)
	s := newStack(t, stackOptions{})
	a := s.startAgent("a", s.addr)
	b := s.startAgent("b", s.addr)
	const segs = 8
	s.createDisk(ctx, "d", segs)
	da, db := a.open(ctx, "d"), b.open(ctx, "d")
	m := make(image, segs*segSize)

	// b loads Zero entries first: a's writes must move it off them.
	expect(t, ctx, "b before any write", db, m, 0, segs*segSize)
	write(t, ctx, da, m, 100, randBytes(1, 5000))                  // partial, segment 0
	write(t, ctx, da, m, segSize, randBytes(2, segSize))           // whole segment 1
	write(t, ctx, da, m, 3*segSize-512, randBytes(3, 2*512+4096))  // straddles 2 and 3
	write(t, ctx, db, m, 5*segSize+segSize/2, randBytes(4, 10000)) // b writes too
	expect(t, ctx, "a", da, m, 0, segs*segSize)
	expect(t, ctx, "b", db, m, 0, segs*segSize)
	if got := s.usedSlots(ctx); got != 5 {
		t.Errorf("%d slots used, want 5 (segments 0, 1, 2, 3, 5)", got)
	}

	snaps, err := s.ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"d@1"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 1 || !snaps[0].ReadOnly {
		t.Fatalf("snapshot: %+v", snaps)
	}
	old := slices.Clone(m)

	// After the snapshot every write to a shared segment is copied on
	// write; the other agent must see the new data at once.
	write(t, ctx, da, m, 200, randBytes(5, 3000))                 // copy forward, segment 0
	write(t, ctx, db, m, segSize, randBytes(6, segSize))          // staged whole write, segment 1
	write(t, ctx, db, m, 3*segSize+7, randBytes(7, 100))          // copy forward, segment 3, by b
	write(t, ctx, da, m, 6*segSize, randBytes(8, 4096))           // allocate, segment 6
	write(t, ctx, da, m, 5*segSize+segSize/2, randBytes(9, 1000)) // copy forward of b's segment, by a
	expect(t, ctx, "a after snapshot", da, m, 0, segs*segSize)
	expect(t, ctx, "b after snapshot", db, m, 0, segs*segSize)
	// A second write to a segment that is now exclusive needs no fault.
	write(t, ctx, db, m, 20, randBytes(10, 20))
	expect(t, ctx, "a", da, m, 0, segSize)

	sa, sb := a.open(ctx, "d@1"), b.open(ctx, "d@1")
	expect(t, ctx, "snapshot via a", sa, old, 0, segs*segSize)
	expect(t, ctx, "snapshot via b", sb, old, 0, segs*segSize)
	if err := sa.WriteAt(ctx, []byte{1}, 0, false); !errors.Is(err, protocol.ErrReadOnly) {
		t.Errorf("write to the snapshot: %v, want ErrReadOnly", err)
	}

	// Once the snapshot is gone, the segments it shared are the disk's
	// alone: a write to one the agent holds NoWrite faults and gets the
	// entry writable (loaded: No-write was derived from the sharing, not
	// stored), without copying.
	if err := s.ctrl.DeleteDisk(ctx, "d@1"); err != nil {
		t.Fatal(err)
	}
	if err := sb.ReadAt(ctx, make([]byte, 1), 0); err == nil {
		t.Error("an agent read a deleted snapshot")
	}
	before := s.usedSlots(ctx)
	write(t, ctx, da, m, 2*segSize+1, randBytes(11, 10))
	if got := s.usedSlots(ctx); got != before {
		t.Errorf("a write to an exclusive NoWrite segment used %d slots, want none", got-before)
	}
	expect(t, ctx, "b after the snapshot was deleted", db, m, 0, segs*segSize)

	counts := s.ctrl.FaultCounts()
	for _, p := range []table.Plan{table.Load, table.Allocate, table.CopySub, table.MoveForward} {
		if counts[p] == 0 {
			t.Errorf("no fault resolved by %v: %v", p, counts)
		}
	}
	s.checkClean(ctx)
}

// ---- fault request ids -----------------------------------------------------------

// TestFaultRequestID: a fault sent twice with one request id (its answer
// was lost) is answered the second time from memory, not applied again.
func TestFaultRequestID(t *testing.T) {
	checkGoroutines(t)
	ctx := testContext(t, time.Minute)
	s := newStack(t, stackOptions{})
	a := s.startAgent("a", s.addr)
	disk := s.createDisk(ctx, "d", 4)
	da := a.open(ctx, "d") // the controller now counts "a" as mapping d

	conn := dial(t, s.addr)
	defer conn.Close()
	c := pb.NewMappingClient(conn)
	// Request ids far from the ones the agent's own client uses.
	req := &pb.FaultRequest{
		Agent: "a", RequestId: 1 << 62, Epoch: s.epoch, Disk: uint64(disk.ID), Segment: 2, Count: 1,
		Op: uint32(protocol.FaultWrite), Reason: uint32(table.Zero),
	}
	r1, err := c.Fault(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if len(r1.GetEntries()) != 1 || r1.GetFirst() != 2 || r1.GetEntries()[0].GetState() != 0 {
		t.Fatalf("allocate: got %v, want one writable entry for segment 2", r1)
	}
	r2, err := c.Fault(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(r1, r2) {
		t.Errorf("the retried fault was answered %v, the first %v", r2, r1)
	}
	if got := s.usedSlots(ctx); got != 1 {
		t.Errorf("%d slots used after one allocation sent twice, want 1", got)
	}
	if n := s.ctrl.FaultCounts()[table.Allocate]; n != 1 {
		t.Errorf("the controller resolved %d allocations, want 1", n)
	}

	// A new request id is a new fault: resolved again (now a load of the
	// slot the first one allocated).
	req3 := proto.Clone(req).(*pb.FaultRequest)
	req3.RequestId++
	r3, err := c.Fault(ctx, req3)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(r3.GetEntries()[0], r1.GetEntries()[0]) {
		t.Errorf("a new fault on the allocated segment got %v, want %v", r3, r1)
	}
	if got := s.usedSlots(ctx); got != 1 {
		t.Errorf("%d slots used, want 1", got)
	}
	req4 := proto.Clone(req).(*pb.FaultRequest)
	req4.RequestId += 2
	req4.Segment = 3
	if _, err := c.Fault(ctx, req4); err != nil {
		t.Fatal(err)
	}
	if got := s.usedSlots(ctx); got != 2 {
		t.Errorf("%d slots used after a second allocation, want 2", got)
	}

	// The agent writes into the slot the faults mapped.
	m := make(image, 4*segSize)
	write(t, ctx, da, m, 2*segSize+10, randBytes(1, 1000))
	expect(t, ctx, "a", da, m, 0, 4*segSize)
	if got := s.usedSlots(ctx); got != 2 {
		t.Errorf("%d slots used after the agent's write, want 2", got)
	}
	s.checkClean(ctx)
}

// ---- epochs -----------------------------------------------------------------------

// TestFaultEpoch: a fault stamped with another epoch than the controller's,
// or from an agent that is not attached, is refused with FENCED.
func TestFaultEpoch(t *testing.T) {
	checkGoroutines(t)
	ctx := testContext(t, time.Minute)
	s := newStack(t, stackOptions{})
	a := s.startAgent("a", s.addr)
	disk := s.createDisk(ctx, "d", 4)
	a.open(ctx, "d")
	conn := dial(t, s.addr)
	defer conn.Close()
	c := pb.NewMappingClient(conn)
	base := &pb.FaultRequest{
		Agent: "a", RequestId: 1 << 62, Epoch: s.epoch, Disk: uint64(disk.ID), Segment: 0, Count: 1,
		Op: uint32(protocol.FaultRead), Reason: uint32(table.Invalid),
	}
	for _, tc := range []struct {
		name string
		edit func(*pb.FaultRequest)
	}{
		{"older epoch", func(r *pb.FaultRequest) { r.Epoch = s.epoch - 1 }},
		{"newer epoch", func(r *pb.FaultRequest) { r.Epoch = s.epoch + 1 }},
		{"no epoch", func(r *pb.FaultRequest) { r.Epoch = 0 }},
		{"agent not attached", func(r *pb.FaultRequest) { r.Agent = "ghost" }},
	} {
		r := proto.Clone(base).(*pb.FaultRequest)
		r.RequestId++
		tc.edit(r)
		_, err := c.Fault(ctx, r)
		wantCode(t, tc.name, err, pb.Code_CODE_FENCED)
	}
	// The same fault with the right epoch is answered.
	if _, err := c.Fault(ctx, base); err != nil {
		t.Fatalf("fault with the controller's epoch: %v", err)
	}
}

// fakeController is the controller end of the protocol, driven by the test:
// each Attach stream is handed to the test, which plays the controller.
type fakeController struct {
	pb.UnimplementedMappingServer
	disk    *pb.MappedDisk
	streams chan pb.Mapping_AttachServer
	release chan struct{}
}

func (f *fakeController) Attach(st pb.Mapping_AttachServer) error {
	select {
	case f.streams <- st:
	case <-st.Context().Done():
		return nil
	}
	select {
	case <-f.release:
	case <-st.Context().Done():
	}
	return nil
}

func (f *fakeController) Open(ctx context.Context, r *pb.OpenRequest) (*pb.MappedDisk, error) {
	if r.GetDisk() != f.disk.GetName() {
		return nil, status.Error(codes.Code(1000+int(pb.Code_CODE_NOT_FOUND)), "no such disk")
	}
	return f.disk, nil
}

// fakeSession is an agent attached to a fakeController.
type fakeSession struct {
	t      *testing.T
	st     pb.Mapping_AttachServer
	epoch  uint64
	agent  *agent.Agent
	nextID uint64
}

// newFakeSession starts a fake controller and an agent attached to it
// under epoch, with disk "d" (id 7, 4 segments) open.
func newFakeSession(t *testing.T, epoch uint64) *fakeSession {
	t.Helper()
	ctx := testContext(t, time.Minute)
	f := &fakeController{
		disk:    &pb.MappedDisk{Id: 7, Name: "d", Size: 4 * segSize, SegmentSize: segSize},
		streams: make(chan pb.Mapping_AttachServer),
		release: make(chan struct{}),
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.WaitForHandlers(true))
	pb.RegisterMappingServer(gs, f)
	served := make(chan struct{})
	go func() { defer close(served); gs.Serve(l) }()
	conn := dial(t, l.Addr().String())
	client := transport.NewClient(conn, quiet)
	a := agent.New(agent.Config{Name: "a", Controller: client, OpenContainer: container.OpenURI})
	t.Cleanup(func() {
		a.Close()
		close(f.release)
		conn.Close()
		gs.Stop()
		<-served
	})

	attached := make(chan error, 1)
	go func() { attached <- a.Attach(ctx, client) }()
	var st pb.Mapping_AttachServer
	select {
	case st = <-f.streams:
	case <-ctx.Done():
		t.Fatal("the agent did not attach")
	}
	hello, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if hello.GetHello().GetName() != "a" {
		t.Fatalf("first message %v, want a Hello from a", hello)
	}
	if err := st.Send(&pb.ControllerMessage{Epoch: epoch, Msg: &pb.ControllerMessage_Welcome{Welcome: &pb.Welcome{LeaseMs: 60_000}}}); err != nil {
		t.Fatal(err)
	}
	if err := <-attached; err != nil {
		t.Fatal(err)
	}
	if _, err := a.Open(ctx, "d"); err != nil {
		t.Fatal(err)
	}
	return &fakeSession{t: t, st: st, epoch: epoch, agent: a}
}

// send sends cmd under epoch and returns its id.
func (s *fakeSession) send(epoch uint64, cmd *pb.Command) uint64 {
	s.t.Helper()
	s.nextID++
	cmd.Id = s.nextID
	if err := s.st.Send(&pb.ControllerMessage{Epoch: epoch, Msg: &pb.ControllerMessage_Command{Command: cmd}}); err != nil {
		s.t.Fatal(err)
	}
	return cmd.Id
}

// result waits for the result of command id; results of other commands
// fail the test (the caller expects none).
func (s *fakeSession) result(id uint64) *pb.CommandResult {
	s.t.Helper()
	for {
		m, err := s.st.Recv()
		if err != nil {
			s.t.Fatalf("waiting for the result of command %d: %v", id, err)
		}
		r := m.GetResult()
		if r == nil {
			continue // a lease renewal
		}
		if r.GetId() != id {
			s.t.Fatalf("got the result of command %d (%v), waiting for %d", r.GetId(), r, id)
		}
		return r
	}
}

// do sends cmd under the session's epoch and returns its result.
func (s *fakeSession) do(cmd *pb.Command) *pb.CommandResult {
	s.t.Helper()
	return s.result(s.send(s.epoch, cmd))
}

func getEntries(disk, first, n uint64) *pb.Command {
	return &pb.Command{Cmd: &pb.Command_GetEntry{GetEntry: &pb.GetEntry{Disk: disk, First: first, Count: n}}}
}

// TestClientIgnoresOlderEpoch: a command stamped with an older epoch than
// the session's (from a deposed controller) is neither run nor answered.
func TestClientIgnoresOlderEpoch(t *testing.T) {
	checkGoroutines(t)
	s := newFakeSession(t, 5)
	mapped := []*pb.Entry{{Container: 1, Slot: 3}}
	s.send(4, &pb.Command{Cmd: &pb.Command_SetEntry{SetEntry: &pb.SetEntry{Disk: 7, First: 0, Entries: mapped}}})
	// A newer epoch than the session's is obeyed (a controller that took
	// over); so is the session's own.
	r := s.do(&pb.Command{Cmd: &pb.Command_SetEntry{SetEntry: &pb.SetEntry{Disk: 7, First: 1, Entries: mapped, Blocking: true}}})
	if r.GetStatus().GetCode() != pb.Code_CODE_OK {
		t.Fatalf("set_entry: %v", r)
	}
	r = s.result(s.send(6, getEntries(7, 0, 2)))
	if r.GetStatus().GetCode() != pb.Code_CODE_OK || len(r.GetEntries()) != 2 {
		t.Fatalf("get_entry: %v", r)
	}
	if e := r.GetEntries()[0]; e.GetState() != uint32(table.Invalid) {
		t.Errorf("entry 0 is %v after a set_entry from an older epoch, want it untouched (Invalid)", e)
	}
	if e := r.GetEntries()[1]; e.GetState() != 0 || e.GetSlot() != 3 {
		t.Errorf("entry 1 is %v, want the mapped entry the current epoch set", e)
	}
}

// ---- bad input -------------------------------------------------------------------

// TestAttachRefusesBadHello: an Attach whose first message is not a Hello
// with a name is refused with BAD_REQUEST, and the server goes on serving.
func TestAttachRefusesBadHello(t *testing.T) {
	checkGoroutines(t)
	ctx := testContext(t, time.Minute)
	s := newStack(t, stackOptions{})
	conn := dial(t, s.addr)
	defer conn.Close()
	c := pb.NewMappingClient(conn)
	for _, tc := range []struct {
		name  string
		first *pb.AgentMessage
	}{
		{"hello without a name", &pb.AgentMessage{Msg: &pb.AgentMessage_Hello{Hello: &pb.Hello{OpenDisks: []uint64{1}}}}},
		{"renew first", &pb.AgentMessage{Msg: &pb.AgentMessage_Renew{Renew: &pb.Renew{Seq: 1}}}},
		{"result first", &pb.AgentMessage{Msg: &pb.AgentMessage_Result{Result: &pb.CommandResult{Id: 1}}}},
		{"empty message", &pb.AgentMessage{}},
	} {
		sctx, cancel := context.WithCancel(ctx)
		st, err := c.Attach(sctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Send(tc.first); err != nil {
			t.Fatal(err)
		}
		m, err := st.Recv()
		if m != nil {
			t.Errorf("%s: welcomed: %v", tc.name, m)
		}
		wantCode(t, tc.name, err, pb.Code_CODE_BAD_REQUEST)
		cancel()
	}
	if got := s.ctrl.Agents(); len(got) != 0 {
		t.Errorf("agents attached after bad hellos: %v", got)
	}
	a := s.startAgent("a", s.addr)
	s.createDisk(ctx, "d", 1)
	m := make(image, segSize)
	d := a.open(ctx, "d")
	write(t, ctx, d, m, 0, randBytes(1, 512))
	expect(t, ctx, "a", d, m, 0, segSize)
}

// TestFaultRefusesBadRequests: malformed faults get BAD_REQUEST (or the
// error they deserve) and change nothing.
func TestFaultRefusesBadRequests(t *testing.T) {
	checkGoroutines(t)
	ctx := testContext(t, time.Minute)
	s := newStack(t, stackOptions{})
	a := s.startAgent("a", s.addr)
	disk := s.createDisk(ctx, "d", 4)
	s.createDisk(ctx, "unmapped", 4)
	a.open(ctx, "d")
	conn := dial(t, s.addr)
	defer conn.Close()
	c := pb.NewMappingClient(conn)
	base := &pb.FaultRequest{
		Agent: "a", Epoch: s.epoch, Disk: uint64(disk.ID), Segment: 0, Count: 1,
		Op: uint32(protocol.FaultWrite), Reason: uint32(table.Zero),
	}
	id := uint64(1 << 62)
	for _, tc := range []struct {
		name string
		edit func(*pb.FaultRequest)
		want pb.Code
	}{
		{"op 0", func(r *pb.FaultRequest) { r.Op = 0 }, pb.Code_CODE_BAD_REQUEST},
		{"op past flush", func(r *pb.FaultRequest) { r.Op = uint32(protocol.FaultFlush) + 1 }, pb.Code_CODE_BAD_REQUEST},
		{"huge op", func(r *pb.FaultRequest) { r.Op = 1 << 31 }, pb.Code_CODE_BAD_REQUEST},
		{"reason past a byte", func(r *pb.FaultRequest) { r.Reason = 0x100 }, pb.Code_CODE_BAD_REQUEST},
		{"segment past the end", func(r *pb.FaultRequest) { r.Segment = 4 }, pb.Code_CODE_BAD_REQUEST},
		{"segment overflow", func(r *pb.FaultRequest) { r.Segment, r.Count = 3, 1<<63 }, pb.Code_CODE_BAD_REQUEST},
		{"write of two segments", func(r *pb.FaultRequest) { r.Count = 2 }, pb.Code_CODE_BAD_REQUEST},
		{"discard too long", func(r *pb.FaultRequest) {
			r.Op, r.Count = uint32(protocol.FaultDiscard), controller.MaxDiscard+1
		}, pb.Code_CODE_BAD_REQUEST},
		{"no such disk", func(r *pb.FaultRequest) { r.Disk = 999 }, pb.Code_CODE_IO},
		{"commit of nothing", func(r *pb.FaultRequest) { r.Op, r.Token = uint32(protocol.FaultCommit), 42 }, pb.Code_CODE_STALE},
	} {
		r := proto.Clone(base).(*pb.FaultRequest)
		id++
		r.RequestId = id
		tc.edit(r)
		_, err := c.Fault(ctx, r)
		if err == nil {
			t.Errorf("%s: accepted", tc.name)
			continue
		}
		if tc.want == pb.Code_CODE_IO {
			t.Logf("%s: %v", tc.name, err)
			if code(err) < 0 {
				t.Errorf("%s: %v carries no protocol code", tc.name, err)
			}
			continue
		}
		wantCode(t, tc.name, err, tc.want)
	}
	if got := s.usedSlots(ctx); got != 0 {
		t.Errorf("%d slots used after refused faults, want 0", got)
	}
	s.checkClean(ctx)
}

// TestAgentRefusesBadCommands: a command the agent cannot make sense of
// (an undefined state bit, an undefined entry state, a bad geometry, no
// command at all) is answered BAD_REQUEST; the session goes on.
func TestAgentRefusesBadCommands(t *testing.T) {
	checkGoroutines(t)
	s := newFakeSession(t, 3)
	ses := func(state uint32, on bool) *pb.Command {
		return &pb.Command{Cmd: &pb.Command_SetEntryState{SetEntryState: &pb.SetEntryState{Disk: 7, First: 0, Count: 4, State: state, On: on}}}
	}
	for _, tc := range []struct {
		name string
		cmd  *pb.Command
		want pb.Code
	}{
		{"set_entry_state with an undefined bit", ses(0x80, true), pb.Code_CODE_BAD_REQUEST},
		{"set_entry_state with a defined and an undefined bit", ses(uint32(table.NoWrite)|0x10, true), pb.Code_CODE_BAD_REQUEST},
		{"set_entry_state past a byte", ses(0x100|uint32(table.NoWrite), true), pb.Code_CODE_BAD_REQUEST},
		{"set_entry_state with no bit", ses(0, true), pb.Code_CODE_BAD_REQUEST},
		{"set_entry with an undefined state", &pb.Command{Cmd: &pb.Command_SetEntry{SetEntry: &pb.SetEntry{
			Disk: 7, Entries: []*pb.Entry{{Container: 1, Slot: 1, State: 0x40}}}}}, pb.Code_CODE_BAD_REQUEST},
		{"new_table with a bad segment size", &pb.Command{Cmd: &pb.Command_NewTable{NewTable: &pb.NewTable{
			Disk: &pb.MappedDisk{Id: 8, Name: "x", Size: 1 << 20, SegmentSize: 1000}}}}, pb.Code_CODE_BAD_REQUEST},
		{"new_table without a disk", &pb.Command{Cmd: &pb.Command_NewTable{NewTable: &pb.NewTable{}}}, pb.Code_CODE_BAD_REQUEST},
		{"no command", &pb.Command{}, pb.Code_CODE_BAD_REQUEST},
		{"get_entry of a disk the agent does not map", getEntries(99, 0, 1), pb.Code_CODE_NO_TABLE},
		{"get_status of a disk the agent does not map", &pb.Command{Cmd: &pb.Command_GetStatus{GetStatus: &pb.GetStatus{Disk: 99}}}, pb.Code_CODE_NO_TABLE},
	} {
		r := s.do(tc.cmd)
		if got := r.GetStatus().GetCode(); got != tc.want {
			t.Errorf("%s: answered %v, want %v", tc.name, r.GetStatus(), tc.want)
		}
	}
	// Ranges outside the table are refused (with some code: see the
	// report on their classification).
	for _, tc := range []struct {
		name string
		cmd  *pb.Command
	}{
		{"get_entry past the end", getEntries(7, 2, 3)},
		{"set_entry_state past the end", &pb.Command{Cmd: &pb.Command_SetEntryState{SetEntryState: &pb.SetEntryState{Disk: 7, First: 3, Count: 2, State: uint32(table.NoWrite), On: true}}}},
		{"set_entry_state clearing Invalid", ses(uint32(table.Invalid), false)},
	} {
		r := s.do(tc.cmd)
		if r.GetStatus().GetCode() == pb.Code_CODE_OK {
			t.Errorf("%s: accepted", tc.name)
		}
		t.Logf("%s: %v", tc.name, r.GetStatus())
	}
	// Nothing was changed, and the session still works.
	r := s.do(getEntries(7, 0, 4))
	if r.GetStatus().GetCode() != pb.Code_CODE_OK {
		t.Fatalf("get_entry: %v", r)
	}
	for i, e := range r.GetEntries() {
		if e.GetState() != uint32(table.Invalid) {
			t.Errorf("entry %d is %v after refused commands, want Invalid", i, e)
		}
	}
}

// ---- leases -------------------------------------------------------------------------

// TestLeaseLapse: an agent cut off from the controller ends its session and
// fences itself before its lease runs out; a snapshot of a disk it maps
// waits for that lease and then goes on without it; when the network
// comes back (or the agent dials anew) the agent re-attaches and its I/O
// resumes with what the others wrote meanwhile.
func TestLeaseLapse(t *testing.T) {
	checkGoroutines(t)
	ctx := testContext(t, time.Minute)
	const lease = 600 * time.Millisecond
	s := newStack(t, stackOptions{lease: lease})
	p := newProxy(t, s.addr)
	a := s.startAgent("a", p.addr())
	b := s.startAgent("b", s.addr)
	const segs = 4
	s.createDisk(ctx, "d", segs)
	da, db := a.open(ctx, "d"), b.open(ctx, "d")
	m := make(image, segs*segSize)
	write(t, ctx, da, m, 0, randBytes(1, segSize+4096))
	write(t, ctx, db, m, 2*segSize+100, randBytes(2, 1000))
	expect(t, ctx, "a", da, m, 0, segs*segSize) // a holds every entry now
	expect(t, ctx, "b", db, m, 0, segs*segSize)

	serverLeaseEnd := transport.LeaseEndOf(s.srv, "a")
	if serverLeaseEnd == nil {
		t.Fatal("the server does not know agent a")
	}
	sessionDone := a.client.Done()
	p.hold()

	// (b) A snapshot now must wait for a's lease to run out.
	type snapResult struct {
		end time.Time
		err error
	}
	snapped := make(chan snapResult, 1)
	go func() {
		_, err := s.ctrl.Snapshot(ctx, controller.SnapshotOptions{Sources: []string{"d"}, Names: []string{"d@1"}})
		snapped <- snapResult{time.Now(), err}
	}()

	// (a) The agent's session ends before its lease does, and it fences.
	var fenced time.Time
	select {
	case <-sessionDone:
		fenced = time.Now()
	case <-time.After(3 * lease):
		t.Fatal("the agent's session did not end after its controller went silent")
	}
	agentLeaseEnd := a.client.LeaseEnd()
	t.Logf("session ended %v before the agent's lease end", agentLeaseEnd.Sub(fenced))
	if !fenced.Before(agentLeaseEnd) {
		t.Errorf("the agent's session ended %v after its lease did", fenced.Sub(agentLeaseEnd))
	}
	// RunAgent fences the agent once the session has ended: from then on
	// (and at the latest when its lease ends) reads wait instead of being
	// served from the entries it held.
	buf := make([]byte, 512)
	for {
		start := time.Now()
		rctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		err := da.ReadAt(rctx, buf, 0)
		cancel()
		if err != nil {
			if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, protocol.ErrUnavailable) {
				t.Errorf("a read on a fenced agent: %v, want it to wait (deadline exceeded or unavailable)", err)
			}
			break
		}
		if start.After(agentLeaseEnd) {
			t.Fatalf("the agent served a read started %v after its lease ran out", start.Sub(agentLeaseEnd))
		}
		time.Sleep(time.Millisecond)
	}

	res := <-snapped
	if res.err != nil {
		t.Fatalf("snapshot while an agent is cut off: %v", res.err)
	}
	if end := serverLeaseEnd(); res.end.Before(end) {
		t.Errorf("the snapshot completed %v before the cut-off agent's lease ran out", end.Sub(res.end))
	}
	if end := serverLeaseEnd(); end.Before(agentLeaseEnd) {
		t.Errorf("the server's idea of the lease end is %v earlier than the agent's", agentLeaseEnd.Sub(end))
	}
	if res.end.Before(fenced) {
		t.Errorf("the snapshot completed before the cut-off agent ended its session")
	}
	old := slices.Clone(m)

	// b writes after the snapshot, while a is still cut off.
	write(t, ctx, db, m, 10, randBytes(3, 2000))
	write(t, ctx, db, m, 3*segSize, randBytes(4, 512))

	// (c) The network comes back: a re-attaches, and reads what b wrote.
	p.resume()
	if !a.waitAttaches(2, 10*time.Second) {
		t.Fatal("the agent did not re-attach after the network came back")
	}
	expect(t, ctx, "a after re-attach", da, m, 0, segs*segSize)
	write(t, ctx, da, m, segSize+5, randBytes(5, 3000))
	expect(t, ctx, "b", db, m, 0, segs*segSize)
	snap := a.open(ctx, "d@1")
	expect(t, ctx, "snapshot via a", snap, old, 0, segs*segSize)

	// The connection breaks outright: a dials anew and re-attaches.
	p.cut()
	if !a.waitAttaches(3, 10*time.Second) {
		t.Fatal("the agent did not re-attach after its connection broke")
	}
	write(t, ctx, db, m, 3*segSize+1000, randBytes(6, 1000))
	expect(t, ctx, "a after a new connection", da, m, 0, segs*segSize)
	s.checkClean(ctx)
}

// ---- controller restart ----------------------------------------------------------------

// TestControllerRestart: the controller process goes away and a new one (a
// new epoch) starts over the same store at the same address; the agents
// re-attach by themselves, and I/O started during the outage completes,
// with the right data.
func TestControllerRestart(t *testing.T) {
	checkGoroutines(t)
	ctx := testContext(t, transport.FaultPatience+30*time.Second)
	s := newStack(t, stackOptions{})
	a := s.startAgent("a", s.addr)
	b := s.startAgent("b", s.addr)
	const segs = 4
	s.createDisk(ctx, "d", segs)
	da, db := a.open(ctx, "d"), b.open(ctx, "d")
	m := make(image, segs*segSize)
	write(t, ctx, da, m, 0, randBytes(1, segSize+100))
	expect(t, ctx, "b", db, m, 0, segs*segSize)
	oldEpoch := s.epoch

	s.stopController()
	// I/O during the outage: a read of written data, a write that needs
	// an allocation, a write that needs none.
	type result struct {
		what string
		err  error
	}
	results := make(chan result, 3)
	got := make([]byte, segSize+100)
	go func() { results <- result{"read", da.ReadAt(ctx, got, 0)} }()
	w1, w2 := randBytes(2, 3000), randBytes(3, 700)
	go func() { results <- result{"write to a new segment", db.WriteAt(ctx, w1, 2*segSize+9, false)} }()
	go func() { results <- result{"write to a written segment", db.WriteAt(ctx, w2, segSize+200, false)} }()
	// Let the I/O reach the faults that wait for the controller.
	time.Sleep(300 * time.Millisecond)
	select {
	case r := <-results:
		// A read or write whose entry was still valid need not wait.
		results <- r
	default:
	}

	start := time.Now()
	s.startController()
	s.serve()
	if s.epoch <= oldEpoch {
		t.Fatalf("new epoch %d, old %d", s.epoch, oldEpoch)
	}
	for range 3 {
		select {
		case r := <-results:
			if r.err != nil {
				t.Fatalf("%s during the outage: %v", r.what, r.err)
			}
		case <-time.After(transport.FaultPatience):
			t.Fatal("I/O started during the outage did not complete")
		}
	}
	t.Logf("I/O completed %v after the controller came back", time.Since(start))
	if i := firstDiff(got, m[:len(got)]); i >= 0 {
		t.Fatalf("the read during the outage returned wrong data at byte %d", i)
	}
	m.write(2*segSize+9, w1)
	m.write(segSize+200, w2)
	for _, n := range []*node{a, b} {
		if !n.waitAttaches(2, 10*time.Second) {
			t.Fatalf("agent %s did not re-attach", n.name)
		}
	}
	if got := s.ctrl.Agents(); len(got) != 2 {
		t.Errorf("the new controller has agents %v, want a and b", got)
	}
	expect(t, ctx, "a", da, m, 0, segs*segSize)
	expect(t, ctx, "b", db, m, 0, segs*segSize)
	write(t, ctx, da, m, 3*segSize, randBytes(4, 100))
	expect(t, ctx, "b", db, m, 0, segs*segSize)
	s.checkClean(ctx)
}

// ---- regressions -------------------------------------------------------------------------

// TestFaultRetryAfterDeadline: transport.Client gives each attempt of a fault
// a deadline and, when it passes, sends the fault again with the same
// request id. If the server resolved the first attempt only after its
// deadline had passed (the controller was busy), the context error it got
// must not be remembered as the fault's answer: the retry must be
// resolved, not failed with EIO.
func TestFaultRetryAfterDeadline(t *testing.T) {
	checkGoroutines(t)
	ctx := testContext(t, time.Minute)
	const reqID = 1 << 62
	// The interceptor hands the watched fault call a context that ends
	// with DeadlineExceeded at the call's deadline, and reports it. gRPC
	// itself ends a server context at its deadline either with
	// DeadlineExceeded or with Canceled (it runs two timers for the same
	// instant, and either may fire first); only the first showed the bug,
	// so the test must not leave that to chance.
	var watched atomic.Bool // the first attempt is seen
	started := make(chan context.Context, 1)
	finished := make(chan error, 1)
	s := newStack(t, stackOptions{unary: func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		r, ok := req.(*pb.FaultRequest)
		if !ok || r.GetRequestId() != reqID || !watched.CompareAndSwap(false, true) {
			return h(ctx, req)
		}
		deadline, ok := ctx.Deadline()
		if !ok {
			t.Errorf("the first attempt reached the server without a deadline")
			deadline = time.Now().Add(100 * time.Millisecond)
		}
		dctx, cancel := context.WithDeadline(context.WithoutCancel(ctx), deadline)
		defer cancel()
		started <- dctx
		resp, err := h(dctx, req)
		finished <- err
		return resp, err
	}})
	a := s.startAgent("a", s.addr)
	disk := s.createDisk(ctx, "d", 1)
	a.open(ctx, "d")
	// Two agents map the disk, so the write's map change is committed
	// before the fault is answered (not kept in memory until a flush):
	// the fault waits for the store.
	s.startAgent("b", s.addr).open(ctx, "d")
	p := newProxy(t, s.addr)
	conn := dial(t, p.addr())
	defer conn.Close()
	c := pb.NewMappingClient(conn)

	req := &pb.FaultRequest{
		Agent: "a", RequestId: reqID, Epoch: s.epoch, Disk: uint64(disk.ID), Segment: 0, Count: 1,
		Op: uint32(protocol.FaultWrite), Reason: uint32(table.Zero),
	}
	// The controller is busy: a disk creation holds its lock while its
	// commit waits.
	entered := s.gate.arm(func(_ context.Context, update bool) bool { return update })
	created := make(chan error, 1)
	go func() {
		_, err := s.ctrl.CreateDisk(context.Background(), controller.CreateOptions{Name: "e", Size: segSize, SegmentSize: segSize})
		created <- err
	}()
	await(t, ctx, entered, "the disk creation to hold the lock")

	// The first attempt times out (and the network loses the client's
	// cancellation).
	called := make(chan error, 1)
	go func() {
		// Long enough to reach the server on a loaded machine (it
		// waits there, held by the disk creation, until the deadline).
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		_, err := c.Fault(cctx, req)
		called <- err
	}()
	sctx := await(t, ctx, started, "the first attempt to reach the server")
	p.hold()
	await(t, ctx, sctx.Done(), "the first attempt's deadline")
	if !errors.Is(sctx.Err(), context.DeadlineExceeded) {
		t.Fatalf("the server's context for the first attempt ended with %v, want DeadlineExceeded", sctx.Err())
	}
	if err := await(t, ctx, called, "the first attempt to fail"); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("first attempt: %v, want DeadlineExceeded", err)
	}
	s.gate.open()
	if err := await(t, ctx, created, "the disk creation"); err != nil {
		t.Fatal(err)
	}
	await(t, ctx, finished, "the server to resolve the first attempt") // late
	p.resume()

	// The retry, with the same request id.
	r, err := c.Fault(ctx, req)
	if err != nil {
		t.Fatalf("the retry of a fault whose first attempt timed out (the server's context: %v) failed: %v (code %v); "+
			"the server remembered the first attempt's context error as the fault's answer", sctx.Err(), err, code(err))
	}
	if len(r.GetEntries()) != 1 || r.GetEntries()[0].GetState() != 0 {
		t.Errorf("retry answered %v, want one writable entry", r)
	}
	if got := s.usedSlots(ctx); got != 1 {
		t.Errorf("%d slots used after one allocation, want 1", got)
	}
}

// await receives from ch, or fails t when ctx ends first: a step that
// never comes fails the test at once instead of hanging it.
func await[T any](t *testing.T, ctx context.Context, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-ctx.Done():
		t.Fatalf("waiting for %s: %v", what, ctx.Err())
		panic("unreachable")
	}
}

// TestReattachIsRegisteredBeforeWelcome: an agent re-attaching must not
// have its faults answered before the controller has registered the new
// attach. Otherwise the entries it loads are resolved against its previous
// registration, whose stream is dead, and a change the controller makes
// meanwhile (another agent's allocation, a copy-on-write, a snapshot's
// NoWrite) is "sent" to that dead stream, counted as done because the old
// lease has run out, and never reaches the agent: it goes on using the
// stale entry.
func TestReattachIsRegisteredBeforeWelcome(t *testing.T) {
	checkGoroutines(t)
	ctx := testContext(t, time.Minute)
	s := newStack(t, stackOptions{lease: 600 * time.Millisecond})
	p := newProxy(t, s.addr)
	a := s.startAgent("a", p.addr())
	b := s.startAgent("b", s.addr)
	s.createDisk(ctx, "d", 2)
	da, db := a.open(ctx, "d"), b.open(ctx, "d")
	m := make(image, 2*segSize)

	// a is cut off long enough for its lease to run out, on its side and
	// on the controller's.
	serverLeaseEnd := transport.LeaseEndOf(s.srv, "a")
	sessionDone := a.client.Done()
	p.hold()
	<-sessionDone
	time.Sleep(time.Until(serverLeaseEnd()) + 10*time.Millisecond)

	// Its connection breaks, it dials anew and attaches again, and the
	// controller is slow to register the attach (a slow store read).
	entered := s.gate.arm(inAttach)
	p.cut()
	p.resume()
	select {
	case <-entered:
	case <-ctx.Done():
		t.Fatal("the agent did not re-attach")
	}
	welcomed := a.waitAttaches(2, 300*time.Millisecond)
	t.Logf("welcomed before the controller registered the attach: %v", welcomed)

	// a reads segment 0 (Zero so far), b writes it, a reads it again; all
	// before the controller has registered a's new attach. a's reads may
	// wait for that, but must not return stale data.
	got := make([]byte, 512)
	read := make(chan error, 1)
	go func() { read <- da.ReadAt(ctx, got, 0) }()
	select {
	case err := <-read:
		t.Logf("a's first read returned %v", err)
		read <- err
	case <-time.After(200 * time.Millisecond):
		t.Logf("a's first read waits")
	}
	write(t, ctx, db, m, 0, randBytes(1, 512))
	again := make([]byte, 512)
	rctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	err := da.ReadAt(rctx, again, 0)
	cancel()
	if err == nil && !bytes.Equal(again, m[:512]) {
		t.Errorf("a read after b's acknowledged write returned stale data (zeros: %v)", bytes.Equal(again, make([]byte, 512)))
	}

	s.gate.open()
	if !a.waitAttaches(2, 10*time.Second) {
		t.Fatal("the agent did not re-attach")
	}
	if err := <-read; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, m[:512]) && !bytes.Equal(got, make([]byte, 512)) {
		t.Errorf("a read concurrent with b's write returned neither zeros nor b's data")
	}
}

// TestAttachLeaseFromHello: an agent whose controller is down longer than
// a lease waits in its attach for the controller to come back; the lease
// of that attach runs from its Hello, not from when the attach began
// waiting. Counted from then, it had run out before the Welcome came: the
// agent fenced itself at once and attached a second time (the kill storm
// saw every controller restart cost each agent that extra round).
func TestAttachLeaseFromHello(t *testing.T) {
	checkGoroutines(t)
	// A long lease, so that a loaded machine's late renewal cannot end
	// the session watched below; the fence this test is about comes at
	// the Welcome.
	const lease = 3 * time.Second
	s := newStack(t, stackOptions{lease: lease})
	a := s.startAgent("a", s.addr)
	s.stopController()
	time.Sleep(lease + 500*time.Millisecond) // the agent fences, and its attach waits
	s.startController()
	s.serve()
	if !a.waitAttaches(2, 10*time.Second) {
		t.Fatal("the agent did not attach again")
	}
	time.Sleep(time.Second)
	if n := a.attaches.Load(); n != 2 {
		t.Errorf("%d attaches, want 2: the attach after the outage was fenced at once", n)
	}
}
