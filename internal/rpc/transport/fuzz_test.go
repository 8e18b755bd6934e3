package transport_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	pb "segmap/api/segmapv1"
	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/rpc/adminapi"
	"segmap/internal/rpc/protocol"
	"segmap/internal/rpc/transport"
)

// FuzzRPC sends raw request bytes to every method of the controller's two
// gRPC services (Admin and Mapping, Attach included) over a real gRPC
// connection: the server decodes them as a client's bytes would be. A
// script is a list of calls, each
//
//	[method byte][length byte][length bytes of request]
//
// and an Attach call's request is itself a list of [length byte][message]
// stream messages; its stream stays open until the script ends, so that
// the calls after it meet a live agent session.
//
// Every call must come back within callLimit with a response or a gRPC
// status whose code is not Unknown (a handler never panics: gRPC does not
// recover panics, so one would end the fuzz worker), and after each script
// the controller's Check must find the store undamaged and the heap must
// stay bounded, whatever the script asked for.
func FuzzRPC(f *testing.F) {
	for _, s := range rpcSeeds() {
		f.Add(s)
	}
	env := newRPCEnv(f)
	f.Fuzz(func(t *testing.T, script []byte) {
		env.run(t, script)
	})
}

// callLimit bounds one call: every wait inside the controller (agent
// commands, quiesce, leases) is configured well below it.
const callLimit = 5 * time.Second

// heapLimit is the most heap a script may leave in use: a request must
// never make the server allocate by a size it names.
const heapLimit = 512 << 20

type rpcMethod struct {
	name string        // full method name
	req  proto.Message // a request, for the seeds
}

var rpcMethods = []rpcMethod{
	{"/segmap.v1.Admin/CreateDisk", &pb.CreateDiskRequest{Name: "d", Size: 4 << 20}},
	{"/segmap.v1.Admin/ListDisks", &pb.ListDisksRequest{}},
	{"/segmap.v1.Admin/GetDisk", &pb.GetDiskRequest{Name: "d"}},
	{"/segmap.v1.Admin/ResizeDisk", &pb.ResizeDiskRequest{Name: "d", Size: 8 << 20}},
	{"/segmap.v1.Admin/DeleteDisk", &pb.DeleteDiskRequest{Name: "d"}},
	{"/segmap.v1.Admin/Snapshot", &pb.SnapshotRequest{Sources: []string{"d"}, Names: []string{"s"}}},
	{"/segmap.v1.Admin/ListContainers", &pb.ListContainersRequest{}},
	{"/segmap.v1.Admin/AddContainer", &pb.AddContainerRequest{Uri: "c9"}},
	{"/segmap.v1.Admin/Check", &pb.CheckRequest{}},
	{"/segmap.v1.Admin/Status", &pb.StatusRequest{}},
	{"/segmap.v1.Admin/Grant", &pb.GrantRequest{Name: "d", Agents: []string{"a"}}},
	{"/segmap.v1.Admin/Revoke", &pb.GrantRequest{Name: "d", Agents: []string{"a"}}},
	{"/segmap.v1.Mapping/Open", &pb.OpenRequest{Agent: "a", Disk: "d"}},
	{"/segmap.v1.Mapping/CloseDisk", &pb.CloseDiskRequest{Agent: "a", Disk: 1}},
	{"/segmap.v1.Mapping/Containers", &pb.ContainersRequest{}},
	{"/segmap.v1.Mapping/Fault", &pb.FaultRequest{Agent: "a", RequestId: 1, Epoch: 1, Disk: 1, Op: uint32(protocol.FaultWrite), Count: 1}},
	{"/segmap.v1.Mapping/Exports", &pb.ExportsRequest{Agent: "a"}},
	{"/segmap.v1.Mapping/Attach", nil},
}

var attachMethod = len(rpcMethods) - 1

// call appends one call to a script.
func call(script []byte, method int, req []byte) []byte {
	if len(req) > 255 {
		panic("seed request too long")
	}
	script = append(script, byte(method), byte(len(req)))
	return append(script, req...)
}

func marshal(m proto.Message) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		panic(err)
	}
	return b
}

// attach builds an Attach call's request from stream messages.
func attach(msgs ...*pb.AgentMessage) []byte {
	var b []byte
	for _, m := range msgs {
		mb := marshal(m)
		b = append(b, byte(len(mb)))
		b = append(b, mb...)
	}
	return b
}

