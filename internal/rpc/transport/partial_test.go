package transport_test

import (
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	pb "segmap/api/segmapv1"
	"segmap/internal/rpc/protocol"
	"segmap/internal/rpc/transport"
	"segmap/internal/table"
)

// partialEntry is c1/s6{0-3}<c1/s4{8}<c1/s2 for a 16-sub-block segment.
func partialEntry() table.Entry {
	l := func(s uint32) table.Location { return table.Location{Container: 1, Slot: s} }
	return table.Over(l(6), table.Range(0, 4), table.Over(l(4), table.Range(8, 9), table.Entry{Loc: l(2)}, 16), 16)
}

// faultServer is a Mapping server whose Fault answers with reply and
// records the requests.
type faultServer struct {
	pb.UnimplementedMappingServer
	reply *pb.FaultReply
	mu    sync.Mutex
	reqs  []*pb.FaultRequest
}

func (f *faultServer) Fault(ctx context.Context, r *pb.FaultRequest) (*pb.FaultReply, error) {
	f.mu.Lock()
	f.reqs = append(f.reqs, r)
	f.mu.Unlock()
	return f.reply, nil
}

// TestFaultCarriesPartial: a write fault's span (Off, Len) reaches the
// controller, and a reply's partial entries and its sparse stage from a
// partial entry reach the agent unchanged, layers and all; a reply with a
// malformed partial entry is a BAD_REQUEST error for that fault.
func TestFaultCarriesPartial(t *testing.T) {
	checkGoroutines(t)
	ctx := testContext(t, time.Minute)
	fs := &faultServer{}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	pb.RegisterMappingServer(gs, fs)
	served := make(chan struct{})
	go func() { defer close(served); _ = gs.Serve(l) }()
	defer func() { gs.Stop(); <-served }()
	conn := dial(t, l.Addr().String())
	defer conn.Close()
	c := transport.NewClient(conn, quiet)

	en := partialEntry()
	filled := table.Filled(en, table.Range(4, 6), 16)
	stage := &protocol.Stage{Loc: en.Loc, Token: 11, From: en, Sparse: true}
	// The test plays the controller: it writes the wire form by hand.
	layer := func(s uint32, bits uint64) *pb.Layer { return &pb.Layer{Container: 1, Slot: s, Bits: []uint64{bits}} }
	fromPB := &pb.Entry{Container: 1, Slot: 6, Bits: []uint64{0xf}, Under: []*pb.Layer{layer(4, 1<<8), layer(2, 0xffff)}}
	fs.reply = &pb.FaultReply{
		First: 2,
		Entries: []*pb.Entry{
			{Container: 1, Slot: 6, Bits: []uint64{0x3f}, Under: []*pb.Layer{layer(4, 1<<8), layer(2, 0xffff)}},
			{Container: 1, Slot: 9, State: uint32(table.NoWrite)},
		},
		Staged: true, Stage: &pb.Entry{Container: 1, Slot: 6}, StageToken: 11, StageFrom: fromPB, StageSparse: true,
	}
	r, err := c.Fault(ctx, protocol.Fault{Agent: "a", Disk: 7, Segment: 2, Count: 1, Op: protocol.FaultWrite, Off: 4*4096 + 10, Len: 5000})
	if err != nil {
		t.Fatal(err)
	}
	fs.mu.Lock()
	req := fs.reqs[0]
	fs.mu.Unlock()
	if req.GetOff() != 4*4096+10 || req.GetLen() != 5000 || req.GetWhole() {
		t.Errorf("fault request %v: want off %d len 5000", req, 4*4096+10)
	}
	if len(r.Entries) != 2 || !r.Entries[0].Equal(filled) || r.Entries[0].Depth() != 3 ||
		!r.Entries[1].Equal(table.Entry{Loc: table.Location{Container: 1, Slot: 9}, State: table.NoWrite}) {
		t.Errorf("entries %v, want [%v c1/s9+NoWrite]", r.Entries, filled)
	}
	if st := r.Stage; st == nil || st.Loc != stage.Loc || st.Token != 11 || !st.Sparse || !st.From.Equal(en) || !st.Copies() {
		t.Errorf("stage %+v, want %+v", r.Stage, stage)
	}

	// The same reply with a layer without a container.
	bad := proto.Clone(fs.reply).(*pb.FaultReply)
	bad.Entries[0].Under[0].Container = 0
	fs.reply = bad
	if _, err := c.Fault(ctx, protocol.Fault{Agent: "a", Disk: 7, Segment: 2, Count: 1, Op: protocol.FaultWrite, Off: 0, Len: 10}); !errors.Is(err, protocol.ErrBadRequest) {
		t.Errorf("a reply with a layer in container 0: %v, want ErrBadRequest", err)
	}
	bad = proto.Clone(fs.reply).(*pb.FaultReply)
	bad.Entries[0].Under[0].Container = 1
	bad.StageFrom.Bits = []uint64{0xf, 0, 0, 0, 1}
	fs.reply = bad
	if _, err := c.Fault(ctx, protocol.Fault{Agent: "a", Disk: 7, Segment: 2, Count: 1, Op: protocol.FaultWrite, Off: 0, Len: 10}); !errors.Is(err, protocol.ErrBadRequest) {
		t.Errorf("a stage from an entry with bits beyond 256: %v, want ErrBadRequest", err)
	}
}

