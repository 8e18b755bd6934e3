package ha

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "segmap/api/segmapv1"
	"segmap/internal/backoff"
)

// NotLeader returns the error a standby answers every call with: gRPC
// status UNAVAILABLE, a message for people, and a pb.NotLeader detail that
// Conn follows. leader is the leader's advertised address, or "" while
// none is elected.
func NotLeader(name, leader string) error {
	msg := fmt.Sprintf("controller %s is a standby; the leader is at %s", name, leader)
	if leader == "" {
		msg = fmt.Sprintf("controller %s is a standby and knows no leader (an election is under way, or it cannot reach etcd)", name)
	}
	st, err := status.New(codes.Unavailable, msg).WithDetails(&pb.NotLeader{Controller: name, Leader: leader})
	if err != nil {
		return status.Error(codes.Unavailable, msg)
	}
	return st.Err()
}

// LeaderHint reports whether err came from a standby, and the leader it
// named ("" if none yet).
func LeaderHint(err error) (leader string, standby bool) {
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.Unavailable {
		return "", false
	}
	for _, d := range st.Details() {
		if nl, ok := d.(*pb.NotLeader); ok {
			return nl.GetLeader(), true
		}
	}
	return "", false
}

// ParseAddrs splits a comma-separated list of controller addresses.
func ParseAddrs(list string) ([]string, error) {
	var addrs []string
	for a := range strings.SplitSeq(list, ",") {
		if a = strings.TrimSpace(a); a != "" {
			addrs = append(addrs, a)
		}
	}
	if len(addrs) == 0 {
		return nil, errors.New("no controller address")
	}
	return addrs, nil
}

// Conn is a grpc.ClientConnInterface over every controller of a cluster: it
// sends each call to the controller it believes leads, and when that one is
// unreachable or answers that it is a standby, it moves to the leader the
// standby named, or to the next address, and sends the call again. A call
// fails only when its context ends (with the last error seen) or with an
// error of the leader's own.
//
// A call that was cut off while the leader ran (the leader died) is sent
// again to the next leader; the mapping protocol's calls are safe to
// repeat, and an admin call such as creating a disk may then report that
// the disk exists.
//
// A stream is opened on the current controller; if it then fails because
// that controller is a standby or gone, Conn moves on for the next one.
type Conn struct {
	opts []grpc.DialOption
	// GiveUp, if positive, fails a call once no controller has answered
	// at all (not even a standby) for that long since it started: for a
	// command line, which should say at once that nothing is there. Zero
	// keeps trying until the call's context ends (agents). Set it before
	// the first call.
	GiveUp time.Duration

	mu     sync.Mutex
	addrs  []string // the addresses given, then any leader named outside them
	conns  map[string]*grpc.ClientConn
	down   map[string]time.Time // when each address last failed to answer
	cur    int
	closed bool
}

// Dial returns a Conn over addrs, dialled with opts (which must include
// transport credentials). It connects lazily, like grpc.NewClient.
func Dial(addrs []string, opts ...grpc.DialOption) (*Conn, error) {
	if len(addrs) == 0 {
		return nil, errors.New("no controller address")
	}
	c := &Conn{opts: opts, conns: map[string]*grpc.ClientConn{}, down: map[string]time.Time{}}
	for _, a := range addrs {
		if _, err := c.conn(a); err != nil {
			c.Close()
			return nil, err
		}
	}
	return c, nil
}

// conn returns the connection to addr, adding addr to the list if new.
// c.mu must not be held.
func (c *Conn) conn(addr string) (*grpc.ClientConn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cc := c.conns[addr]; cc != nil {
		return cc, nil
	}
	if c.closed {
		return nil, errors.New("connection closed")
	}
	cc, err := grpc.NewClient(addr, c.opts...)
	if err != nil {
		return nil, fmt.Errorf("controller %s: %w", addr, err)
	}
	c.conns[addr] = cc
	c.addrs = append(c.addrs, addr)
	return cc, nil
}

// Close closes every connection.
func (c *Conn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	for _, cc := range c.conns {
		errs = append(errs, cc.Close())
	}
	c.conns = map[string]*grpc.ClientConn{}
	c.closed = true
	return errors.Join(errs...)
}

// Current returns the address calls go to now.
func (c *Conn) Current() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.addrs[c.cur]
}