func rpcSeeds() [][]byte {
	var seeds [][]byte
	for i, m := range rpcMethods {
		if m.req != nil {
			seeds = append(seeds, call(nil, i, marshal(m.req)))
		}
	}
	idx := func(name string) int {
		for i, m := range rpcMethods {
			if strings.HasSuffix(m.name, "/"+name) {
				return i
			}
		}
		panic(name)
	}
	hello := &pb.AgentMessage{Msg: &pb.AgentMessage_Hello{Hello: &pb.Hello{Name: "a"}}}
	renew := &pb.AgentMessage{Msg: &pb.AgentMessage_Renew{Renew: &pb.Renew{Seq: 1}}}
	result := &pb.AgentMessage{Msg: &pb.AgentMessage_Result{Result: &pb.CommandResult{Id: 1, Status: &pb.Status{}}}}
	// A whole life: create, an agent attaches, opens, faults, a snapshot
	// (its commands go to the agent, which answers one), delete.
	var life []byte
	life = call(life, idx("CreateDisk"), marshal(&pb.CreateDiskRequest{Name: "d", Size: 4 << 20, SegmentSize: 64 << 10}))
	life = call(life, attachMethod, attach(hello, renew, result))
	life = call(life, idx("Open"), marshal(&pb.OpenRequest{Agent: "a", Disk: "d"}))
	life = call(life, idx("Fault"), marshal(&pb.FaultRequest{Agent: "a", RequestId: 7, Epoch: 1, Disk: 1, Segment: 2, Count: 1, Op: uint32(protocol.FaultWrite), Whole: true}))
	life = call(life, idx("Snapshot"), marshal(&pb.SnapshotRequest{Sources: []string{"d"}, Names: []string{"s"}, Writable: true}))
	// A partial write after the snapshot stages a copy; its commit is
	// abandoned.
	life = call(life, idx("Fault"), marshal(&pb.FaultRequest{Agent: "a", RequestId: 8, Epoch: 1, Disk: 1, Segment: 2, Count: 1, Op: uint32(protocol.FaultWrite)}))
	life = call(life, idx("Fault"), marshal(&pb.FaultRequest{Agent: "a", RequestId: 9, Epoch: 1, Disk: 1, Segment: 2, Count: 1, Op: uint32(protocol.FaultCommit), Token: 1, Abandon: true}))
	life = call(life, idx("ResizeDisk"), marshal(&pb.ResizeDiskRequest{Name: "d", Size: 1 << 20, Shrink: true}))
	life = call(life, idx("DeleteDisk"), marshal(&pb.DeleteDiskRequest{Name: "s"}))
	life = call(life, idx("DeleteDisk"), marshal(&pb.DeleteDiskRequest{Name: "d"}))
	seeds = append(seeds, life)
	// Sizes and names a client must not be able to turn into work or
	// memory.
	seeds = append(seeds,
		call(nil, idx("CreateDisk"), marshal(&pb.CreateDiskRequest{Name: "big", Size: 1 << 62, SegmentSize: 4096, Preallocate: true})),
		call(nil, idx("CreateDisk"), marshal(&pb.CreateDiskRequest{Name: strings.Repeat("n", 200), Size: 1 << 40})),
		call(nil, idx("Fault"), marshal(&pb.FaultRequest{Agent: "a", Epoch: 1, Disk: 1, Segment: 1 << 62, Count: 1 << 62, Op: 1})),
		call(nil, idx("Snapshot"), marshal(&pb.SnapshotRequest{Sources: []string{"d", "d", "d"}, Names: []string{"x"}, QuiesceTimeoutMs: 1 << 31})),
		call(nil, attachMethod, attach(hello, &pb.AgentMessage{Msg: &pb.AgentMessage_Hello{Hello: &pb.Hello{Name: "a", OpenDisks: []uint64{1, 1 << 60}}}})),
		[]byte{0, 255, 0xff, 0xff, 0xff},
	)
	return seeds
}

// rpcEnv is a controller over bbolt on a RAM disk with two pools, served by
// both services on a loopback address; it lives as long as the fuzz
// worker, so state builds up across scripts as it would on a server.
type rpcEnv struct {
	ctrl *controller.Controller
	conn *grpc.ClientConn
}

func newRPCEnv(f *testing.F) *rpcEnv {
	base := os.TempDir()
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		base = "/dev/shm"
	}
	dir, err := os.MkdirTemp(base, "segmap-fuzzrpc-")
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { os.RemoveAll(dir) })
	store, err := meta.OpenBolt(filepath.Join(dir, "meta.db"))
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { store.Close() })
	// The admin API may name any file as a container; the fuzzer must
	// not open the machine's, so this controller only opens its own.
	open := func(info protocol.Container) (container.Container, error) {
		p, err := container.FilePath(info.URI)
		if err != nil {
			return nil, err
		}
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		if filepath.Dir(p) != dir {
			return nil, fmt.Errorf("fuzz: container %q outside the test directory: %w", info.URI, container.ErrNotContainer)
		}
		info.URI = container.FileURI(p)
		return container.OpenURI(info)
	}
	ctrl := controller.New(controller.Config{Store: store, OpenContainer: open, Logger: quiet, CommandTimeout: time.Second})
	epoch, err := ctrl.NewEpoch(context.Background())
	if err != nil {
		f.Fatal(err)
	}
	for i, g := range []struct{ slot, slots uint64 }{{64 << 10, 256}, {64 << 10, 256}, {1 << 20, 64}} {
		path := filepath.Join(dir, fmt.Sprintf("c%d", i+1))
		if err := container.CreateFile(path, uint32(i+1), g.slot, g.slots); err != nil {
			f.Fatal(err)
		}
		if _, err := ctrl.AddContainer(context.Background(), container.FileURI(path)); err != nil {
			f.Fatal(err)
		}
	}
	// Spare container files the script may add.
	for i := 9; i < 12; i++ {
		if err := container.CreateFile(filepath.Join(dir, fmt.Sprintf("c%d", i)), uint32(i), 64<<10, 16); err != nil {
			f.Fatal(err)
		}
	}

	gs := grpc.NewServer(transport.ServerOptions()...)
	srv := transport.NewServer(transport.ServerConfig{Ctrl: ctrl, Epoch: epoch, Lease: 300 * time.Millisecond, CommandTimeout: time.Second, Logger: quiet})
	pb.RegisterMappingServer(gs, srv)
	pb.RegisterAdminServer(gs, adminapi.New(adminapi.Config{Ctrl: ctrl, Version: "fuzz"}))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	go gs.Serve(l)
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() {
		conn.Close()
		srv.Close()
		gs.Stop()
		ctrl.Close()
	})
	return &rpcEnv{ctrl: ctrl, conn: conn}
}