// TestSetEntryCarriesPartial: a set_entry command carries partial entries
// into the agent's table, which get_entry gives back unchanged; one with
// a malformed partial entry is refused with BAD_REQUEST and changes
// nothing.
func TestSetEntryCarriesPartial(t *testing.T) {
	checkGoroutines(t)
	s := newFakeSession(t, 3)
	layer := func(s uint32, bits ...uint64) *pb.Layer { return &pb.Layer{Container: 1, Slot: s, Bits: bits} }
	full := table.Full(table.SubBlockCount(segSize))
	words := full[:]
	for len(words) > 0 && words[len(words)-1] == 0 {
		words = words[:len(words)-1] // as the wire carries them
	}
	en := []*pb.Entry{
		{Container: 1, Slot: 6, Bits: []uint64{0xf}, Under: []*pb.Layer{layer(4, 1<<8), layer(2, words...)}},
		{Container: 1, Slot: 7, State: uint32(table.NoWrite), Bits: []uint64{1 << 3}, Under: []*pb.Layer{layer(3, words...)}},
	}
	r := s.do(&pb.Command{Cmd: &pb.Command_SetEntry{SetEntry: &pb.SetEntry{Disk: 7, First: 1, Entries: en}}})
	if r.GetStatus().GetCode() != pb.Code_CODE_OK {
		t.Fatalf("set_entry: %v", r)
	}
	r = s.do(getEntries(7, 1, 2))
	if r.GetStatus().GetCode() != pb.Code_CODE_OK || len(r.GetEntries()) != 2 {
		t.Fatalf("get_entry: %v", r)
	}
	for i, e := range r.GetEntries() {
		if !proto.Equal(e, en[i]) {
			t.Errorf("entry %d came back %v, want %v", 1+i, e, en[i])
		}
	}
	bad := []*pb.Entry{{Container: 1, Slot: 5}, {Container: 1, Slot: 6, State: uint32(table.Zero), Bits: []uint64{1}, Under: []*pb.Layer{layer(2, words...)}}}
	r = s.do(&pb.Command{Cmd: &pb.Command_SetEntry{SetEntry: &pb.SetEntry{Disk: 7, First: 0, Entries: bad}}})
	if r.GetStatus().GetCode() != pb.Code_CODE_BAD_REQUEST {
		t.Errorf("set_entry with layers on a Zero entry: %v, want BAD_REQUEST", r)
	}
	r = s.do(getEntries(7, 0, 2))
	if e := r.GetEntries(); len(e) != 2 || e[0].GetState() != uint32(table.Invalid) || !proto.Equal(e[1], en[0]) {
		t.Errorf("entries after a refused set_entry: %v", e)
	}
}
