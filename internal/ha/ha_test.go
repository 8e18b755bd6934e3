package ha_test

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "segmap/api/segmapv1"
	"segmap/internal/etcdtest"
	"segmap/internal/ha"
	"segmap/internal/heldport"
	"segmap/internal/meta"
	"segmap/internal/table"
)

// named answers Status with its controller's name.
type named struct {
	pb.UnimplementedAdminServer
	name string
}

func (n named) Status(context.Context, *pb.StatusRequest) (*pb.StatusResponse, error) {
	return &pb.StatusResponse{Version: n.name}, nil
}

// node is one controller under test.
type node struct {
	name, addr string
	cancel     context.CancelFunc
	done       chan struct{}

	mu     sync.Mutex
	events []event // leads and step-downs, in order
	store  meta.Store
}

type event struct {
	lead bool
	at   time.Time
}

func (n *node) log(lead bool) {
	n.mu.Lock()
	n.events = append(n.events, event{lead, time.Now()})
	n.mu.Unlock()
}

func (n *node) leading() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.events) > 0 && n.events[len(n.events)-1].lead
}

func newClient(t *testing.T, endpoint string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{
		Endpoints: []string{endpoint}, DialTimeout: 5 * time.Second,
		DialKeepAliveTime: time.Second, DialKeepAliveTimeout: time.Second,
		Logger: zap.NewNop(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// start runs a controller named name over cli.
func start(t *testing.T, cli *clientv3.Client, name string, ttl time.Duration) *node {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	n := &node{name: name, addr: l.Addr().String(), cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(n.done)
		err := ha.Run(ctx, ha.Config{
			Client: cli, Prefix: "/ha-test/", Name: name, Advertise: n.addr, TTL: ttl, Listener: l,
			Lead: func(ctx context.Context, st meta.Store, term ha.Term) (*grpc.Server, func(), error) {
				gs := grpc.NewServer()
				pb.RegisterAdminServer(gs, named{name: name})
				n.mu.Lock()
				n.store = st
				n.mu.Unlock()
				n.log(true)
				return gs, func() { n.log(false) }, nil
			},
		})
		if err != nil {
			t.Errorf("%s: Run: %v", name, err)
		}
	}()
	t.Cleanup(func() { cancel(); <-n.done })
	return n
}

func dial(t *testing.T, addrs ...string) (*ha.Conn, pb.AdminClient) {
	t.Helper()
	c, err := ha.Dial(addrs, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, pb.NewAdminClient(c)
}

// leaderName asks the cluster through c who leads.
func leaderName(t *testing.T, c pb.AdminClient) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	r, err := c.Status(ctx, &pb.StatusRequest{})
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	return r.GetVersion()
}

// TestFailover: one of three leads; standbys name it; calls through a Conn
// reach it from any address; when it stops, another leads and the Conn
// follows.
func TestFailover(t *testing.T) {
	endpoint := etcdtest.StartOne(t)
	cli := newClient(t, endpoint)
	nodes := map[string]*node{}
	var addrs []string
	for _, name := range []string{"c1", "c2", "c3"} {
		n := start(t, cli, name, time.Second)
		nodes[name] = n
		addrs = append(addrs, n.addr)
	}
	_, admin := dial(t, addrs...)
	first := leaderName(t, admin)
	lead := nodes[first]
	if !lead.leading() {
		t.Fatalf("%s answered, but has not led", first)
	}
	// A standby, asked alone, names the leader.
	for name, n := range nodes {
		if name == first {
			continue
		}
		cc, err := grpc.NewClient(n.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		_, err = pb.NewAdminClient(cc).Status(t.Context(), &pb.StatusRequest{})
		cc.Close()
		got, standby := ha.LeaderHint(err)
		if !standby || got != lead.addr {
			t.Errorf("standby %s: %v; hint %q (standby %v), want %s", name, err, got, standby, lead.addr)
		}
		if !strings.Contains(fmt.Sprint(err), lead.addr) {
			t.Errorf("standby's message %v does not name the leader", err)
		}
		// A Conn given only the standby follows it to the leader.
		_, one := dial(t, n.addr)
		if got := leaderName(t, one); got != first {
			t.Errorf("through %s alone: %s answered, want %s", name, got, first)
		}
	}

	// The leader stops (it resigns): another takes over at once.
	stopped := time.Now()
	lead.cancel()
	<-lead.done
	second := leaderName(t, admin)
	if second == first {
		t.Fatalf("%s still answers after it stopped", first)
	}
	t.Logf("%s took over from %s in %v", second, first, time.Since(stopped).Round(time.Millisecond))
	if n := nodes[first]; n.leading() {
		t.Errorf("%s never stepped down", first)
	}
}

// proxy is a TCP proxy that can drop everything (a partition).
type proxy struct {
	l     net.Listener
	to    string
	black atomic.Bool
	mu    sync.Mutex
	conns []net.Conn
}

func newProxy(t *testing.T, to string) *proxy {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{l: l, to: to}
	go p.run()
	t.Cleanup(func() { l.Close(); p.cut() })
	return p
}

func (p *proxy) run() {
	for {
		c, err := p.l.Accept()
		if err != nil {
			return
		}
		if p.black.Load() {
			p.keep(c) // accepted, never answered
			continue
		}
		u, err := net.Dial("tcp", p.to)
		if err != nil {
			c.Close()
			continue
		}
		p.keep(c, u)
		go p.pipe(c, u)
		go p.pipe(u, c)
	}
}

func (p *proxy) keep(cs ...net.Conn) {
	p.mu.Lock()
	p.conns = append(p.conns, cs...)
	p.mu.Unlock()
}

// pipe copies while the proxy passes traffic; once partitioned it reads
// and drops, so that neither side sees an error or a close.
func (p *proxy) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if err != nil {
			return
		}
		if p.black.Load() {
			continue
		}
		if _, err := dst.Write(buf[:n]); err != nil {
			return
		}
	}
}

func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
}

// TestPartitionedLeaderStepsDown: a leader cut off from etcd (its packets
// dropped, nothing closed) stops leading before another is elected, and
// no write of its lands after the new leader's first.
func TestPartitionedLeaderStepsDown(t *testing.T) {
	const ttl = 2 * time.Second
	endpoint := etcdtest.StartOne(t)
	direct := newClient(t, endpoint)
	px := newProxy(t, strings.TrimPrefix(endpoint, "http://"))
	a := start(t, newClient(t, "http://"+px.l.Addr().String()), "a", ttl)
	_, admin := dial(t, a.addr)
	if got := leaderName(t, admin); got != "a" {
		t.Fatalf("leader %s, want a", got)
	}
	b := start(t, direct, "b", ttl)

	// Both write as fast as they can while they lead.
	ctx, stop := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	var written [2]atomic.Int64
	for i, n := range []*node{a, b} {
		wg.Go(func() {
			for k := 0; ctx.Err() == nil; k++ {
				n.mu.Lock()
				st := n.store
				n.mu.Unlock()
				if st == nil || !n.leading() {
					time.Sleep(5 * time.Millisecond)
					continue
				}
				err := st.Update(ctx, func(tx *meta.Tx) error {
					_, err := tx.CreateDisk(meta.Disk{Name: fmt.Sprintf("%s-%d", n.name, k), Size: 1 << 30, SegmentSize: 1 << 20, Policy: table.Forward, Created: time.Now()})
					return err
				})
				if err == nil {
					written[i].Add(1)
				}
			}
		})
	}
	time.Sleep(300 * time.Millisecond)
	px.black.Store(true)
	deadline := time.Now().Add(15 * time.Second)
	for !b.leading() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	stop()
	wg.Wait()
	if !b.leading() {
		t.Fatal("b never took over")
	}
	a.mu.Lock()
	aEvents := append([]event(nil), a.events...)
	a.mu.Unlock()
	b.mu.Lock()
	bLead := b.events[0].at
	b.mu.Unlock()
	if len(aEvents) < 2 || aEvents[1].lead {
		t.Fatalf("a's events %v: it never stepped down", aEvents)
	}
	if down := aEvents[1].at; !down.Before(bLead) {
		t.Errorf("a stepped down at %v, after b was elected at %v", down, bLead)
	} else {
		t.Logf("a stepped down %v before b was elected", bLead.Sub(down).Round(time.Millisecond))
	}
	if written[0].Load() == 0 || written[1].Load() == 0 {
		t.Fatalf("writes: a %d, b %d; want both", written[0].Load(), written[1].Load())
	}

	// etcd's history of the writer key: every write of a's term, then
	// b's, never a's after b's first.
	var history []string
	w := direct.Watch(t.Context(), "/ha-test/"+ha.MetaPrefix+meta.WriterKey, clientv3.WithRev(1))
	last, err := direct.Get(t.Context(), "/ha-test/"+ha.MetaPrefix+meta.WriterKey)
	if err != nil {
		t.Fatal(err)
	}
	for len(history) == 0 || last.Kvs[0].ModRevision > 0 {
		resp := <-w
		if err := resp.Err(); err != nil {
			t.Fatal(err)
		}
		for _, ev := range resp.Events {
			history = append(history, strings.Fields(string(ev.Kv.Value))[0])
			if ev.Kv.ModRevision == last.Kvs[0].ModRevision {
				last.Kvs[0].ModRevision = 0
			}
		}
	}
	firstB := -1
	for i, who := range history {
		if who == "b" && firstB < 0 {
			firstB = i
		}
		if who == "a" && firstB >= 0 {
			t.Fatalf("write %d of %d is a's, after b's first (write %d)", i, len(history), firstB)
		}
	}
	t.Logf("%d commits: %d by a, then %d by b", len(history), firstB, len(history)-firstB)
}

// TestConnSkipsDeadLeader: a standby that names a dead controller as the
// leader (it was cut off from etcd when it last looked) does not trap a
// Conn between the two; the Conn finds the live leader.
func TestConnSkipsDeadLeader(t *testing.T) {
	serve := func(gs *grpc.Server) string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		go gs.Serve(l)
		t.Cleanup(gs.Stop)
		return l.Addr().String()
	}
	// A port the test holds with no server on it: it accepts and closes
	// every connection, as a dead controller's would refuse them, and
	// no server of the test can be given it.
	dead := heldport.New(t).Addr()
	standby := serve(grpc.NewServer(grpc.UnknownServiceHandler(func(any, grpc.ServerStream) error {
		return ha.NotLeader("s", dead)
	})))
	leader := grpc.NewServer()
	pb.RegisterAdminServer(leader, named{name: "leader"})
	_, admin := dial(t, dead, standby, serve(leader))
	for range 5 {
		if got := leaderName(t, admin); got != "leader" {
			t.Fatalf("%s answered", got)
		}
	}
}
