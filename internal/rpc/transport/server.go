package transport

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	pb "segmap/api/segmapv1"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// DefaultLease is how long an agent's lease runs from its last renewal.
const DefaultLease = 4 * time.Second

// ServerConfig configures a Server.
type ServerConfig struct {
	// Ctrl is the controller agents attach to.
	Ctrl protocol.Controller
	// Epoch is the controller's epoch: larger than any earlier
	// controller's on the same store.
	Epoch uint64
	// Lease is the agents' lease; DefaultLease if 0.
	Lease time.Duration
	// CommandTimeout bounds how long a command waits for an agent that
	// still holds its lease; 30 s if 0.
	CommandTimeout time.Duration
	Logger         *slog.Logger
	// Now is the clock; time.Now if nil.
	Now func() time.Time
}

// Server serves the Mapping service.
type Server struct {
	pb.UnimplementedMappingServer
	cfg ServerConfig

	mu      sync.Mutex
	agents  map[string]*remoteAgent
	closing chan struct{}
	once    sync.Once
}

// Close ends every agent's stream (they re-attach to whichever controller
// comes next); a gRPC server's GracefulStop can then finish.
func (s *Server) Close() {
	s.once.Do(func() { close(s.closing) })
}

// NewServer returns a Server.
func NewServer(cfg ServerConfig) *Server {
	if cfg.Lease <= 0 {
		cfg.Lease = DefaultLease
	}
	if cfg.CommandTimeout <= 0 {
		cfg.CommandTimeout = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Server{cfg: cfg, agents: map[string]*remoteAgent{}, closing: make(chan struct{})}
}

// remoteAgent is a protocol.Agent at the other end of an Attach stream.
type remoteAgent struct {
	s    *Server
	name string
	send chan *pb.ControllerMessage // to the stream's sender

	mu struct {
		sync.Mutex
		nextID  uint64
		waiting map[uint64]chan *pb.CommandResult
		// leaseEnd is when the agent's lease runs out: it has fenced
		// itself by then if it could not renew.
		leaseEnd time.Time
		gone     bool // the stream ended
		// faults remembers recent fault answers by request id, so that
		// a retried fault is answered, not applied again.
		faults     map[uint64]*faultAnswer
		faultOrder []uint64
	}
	done chan struct{} // closed when the stream ends
}

type faultAnswer struct {
	reply *pb.FaultReply
	err   error
}

// maxRemembered bounds the fault answers remembered per agent.
const maxRemembered = 1024

// Attach implements pb.MappingServer.
func (s *Server) Attach(stream pb.Mapping_AttachServer) error {
	ctx := stream.Context()
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	hello := first.GetHello()
	if hello == nil || hello.GetName() == "" {
		return statusErr(fmt.Errorf("attach: the first message must be a Hello with a name: %w", protocol.ErrBadRequest))
	}
	if err := checkAgent(ctx, hello.GetName()); err != nil {
		return err
	}
	ra := &remoteAgent{s: s, name: hello.GetName(), send: make(chan *pb.ControllerMessage, 64), done: make(chan struct{})}
	ra.mu.waiting = map[uint64]chan *pb.CommandResult{}
	ra.mu.faults = map[uint64]*faultAnswer{}
	ra.mu.leaseEnd = s.cfg.Now().Add(s.cfg.Lease)

	// The controller registers the agent first: from the Welcome on, the
	// agent's faults and the controller's commands must concern this
	// attach, not the one it replaces (whose agent has restarted or
	// reconnected with every entry forgotten). Commands sent meanwhile
	// wait in ra.send until the sender starts, after the Welcome.
	open := make([]protocol.DiskID, len(hello.GetOpenDisks()))
	for i, id := range hello.GetOpenDisks() {
		open[i] = protocol.DiskID(id)
	}
	// The previous attach ends now (its faults are refused from here
	// on), and this one is served only once the controller knows it.
	s.mu.Lock()
	if old := s.agents[ra.name]; old != nil {
		old.end()
	}
	s.mu.Unlock()
	defer func() {
		ra.end()
		s.mu.Lock()
		if s.agents[ra.name] == ra {
			delete(s.agents, ra.name)
		}
		s.mu.Unlock()
	}()
	if err := s.cfg.Ctrl.Attach(ctx, ra.name, ra, open); err != nil {
		return statusErr(err)
	}
	s.mu.Lock()
	if old := s.agents[ra.name]; old != nil && old != ra {
		old.end()
	}
	s.agents[ra.name] = ra
	s.mu.Unlock()
	if err := stream.Send(&pb.ControllerMessage{Epoch: s.cfg.Epoch, Msg: &pb.ControllerMessage_Welcome{Welcome: &pb.Welcome{LeaseMs: s.cfg.Lease.Milliseconds()}}}); err != nil {
		return err
	}
	s.cfg.Logger.Info("agent attached", "agent", ra.name, "open", len(open))

	// The sender: commands and lease grants, in order.
	sendErr := make(chan error, 1)
	go func() {
		for {
			select {
			case m := <-ra.send:
				if err := stream.Send(m); err != nil {
					sendErr <- err
					return
				}
			case <-ra.done:
				sendErr <- nil
				return
			}
		}
	}()
	defer func() { ra.end(); <-sendErr }() //nolint:errcheck // waits for the sender; the stream's end is reported below

	msgs := make(chan *pb.AgentMessage)
	recvErr := make(chan error, 1)
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case msgs <- m:
			case <-ra.done:
				recvErr <- nil
				return
			}
		}
	}()
	for {
		var m *pb.AgentMessage
		select {
		case m = <-msgs:
		case err := <-recvErr:
			s.cfg.Logger.Info("agent stream ended", "agent", ra.name, "err", err)
			return nil
		case <-s.closing:
			return nil
		case <-ra.done:
			return nil
		}
		switch x := m.Msg.(type) {
		case *pb.AgentMessage_Result:
			ra.deliver(x.Result)
		case *pb.AgentMessage_Renew:
			// A renewal that comes after the lease ran out renews
			// nothing: the controller may have gone on without the
			// agent (waited out its lease), which must fence itself
			// and attach again with its entries forgotten.
			if !ra.renew() {
				s.cfg.Logger.Warn("renewal after the lease ran out; ending the session", "agent", ra.name)
				return nil
			}
			select {
			case ra.send <- &pb.ControllerMessage{Epoch: s.cfg.Epoch, Msg: &pb.ControllerMessage_Lease{Lease: &pb.Lease{Seq: x.Renew.GetSeq(), LeaseMs: s.cfg.Lease.Milliseconds()}}}:
			case <-ra.done:
			}
		default:
			s.cfg.Logger.Warn("unexpected message from agent", "agent", ra.name)
		}
	}
}

