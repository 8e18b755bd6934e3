// Package transport carries the controller-agent protocol (package
// protocol) over gRPC (api/segmapv1, service Mapping), so that the
// controller and the agents can run as separate processes on separate
// machines.
//
// Server exposes a protocol.Controller to remote agents. Each agent holds
// one Attach stream: the controller's commands go down it, the agent's
// answers and lease renewals come up it. Client is the agent's side: a
// protocol.Controller whose Attach opens that stream and executes the
// commands on the local agent.
//
// # Leases
//
// An agent's lease runs LeaseDuration from the moment it sent its last
// renewal (it renews every third of that). An agent whose lease lapses
// fences itself before the lapse: every table goes Invalid and I/O waits,
// until it has re-attached. So when a command to an agent fails or gets
// no answer, the controller waits until that agent's lease has run out
// and then goes on without it: the agent can no longer be acting on old
// entries. The controller's epoch, which grows at every start, rides on
// every message; an agent refuses commands from an older epoch, and the
// controller refuses faults stamped with another epoch.
package transport

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "segmap/api/segmapv1"
	"segmap/internal/agent"
	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

func entriesToPB(es []table.Entry) []*pb.Entry {
	out := make([]*pb.Entry, len(es))
	for i, e := range es {
		out[i] = entryToPB(e)
	}
	return out
}

// entryToPB converts e for the wire, with its layers if it is partial.
func entryToPB(e table.Entry) *pb.Entry {
	out := &pb.Entry{Container: e.Loc.Container, Slot: e.Loc.Slot, State: uint32(e.State)}
	if e.Partial() {
		out.Bits = bitsToPB(e.Part.Bits)
		out.Under = make([]*pb.Layer, len(e.Part.Under))
		for i, l := range e.Part.Under {
			out.Under[i] = &pb.Layer{Container: l.Loc.Container, Slot: l.Loc.Slot, Bits: bitsToPB(l.Bits)}
		}
	}
	return out
}

// bitsToPB returns b's words up to its last non-zero one.
func bitsToPB(b table.Bits) []uint64 {
	n := len(b)
	for n > 0 && b[n-1] == 0 {
		n--
	}
	return append([]uint64(nil), b[:n]...)
}

// bitsFromPB undoes bitsToPB, refusing sub-blocks beyond table.SubBlocks.
func bitsFromPB(ws []uint64) (table.Bits, error) {
	var b table.Bits
	if len(ws) > len(b) {
		return b, fmt.Errorf("%d words of sub-block bits (at most %d): %w", len(ws), len(b), protocol.ErrBadRequest)
	}
	copy(b[:], ws)
	return b, nil
}

// entriesFromPB converts entries from the wire, refusing undefined states
// and malformed layers.
func entriesFromPB(es []*pb.Entry) ([]table.Entry, error) {
	out := make([]table.Entry, len(es))
	for i, e := range es {
		var err error
		if out[i], err = entryFromPB(e); err != nil {
			return nil, fmt.Errorf("entry %d: %w", i, err)
		}
	}
	return out, nil
}

