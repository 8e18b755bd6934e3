package transport

import (
	"fmt"
	"testing"

	"google.golang.org/protobuf/proto"

	pb "segmap/api/segmapv1"
	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// TestCodeOfStepDown: a controller stepping down answers with errors its
// agents retry (on the next leader), not with I/O errors for their hosts.
func TestCodeOfStepDown(t *testing.T) {
	for _, err := range []error{meta.ErrLeadershipLost, meta.ErrClosed, controller.ErrClosed, protocol.ErrUnavailable} {
		if got := codeOf(fmt.Errorf("fault: %w", err)); got != pb.Code_CODE_UNAVAILABLE {
			t.Errorf("codeOf(%v) = %v, want CODE_UNAVAILABLE", err, got)
		}
	}
	if got := codeOf(fmt.Errorf("x: %w", meta.ErrCorrupt)); got != pb.Code_CODE_IO {
		t.Errorf("codeOf(ErrCorrupt) = %v, want CODE_IO", got)
	}
}

// FuzzStageRoundTrip: a fault reply's stage crosses the wire unchanged,
// whole-segment (no From) and copying (From set) alike, and a reply
// without one stays without.
func FuzzStageRoundTrip(f *testing.F) {
	f.Add(false, uint32(0), uint32(0), uint64(0), uint32(0), uint32(0))
	f.Add(true, uint32(1), uint32(5), uint64(7), uint32(0), uint32(0))
	f.Add(true, uint32(2), uint32(9), uint64(1<<63), uint32(1), uint32(3))
	f.Add(true, uint32(1<<31), uint32(1<<32-1), uint64(1<<64-1), uint32(1<<32-1), uint32(1<<32-1))
	f.Fuzz(func(t *testing.T, staged bool, cont, slot uint32, tok uint64, fromCont, fromSlot uint32) {
		var st *protocol.Stage
		if staged {
			st = &protocol.Stage{Loc: table.Location{Container: cont, Slot: slot}, Token: tok, From: table.Entry{Loc: table.Location{Container: fromCont, Slot: fromSlot}}}
			if fromCont == 0 {
				st.From = table.Entry{} // no container has id 0: no copy
			}
		}
		out := &pb.FaultReply{First: 3}
		stageToPB(out, st)
		b, err := proto.Marshal(out)
		if err != nil {
			t.Fatal(err)
		}
		var back pb.FaultReply
		if err := proto.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		got := stageFromPB(&back)
		switch {
		case st == nil && got != nil:
			t.Fatalf("no stage sent, %+v received", *got)
		case st != nil && (got == nil || *got != *st):
			t.Fatalf("stage %+v sent, %+v received", *st, got)
		case st != nil && got.Copies() != (fromCont != 0):
			t.Fatalf("stage %+v: Copies %v", *got, got.Copies())
		}
	})
}