// end marks the stream ended: commands waiting for answers stop waiting
// for them (and wait for the lease instead).
func (ra *remoteAgent) end() {
	ra.mu.Lock()
	defer ra.mu.Unlock()
	if ra.mu.gone {
		return
	}
	ra.mu.gone = true
	close(ra.done)
}

func (ra *remoteAgent) deliver(r *pb.CommandResult) {
	ra.mu.Lock()
	ch := ra.mu.waiting[r.GetId()]
	delete(ra.mu.waiting, r.GetId())
	ra.mu.Unlock()
	if ch != nil {
		ch <- r
	}
}

// command sends c and waits for the agent's answer. If the agent cannot
// be reached or does not answer in time, command waits until the agent's
// lease has run out, by which time the agent has fenced itself (every
// entry Invalid, I/O held), and then reports success: the restrictive
// change the controller wanted holds a fortiori.
func (ra *remoteAgent) command(ctx context.Context, c *pb.Command) (*pb.CommandResult, error) {
	ra.mu.Lock()
	ra.mu.nextID++
	c.Id = ra.mu.nextID
	ch := make(chan *pb.CommandResult, 1)
	ra.mu.waiting[c.Id] = ch
	gone := ra.mu.gone
	ra.mu.Unlock()
	defer func() {
		ra.mu.Lock()
		delete(ra.mu.waiting, c.Id)
		ra.mu.Unlock()
	}()
	s := ra.s
	if !gone {
		timer := time.NewTimer(s.cfg.CommandTimeout)
		defer timer.Stop()
		// The lease is checked while waiting: an agent that stops
		// renewing has fenced itself by the time its lease ends.
		tick := time.NewTicker(max(s.cfg.Lease/10, time.Millisecond))
		defer tick.Stop()
		select {
		case ra.send <- &pb.ControllerMessage{Epoch: s.cfg.Epoch, Msg: &pb.ControllerMessage_Command{Command: c}}:
		wait:
			for {
				select {
				case r := <-ch:
					return r, errOf(r.GetStatus().GetCode(), r.GetStatus().GetMessage())
				case <-ra.done:
					break wait
				case <-tick.C:
					if ra.leaseOver() {
						break wait
					}
				case <-timer.C:
					// The agent renews its lease but does not answer:
					// it is alive, and may still be doing I/O under the
					// old entries. That is a failure, not a fence.
					return nil, fmt.Errorf("agent %q did not answer in %v: %w", ra.name, s.cfg.CommandTimeout, protocol.ErrUnavailable)
				case <-ctx.Done():
					return nil, ctx.Err()
				}
			}
		case <-ra.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	// No answer: wait out the lease; the session ends with it (the agent
	// must re-attach, with everything forgotten).
	for logged := false; ; logged = true {
		end, over := ra.endIfLeaseOver()
		if over {
			return nil, nil
		}
		if !logged {
			s.cfg.Logger.Warn("agent did not answer; waiting for its lease to run out", "agent", ra.name, "until", end)
		}
		t := time.NewTimer(end.Sub(s.cfg.Now()))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		}
	}
}

// renew extends the agent's lease from now, unless it has run out or the
// session has ended, and reports whether it did. The check and the
// extension are one step: a command that found the lease over and went on
// without the agent is never followed by a renewal. The lease runs from
// when the agent sent the renewal; receiving it now is later than that, so
// the end set here is never earlier than the agent's own.
func (ra *remoteAgent) renew() bool {
	ra.mu.Lock()
	defer ra.mu.Unlock()
	now := ra.s.cfg.Now()
	if ra.mu.gone || !now.Before(ra.mu.leaseEnd) {
		return false
	}
	ra.mu.leaseEnd = now.Add(ra.s.cfg.Lease)
	return true
}

// endIfLeaseOver ends the session if the agent's lease has run out, and
// otherwise returns when it will.
func (ra *remoteAgent) endIfLeaseOver() (until time.Time, over bool) {
	ra.mu.Lock()
	defer ra.mu.Unlock()
	if ra.s.cfg.Now().Before(ra.mu.leaseEnd) {
		return ra.mu.leaseEnd, false
	}
	if !ra.mu.gone {
		ra.mu.gone = true
		close(ra.done)
	}
	return time.Time{}, true
}

// ended reports whether the agent's stream has ended.
func (ra *remoteAgent) ended() bool {
	ra.mu.Lock()
	defer ra.mu.Unlock()
	return ra.mu.gone
}

// leaseOver reports whether the agent's lease has run out.
func (ra *remoteAgent) leaseOver() bool {
	ra.mu.Lock()
	defer ra.mu.Unlock()
	return !ra.s.cfg.Now().Before(ra.mu.leaseEnd)
}

func (ra *remoteAgent) NewTable(ctx context.Context, d protocol.Disk) error {
	_, err := ra.command(ctx, &pb.Command{Cmd: &pb.Command_NewTable{NewTable: &pb.NewTable{Disk: diskToPB(d)}}})
	return err
}

func (ra *remoteAgent) DeleteTable(ctx context.Context, id protocol.DiskID) error {
	_, err := ra.command(ctx, &pb.Command{Cmd: &pb.Command_DeleteTable{DeleteTable: &pb.DeleteTable{Disk: uint64(id)}}})
	return err
}

func (ra *remoteAgent) GetEntry(ctx context.Context, id protocol.DiskID, first, n uint64) ([]table.Entry, error) {
	r, err := ra.command(ctx, &pb.Command{Cmd: &pb.Command_GetEntry{GetEntry: &pb.GetEntry{Disk: uint64(id), First: first, Count: n}}})
	if err != nil {
		return nil, err
	}
	if r == nil {
		return nil, fmt.Errorf("agent %q fenced: %w", ra.name, protocol.ErrFenced)
	}
	return entriesFromPB(r.GetEntries())
}

func (ra *remoteAgent) GetStatus(ctx context.Context, id protocol.DiskID) (protocol.DiskStatus, error) {
	r, err := ra.command(ctx, &pb.Command{Cmd: &pb.Command_GetStatus{GetStatus: &pb.GetStatus{Disk: uint64(id)}}})
	if err != nil {
		return protocol.DiskStatus{}, err
	}
	if r == nil {
		return protocol.DiskStatus{}, fmt.Errorf("agent %q fenced: %w", ra.name, protocol.ErrFenced)
	}
	if r.GetDiskStatus() == nil {
		return protocol.DiskStatus{}, fmt.Errorf("agent %q answered get_status without a status: %w", ra.name, protocol.ErrBadRequest)
	}
	return diskStatusFromPB(r.GetDiskStatus()), nil
}

func (ra *remoteAgent) SetEntry(ctx context.Context, c protocol.SetEntry) error {
	_, err := ra.command(ctx, &pb.Command{Cmd: &pb.Command_SetEntry{SetEntry: &pb.SetEntry{
		Disk: uint64(c.Disk), First: c.First, Entries: entriesToPB(c.Entries), Blocking: c.Blocking}}})
	return err
}

func (ra *remoteAgent) SetEntryState(ctx context.Context, c protocol.SetEntryState) error {
	_, err := ra.command(ctx, &pb.Command{Cmd: &pb.Command_SetEntryState{SetEntryState: &pb.SetEntryState{
		Disk: uint64(c.Disk), First: c.First, Count: c.Count, State: uint32(c.State), On: c.On, Blocking: c.Blocking}}})
	return err
}

func (ra *remoteAgent) Quiesce(ctx context.Context, id protocol.DiskID, timeout time.Duration) error {
	r, err := ra.command(ctx, &pb.Command{Cmd: &pb.Command_Quiesce{Quiesce: &pb.Quiesce{Disk: uint64(id), TimeoutMs: timeout.Milliseconds()}}})
	if err == nil && r == nil {
		// Fenced agents have no I/O to drain, but a quiesce must
		// not be reported as done for an agent that may come back
		// mid-snapshot and write: fail it, the snapshot is retried.
		return fmt.Errorf("quiesce: agent %q did not answer: %w", ra.name, protocol.ErrUnavailable)
	}
	return err
}

func (ra *remoteAgent) Activate(ctx context.Context, id protocol.DiskID) error {
	_, err := ra.command(ctx, &pb.Command{Cmd: &pb.Command_Activate{Activate: &pb.Activate{Disk: uint64(id)}}})
	return err
}

func (ra *remoteAgent) SetMembership(ctx context.Context, m protocol.Membership) error {
	_, err := ra.command(ctx, &pb.Command{Cmd: &pb.Command_SetMembership{SetMembership: membershipToPB(m)}})
	return err
}

var _ protocol.Agent = (*remoteAgent)(nil)

// --- unary calls ------------------------------------------------------------

// Open implements pb.MappingServer.
func (s *Server) Open(ctx context.Context, r *pb.OpenRequest) (*pb.MappedDisk, error) {
	if err := checkAgent(ctx, r.GetAgent()); err != nil {
		return nil, err
	}
	d, err := s.cfg.Ctrl.Open(ctx, r.GetAgent(), r.GetDisk())
	if err != nil {
		return nil, statusErr(err)
	}
	return diskToPB(d), nil
}

// CloseDisk implements pb.MappingServer.
func (s *Server) CloseDisk(ctx context.Context, r *pb.CloseDiskRequest) (*pb.CloseDiskResponse, error) {
	if err := checkAgent(ctx, r.GetAgent()); err != nil {
		return nil, err
	}
	return &pb.CloseDiskResponse{}, statusErr(s.cfg.Ctrl.CloseDisk(ctx, r.GetAgent(), protocol.DiskID(r.GetDisk())))
}

// Containers implements pb.MappingServer.
func (s *Server) Containers(ctx context.Context, _ *pb.ContainersRequest) (*pb.ContainersResponse, error) {
	cs, err := s.cfg.Ctrl.Containers(ctx)
	if err != nil {
		return nil, statusErr(err)
	}
	out := &pb.ContainersResponse{}
	for _, c := range cs {
		out.Containers = append(out.Containers, containerToPB(c))
	}
	return out, nil
}

// ReportReplica implements pb.MappingServer, for agents with a live
// session.
func (s *Server) ReportReplica(ctx context.Context, r *pb.ReplicaReport) (*pb.Membership, error) {
	if err := checkAgent(ctx, r.GetAgent()); err != nil {
		return nil, err
	}
	s.mu.Lock()
	ra := s.agents[r.GetAgent()]
	s.mu.Unlock()
	if ra == nil || ra.ended() || ra.leaseOver() {
		return nil, statusErr(fmt.Errorf("replica report from %q, which has no live session: %w", r.GetAgent(), protocol.ErrFenced))
	}
	if r.GetFailed() < -1 || r.GetFailed() >= maxReplicas || len(r.GetSlots()) > protocol.MaxReadRange {
		return nil, statusErr(fmt.Errorf("replica report: replica %d, %d slots: %w", r.GetFailed(), len(r.GetSlots()), protocol.ErrBadRequest))
	}
	m, err := s.cfg.Ctrl.ReportReplica(ctx, protocol.ReplicaReport{Agent: r.GetAgent(), Container: r.GetContainer(), Epoch: r.GetEpoch(),
		Failed: int(r.GetFailed()), URI: r.GetUri(), Cause: r.GetCause(), Slots: r.GetSlots()})
	if err != nil {
		return nil, statusErr(err)
	}
	return membershipToPB(m), nil
}

// Exports implements pb.MappingServer.
func (s *Server) Exports(ctx context.Context, r *pb.ExportsRequest) (*pb.ExportsResponse, error) {
	if err := checkAgent(ctx, r.GetAgent()); err != nil {
		return nil, err
	}
	ds, err := s.cfg.Ctrl.Exports(ctx, r.GetAgent())
	if err != nil {
		return nil, statusErr(err)
	}
	out := &pb.ExportsResponse{}
	for _, d := range ds {
		out.Disks = append(out.Disks, diskToPB(d))
	}
	return out, nil
}

// Fault implements pb.MappingServer. A fault stamped with another epoch
// comes from an agent attached to an earlier controller: it must
// re-attach. A fault whose request id was seen is answered as it was.
func (s *Server) Fault(ctx context.Context, r *pb.FaultRequest) (*pb.FaultReply, error) {
	if err := checkAgent(ctx, r.GetAgent()); err != nil {
		return nil, err
	}
	if r.GetEpoch() != s.cfg.Epoch {
		return nil, statusErr(fmt.Errorf("fault stamped with epoch %d, controller is at %d: %w", r.GetEpoch(), s.cfg.Epoch, protocol.ErrFenced))
	}
	s.mu.Lock()
	ra := s.agents[r.GetAgent()]
	s.mu.Unlock()
	if ra == nil || ra.ended() || ra.leaseOver() {
		return nil, statusErr(fmt.Errorf("fault from %q, which has no live session: %w", r.GetAgent(), protocol.ErrFenced))
	}
	if r.GetOp() == 0 || r.GetOp() > uint32(protocol.FaultFlush) || r.GetReason() > 0xff {
		return nil, statusErr(fmt.Errorf("fault op %d reason %d: %w", r.GetOp(), r.GetReason(), protocol.ErrBadRequest))
	}
	id := r.GetRequestId()
	ra.mu.Lock()
	if a := ra.mu.faults[id]; a != nil && id != 0 {
		ra.mu.Unlock()
		return a.reply, statusErr(a.err)
	}
	ra.mu.Unlock()

	rep, err := s.cfg.Ctrl.Fault(ctx, protocol.Fault{
		Agent: r.GetAgent(), Disk: protocol.DiskID(r.GetDisk()), Segment: r.GetSegment(), Count: r.GetCount(),
		Op: protocol.FaultOp(r.GetOp()), Reason: table.State(r.GetReason()), Whole: r.GetWhole(), Token: r.GetToken(), Abandon: r.GetAbandon(),
		Off: r.GetOff(), Len: r.GetLen(), ID: id,
	})
	var out *pb.FaultReply
	if err == nil {
		out = &pb.FaultReply{First: rep.First, Entries: entriesToPB(rep.Entries), Deferred: rep.Deferred}
		stageToPB(out, rep.Stage)
	}
	// Remember answers, not failures to answer: a retry after a timeout
	// or an outage must be tried again.
	transient := ctx.Err() != nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, protocol.ErrUnavailable) || errors.Is(err, protocol.ErrFenced)
	if id != 0 && !transient {
		ra.mu.Lock()
		ra.mu.faults[id] = &faultAnswer{reply: out, err: err}
		ra.mu.faultOrder = append(ra.mu.faultOrder, id)
		if len(ra.mu.faultOrder) > maxRemembered {
			delete(ra.mu.faults, ra.mu.faultOrder[0])
			ra.mu.faultOrder = ra.mu.faultOrder[1:]
		}
		ra.mu.Unlock()
	}
	return out, statusErr(err)
}