// current returns the current address and its connection.
func (c *Conn) current() (string, *grpc.ClientConn, error) {
	c.mu.Lock()
	addr := c.addrs[c.cur]
	cc := c.conns[addr]
	c.mu.Unlock()
	if cc == nil {
		return addr, nil, errors.New("connection closed")
	}
	return addr, cc, nil
}

// failed moves on from addr after err: to the leader a standby named,
// unless that one was unreachable moments ago (a standby cut off from etcd
// may name a dead leader), or else to the next address that was not. It
// reports whether err is one to move on from.
func (c *Conn) failed(addr string, err error) bool {
	leader, standby := LeaderHint(err)
	if !standby && status.Code(err) != codes.Unavailable {
		return false
	}
	if standby && leader != "" && leader != addr {
		_, _ = c.conn(leader) // known from now on (if it can be dialled)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	if !standby {
		c.down[addr] = now
	}
	if c.addrs[c.cur] != addr {
		return true // another call moved on already
	}
	up := func(a string) bool { return now.Sub(c.down[a]) > downFor }
	if standby && leader != "" && leader != addr && up(leader) && c.conns[leader] != nil {
		c.cur = indexOf(c.addrs, leader)
		return true
	}
	n := len(c.addrs)
	next := (c.cur + 1) % n
	for i := 1; i < n; i++ {
		if j := (c.cur + i) % n; up(c.addrs[j]) {
			next = j
			break
		}
	}
	c.cur = next
	return true
}

// downFor is how long an address that did not answer is passed over when
// a standby names it.
const downFor = 2 * time.Second

func indexOf(s []string, v string) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	return 0
}

// connBackoff spaces Conn's rounds over the controllers: 50 ms doubling to
// 1 s.
var connBackoff = backoff.Policy{Initial: 50 * time.Millisecond, Max: time.Second}

// retry runs call on the current controller until it succeeds, fails with
// an error that is not about leadership or reachability, or ctx ends. After
// every controller has been tried in a row it waits, 50 ms doubling to 1 s.
func (c *Conn) retry(ctx context.Context, call func(addr string, cc *grpc.ClientConn) error) error {
	var b *backoff.Backoff // made on the first wait: most calls need none
	answered := time.Now() // when a controller last answered
	for tries := 1; ; tries++ {
		addr, cc, err := c.current()
		if err != nil {
			return status.Error(codes.Canceled, err.Error())
		}
		err = call(addr, cc)
		if err == nil || !c.failed(addr, err) || ctx.Err() != nil {
			return err
		}
		if _, standby := LeaderHint(err); standby {
			answered = time.Now()
		}
		c.mu.Lock()
		n := len(c.addrs)
		c.mu.Unlock()
		if tries%n != 0 {
			continue
		}
		if c.GiveUp > 0 && time.Since(answered) >= c.GiveUp {
			return err
		}
		if b == nil {
			b = backoff.New(connBackoff, nil)
		}
		if b.Wait(ctx) != nil {
			return err
		}
	}
}

// failFast replaces a default WaitForReady: a controller that is down must
// fail the call at once so that Conn moves on.
var failFast = grpc.WaitForReady(false)

// Invoke implements grpc.ClientConnInterface.
func (c *Conn) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) error {
	opts = append(opts[:len(opts):len(opts)], failFast)
	return c.retry(ctx, func(_ string, cc *grpc.ClientConn) error {
		return cc.Invoke(ctx, method, args, reply, opts...)
	})
}

// NewStream implements grpc.ClientConnInterface.
func (c *Conn) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	opts = append(opts[:len(opts):len(opts)], failFast)
	var s grpc.ClientStream
	err := c.retry(ctx, func(addr string, cc *grpc.ClientConn) error {
		cs, err := cc.NewStream(ctx, desc, method, opts...)
		if err == nil {
			s = &stream{ClientStream: cs, c: c, addr: addr}
		}
		return err
	})
	return s, err
}

// stream notes a stream's failure so that the next call goes elsewhere.
type stream struct {
	grpc.ClientStream
	c    *Conn
	addr string
}

func (s *stream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	if err != nil {
		s.c.failed(s.addr, err)
	}
	return err
}

var _ grpc.ClientConnInterface = (*Conn)(nil)
