package transport

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"

	pb "segmap/api/segmapv1"
	"segmap/internal/backoff"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// Client is an agent's protocol.Controller at the other end of a gRPC
// connection. Its Attach opens a session: the Attach stream, on which it
// runs the controller's commands on the agent and renews the lease.
type Client struct {
	c      pb.MappingClient
	logger *slog.Logger
	reqID  atomic.Uint64

	mu struct {
		sync.Mutex
		sess *session
	}

	// cmds is held shared by each command while it runs, and taken by
	// EndCommands: see there.
	cmds struct {
		mu struct{ sync.RWMutex }
	}
}

// EndCommands waits for the commands of the ended session that are
// running, and makes sure no later one of it runs: commands still
// buffered on its stream (the agent was stopped, say, while they came)
// are dropped. RunAgent calls it before it fences the agent, so that no
// command of a dead session lands in the tables the fence makes: a stale
// entry installed there would send reads to a slot the controller has
// moved the disk off since.
func (c *Client) EndCommands() {
	c.cmds.mu.Lock()
	defer c.cmds.mu.Unlock()
}

// session is one Attach stream.
type session struct {
	epoch  uint64
	lease  time.Duration
	cancel context.CancelFunc
	done   chan struct{} // closed when the session is over
	once   sync.Once

	mu       sync.Mutex
	leaseEnd time.Time
	sent     map[uint64]time.Time // renewal seq -> when it was sent

	// holder, if the agent takes it, is told how long its lease lets it
	// do I/O whenever leaseEnd moves.
	holder leaseHolder
}

// leaseHolder is an agent that stops its I/O when its lease lapses
// (*agent.Agent).
type leaseHolder interface{ SetLease(until time.Time) }

// leaseMargin is how long before its lease runs out an agent stops I/O and
// fences itself.
func leaseMargin(lease time.Duration) time.Duration { return lease / 6 }

// grantedLocked tells the holder the lease (s.mu held).
func (s *session) grantedLocked() {
	if s.holder != nil {
		s.holder.SetLease(s.leaseEnd.Add(-leaseMargin(s.lease)))
	}
}

func (s *session) close() { s.once.Do(func() { s.cancel(); close(s.done) }) }

// DialOptions are the gRPC options an agent's connection to its controller
// wants: reconnect quickly after a controller restart (gRPC's default
// backoff grows to two minutes), and let calls wait for the connection
// instead of failing at once while it is down.
func DialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           grpcbackoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 2 * time.Second},
			MinConnectTimeout: 2 * time.Second,
		}),
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true)),
	}
}

// NewClient returns a Client over conn.
func NewClient(conn grpc.ClientConnInterface, logger *slog.Logger) *Client {
	if logger == nil {
		logger = slog.Default()
	}
	return &Client{c: pb.NewMappingClient(conn), logger: logger}
}

// Done returns a channel closed when the current session ends: the stream
// broke, or the lease lapsed. The agent must then fence itself and attach
// again. Before the first Attach it returns a closed channel.
func (c *Client) Done() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.mu.sess == nil {
		ch := make(chan struct{})
		close(ch)
		return ch
	}
	return c.mu.sess.done
}

// LeaseEnd returns when the current lease runs out.
func (c *Client) LeaseEnd() time.Time {
	c.mu.Lock()
	s := c.mu.sess
	c.mu.Unlock()
	if s == nil {
		return time.Time{}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.leaseEnd
}

func (c *Client) epoch() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.mu.sess == nil {
		return 0
	}
	return c.mu.sess.epoch
}

