package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"reflect"
	"slices"
	"strings"
	"testing"

	"segmap/internal/nbd/nbdwire"
)

func TestParseMetaRequest(t *testing.T) {
	long := strings.Repeat("q", nbdwire.MaxString+1)
	for _, tt := range []struct {
		name      string
		data      []byte
		list      bool
		want      metaRequest
		wantError bool
	}{
		{name: "list all", data: metaData("disk"), list: true, want: metaRequest{name: "disk", allocation: true}},
		{name: "set none", data: metaData("disk"), want: metaRequest{name: "disk", allocation: false}},
		{name: "list allocation", data: metaData("disk", "base:allocation"), list: true, want: metaRequest{name: "disk", allocation: true}},
		{name: "set allocation", data: metaData("disk", "base:allocation"), want: metaRequest{name: "disk", allocation: true}},
		{name: "list base wildcard", data: metaData("disk", "base:"), list: true, want: metaRequest{name: "disk", allocation: true}},
		{name: "set base wildcard", data: metaData("disk", "base:"), want: metaRequest{name: "disk", allocation: false}},
		{name: "other namespaces", data: metaData("disk", "qemu:dirty-bitmap:a", "x-foo:"), list: true, want: metaRequest{name: "disk", others: []string{"qemu:dirty-bitmap:a", "x-foo:"}}},
		{name: "unknown base leaf", data: metaData("disk", "base:other"), want: metaRequest{name: "disk", allocation: false}},
		{name: "mixed", data: metaData("disk", "x-foo:bar", "base:allocation"), want: metaRequest{name: "disk", allocation: true, others: []string{"x-foo:bar"}}},
		{name: "empty name", data: metaData("", "base:allocation"), want: metaRequest{allocation: true}},
		{name: "too short", data: []byte{0, 0, 0, 0, 0, 0, 0}, wantError: true},
		{name: "name past the end", data: []byte{0, 0, 0, 9, 'd', 'i', 's', 'k', 0, 0, 0, 0}, wantError: true},
		{name: "huge name length", data: []byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0}, wantError: true},
		{name: "count too big", data: be.AppendUint32(metaData("disk")[:8], 2), wantError: true},
		{name: "huge count", data: be.AppendUint32(metaData("disk")[:8], 0xffffffff), wantError: true},
		{name: "query past the end", data: metaData("disk", "base:allocation")[:20], wantError: true},
		{name: "huge query length", data: be.AppendUint32(be.AppendUint32(metaData("disk")[:8], 1), 0xffffffff), wantError: true},
		{name: "trailing byte", data: append(metaData("disk", "base:allocation"), 0), wantError: true},
		{name: "no colon", data: metaData("disk", "base"), wantError: true},
		{name: "empty namespace", data: metaData("disk", ":allocation"), wantError: true},
		{name: "query with NUL", data: metaData("disk", "base:alloc\x00"), wantError: true},
		{name: "query too long", data: metaData("disk", long), wantError: true},
		{name: "name not UTF-8", data: metaData("\xff", "base:allocation"), wantError: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, msg := parseMetaRequest(tt.data, tt.list)
			if (msg != "") != tt.wantError {
				t.Fatalf("error %q, want error %v", msg, tt.wantError)
			}
			if !tt.wantError && !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

// run is one run an ExtentLister reports, or one descriptor.
type run struct {
	n uint64
	f ExtentFlags
}

func TestExtentList(t *testing.T) {
	const d, h = ExtentFlags(0), ExtentHole | ExtentZero
	for _, tt := range []struct {
		name    string
		length  uint32
		reqOne  bool
		bufSize int // 0: extentBufSize(length)
		runs    []run
		want    []run
	}{
		{name: "one run", length: 4096, runs: []run{{4096, d}}, want: []run{{4096, d}}},
		{name: "merged", length: 4096, runs: []run{{512, h}, {512, h}, {1024, d}, {2048, d}},
			want: []run{{1024, h}, {3072, d}}},
		{name: "ends mid-extent", length: 1000, runs: []run{{512, d}, {4096, h}}, want: []run{{512, d}, {488, h}}},
		{name: "run past the end", length: 100, runs: []run{{1 << 40, h}}, want: []run{{100, h}}},
		{name: "runs after the end ignored", length: 512, runs: []run{{512, d}, {512, h}, {512, d}}, want: []run{{512, d}}},
		{name: "zero-length runs skipped", length: 1024, runs: []run{{0, h}, {512, d}, {0, h}, {512, d}}, want: []run{{1024, d}}},
		{name: "no runs: all data", length: 777, want: []run{{777, d}}},
		{name: "short: what was reported", length: 4096, runs: []run{{512, h}}, want: []run{{512, h}}},
		{name: "req one", length: 4096, reqOne: true, runs: []run{{512, h}, {512, h}, {1024, d}}, want: []run{{1024, h}}},
		{name: "req one past the end", length: 300, reqOne: true, runs: []run{{512, h}}, want: []run{{300, h}}},
		{name: "req one one run", length: 4096, reqOne: true, runs: []run{{4096, d}, {4096, h}}, want: []run{{4096, d}}},
		{name: "flag change", length: 3, bufSize: 4 + 8*3, runs: []run{{1, d}, {1, ExtentHole}, {1, h}},
			want: []run{{1, d}, {1, ExtentHole}, {1, h}}},
		{name: "reserved flags dropped", length: 1024, runs: []run{{512, ExtentHole | 4}, {512, ExtentHole}}, want: []run{{1024, ExtentHole}}},
		{name: "buffer full", length: 8192, bufSize: 4 + 8*2, runs: []run{{512, d}, {512, h}, {512, d}, {512, h}},
			want: []run{{512, d}, {512, h}}},
		{name: "max length", length: 0xffffffff, runs: []run{{1 << 40, d}}, want: []run{{0xffffffff, d}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			size := tt.bufSize
			if size == 0 {
				size = extentBufSize(tt.length)
			}
			l := newExtentList(make([]byte, size), allocationID, ExtentHole|ExtentZero, tt.length, tt.reqOne)
			for _, r := range tt.runs {
				if !l.add(r.n, r.f) {
					break
				}
			}
			p := l.payload()
			if id := be.Uint32(p); id != allocationID {
				t.Fatalf("context id %d", id)
			}
			got := decodeDescriptors(p[4:])
			if !slices.Equal(got, tt.want) {
				t.Fatalf("got %v, want %v", got, tt.want)
			}
		})
	}
}

func TestExtentBufSize(t *testing.T) {
	for n, want := range map[uint32]int{1: 20, 512: 28, 4096: 4 + 8*10, 0xffffffff: 4 + 8*maxExtents} {
		if got := extentBufSize(n); got != want {
			t.Errorf("extentBufSize(%d) = %d, want %d", n, got, want)
		}
	}
}

func decodeDescriptors(p []byte) []run {
	var out []run
	for ; len(p) >= 8; p = p[8:] {
		out = append(out, run{uint64(be.Uint32(p)), ExtentFlags(be.Uint32(p[4:]))})
	}
	return out
}

// metaContexts returns the contexts of META_CONTEXT replies as "id name".
func metaContexts(t testing.TB, rs []optReply) []string {
	t.Helper()
	var out []string
	for _, r := range rs {
		if r.typ != nbdwire.RepMetaContext || len(r.data) < 5 {
			t.Fatalf("unexpected reply %v % x", r.typ, r.data)
		}
		out = append(out, fmt.Sprintf("%d %s", be.Uint32(r.data), r.data[4:]))
	}
	return out
}

func TestMetaContextOptions(t *testing.T) {
	checkGoroutines(t)
	h := startServer(t, nil, newMem("disk", 4096))
	c := dialFlags(t, h.addr, nbdwire.CFlagFixedNewstyle)
	const list, set = nbdwire.OptListMetaContext, nbdwire.OptSetMetaContext
	alloc0, alloc1 := []string{"0 base:allocation"}, []string{"1 base:allocation"}

	// Before structured replies: LIST works, SET does not.
	if got := metaContexts(t, c.expectFinal(list, metaData("disk"), nbdwire.RepAck)); !slices.Equal(got, alloc0) {
		t.Errorf("LIST all: %v", got)
	}
	c.expectFinal(set, metaData("disk", "base:allocation"), nbdwire.RepErrInvalid)
	c.expectFinal(nbdwire.OptStructuredReply, nil, nbdwire.RepAck)

	for _, tt := range []struct {
		opt  nbdwire.Option
		data []byte
		want []string
		rep  nbdwire.RepType
	}{
		{list, metaData("disk"), alloc0, nbdwire.RepAck},
		{list, metaData("disk", "base:"), alloc0, nbdwire.RepAck},
		{list, metaData("disk", "base:allocation", "base:allocation"), alloc0, nbdwire.RepAck},
		{list, metaData("disk", "x-foo:bar", "qemu:dirty-bitmap:a"), nil, nbdwire.RepAck},
		{list, metaData("nope"), nil, nbdwire.RepErrUnknown},
		{list, metaData(""), nil, nbdwire.RepErrUnknown},
		{list, metaData("disk", "nocolon"), nil, nbdwire.RepErrInvalid},
		{list, metaData("disk")[:7], nil, nbdwire.RepErrInvalid},
		{set, metaData("disk", "base:allocation"), alloc1, nbdwire.RepAck},
		{set, metaData("disk", "x-foo:bar", "base:allocation"), alloc1, nbdwire.RepAck},
		{set, metaData("disk", "base:"), nil, nbdwire.RepAck},
		{set, metaData("disk"), nil, nbdwire.RepAck},
		{set, metaData("nope", "base:allocation"), nil, nbdwire.RepErrUnknown},
		{set, append(metaData("disk", "base:allocation"), 1), nil, nbdwire.RepErrInvalid},
	} {
		got := metaContexts(t, c.expectFinal(tt.opt, tt.data, tt.rep))
		if !slices.Equal(got, tt.want) {
			t.Errorf("%v % x: %v, want %v", tt.opt, tt.data, got, tt.want)
		}
	}
	tc := goStructured(t, c, "disk")
	tc.expectErrno(tc.do(nbdwire.CmdBlockStatus, 0, 0, 512, nil), nbdwire.EINVAL) // the last SET failed
}

// goStructured enters transmission on name after structured replies were
// negotiated.
func goStructured(t *testing.T, c *client, name string) *txClient {
	t.Helper()
	infos := c.expectFinal(nbdwire.OptGo, infoData(name), nbdwire.RepAck)
	ei := parseInfos(t, infos)
	return c.transmission(ei.size, ei.flags, true)
}

// metaConnect dials, negotiates structured replies, sends SET_META_CONTEXT
// for each of sets in turn (export name, then queries) and enters
// transmission on name.
func metaConnect(t *testing.T, addr, name string, sets ...[]string) *txClient {
	t.Helper()
	c := dialFlags(t, addr, nbdwire.CFlagFixedNewstyle|nbdwire.CFlagNoZeroes)
	c.expectFinal(nbdwire.OptStructuredReply, nil, nbdwire.RepAck)
	for _, s := range sets {
		c.expectFinal(nbdwire.OptSetMetaContext, metaData(s[0], s[1:]...), nbdwire.RepAck)
	}
	infos := c.expectFinal(nbdwire.OptGo, infoData(name), nbdwire.RepAck)
	ei := parseInfos(t, infos)
	return c.transmission(ei.size, ei.flags, true)
}

// blockStatus sends BLOCK_STATUS and returns its descriptors, failing on
// an error.
func (tc *txClient) blockStatus(off uint64, n uint32, flags uint16) []run {
	tc.t.Helper()
	cl := tc.do(nbdwire.CmdBlockStatus, flags, off, n, nil)
	tc.expectErrno(cl, 0)
	if cl.chunks != 1 || len(cl.status) != 1 || be.Uint32(cl.status[0]) != allocationID {
		tc.t.Fatalf("block status: %d chunks, payloads % x", cl.chunks, cl.status)
	}
	return decodeDescriptors(cl.status[0][4:])
}

// ctxBackend is a memBackend with a context of its own, x-test:bits, whose
// runs are those of the export's bits.
type ctxBackend struct{ *memBackend }

func (b ctxBackend) MetaContexts(ctx context.Context, export, q string, list bool) ([]string, error) {
	if q == "x-test:bits" || list && q == "x-test:" {
		return []string{"x-test:bits"}, nil
	}
	if q == "x-test:fail" {
		return nil, errors.New("no contexts today")
	}
	return nil, nil
}

func (b ctxBackend) Open(ctx context.Context, name string) (Export, io.Closer, error) {
	exp, c, err := b.memBackend.Open(ctx, name)
	if err != nil {
		return nil, nil, err
	}
	return bitsExport{exp.(*memExport)}, c, nil
}

// bitsExport reports x-test:bits: flags 0x80000005 on its first 1000
// bytes, 0 on the rest.
type bitsExport struct{ *memExport }

func (e bitsExport) ContextExtents(ctx context.Context, name string, off, n uint64, fn func(uint64, ExtentFlags) bool) error {
	if name != "x-test:bits" {
		return fmt.Errorf("context %q", name)
	}
	if off < 1000 && !fn(1000-off, 0x80000005) {
		return nil
	}
	fn(e.Size()-max(off, 1000), 0)
	return nil
}

// statuses sends BLOCK_STATUS and returns, per chunk, its context id and
// descriptors.
func (tc *txClient) statuses(off uint64, n uint32, flags uint16) map[uint32][]run {
	tc.t.Helper()
	cl := tc.do(nbdwire.CmdBlockStatus, flags, off, n, nil)
	tc.expectErrno(cl, 0)
	out := map[uint32][]run{}
	for _, p := range cl.status {
		out[be.Uint32(p)] = decodeDescriptors(p[4:])
	}
	if len(out) != cl.chunks {
		tc.t.Fatalf("%d chunks for %d contexts", cl.chunks, len(out))
	}
	return out
}

func TestOtherContexts(t *testing.T) {
	checkGoroutines(t)
	const h = ExtentHole | ExtentZero
	m := newMem("disk", 4096)
	copy(m.data[2048:], pattern(1024, 1))
	hs := startServer(t, func(c *Config) { c.Backend = ctxBackend{c.Backend.(*memBackend)} }, m)

	c := dialFlags(t, hs.addr, nbdwire.CFlagFixedNewstyle)
	c.expectFinal(nbdwire.OptStructuredReply, nil, nbdwire.RepAck)
	for _, tt := range []struct {
		opt  nbdwire.Option
		data []byte
		want []string
		rep  nbdwire.RepType
	}{
		{nbdwire.OptListMetaContext, metaData("disk", "x-test:"), []string{"0 x-test:bits"}, nbdwire.RepAck},
		{nbdwire.OptListMetaContext, metaData("disk", "base:", "x-test:bits"), []string{"0 base:allocation", "0 x-test:bits"}, nbdwire.RepAck},
		{nbdwire.OptSetMetaContext, metaData("disk", "x-test:bits", "x-test:other", "base:allocation"), []string{"1 base:allocation", "2 x-test:bits"}, nbdwire.RepAck},
		{nbdwire.OptSetMetaContext, metaData("disk", "x-test:fail"), nil, nbdwire.RepErrInvalid},
	} {
		got := metaContexts(t, c.expectFinal(tt.opt, tt.data, tt.rep))
		if !slices.Equal(got, tt.want) {
			t.Errorf("%v % x: %v, want %v", tt.opt, tt.data, got, tt.want)
		}
	}

	tc := metaConnect(t, hs.addr, "disk", []string{"disk", "base:allocation", "x-test:bits"})
	want := map[uint32][]run{
		allocationID:   {{2048, h}, {1024, 0}, {1024, h}},
		firstContextID: {{1000, 0x80000005}, {3096, 0}},
	}
	if got := tc.statuses(0, 4096, 0); !maps.EqualFunc(got, want, slices.Equal) {
		t.Errorf("two contexts: %v, want %v", got, want)
	}
	want = map[uint32][]run{allocationID: {{1048, h}}, firstContextID: {{1100, 0}}}
	if got := tc.statuses(1000, 1100, nbdwire.CmdFlagReqOne); !maps.EqualFunc(got, want, slices.Equal) {
		t.Errorf("two contexts, REQ_ONE: %v, want %v", got, want)
	}

	// The other context alone.
	to := metaConnect(t, hs.addr, "disk", []string{"disk", "x-test:bits"})
	want = map[uint32][]run{firstContextID: {{500, 0x80000005}, {100, 0}}}
	if got := to.statuses(500, 600, 0); !maps.EqualFunc(got, want, slices.Equal) {
		t.Errorf("one context: %v, want %v", got, want)
	}
}

func TestBlockStatus(t *testing.T) {
	checkGoroutines(t)
	const d, h = ExtentFlags(0), ExtentHole | ExtentZero
	m := newMem("disk", 8<<10+100) // 16 blocks and a short one
	copy(m.data[1024:], pattern(1024, 1))
	copy(m.data[4096:], pattern(600, 2)) // blocks 8 and 9
	m.data[len(m.data)-1] = 1
	plain := newMem("plain", 4096)
	plain.noExtents = true
	other := newMem("other", 4096)
	hs := startServer(t, nil, m, plain, other)
	tc := metaConnect(t, hs.addr, "disk", []string{"disk", "base:allocation"})

	for _, tt := range []struct {
		name   string
		off    uint64
		n      uint32
		reqOne bool
		want   []run
	}{
		{"whole", 0, 8<<10 + 100, false, []run{{1024, h}, {1024, d}, {2048, h}, {1024, d}, {3072, h}, {100, d}}},
		{"mid-extent start and end", 1500, 3000, false, []run{{548, d}, {2048, h}, {404, d}}},
		{"req one", 0, 8 << 10, true, []run{{1024, h}}},
		{"req one shorter than the extent", 0, 100, true, []run{{100, h}}},
		{"req one mid-extent", 1100, 4096, true, []run{{948, d}}},
		{"one byte", 8<<10 + 99, 1, false, []run{{1, d}}},
		{"tail", 7 << 10, 1124, false, []run{{1024, h}, {100, d}}},
	} {
		var flags uint16
		if tt.reqOne {
			flags = nbdwire.CmdFlagReqOne
		}
		if got := tc.blockStatus(tt.off, tt.n, flags); !slices.Equal(got, tt.want) {
			t.Errorf("%s: got %v, want %v", tt.name, got, tt.want)
		}
	}

	// Bad requests fail alone.
	size := uint64(len(m.data))
	tc.expectErrno(tc.do(nbdwire.CmdBlockStatus, 0, size-10, 11, nil), nbdwire.EINVAL)
	tc.expectErrno(tc.do(nbdwire.CmdBlockStatus, 0, size+1, 1, nil), nbdwire.EINVAL)
	tc.expectErrno(tc.do(nbdwire.CmdBlockStatus, 0, 0, 0, nil), nbdwire.EINVAL)
	tc.expectErrno(tc.do(nbdwire.CmdBlockStatus, nbdwire.CmdFlagDF, 0, 1, nil), nbdwire.EINVAL)

	// An export error fails the request, and the connection goes on.
	m.hook = func(ctx context.Context, op string, off, n uint64) error {
		if op == "extents" {
			return errors.New("no map today")
		}
		return nil
	}
	tc.expectErrno(tc.do(nbdwire.CmdBlockStatus, 0, 0, 512, nil), nbdwire.EIO)
	m.hook = nil

	// A write is seen by the next BLOCK_STATUS.
	tc.write(2048, []byte{1}, 0)
	if got, want := tc.blockStatus(0, 4096, 0), []run{{1024, h}, {1536, d}, {1536, h}}; !slices.Equal(got, want) {
		t.Errorf("after a write: got %v, want %v", got, want)
	}

	// An export without an ExtentLister is all data.
	tp := metaConnect(t, hs.addr, "plain", []string{"plain", "base:allocation"})
	if got, want := tp.blockStatus(100, 1000, 0), []run{{1000, d}}; !slices.Equal(got, want) {
		t.Errorf("plain export: got %v, want %v", got, want)
	}

	// No context selected for the export that was opened: EINVAL.
	for name, sets := range map[string][][]string{
		"no SET":               nil,
		"SET of nothing":       {{"disk", "base:"}},
		"a later SET replaces": {{"disk", "base:allocation"}, {"disk", "x-foo:bar"}},
		"SET of another":       {{"other", "base:allocation"}},
	} {
		tn := metaConnect(t, hs.addr, "disk", sets...)
		cl := tn.do(nbdwire.CmdBlockStatus, 0, 0, 512, nil)
		if cl.errno != nbdwire.EINVAL {
			t.Errorf("%s: errno %d, want EINVAL", name, cl.errno)
		}
		tn.close()
	}
}

func TestBlockStatusWithoutStructuredReplies(t *testing.T) {
	checkGoroutines(t)
	hs := startServer(t, nil, newMem("disk", 4096))
	c := dialFlags(t, hs.addr, nbdwire.CFlagFixedNewstyle|nbdwire.CFlagNoZeroes)
	c.expectFinal(nbdwire.OptSetMetaContext, metaData("disk", "base:allocation"), nbdwire.RepErrInvalid)
	tc := c.goExport("disk", false)
	tc.expectErrno(tc.do(nbdwire.CmdBlockStatus, 0, 0, 512, nil), nbdwire.EINVAL)
}