// entryFromPB converts an entry from the wire. A partial one must have the
// shape table.Partial.Valid checks, for the segment of as many sub-blocks
// as its layers hold (the agent does not know the disk here); anything else
// is protocol.ErrBadRequest.
func entryFromPB(e *pb.Entry) (table.Entry, error) {
	st := table.State(e.GetState())
	if e.GetState() > 0xff || !st.Valid() {
		return table.Entry{}, fmt.Errorf("entry state %d: %w", e.GetState(), protocol.ErrBadRequest)
	}
	out := table.Entry{Loc: table.Location{Container: e.GetContainer(), Slot: e.GetSlot()}, State: st}
	if len(e.GetBits()) == 0 && len(e.GetUnder()) == 0 {
		return out, nil
	}
	switch {
	case out.Voided():
		return table.Entry{}, fmt.Errorf("%v entry with layers: %w", st, protocol.ErrBadRequest)
	case 1+len(e.GetUnder()) > table.MaxDepth:
		return table.Entry{}, fmt.Errorf("entry %v with %d layers (at most %d): %w", out.Loc, 1+len(e.GetUnder()), table.MaxDepth, protocol.ErrBadRequest)
	case len(e.GetUnder()) == 0:
		return table.Entry{}, fmt.Errorf("partial entry %v with no layer under it: %w", out.Loc, protocol.ErrBadRequest)
	case out.Loc.Container == 0:
		return table.Entry{}, fmt.Errorf("partial entry %v has no container: %w", out.Loc, protocol.ErrBadRequest)
	}
	p := &table.Partial{Under: make([]table.Layer, len(e.GetUnder()))}
	var err error
	if p.Bits, err = bitsFromPB(e.GetBits()); err != nil {
		return table.Entry{}, fmt.Errorf("entry %v: %w", out.Loc, err)
	}
	for i, l := range e.GetUnder() {
		p.Under[i].Loc = table.Location{Container: l.GetContainer(), Slot: l.GetSlot()}
		if p.Under[i].Bits, err = bitsFromPB(l.GetBits()); err != nil {
			return table.Entry{}, fmt.Errorf("entry %v, layer %d: %w", out.Loc, i+1, err)
		}
	}
	if err := p.Valid(out.Loc, p.Covered()); err != nil {
		return table.Entry{}, fmt.Errorf("%w: %w", err, protocol.ErrBadRequest)
	}
	out.Part = p
	return out, nil
}

// stageToPB puts st (nil: none) in the fault reply out.
func stageToPB(out *pb.FaultReply, st *protocol.Stage) {
	if st == nil {
		return
	}
	out.Staged = true
	out.StageToken = st.Token
	out.Stage = &pb.Entry{Container: st.Loc.Container, Slot: st.Loc.Slot}
	if st.Copies() {
		out.StageFrom = entryToPB(st.From)
	}
	out.StageSparse = st.Sparse
	out.StageNoFlush = st.NoFlush
	out.StageFillRest = st.FillRest
}

// stageFromPB returns the stage of the fault reply r, nil if it has none.
func stageFromPB(r *pb.FaultReply) (*protocol.Stage, error) {
	if !r.GetStaged() {
		return nil, nil
	}
	st := &protocol.Stage{
		Loc:      table.Location{Container: r.GetStage().GetContainer(), Slot: r.GetStage().GetSlot()},
		Token:    r.GetStageToken(),
		Sparse:   r.GetStageSparse(),
		NoFlush:  r.GetStageNoFlush(),
		FillRest: r.GetStageFillRest(),
	}
	if r.GetStageFrom() != nil {
		from, err := entryFromPB(r.GetStageFrom())
		if err != nil {
			return nil, fmt.Errorf("stage from: %w", err)
		}
		if from.Loc.Container != 0 {
			st.From = from
		}
	}
	return st, nil
}

func diskToPB(d protocol.Disk) *pb.MappedDisk {
	return &pb.MappedDisk{Id: uint64(d.ID), Name: d.Name, Size: d.Size, SegmentSize: d.SegmentSize, ReadOnly: d.ReadOnly, Family: uint64(d.Family)}
}

func diskFromPB(d *pb.MappedDisk) (protocol.Disk, error) {
	out := protocol.Disk{ID: protocol.DiskID(d.GetId()), Name: d.GetName(), Size: d.GetSize(), SegmentSize: d.GetSegmentSize(), ReadOnly: d.GetReadOnly(), Family: protocol.DiskID(d.GetFamily())}
	if err := controller.ValidGeometry(out.Size, out.SegmentSize); err != nil {
		return protocol.Disk{}, fmt.Errorf("disk %q from the wire: %w: %w", out.Name, protocol.ErrBadRequest, err)
	}
	return out, nil
}

