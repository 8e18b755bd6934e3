package dashboard

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"

	pb "segmap/api/segmapv1"
	"segmap/internal/controller"
	"segmap/internal/leaktest"
	"segmap/internal/rpc/adminapi"
	"segmap/internal/standalone"
)

func TestMain(m *testing.M) { leaktest.VerifyTestMain(m) }

// fixture is a dashboard over a real controller's admin API, in process:
// disk d (8 segments of 1 MiB, two written), its snapshot d@1, and a
// writable clone c of d@1.
type fixture struct {
	t     *testing.T
	admin pb.AdminClient
	srv   *httptest.Server
	d     *Dashboard
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	ctx := context.Background()
	const seg = 1 << 20 // the default: what the page's create disk uses
	c, err := standalone.Open(ctx, t.TempDir(), standalone.Options{
		Agents: []string{"host-a"},
		Pool:   []standalone.PoolSpec{{SlotSize: seg, Slots: 64, Count: 2}},
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Error(err)
		}
	})
	lis := bufconn.Listen(1 << 20)
	gs := grpc.NewServer()
	pb.RegisterAdminServer(gs, adminapi.New(adminapi.Config{Ctrl: c.Ctrl, Version: "test"}))
	served := make(chan error, 1)
	go func() { served <- gs.Serve(lis) }()
	t.Cleanup(func() { gs.Stop(); <-served })
	conn, err := grpc.NewClient("passthrough:///bufconn", grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	admin := pb.NewAdminClient(conn)

	if _, err := c.Ctrl.CreateDisk(ctx, controller.CreateOptions{Name: "d", Size: 8 * seg, SegmentSize: seg}); err != nil {
		t.Fatal(err)
	}
	h, err := c.Agents[0].Open(ctx, "d")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.WriteAt(ctx, bytes.Repeat([]byte{1}, 2*seg), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := h.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Snapshot(ctx, &pb.SnapshotRequest{Sources: []string{"d"}, Names: []string{"d@1"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Snapshot(ctx, &pb.SnapshotRequest{Sources: []string{"d@1"}, Names: []string{"c"}, Writable: true}); err != nil {
		t.Fatal(err)
	}

	d := New(Config{Admin: admin, Logger: slog.New(slog.DiscardHandler), Role: func() string { return "leader" }})
	t.Cleanup(d.Close)
	srv := httptest.NewServer(d)
	t.Cleanup(srv.Close)
	return &fixture{t: t, admin: admin, srv: srv, d: d}
}

// do sends a request to the dashboard; same-origin with the token unless
// hdr says otherwise (a value "" removes a header).
func (f *fixture) do(method, path, body string, hdr map[string]string) (int, string) {
	f.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, f.srv.URL+path, rd)
	if err != nil {
		f.t.Fatal(err)
	}
	if method != http.MethodGet {
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Origin", f.srv.URL)
		req.Header.Set("Sec-Fetch-Site", "same-origin")
		req.Header.Set(TokenHeader, f.d.Token())
	}
	for k, v := range hdr {
		if v == "" {
			req.Header.Del(k)
		} else {
			req.Header.Set(k, v)
		}
	}
	resp, err := f.srv.Client().Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		f.t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

func (f *fixture) disks() map[string]*pb.Disk {
	f.t.Helper()
	r, err := f.admin.ListDisks(context.Background(), &pb.ListDisksRequest{})
	if err != nil {
		f.t.Fatal(err)
	}
	m := map[string]*pb.Disk{}
	for _, d := range r.Disks {
		m[d.Name] = d
	}
	return m
}

// TestState: /api/state shows the tree (the clone under its snapshot
// under its disk) with the admin API's space figures, the pool and its
// containers, the agent and the role.
func TestState(t *testing.T) {
	f := newFixture(t)
	code, body := f.do(http.MethodGet, "/api/state", "", nil)
	if code != http.StatusOK {
		t.Fatalf("GET /api/state: %d %s", code, body)
	}
	var s state
	if err := json.Unmarshal([]byte(body), &s); err != nil {
		t.Fatal(err)
	}
	if s.Role != "leader" || s.Version != "test" || s.DiskCount != 3 {
		t.Errorf("role %q version %q disks %d, want leader, test, 3", s.Role, s.Version, s.DiskCount)
	}
	if len(s.Disks) != 1 || s.Disks[0].Name != "d" || len(s.Disks[0].Children) != 1 ||
		s.Disks[0].Children[0].Name != "d@1" || len(s.Disks[0].Children[0].Children) != 1 || s.Disks[0].Children[0].Children[0].Name != "c" {
		t.Fatalf("tree: %s", body)
	}
	d, snap := s.Disks[0], s.Disks[0].Children[0]
	want := f.disks()
	if d.Size != 8<<20 || d.SizeText != "8M" || d.Allocated != want["d"].Allocated || d.Shared != want["d"].Shared || d.Exclusive != want["d"].Exclusive {
		t.Errorf("disk d: %+v, admin API says %v", d, want["d"])
	}
	if d.Shared != 2<<20 || !snap.ReadOnly || snap.Shared != 2<<20 {
		t.Errorf("d shares %d, snapshot (read-only %v) shares %d; want 2 MiB each", d.Shared, snap.ReadOnly, snap.Shared)
	}
	if len(s.Pools) != 1 || s.Pools[0].Containers != 2 || s.Pools[0].Slots != 128 || s.Pools[0].UsedSlots != 2 || len(s.Containers) != 2 {
		t.Errorf("pools %+v containers %+v", s.Pools, s.Containers)
	}
	if len(s.Agents) != 1 || s.Agents[0].Name != "host-a" {
		t.Errorf("agents %+v", s.Agents)
	}
}

// TestPage: the page carries the token; its files are built in.
func TestPage(t *testing.T) {
	f := newFixture(t)
	code, body := f.do(http.MethodGet, "/", "", nil)
	if code != http.StatusOK || !strings.Contains(body, `<meta name="segmap-token" content="`+f.d.Token()+`">`) {
		t.Fatalf("GET /: %d, token meta missing:\n%s", code, body)
	}
	for _, p := range []string{"/static/app.js", "/static/style.css"} {
		if code, body := f.do(http.MethodGet, p, "", nil); code != http.StatusOK || len(body) < 1000 {
			t.Errorf("GET %s: %d, %d bytes", p, code, len(body))
		}
	}
	if code, _ := f.do(http.MethodGet, "/nope", "", nil); code != http.StatusNotFound {
		t.Errorf("GET /nope: %d, want 404", code)
	}
	if code, _ := f.do(http.MethodGet, "/api/series", "", nil); code != http.StatusOK {
		t.Errorf("GET /api/series: %d", code)
	}
}

// TestActions: snapshot, create and delete through the API, and the
// admin API's refusals passed on with its message and a fitting status.
func TestActions(t *testing.T) {
	f := newFixture(t)
	if code, body := f.do(http.MethodPost, "/api/snapshots", `{"disk":"d","name":"d@2"}`, nil); code != http.StatusOK || !strings.Contains(body, `"d@2"`) {
		t.Fatalf("snapshot: %d %s", code, body)
	}
	if d := f.disks()["d@2"]; d == nil || !d.ReadOnly || d.Origin != "d" {
		t.Fatalf("d@2 after snapshot: %v", d)
	}
	if code, body := f.do(http.MethodPost, "/api/disks", `{"name":"e","size":"1M"}`, nil); code != http.StatusOK {
		t.Fatalf("create disk: %d %s", code, body)
	}
	if d := f.disks()["e"]; d == nil || d.Size != 1<<20 {
		t.Fatalf("e after create: %v", d)
	}
	if code, body := f.do(http.MethodGet, "/api/disks/d@2/delete-preview", "", nil); code != http.StatusOK || !strings.Contains(body, "freed_bytes") {
		t.Errorf("delete preview: %d %s", code, body)
	}
	if f.disks()["d@2"] == nil {
		t.Fatal("the delete preview deleted d@2")
	}
	if code, body := f.do(http.MethodDelete, "/api/snapshots/d@2", "", nil); code != http.StatusOK {
		t.Fatalf("delete d@2: %d %s", code, body)
	}
	if f.disks()["d@2"] != nil {
		t.Fatal("d@2 still there after delete")
	}

	for _, tt := range []struct {
		name, method, path, body string
		code                     int
		msg                      string
	}{
		{"a name taken", http.MethodPost, "/api/disks", `{"name":"d","size":"1M"}`, http.StatusConflict, "exists"},
		{"a size that does not parse", http.MethodPost, "/api/disks", `{"name":"x","size":"lots"}`, http.StatusBadRequest, "size"},
		{"no name", http.MethodPost, "/api/disks", `{"size":"1M"}`, http.StatusBadRequest, "name"},
		{"an unknown field", http.MethodPost, "/api/disks", `{"name":"x","size":"1M","preallocate":true}`, http.StatusBadRequest, "unknown field"},
		{"a snapshot of nothing", http.MethodPost, "/api/snapshots", `{"disk":"nope"}`, http.StatusNotFound, "nope"},
		{"deleting a writable disk", http.MethodDelete, "/api/snapshots/c", "", http.StatusConflict, "writable"},
		{"deleting what is not there", http.MethodDelete, "/api/snapshots/nope", "", http.StatusNotFound, "nope"},
		{"GET changes nothing", http.MethodGet, "/api/snapshots", "", http.StatusMethodNotAllowed, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, body := f.do(tt.method, tt.path, tt.body, nil)
			if code != tt.code || !strings.Contains(body, tt.msg) {
				t.Errorf("%s %s: %d %s, want %d and %q", tt.method, tt.path, code, body, tt.code, tt.msg)
			}
			if strings.Contains(body, "rpc error") {
				t.Errorf("the gRPC wrapping shows: %s", body)
			}
		})
	}
	if d := f.disks(); len(d) != 4 || d["c"] == nil || d["x"] != nil {
		t.Errorf("after the refusals: %v", d)
	}
}

// TestCrossSite: actions from another site, or without the page's token,
// get 403 and change nothing.
func TestCrossSite(t *testing.T) {
	f := newFixture(t)
	for _, hdr := range []map[string]string{
		{"Origin": "http://evil.example", TokenHeader: "", "Sec-Fetch-Site": ""},
		{"Origin": "http://evil.example"},
		{"Sec-Fetch-Site": "cross-site", "Origin": ""},
		{TokenHeader: ""},
		{TokenHeader: "guess"},
	} {
		for _, rq := range []struct{ method, path, body string }{
			{http.MethodPost, "/api/snapshots", `{"disk":"d","name":"evil"}`},
			{http.MethodPost, "/api/disks", `{"name":"evil","size":"1M"}`},
			{http.MethodDelete, "/api/snapshots/d@1", ""},
		} {
			if code, body := f.do(rq.method, rq.path, rq.body, hdr); code != http.StatusForbidden {
				t.Errorf("%s %s with %v: %d %s, want 403", rq.method, rq.path, hdr, code, body)
			}
		}
	}
	if d := f.disks(); len(d) != 3 || d["evil"] != nil || d["d@1"] == nil {
		t.Errorf("after cross-site requests: %v", d)
	}
}

func TestDiskTreeCycle(t *testing.T) {
	// Metadata that says a is b's origin and b a's must not hang.
	roots := diskTree([]*pb.Disk{{Name: "a", Origin: "b"}, {Name: "b", Origin: "a"}, {Name: "c", Origin: "a", CreatedUnixNano: 1}, {Name: "d", Origin: "(deleted)"}})
	var names []string
	for _, r := range roots {
		names = append(names, r.Name)
	}
	if strings.Join(names, ",") != "a,b,d" || len(roots[0].Children) != 1 || roots[0].Children[0].Name != "c" {
		t.Errorf("roots %v", names)
	}
}