// rawCodec sends and receives bytes as they are, so that the server
// decodes exactly what the fuzzer made. It is named "proto" so that the
// server decodes with its protobuf codec.
type rawCodec struct{}

type rawMsg struct{ b []byte }

func (rawCodec) Marshal(v any) ([]byte, error) { return v.(*rawMsg).b, nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	v.(*rawMsg).b = append(v.(*rawMsg).b[:0], data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// maxCalls bounds a script's calls.
const maxCalls = 12

func (e *rpcEnv) run(t *testing.T, script []byte) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var streams []grpc.ClientStream
	drained := make(chan struct{}, maxCalls)
	defer func() {
		for _, s := range streams {
			s.CloseSend()
		}
		cancel()
		for range streams {
			select {
			case <-drained:
			case <-time.After(callLimit):
				t.Fatalf("an Attach stream did not end within %v of being cancelled", callLimit)
			}
		}
	}()
	for calls := 0; len(script) >= 2 && calls < maxCalls; calls++ {
		m := int(script[0]) % len(rpcMethods)
		n := min(int(script[1]), len(script)-2)
		req := script[2 : 2+n]
		script = script[2+n:]
		start := time.Now()
		var err error
		if m == attachMethod {
			var s grpc.ClientStream
			s, err = e.attach(ctx, req, drained)
			if s != nil {
				streams = append(streams, s)
			}
		} else {
			cctx, ccancel := context.WithTimeout(ctx, 2*callLimit)
			err = e.conn.Invoke(cctx, rpcMethods[m].name, &rawMsg{b: req}, &rawMsg{}, grpc.ForceCodec(rawCodec{}))
			ccancel()
		}
		if d := time.Since(start); d > callLimit {
			t.Fatalf("%s took %v (limit %v)", rpcMethods[m].name, d, callLimit)
		}
		if testing.Verbose() {
			t.Logf("%s: %v", rpcMethods[m].name, err)
		}
		if err != nil {
			st, ok := status.FromError(err)
			if !ok || st.Code() == codes.Unknown {
				t.Fatalf("%s: error without a gRPC status code: %v", rpcMethods[m].name, err)
			}
		}
	}
	// The store is whole whatever was asked.
	cctx, ccancel := context.WithTimeout(context.Background(), callLimit)
	defer ccancel()
	ps, err := e.ctrl.Check(cctx)
	if err != nil {
		t.Fatalf("check: %v", err)
	}
	if len(ps) > 0 {
		t.Fatalf("check after the script: %v", ps)
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	if ms.HeapInuse > heapLimit {
		runtime.GC()
		runtime.ReadMemStats(&ms)
		if ms.HeapInuse > heapLimit {
			t.Fatalf("heap in use %d MiB after the script", ms.HeapInuse>>20)
		}
	}
}

// attach opens an Attach stream, sends the messages in req, waits for the
// controller's first message, and reads what the controller sends until
// ctx ends (then signals drained).
func (e *rpcEnv) attach(ctx context.Context, req []byte, drained chan<- struct{}) (grpc.ClientStream, error) {
	desc := &grpc.StreamDesc{StreamName: "Attach", ServerStreams: true, ClientStreams: true}
	s, err := e.conn.NewStream(ctx, desc, "/segmap.v1.Mapping/Attach", grpc.ForceCodec(rawCodec{}))
	if err != nil {
		return nil, err
	}
	first := make(chan struct{})
	go func() {
		defer func() { drained <- struct{}{} }()
		for i := 0; ; i++ {
			var m rawMsg
			err := s.RecvMsg(&m)
			if i == 0 {
				close(first)
			}
			if err != nil {
				return
			}
		}
	}()
	for len(req) > 0 {
		n := min(int(req[0]), len(req)-1)
		if err := s.SendMsg(&rawMsg{b: req[1 : 1+n]}); err != nil {
			if errors.Is(err, io.EOF) {
				break // the server ended the stream; its status comes to RecvMsg
			}
			return s, err
		}
		req = req[1+n:]
	}
	// Let the session start (or fail) before the next call, so that a
	// script means the same thing every time it runs.
	select {
	case <-first:
	case <-time.After(time.Second):
	}
	return s, nil
}