// codeOf classifies an error for the wire.
func codeOf(err error) pb.Code {
	switch {
	case err == nil:
		return pb.Code_CODE_OK
	case errors.Is(err, protocol.ErrNoSpace):
		return pb.Code_CODE_NO_SPACE
	case errors.Is(err, protocol.ErrReadOnly):
		return pb.Code_CODE_READ_ONLY
	case errors.Is(err, protocol.ErrNotFound):
		return pb.Code_CODE_NOT_FOUND
	case errors.Is(err, protocol.ErrStale):
		return pb.Code_CODE_STALE
	case errors.Is(err, protocol.ErrFenced), errors.Is(err, controller.ErrUnknownAgent):
		return pb.Code_CODE_FENCED
	case errors.Is(err, protocol.ErrBadRequest), errors.Is(err, table.ErrRange), errors.Is(err, table.ErrVoided),
		errors.Is(err, table.ErrBadState):
		return pb.Code_CODE_BAD_REQUEST
	case errors.Is(err, agent.ErrNoTable):
		return pb.Code_CODE_NO_TABLE
	case errors.Is(err, agent.ErrQuiesceTimeout):
		return pb.Code_CODE_QUIESCE_TIMEOUT
	case errors.Is(err, protocol.ErrUnavailable), errors.Is(err, controller.ErrClosed),
		errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled),
		// A controller stepping down: its store is closed or fenced,
		// nothing was committed, and the next leader will answer. Or
		// its store out of reach mid-commit: the fault told the
		// agents of the segment to load it again (unsettled), and the
		// agent's retry reads it as it now is.
		errors.Is(err, meta.ErrClosed), errors.Is(err, meta.ErrLeadershipLost), errors.Is(err, meta.ErrUnreachable):
		return pb.Code_CODE_UNAVAILABLE
	}
	return pb.Code_CODE_IO
}

// errOf turns a code from the wire back into an error that errors.Is
// recognises.
func errOf(c pb.Code, msg string) error {
	var base error
	switch c {
	case pb.Code_CODE_OK:
		return nil
	case pb.Code_CODE_NO_SPACE:
		base = protocol.ErrNoSpace
	case pb.Code_CODE_READ_ONLY:
		base = protocol.ErrReadOnly
	case pb.Code_CODE_NOT_FOUND:
		base = protocol.ErrNotFound
	case pb.Code_CODE_STALE:
		base = protocol.ErrStale
	case pb.Code_CODE_FENCED:
		base = protocol.ErrFenced
	case pb.Code_CODE_BAD_REQUEST:
		base = protocol.ErrBadRequest
	case pb.Code_CODE_NO_TABLE:
		base = agent.ErrNoTable
	case pb.Code_CODE_QUIESCE_TIMEOUT:
		base = agent.ErrQuiesceTimeout
	case pb.Code_CODE_UNAVAILABLE:
		base = protocol.ErrUnavailable
	default:
		base = protocol.ErrIO
	}
	return &remoteError{msg: msg, base: base}
}

// remoteError is an error that crossed the wire: the other side's message,
// which already names its cause, and the sentinel that cause maps to.
type remoteError struct {
	msg  string
	base error
}

func (e *remoteError) Error() string {
	if strings.Contains(e.msg, e.base.Error()) {
		return e.msg
	}
	return e.msg + ": " + e.base.Error()
}

func (e *remoteError) Unwrap() error { return e.base }

// statusErr wraps an error as a gRPC status whose details carry its code.
func statusErr(err error) error {
	if err == nil {
		return nil
	}
	return status.Error(codes.Code(1000+int(codeOf(err))), err.Error())
}

// answered reports whether err, from a call, is the other side's answer
// (made by statusErr) rather than a transport's failure, after which the
// call may or may not have been carried out.
func answered(err error) bool {
	st, ok := status.FromError(err)
	return ok && int(st.Code()) >= 1000
}

// fromStatus undoes statusErr; transport errors become ErrUnavailable.
func fromStatus(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("%v: %w", err, protocol.ErrUnavailable)
	}
	if c := int(st.Code()); c >= 1000 {
		return errOf(pb.Code(c-1000), st.Message())
	}
	switch st.Code() {
	case codes.Unavailable, codes.Canceled, codes.DeadlineExceeded:
		return fmt.Errorf("%s: %w", st.Message(), protocol.ErrUnavailable)
	}
	return fmt.Errorf("%s: %w", st.Message(), protocol.ErrIO)
}