// Attach implements protocol.Controller: it opens the Attach stream, says
// Hello, waits for Welcome, and then serves commands for a until the
// session ends (see Done).
func (c *Client) Attach(ctx context.Context, name string, a protocol.Agent, open []protocol.DiskID) error {
	c.mu.Lock()
	if old := c.mu.sess; old != nil {
		old.close()
	}
	c.mu.Unlock()

	// The stream outlives this call (it is the session), but until the
	// controller has welcomed us, ctx bounds it.
	sctx, cancel := context.WithCancel(context.Background())
	stop := context.AfterFunc(ctx, cancel)
	stream, err := c.c.Attach(sctx)
	if err != nil {
		cancel()
		return fromStatus(err)
	}
	hello := &pb.Hello{Name: name}
	for _, id := range open {
		hello.OpenDisks = append(hello.OpenDisks, uint64(id))
	}
	// The lease runs from before the Hello was sent (the controller's
	// runs from when it got it): never later than the controller's idea
	// of it. Not from before the stream was opened, which waits for the
	// connection: after an outage longer than a lease, the lease would
	// have run out by the Welcome, and the agent fenced itself at once.
	sent := time.Now()
	if err := stream.Send(&pb.AgentMessage{Msg: &pb.AgentMessage_Hello{Hello: hello}}); err != nil {
		cancel()
		return fromStatus(err)
	}
	first, err := recvCtx(ctx, stream)
	if err != nil {
		cancel()
		return fromStatus(err)
	}
	if !stop() {
		cancel()
		return fmt.Errorf("attach: %w", ctx.Err())
	}
	w := first.GetWelcome()
	if w == nil || w.GetLeaseMs() <= 0 {
		cancel()
		return fmt.Errorf("attach: the controller did not welcome us: %w", protocol.ErrBadRequest)
	}
	s := &session{epoch: first.GetEpoch(), lease: time.Duration(w.GetLeaseMs()) * time.Millisecond,
		cancel: cancel, done: make(chan struct{}), sent: map[uint64]time.Time{}}
	s.leaseEnd = sent.Add(s.lease)
	if h, ok := a.(leaseHolder); ok {
		s.holder = h
		s.grantedLocked()
	}
	c.mu.Lock()
	c.mu.sess = s
	c.mu.Unlock()

	var sendMu sync.Mutex
	send := func(m *pb.AgentMessage) error {
		sendMu.Lock()
		defer sendMu.Unlock()
		return stream.Send(m)
	}
	go c.receive(s, stream, a, send)
	go c.renew(s, send)
	return nil
}

