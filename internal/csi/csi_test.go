package csi

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"segmap/internal/controller"
)

func TestVolumeSize(t *testing.T) {
	for _, tt := range []struct {
		req, lim int64
		least    uint64
		want     uint64
		code     codes.Code
	}{
		{0, 0, 0, defaultVolumeSize, codes.OK},
		{0, 64 << 20, 0, 64 << 20, codes.OK},               // the default cut to the limit
		{1, 0, 0, 1 << 20, codes.OK},                       // rounded up to a MiB
		{1, 4096, 0, 512, codes.OK},                        // ... or to 512 B under a limit
		{1<<20 + 1, 0, 0, 2 << 20, codes.OK},               //
		{0, 0, 300 << 20, 300 << 20, codes.OK},             // a clone with no size: its source's
		{100 << 20, 0, 300 << 20, 300 << 20, codes.OK},     // never below its source
		{0, 100, 0, 0, codes.OutOfRange},                   // no multiple of 512 fits
		{0, 100 << 20, 300 << 20, 0, codes.OutOfRange},     // the source does not fit
		{2 << 20, 1 << 20, 0, 0, codes.InvalidArgument},    // limit below required
		{-1, 0, 0, 0, codes.InvalidArgument},               // negative
		{1 << 62, 0, 0, 0, codes.OutOfRange},               // over 1 EiB
		{5<<20 + 7, 5<<20 + 512, 0, 5<<20 + 512, codes.OK}, // the limit allows only 512-B rounding
	} {
		got, err := volumeSize(&csi.CapacityRange{RequiredBytes: tt.req, LimitBytes: tt.lim}, tt.least)
		if c := status.Code(err); c != tt.code || got != tt.want {
			t.Errorf("volumeSize(req %d, lim %d, least %d) = %d, %v; want %d, %v", tt.req, tt.lim, tt.least, got, err, tt.want, tt.code)
		}
	}
}

func TestParseParams(t *testing.T) {
	v, err := parseParams(map[string]string{"segmentSize": "4Mi", "policy": "reverse", "preallocate": "true", "csi.storage.k8s.io/pvc/name": "x"})
	if err != nil || v.segmentSize != 4<<20 || v.policy.String() != "POLICY_REVERSE" || !v.preallocate {
		t.Errorf("parseParams: %+v, %v", v, err)
	}
	for _, bad := range []map[string]string{
		{"segmentSize": "3M"}, {"segmentSize": "1G"}, {"segmentSize": "x"},
		{"policy": "sideways"}, {"preallocate": "maybe"}, {"replicas": "3"},
	} {
		if _, err := parseParams(bad); status.Code(err) != codes.InvalidArgument {
			t.Errorf("parseParams(%v): %v, want InvalidArgument", bad, err)
		}
	}
}

func TestCheckCaps(t *testing.T) {
	mount := func(fs string, m csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
		return &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fs}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: m}}
	}
	block := &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	for _, tt := range []struct {
		caps []*csi.VolumeCapability
		ok   bool
	}{
		{[]*csi.VolumeCapability{mount("", csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)}, true},
		{[]*csi.VolumeCapability{mount("xfs", csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY), block}, true},
		{nil, false},
		{[]*csi.VolumeCapability{mount("btrfs", csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)}, false},
		{[]*csi.VolumeCapability{mount("ext4", csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)}, false},
		{[]*csi.VolumeCapability{{AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}}, false},
	} {
		if why := checkCaps(tt.caps); (why == "") != tt.ok {
			t.Errorf("checkCaps(%v) = %q, want ok %t", tt.caps, why, tt.ok)
		}
	}
}

func TestPage(t *testing.T) {
	names := []string{"a", "b", "c", "d", "e"}
	var all []string
	token := ""
	for range 10 {
		got, next, err := page(names, token, 2, "x")
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, got...)
		if next == "" {
			break
		}
		token = next
	}
	if strings.Join(all, "") != "abcde" {
		t.Errorf("pages gave %v", all)
	}
	// A token whose name was deleted meanwhile still says where to go on.
	if got, _, _ := page([]string{"a", "c"}, "after:b", 0, "x"); strings.Join(got, "") != "c" {
		t.Errorf("after a deleted name: %v", got)
	}
	if _, _, err := page(names, "invalid-token", 0, "x"); status.Code(err) != codes.Aborted {
		t.Errorf("a foreign token: %v, want Aborted", err)
	}
	if _, _, err := page(names, "", -1, "x"); status.Code(err) != codes.InvalidArgument {
		t.Errorf("negative max: %v, want InvalidArgument", err)
	}
}

func TestNames(t *testing.T) {
	if got := diskName(volPrefix, "pvc-1234"); got != "csi-vol-pvc-1234" {
		t.Errorf("plain name: %s", got)
	}
	for _, name := range []string{strings.Repeat("x", 128), "a name/with:odd chars", ".hidden"} {
		got := diskName(snapPrefix, name)
		if controller.ValidName(got) != nil || !strings.HasPrefix(got, snapPrefix) || got != diskName(snapPrefix, name) {
			t.Errorf("diskName(%q) = %q: not a stable valid disk name", name, got)
		}
	}
	if diskName(volPrefix, "a b") == diskName(volPrefix, "a_b") {
		t.Error("two names hashed alike")
	}
	g := groupID("groupsnapshot-1")
	m := memberName(g, "csi-vol-a")
	if !isGroupID(g) || isGroupID(m) || groupOf(m) != g || groupOf(g) != "" || groupOf("csi-snap-x") != "" {
		t.Errorf("group %s, member %s: isGroupID %t %t, groupOf %q %q", g, m, isGroupID(g), isGroupID(m), groupOf(m), groupOf(g))
	}
	if controller.ValidName(m) != nil {
		t.Errorf("member name %q is not a disk name", m)
	}
}