func diskStatusToPB(s protocol.DiskStatus) *pb.DiskStatus {
	return &pb.DiskStatus{
		Disk: uint64(s.Disk), Segments: s.Segments, Loaded: s.Loaded,
		Invalid: s.Invalid, Error: s.Error, Zero: s.Zero, NoWrite: s.NoWrite, Mapped: s.Mapped,
		InFlight: s.InFlight, FaultsOut: s.FaultsOut, Quiesced: s.Quiesced,
		Leased: s.Leased, LeaseLeftMs: s.LeaseLeft.Milliseconds(),
	}
}

// diskStatusFromPB takes a status as the agent sent it: figures to show,
// checked for nothing (a negative lease reads as lapsed, a huge one is
// cut to what a Duration holds).
func diskStatusFromPB(m *pb.DiskStatus) protocol.DiskStatus {
	return protocol.DiskStatus{
		Disk: protocol.DiskID(m.GetDisk()), Segments: m.GetSegments(), Loaded: m.GetLoaded(),
		Invalid: m.GetInvalid(), Error: m.GetError(), Zero: m.GetZero(), NoWrite: m.GetNoWrite(), Mapped: m.GetMapped(),
		InFlight: m.GetInFlight(), FaultsOut: m.GetFaultsOut(), Quiesced: m.GetQuiesced(),
		Leased: m.GetLeased(), LeaseLeft: time.Duration(min(max(0, m.GetLeaseLeftMs()), math.MaxInt64/int64(time.Millisecond))) * time.Millisecond,
	}
}

// membershipToPB converts a mirrored container's membership.
func membershipToPB(m protocol.Membership) *pb.Membership {
	out := &pb.Membership{Container: m.Container, Epoch: m.Epoch}
	for _, r := range m.Replicas {
		out.Replicas = append(out.Replicas, &pb.Replica{Uri: r.URI, State: uint32(r.State)})
	}
	return out
}

// replicasFromPB converts and checks the replicas of a mirrored container.
func replicasFromPB(rs []*pb.Replica) ([]protocol.Replica, error) {
	if len(rs) == 0 {
		return nil, nil
	}
	if len(rs) < 2 || len(rs) > maxReplicas {
		return nil, fmt.Errorf("mirrored container with %d replicas: %w", len(rs), protocol.ErrBadRequest)
	}
	out := make([]protocol.Replica, len(rs))
	for i, r := range rs {
		if r.GetUri() == "" || r.GetState() > uint32(protocol.ReplicaRebuilding) {
			return nil, fmt.Errorf("replica %d: uri %q, state %d: %w", i, r.GetUri(), r.GetState(), protocol.ErrBadRequest)
		}
		out[i] = protocol.Replica{URI: r.GetUri(), State: protocol.ReplicaState(r.GetState())}
	}
	return out, nil
}

// maxReplicas is meta.MaxReplicas.
const maxReplicas = 3

// membershipFromPB converts and checks a membership.
func membershipFromPB(m *pb.Membership) (protocol.Membership, error) {
	rs, err := replicasFromPB(m.GetReplicas())
	if err != nil {
		return protocol.Membership{}, err
	}
	if len(rs) == 0 {
		return protocol.Membership{}, fmt.Errorf("membership of container %d without replicas: %w", m.GetContainer(), protocol.ErrBadRequest)
	}
	return protocol.Membership{Container: m.GetContainer(), Epoch: m.GetEpoch(), Replicas: rs}, nil
}

// containerToPB converts a container's description.
func containerToPB(c protocol.Container) *pb.ContainerInfo {
	out := &pb.ContainerInfo{Id: c.ID, Uri: c.URI, SlotSize: c.SlotSize, Slots: c.Slots, Epoch: c.Epoch}
	for _, r := range c.Replicas {
		out.Replicas = append(out.Replicas, &pb.Replica{Uri: r.URI, State: uint32(r.State)})
	}
	return out
}

// containerFromPB converts and checks a container's description.
func containerFromPB(c *pb.ContainerInfo) (protocol.Container, error) {
	rs, err := replicasFromPB(c.GetReplicas())
	if err != nil {
		return protocol.Container{}, fmt.Errorf("container %d: %w", c.GetId(), err)
	}
	return protocol.Container{ID: c.GetId(), URI: c.GetUri(), SlotSize: c.GetSlotSize(), Slots: c.GetSlots(), Epoch: c.GetEpoch(), Replicas: rs}, nil
}