func recvCtx(ctx context.Context, stream pb.Mapping_AttachClient) (*pb.ControllerMessage, error) {
	type res struct {
		m   *pb.ControllerMessage
		err error
	}
	ch := make(chan res, 1)
	go func() {
		m, err := stream.Recv()
		ch <- res{m, err}
	}()
	select {
	case r := <-ch:
		return r.m, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// receive runs the controller's commands, each in its own goroutine (a
// Blocking one may wait for I/O; others must not queue behind it).
func (c *Client) receive(s *session, stream pb.Mapping_AttachClient, a protocol.Agent, send func(*pb.AgentMessage) error) {
	defer s.close()
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { <-s.done; cancel() }()
	for {
		m, err := stream.Recv()
		if err != nil {
			c.logger.Warn("controller stream ended", "err", err)
			return
		}
		if m.GetEpoch() < s.epoch {
			c.logger.Warn("message from an older controller epoch refused", "epoch", m.GetEpoch(), "ours", s.epoch)
			continue
		}
		switch x := m.Msg.(type) {
		case *pb.ControllerMessage_Lease:
			s.mu.Lock()
			if t, ok := s.sent[x.Lease.GetSeq()]; ok {
				delete(s.sent, x.Lease.GetSeq())
				if end := t.Add(time.Duration(x.Lease.GetLeaseMs()) * time.Millisecond); end.After(s.leaseEnd) {
					s.leaseEnd = end
					s.grantedLocked()
				}
			}
			s.mu.Unlock()
		case *pb.ControllerMessage_Command:
			cmd := x.Command
			wg.Add(1)
			go func() {
				defer wg.Done()
				var r *pb.CommandResult
				c.cmds.mu.RLock()
				select {
				case <-s.done:
					r = &pb.CommandResult{Id: cmd.GetId(), Status: &pb.Status{Code: pb.Code_CODE_FENCED, Message: "the session is over"}}
				default:
					r = run(ctx, a, cmd)
				}
				c.cmds.mu.RUnlock()
				if err := send(&pb.AgentMessage{Msg: &pb.AgentMessage_Result{Result: r}}); err != nil {
					s.close()
				}
			}()
		}
	}
}

// run executes one command on the agent.
func run(ctx context.Context, a protocol.Agent, cmd *pb.Command) *pb.CommandResult {
	r := &pb.CommandResult{Id: cmd.GetId()}
	var err error
	switch x := cmd.Cmd.(type) {
	case *pb.Command_NewTable:
		var d protocol.Disk
		if d, err = diskFromPB(x.NewTable.GetDisk()); err == nil {
			err = a.NewTable(ctx, d)
		}
	case *pb.Command_DeleteTable:
		err = a.DeleteTable(ctx, protocol.DiskID(x.DeleteTable.GetDisk()))
	case *pb.Command_GetEntry:
		g := x.GetEntry
		var es []table.Entry
		if es, err = a.GetEntry(ctx, protocol.DiskID(g.GetDisk()), g.GetFirst(), g.GetCount()); err == nil {
			r.Entries = entriesToPB(es)
		}
	case *pb.Command_SetEntry:
		se := x.SetEntry
		var es []table.Entry
		if es, err = entriesFromPB(se.GetEntries()); err == nil {
			err = a.SetEntry(ctx, protocol.SetEntry{Disk: protocol.DiskID(se.GetDisk()), First: se.GetFirst(), Entries: es, Blocking: se.GetBlocking()})
		}
	case *pb.Command_SetEntryState:
		ss := x.SetEntryState
		st := table.State(ss.GetState())
		if ss.GetState() > 0xff || st == 0 || !st.Valid() {
			err = fmt.Errorf("set_entry_state %d: %w", ss.GetState(), protocol.ErrBadRequest)
			break
		}
		err = a.SetEntryState(ctx, protocol.SetEntryState{Disk: protocol.DiskID(ss.GetDisk()), First: ss.GetFirst(), Count: ss.GetCount(),
			State: st, On: ss.GetOn(), Blocking: ss.GetBlocking()})
	case *pb.Command_Quiesce:
		err = a.Quiesce(ctx, protocol.DiskID(x.Quiesce.GetDisk()), time.Duration(x.Quiesce.GetTimeoutMs())*time.Millisecond)
	case *pb.Command_Activate:
		err = a.Activate(ctx, protocol.DiskID(x.Activate.GetDisk()))
	case *pb.Command_SetMembership:
		var m protocol.Membership
		if m, err = membershipFromPB(x.SetMembership); err == nil {
			err = a.SetMembership(ctx, m)
		}
	case *pb.Command_GetStatus:
		var st protocol.DiskStatus
		if st, err = a.GetStatus(ctx, protocol.DiskID(x.GetStatus.GetDisk())); err == nil {
			r.DiskStatus = diskStatusToPB(st)
		}
	default:
		err = fmt.Errorf("unknown command: %w", protocol.ErrBadRequest)
	}
	if err != nil {
		r.Status = &pb.Status{Code: codeOf(err), Message: err.Error()}
	}
	return r
}

// renew renews the lease every third of it, and ends the session a margin
// before the lease would lapse without a renewal: the agent must have
// fenced itself by the time the controller gives up on it.
func (c *Client) renew(s *session, send func(*pb.AgentMessage) error) {
	every := s.lease / 3
	margin := leaseMargin(s.lease)
	// Check often enough that the session ends well inside the margin.
	tick := time.NewTicker(max(s.lease/24, time.Millisecond))
	defer tick.Stop()
	var seq uint64
	last := time.Time{}
	for {
		select {
		case <-s.done:
			return
		case now := <-tick.C:
			s.mu.Lock()
			end := s.leaseEnd
			s.mu.Unlock()
			if now.After(end.Add(-margin)) {
				c.logger.Warn("lease about to lapse; fencing", "lease_end", end)
				s.close()
				return
			}
			if now.Sub(last) < every {
				continue
			}
			seq++
			s.mu.Lock()
			s.sent[seq] = now
			for k := range s.sent {
				if k+16 < seq {
					delete(s.sent, k)
				}
			}
			s.mu.Unlock()
			last = now
			if err := send(&pb.AgentMessage{Msg: &pb.AgentMessage_Renew{Renew: &pb.Renew{Seq: seq}}}); err != nil {
				s.close()
				return
			}
		}
	}
}

// Detach implements protocol.Controller: the session ends.
func (c *Client) Detach(ctx context.Context, name string) error {
	c.mu.Lock()
	s := c.mu.sess
	c.mu.Unlock()
	if s != nil {
		s.close()
	}
	return nil
}

// Open implements protocol.Controller.
func (c *Client) Open(ctx context.Context, agent, disk string) (protocol.Disk, error) {
	r, err := c.c.Open(ctx, &pb.OpenRequest{Agent: agent, Disk: disk})
	if err != nil {
		return protocol.Disk{}, fromStatus(err)
	}
	return diskFromPB(r)
}

// CloseDisk implements protocol.Controller.
func (c *Client) CloseDisk(ctx context.Context, agent string, id protocol.DiskID) error {
	_, err := c.c.CloseDisk(ctx, &pb.CloseDiskRequest{Agent: agent, Disk: uint64(id)})
	return fromStatus(err)
}

// Containers implements protocol.Controller.
func (c *Client) Containers(ctx context.Context) ([]protocol.Container, error) {
	r, err := c.c.Containers(ctx, &pb.ContainersRequest{})
	if err != nil {
		return nil, fromStatus(err)
	}
	out := make([]protocol.Container, len(r.GetContainers()))
	for i, ct := range r.GetContainers() {
		if out[i], err = containerFromPB(ct); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// ReportReplica implements protocol.Controller. Like a fault, it waits
// for an unreachable or restarted controller (up to FaultPatience): the
// I/O that hit the failure is held meanwhile. A report sent twice is
// harmless: it records the same slots and finds the replica failed.
func (c *Client) ReportReplica(ctx context.Context, rr protocol.ReplicaReport) (protocol.Membership, error) {
	req := &pb.ReplicaReport{Agent: rr.Agent, Container: rr.Container, Epoch: rr.Epoch, Failed: int32(rr.Failed), Uri: rr.URI, Cause: rr.Cause, Slots: rr.Slots}
	b := backoff.New(faultBackoff, nil)
	for {
		cctx, cancel := context.WithTimeout(ctx, FaultPatience)
		r, err := c.c.ReportReplica(cctx, req)
		cancel()
		if err == nil {
			return membershipFromPB(r)
		}
		err = fromStatus(err)
		retry := errors.Is(err, protocol.ErrUnavailable) || errors.Is(err, protocol.ErrFenced)
		if !retry || ctx.Err() != nil || errors.Is(b.Wait(ctx), backoff.ErrGaveUp) {
			return protocol.Membership{}, err
		}
	}
}

// Exports implements protocol.Controller.
func (c *Client) Exports(ctx context.Context, agent string) ([]protocol.Disk, error) {
	r, err := c.c.Exports(ctx, &pb.ExportsRequest{Agent: agent})
	if err != nil {
		return nil, fromStatus(err)
	}
	var out []protocol.Disk
	for _, d := range r.GetDisks() {
		md, err := diskFromPB(d)
		if err != nil {
			return nil, err
		}
		out = append(out, md)
	}
	return out, nil
}

// FaultPatience is how long a fault waits for an unreachable or restarted
// controller before the I/O fails.
const FaultPatience = 60 * time.Second

// faultBackoff spaces the tries of a fault: 20 ms doubling to 1 s, for
// FaultPatience.
var faultBackoff = backoff.Policy{Initial: 20 * time.Millisecond, Max: time.Second, Limit: FaultPatience}

// faultWarnAfter is how long a fault is refused before the agent says so.
const faultWarnAfter = 5 * time.Second

// Fault implements protocol.Controller. A fault whose answer is lost is sent
// again with the same request id, so the controller answers it from
// memory instead of applying it twice.
func (c *Client) Fault(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
	req := &pb.FaultRequest{
		Agent: f.Agent, RequestId: c.reqID.Add(1), Disk: uint64(f.Disk), Segment: f.Segment,
		Count: f.Count, Op: uint32(f.Op), Reason: uint32(f.Reason), Whole: f.Whole, Token: f.Token, Abandon: f.Abandon,
		Off: f.Off, Len: f.Len,
	}
	// While the controller is unreachable, or has restarted and not yet
	// seen this agent re-attach, the I/O waits (up to FaultPatience)
	// rather than fail: a controller failover is a pause, not an error.
	var r *pb.FaultReply
	var err error
	// unsure: a try of a commit went unanswered (the connection broke,
	// the deadline passed) and may have landed: logged.
	unsure := false
	commit := f.Op == protocol.FaultCommit && !f.Abandon
	b := backoff.New(faultBackoff, nil)
	// A fault still refused after faultWarnAfter is logged once, with the
	// controller's reason: a long pause must say what it waits for.
	warned, start := false, time.Now()
	for {
		req.Epoch = c.epoch()
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		r, err = c.c.Fault(cctx, req)
		cancel()
		if commit && err != nil && !answered(err) {
			if !unsure {
				c.logger.Warn("commit of a staged write unanswered; asking again", "disk_id", f.Disk, "segment", f.Segment, "token", f.Token, "err", err)
			}
			unsure = true
		}
		err = fromStatus(err)
		retry := errors.Is(err, protocol.ErrUnavailable) || errors.Is(err, protocol.ErrFenced)
		if !retry || ctx.Err() != nil {
			break
		}
		if !warned && time.Since(start) > faultWarnAfter {
			warned = true
			c.logger.Warn("fault refused by the controller; still asking", "disk_id", f.Disk, "segment", f.Segment,
				"op", f.Op, "for", time.Since(start).Round(time.Millisecond), "err", err)
		}
		// If ctx ends meanwhile, the next try fails at once with its
		// error, which is the one returned.
		if errors.Is(b.Wait(ctx), backoff.ErrGaveUp) {
			break
		}
	}
	if unsure {
		// A controller that knows the commit answers it as before; a
		// new leader, or a restarted controller, does not, and calls
		// it stale: the agent writes again (see docs/protocol.md).
		c.logger.Warn("commit of a staged write asked again", "disk_id", f.Disk, "segment", f.Segment, "token", f.Token, "err", err)
	}
	if err != nil {
		return protocol.Reply{}, err
	}
	es, err := entriesFromPB(r.GetEntries())
	if err != nil {
		return protocol.Reply{}, err
	}
	out := protocol.Reply{First: r.GetFirst(), Entries: es, Deferred: r.GetDeferred()}
	if out.Stage, err = stageFromPB(r); err != nil {
		return protocol.Reply{}, err
	}
	return out, nil
}

var _ protocol.Controller = (*Client)(nil)
