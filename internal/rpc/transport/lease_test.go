package transport_test

import (
	"context"
	"testing"
	"time"

	pb "segmap/api/segmapv1"
)

// TestLateRenewalEndsSession: a renewal that reaches the controller after
// the agent's lease ran out is not granted: by then the controller may have
// gone on without the agent (a snapshot that waited out its lease), so the
// session ends, and the agent must fence itself and attach again with its
// entries forgotten, instead of going on under them.
func TestLateRenewalEndsSession(t *testing.T) {
	checkGoroutines(t)
	ctx := testContext(t, time.Minute)
	const lease = 300 * time.Millisecond
	s := newStack(t, stackOptions{lease: lease})
	conn := dial(t, s.addr)
	defer conn.Close()
	c := pb.NewMappingClient(conn)
	for _, tc := range []struct {
		name  string
		delay time.Duration
		grant bool
	}{
		{"in time", lease / 3, true},
		{"late", 2 * lease, false},
	} {
		sctx, cancel := context.WithCancel(ctx)
		st, err := c.Attach(sctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Send(&pb.AgentMessage{Msg: &pb.AgentMessage_Hello{Hello: &pb.Hello{Name: "a"}}}); err != nil {
			t.Fatal(err)
		}
		if m, err := st.Recv(); err != nil || m.GetWelcome() == nil {
			t.Fatalf("%s: attach: %v, %v", tc.name, m, err)
		}
		time.Sleep(tc.delay)
		if err := st.Send(&pb.AgentMessage{Msg: &pb.AgentMessage_Renew{Renew: &pb.Renew{Seq: 1}}}); err != nil {
			t.Fatal(err)
		}
		m, err := st.Recv()
		granted := err == nil && m.GetLease() != nil
		if granted != tc.grant {
			t.Errorf("%s: renewal %v after the welcome (lease %v): answer %v, %v; want granted %v", tc.name, tc.delay, lease, m, err, tc.grant)
		}
		cancel()
	}
}