func TestUnescapeMount(t *testing.T) {
	for in, want := range map[string]string{`/a\040b`: "/a b", `/plain`: "/plain", `/t\011x\134`: "/t\tx\\", `/bad\09`: `/bad\09`} {
		if got := unescapeMount(in); got != want {
			t.Errorf("unescapeMount(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestUnderRoot: a staging or target path is refused when it, or the
// deepest part of it that exists, leads out of the root by a link; a
// link as the path itself, dangling or not, would be followed by mkdir,
// open and mount.
func TestUnderRoot(t *testing.T) {
	dir := t.TempDir()
	root, outside := filepath.Join(dir, "root"), filepath.Join(dir, "outside")
	for _, p := range []string{filepath.Join(root, "pods"), outside} {
		if err := os.MkdirAll(p, 0o750); err != nil {
			t.Fatal(err)
		}
	}
	for link, to := range map[string]string{
		"pods/up":       outside,
		"pods/dangling": filepath.Join(outside, "not-yet"),
		"pods/inside":   filepath.Join(root, "pods"),
	} {
		if err := os.Symlink(to, filepath.Join(root, link)); err != nil {
			t.Fatal(err)
		}
	}
	s := &nodeServer{cfg: NodeConfig{Root: root}}
	for _, tt := range []struct {
		path string
		code codes.Code
	}{
		{filepath.Join(root, "pods/v/mount"), codes.OK},
		{filepath.Join(root, "pods/up/x"), codes.InvalidArgument},
		{filepath.Join(root, "pods/up"), codes.InvalidArgument},
		{filepath.Join(root, "pods/dangling"), codes.InvalidArgument},
		{filepath.Join(root, "pods/inside"), codes.InvalidArgument},
		{filepath.Join(root, "../outside/x"), codes.InvalidArgument},
		{"pods/v", codes.InvalidArgument},
	} {
		if _, err := s.underRoot("publish", "target path", tt.path); status.Code(err) != tt.code {
			t.Errorf("underRoot(%s): %v, want %v", tt.path, err, tt.code)
		}
	}
}

// blockingAttacher is an Attacher whose Detach waits for release, and
// that counts its Grow calls.
type blockingAttacher struct {
	release chan struct{}
	grows   atomic.Int32
}

func (a *blockingAttacher) Attach(context.Context, string, string) (string, error) {
	return "/dev/null", nil
}
func (a *blockingAttacher) Device(string) (string, bool, error) { return "/dev/null", true, nil }
func (a *blockingAttacher) Grow(context.Context, string, uint64) (uint64, error) {
	a.grows.Add(1)
	return 1 << 20, nil
}
func (a *blockingAttacher) Detach(context.Context, string) error { <-a.release; return nil }

// TestNodeExpandWaitsForUnstage: a NodeExpandVolume that arrives while
// the volume is being unstaged reads the volume's state after the
// unstage, and finds it gone, instead of growing a detached device.
func TestNodeExpandWaitsForUnstage(t *testing.T) {
	dir := t.TempDir()
	a := &blockingAttacher{release: make(chan struct{})}
	s, err := newNodeServer(Config{NodeID: "n", Node: NodeConfig{StateDir: filepath.Join(dir, "state"), Root: filepath.Join(dir, "root"), Attacher: a}})
	if err != nil {
		t.Fatal(err)
	}
	const id = "csi-vol-x"
	staging := filepath.Join(s.cfg.Root, "staging", id)
	if err := os.MkdirAll(s.volDir(id), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := s.writeState(id, &volumeState{Export: id, Staging: staging, Block: true}); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	unstaged := make(chan error, 1)
	go func() {
		_, err := s.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
		unstaged <- err
	}()
	expanded := make(chan error, 1)
	waitUsers := func(n int) {
		for range 5000 {
			s.mu.Lock()
			u := 0
			if l := s.mu.locks[id]; l != nil {
				u = l.users
			}
			s.mu.Unlock()
			if u == n {
				return
			}
			time.Sleep(time.Millisecond)
		}
		t.Fatalf("the volume's lock never had %d users", n)
	}
	waitUsers(1) // the unstage holds it
	go func() {
		_, err := s.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: staging})
		expanded <- err
	}()
	waitUsers(2) // the expand waits for it
	close(a.release)
	if err := <-unstaged; err != nil {
		t.Fatalf("unstage: %v", err)
	}
	if err := <-expanded; status.Code(err) != codes.NotFound {
		t.Errorf("expand during an unstage: %v, want NotFound", err)
	}
	if n := a.grows.Load(); n != 0 {
		t.Errorf("Grow called %d times on an unstaged volume", n)
	}
}
