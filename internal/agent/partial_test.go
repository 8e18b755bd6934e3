package agent

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"segmap/internal/container"
	"segmap/internal/metrics"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// Partial entries (sub-segment copy-on-write) at the agent: reads through
// the layers, writes the top holds, faults for the ones it does not, and
// the sparse and layered staged writes the controller's copy-sub and
// fill-in plans hand out.

// tSub is the sub-block size of the test disk's 64 KiB segments: 16 of
// them.
const tSub = 4096

func init() {
	if table.SubBlockSize(tSeg) != tSub || table.SubBlockCount(tSeg) != 16 {
		panic(fmt.Sprintf("sub-blocks of a %d-byte segment: %d of %d bytes", tSeg, table.SubBlockCount(tSeg), table.SubBlockSize(tSeg)))
	}
}

// recContainer records the writes that reach the container and serves
// reads without waiting (a container.NoWaitReader, so TryReadAt uses it).
type recContainer struct {
	container.Container
	mu     sync.Mutex
	writes [][2]int64 // [off, off+len)
}

func (r *recContainer) WriteAt(p []byte, off int64) (int, error) {
	r.mu.Lock()
	r.writes = append(r.writes, [2]int64{off, off + int64(len(p))})
	r.mu.Unlock()
	return r.Container.WriteAt(p, off)
}

func (r *recContainer) ReadAtNoWait(p []byte, off int64) bool {
	_, err := r.ReadAt(p, off)
	return err == nil
}

// written returns the byte ranges of slot s written, relative to the
// slot, in order of offset.
func (r *recContainer) written(s int) [][2]int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out [][2]int64
	for _, w := range r.writes {
		lo, hi := max(w[0], int64(s*tSeg)), min(w[1], int64((s+1)*tSeg))
		if lo < hi {
			out = append(out, [2]int64{lo - int64(s*tSeg), hi - int64(s*tSeg)})
		}
	}
	slices.SortFunc(out, func(a, b [2]int64) int { return cmp.Compare(a[0], b[0]) })
	return out
}

// partialEnv is an env whose slots 0..7 hold distinct data (slot s is
// bytesOf(tSeg, 16*s+1)), the others zeros, with every write recorded.
type partialEnv struct {
	*env
	rec *recContainer
}

func newPartialEnv(t *testing.T) *partialEnv {
	t.Helper()
	var rec *recContainer
	e := newEnvOver(t, func(mem *container.Memory) (container.Container, func()) {
		rec = &recContainer{Container: mem}
		return rec, func() {}
	})
	for s := range 8 {
		if _, err := e.mem.WriteAt(slotData(s), int64(s*tSeg)); err != nil {
			t.Fatal(err)
		}
	}
	return &partialEnv{env: e, rec: rec}
}

// slotData is what slot s (< 8) of a partialEnv starts with.
func slotData(s int) []byte { return bytesOf(tSeg, byte(16*s+1)) }

func loc(s int) table.Location { return table.Location{Container: 1, Slot: uint32(s)} }

// layered is the partial entry c1/s6{0-3}<c1/s4{8}<c1/s2: sub-blocks 0..3
// in slot 6, 8 in slot 4, the others in slot 2. noWrite makes it read-only
// (a snapshot's).
func layered(noWrite bool) table.Entry {
	e := table.Over(loc(6), table.Range(0, 4), table.Over(loc(4), table.Range(8, 9), table.Entry{Loc: loc(2)}, 16), 16)
	if noWrite {
		e.State |= table.NoWrite
	}
	return e
}

// segmentOf assembles the segment a mapped entry maps from the slots as
// they are now, sub-block by sub-block.
func (e *partialEnv) segmentOf(en table.Entry) []byte {
	e.t.Helper()
	out := make([]byte, 0, tSeg)
	for i := range 16 {
		l := en.Locate(i)
		out = append(out, e.slot(int(l.Slot), i*tSub, tSub)...)
	}
	return out
}

// set installs en as segment seg's entry.
func (e *partialEnv) set(seg uint64, en table.Entry) {
	e.t.Helper()
	if err := e.a.SetEntry(e.ctx, protocol.SetEntry{Disk: tDisk, First: seg, Entries: []table.Entry{en}}); err != nil {
		e.t.Fatal(err)
	}
}

func (e *partialEnv) read(off uint64, n int) []byte {
	e.t.Helper()
	p := make([]byte, n)
	if err := await(e.t, async(func() error { return e.d.ReadAt(e.ctx, p, off) }), "read"); err != nil {
		e.t.Fatalf("read [%d, +%d): %v", off, n, err)
	}
	return p
}

func (e *partialEnv) write(off uint64, p []byte) {
	e.t.Helper()
	if err := await(e.t, async(func() error { return e.d.WriteAt(e.ctx, p, off, false) }), "write"); err != nil {
		e.t.Fatalf("write [%d, +%d): %v", off, len(p), err)
	}
}

// TestPartialRead: a read of a partial entry returns each sub-block from
// the slot that holds it, byte for byte, for reads aligned to sub-blocks
// or not, within one run or across several, by ReadAt and TryReadAt
// alike, without a fault.
func TestPartialRead(t *testing.T) {
	e := newPartialEnv(t)
	en := layered(true)
	e.set(1, en)
	want := e.segmentOf(en)
	for i, s := range []int{6, 6, 6, 6, 2, 2, 2, 2, 4, 2, 2, 2, 2, 2, 2, 2} {
		if !bytes.Equal(want[i*tSub:(i+1)*tSub], slotData(s)[i*tSub:(i+1)*tSub]) {
			t.Fatalf("sub-block %d of %v is not slot %d's", i, en, s)
		}
	}
	for _, r := range []struct{ off, n int }{
		{0, tSeg},                       // the whole segment: three slots, four runs
		{0, 4 * tSub},                   // the top's run
		{3*tSub + 100, 6*tSub - 50},     // top, base, middle layer, base, unaligned
		{8*tSub + 1, tSub - 2},          // inside the middle layer's sub-block
		{4*tSub - 1, 2},                 // one byte from the top, one from the base
		{9*tSub - 7, tSeg - 9*tSub + 7}, // the middle layer's last bytes to the end
	} {
		got := e.read(tSeg+uint64(r.off), r.n)
		if !bytes.Equal(got, want[r.off:r.off+r.n]) {
			t.Errorf("read [%d, +%d) of %v: not the bytes of the slots that hold it", r.off, r.n, en)
		}
		p := make([]byte, r.n)
		done, err := e.d.TryReadAt(e.ctx, p, tSeg+uint64(r.off))
		if err != nil || !done || !bytes.Equal(p, want[r.off:r.off+r.n]) {
			t.Errorf("TryReadAt [%d, +%d) of %v: done %v, %v, bytes right %v", r.off, r.n, en, done, err, bytes.Equal(p, want[r.off:r.off+r.n]))
		}
	}
	// A read across the segment boundary: segment 0 (Invalid, mapped
	// by the fault at slot 0) then segment 1's top.
	got := e.read(tSeg-10, 20)
	if !bytes.Equal(got[:10], slotData(0)[tSeg-10:]) || !bytes.Equal(got[10:], want[:10]) {
		t.Errorf("read across segments 0 and 1: %x", got)
	}
	if n := e.fc.faults(); n != 1 {
		t.Errorf("%d faults, want 1 (segment 0's load)", n)
	}
}

// TestPartialWriteTopHolds: a write whose sub-blocks the writable partial
// entry's top holds goes to the top without a fault, and the layers under
// it are not written.
func TestPartialWriteTopHolds(t *testing.T) {
	e := newPartialEnv(t)
	en := layered(false)
	e.set(2, en)
	p := bytesOf(2*tSub+300, 99)
	e.write(2*tSeg+tSub+10, p)
	if n := e.fc.faults(); n != 0 {
		t.Errorf("%d faults for a write the top holds", n)
	}
	if w := e.rec.written(6); len(w) != 1 || w[0] != [2]int64{tSub + 10, tSub + 10 + int64(len(p))} {
		t.Errorf("writes to the top: %v, want [%d %d)", w, tSub+10, tSub+10+len(p))
	}
	for _, s := range []int{2, 4} {
		if w := e.rec.written(s); len(w) != 0 {
			t.Errorf("layer slot %d written: %v", s, w)
		}
	}
	want := e.segmentOf(en)
	if !bytes.Equal(want[tSub+10:tSub+10+len(p)], p) {
		t.Error("the top does not hold the write")
	}
	if got := e.read(2*tSeg, tSeg); !bytes.Equal(got, want) {
		t.Error("the segment does not read back as the write over the layers")
	}
}

// TestPartialWriteFaults: a write (or zeroing) that touches a sub-block
// the top lacks faults for a write, with the bytes of the segment it
// covers; once the reply says the top holds them, it goes to the top.
func TestPartialWriteFaults(t *testing.T) {
	e := newPartialEnv(t)
	en := layered(false)
	e.set(3, en)
	var mu sync.Mutex
	var got []protocol.Fault
	cur := en // the top fills in as the writes fault
	e.fc.setFault(func(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
		mu.Lock()
		got = append(got, f)
		mu.Unlock()
		if f.Op != protocol.FaultWrite {
			return protocol.Reply{}, fmt.Errorf("unexpected fault %+v: %w", f, protocol.ErrIO)
		}
		mu.Lock()
		cur = table.Filled(cur, table.SpanOf(tSeg, f.Off, f.Len), 16)
		r := protocol.Reply{First: f.Segment, Entries: []table.Entry{cur}}
		mu.Unlock()
		return r, nil
	})
	p := bytesOf(5000, 7)
	e.write(3*tSeg+3*tSub+10, p) // sub-blocks 3 (top) and 4 (base)
	if err := await(t, async(func() error { return e.d.WriteZeroes(e.ctx, 3*tSeg+9*tSub, 100, false) }), "zero"); err != nil {
		t.Fatal(err)
	}
	want := []protocol.Fault{
		{Agent: "host", Disk: tDisk, Segment: 3, Count: 1, Op: protocol.FaultWrite, Off: 3*tSub + 10, Len: 5000},
		{Agent: "host", Disk: tDisk, Segment: 3, Count: 1, Op: protocol.FaultWrite, Off: 9 * tSub, Len: 100},
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != len(want) {
		t.Fatalf("faults %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("fault %d: %+v, want %+v", i, got[i], want[i])
		}
	}
	if w := e.rec.written(6); len(w) != 2 || w[0] != [2]int64{3*tSub + 10, 3*tSub + 10 + 5000} || w[1] != [2]int64{9 * tSub, 9*tSub + 100} {
		t.Errorf("writes to the top: %v", w)
	}
	for _, s := range []int{2, 4} {
		if w := e.rec.written(s); len(w) != 0 {
			t.Errorf("layer slot %d written: %v", s, w)
		}
	}
	if !bytes.Equal(e.slot(6, 3*tSub+10, len(p)), p) || !bytes.Equal(e.slot(6, 9*tSub, 100), make([]byte, 100)) {
		t.Error("the top does not hold the writes")
	}
	if en := e.entry(3); en.Part == nil || !en.Part.Bits.Has(table.Range(3, 5)) || !en.Part.Bits.Test(9) {
		t.Errorf("entry after the faults %v", en)
	}
}

// stageCtrl answers a write fault with st and its commit with the entry
// commit, recording the faults.
func stageCtrl(e *partialEnv, st protocol.Stage, commit table.Entry) func() []protocol.Fault {
	var mu sync.Mutex
	var got []protocol.Fault
	e.fc.setFault(func(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
		mu.Lock()
		got = append(got, f)
		mu.Unlock()
		switch f.Op {
		case protocol.FaultWrite:
			s := st
			return protocol.Reply{First: f.Segment, Stage: &s}, nil
		case protocol.FaultCommit:
			if f.Token != st.Token || f.Abandon {
				return protocol.Reply{}, fmt.Errorf("commit %+v: %w", f, protocol.ErrIO)
			}
			return protocol.Reply{First: f.Segment, Entries: []table.Entry{commit}}, nil
		}
		return protocol.Reply{}, fmt.Errorf("unexpected fault %+v: %w", f, protocol.ErrIO)
	})
	return func() []protocol.Fault {
		mu.Lock()
		defer mu.Unlock()
		return append([]protocol.Fault(nil), got...)
	}
}

// TestSparseStage: a sparse staged write (copy-sub of a snapshot's partial
// entry into a new slot) writes exactly the sub-blocks the write touches:
// the ones it covers from the write alone, the edges of the ones it
// covers in part from the layer that holds them (the base for the first,
// the middle layer for the last); the new slot's other sub-blocks stay
// unwritten (zero). After the commit the segment reads as the write over
// the old layers.
func TestSparseStage(t *testing.T) {
	e := newPartialEnv(t)
	from := layered(true)
	e.set(4, from)
	const off, n = 5*tSub + 100, 3 * tSub // sub-blocks 5 (from slot 2), 6, 7, 8 (from slot 4)
	span := table.SpanOf(tSeg, off, n)
	commit := table.Over(loc(12), span, from, 16)
	faults := stageCtrl(e, protocol.Stage{Loc: loc(12), Token: 5, From: from, Sparse: true}, commit)
	old := e.segmentOf(from)
	p := bytesOf(n, 42)
	reg := prometheus.NewRegistry()
	e.d.met = metrics.NewAgent(reg).Disk("d")
	e.write(4*tSeg+off, p)
	// Only the edges of the first and last sub-blocks are read.
	if got := sample(t, reg, "segmap_agent_cow_bytes_total", map[string]string{"disk": "d"}); got != 2*tSub {
		t.Errorf("copy-on-write bytes: %v, want the two edge sub-blocks, %d", got, 2*tSub)
	}

	if w := e.rec.written(12); len(w) == 0 || w[0][0] != 5*tSub || w[len(w)-1][1] != 9*tSub {
		t.Errorf("writes to the new slot %v, want [%d, %d) only", w, 5*tSub, 9*tSub)
	} else {
		for i := 1; i < len(w); i++ {
			if w[i][0] != w[i-1][1] {
				t.Errorf("writes to the new slot %v: not one run over [%d, %d)", w, 5*tSub, 9*tSub)
			}
		}
	}
	for _, s := range []int{2, 4, 6} {
		if w := e.rec.written(s); len(w) != 0 {
			t.Errorf("old slot %d written: %v", s, w)
		}
	}
	slot := e.slot(12, 0, tSeg)
	if !bytes.Equal(slot[:5*tSub], make([]byte, 5*tSub)) || !bytes.Equal(slot[9*tSub:], make([]byte, tSeg-9*tSub)) {
		t.Error("the new slot's untouched sub-blocks are not zero")
	}
	if !bytes.Equal(slot[5*tSub:off], slotData(2)[5*tSub:off]) {
		t.Error("the head of sub-block 5 is not the base's")
	}
	if !bytes.Equal(slot[off:off+n], p) {
		t.Error("the new slot does not hold the write")
	}
	if !bytes.Equal(slot[off+n:9*tSub], slotData(4)[off+n:9*tSub]) {
		t.Error("the tail of sub-block 8 is not the middle layer's")
	}
	want := append([]byte(nil), old...)
	copy(want[off:], p)
	if got := e.read(4*tSeg, tSeg); !bytes.Equal(got, want) {
		t.Error("the segment does not read as the write over the old layers")
	}
	if en := e.entry(4); !en.Equal(commit) {
		t.Errorf("entry %v, want the commit's %v", en, commit)
	}
	fs := faults()
	if len(fs) != 2 || fs[0].Off != off || fs[0].Len != n || fs[0].Whole || fs[0].Reason != table.NoWrite ||
		fs[1].Op != protocol.FaultCommit || fs[1].Token != 5 {
		t.Errorf("faults %+v: want a write of [%d, +%d) then the commit of token 5", fs, off, n)
	}
}

// TestSparseFillInPlace: a sparse stage into the partial entry's own slot
// (fill-in) writes the touched sub-blocks there; of an edge the top
// already holds only the write's bytes are written (a read-modify-write
// would lay stale bytes over another writer's write to the rest of it),
// one it lacks is filled from the layer that holds it; the top's other
// sub-blocks are not written.
func TestSparseFillInPlace(t *testing.T) {
	e := newPartialEnv(t)
	en := layered(false)
	e.set(5, en)
	const off, n = 3*tSub + 100, tSub // sub-blocks 3 (top) and 4 (base), both in part
	commit := table.Filled(en, table.SpanOf(tSeg, off, n), 16)
	stageCtrl(e, protocol.Stage{Loc: en.Loc, Token: 9, From: en, Sparse: true}, commit)
	old := e.segmentOf(en)
	top := e.slot(6, 0, tSeg)
	p := bytesOf(n, 77)
	e.write(5*tSeg+off, p)

	if w := e.rec.written(6); len(w) == 0 || w[0][0] != off || w[len(w)-1][1] != 5*tSub {
		t.Errorf("writes to the top %v, want [%d, %d) only", w, off, 5*tSub)
	}
	slot := e.slot(6, 0, tSeg)
	if !bytes.Equal(slot[:off], top[:off]) {
		t.Error("the top's sub-blocks before the write changed")
	}
	if !bytes.Equal(slot[off+n:5*tSub], slotData(2)[off+n:5*tSub]) {
		t.Error("the tail of sub-block 4 is not the base's")
	}
	if !bytes.Equal(slot[5*tSub:], top[5*tSub:]) {
		t.Error("the top's untouched sub-blocks were written")
	}
	want := append([]byte(nil), old...)
	copy(want[off:], p)
	if got := e.read(5*tSeg, tSeg); !bytes.Equal(got, want) {
		t.Error("the segment does not read as the write over the old data")
	}
	if got := e.entry(5); !got.Equal(commit) || !got.Part.Bits.Has(table.Range(0, 5)) {
		t.Errorf("entry %v, want %v", got, commit)
	}
}

// TestStagedCopyFromPartial: a non-sparse staged write whose From is
// partial copies the whole segment into the new slot, each sub-block from
// the layer that holds it, with the write laid over; all-zero blocks are
// left unwritten.
func TestStagedCopyFromPartial(t *testing.T) {
	e := newPartialEnv(t)
	from := layered(true)
	e.set(6, from)
	// Sub-block 10 of the base reads as zeros: the copy skips it.
	if _, err := e.mem.WriteAt(make([]byte, tSub), 2*tSeg+10*tSub); err != nil {
		t.Fatal(err)
	}
	const off, n = 100, 300
	stageCtrl(e, protocol.Stage{Loc: loc(13), Token: 3, From: from}, table.Entry{Loc: loc(13)})
	want := e.segmentOf(from)
	p := bytesOf(n, 5)
	copy(want[off:], p)
	reg := prometheus.NewRegistry()
	e.d.met = metrics.NewAgent(reg).Disk("d")
	e.write(6*tSeg+off, p)
	// The write covers part of the segment's one copy chunk: the whole
	// segment is read from the old layers.
	if got := sample(t, reg, "segmap_agent_cow_bytes_total", map[string]string{"disk": "d"}); got != tSeg {
		t.Errorf("copy-on-write bytes: %v, want the segment's %d", got, tSeg)
	}

	if got := e.slot(13, 0, tSeg); !bytes.Equal(got, want) {
		for i := range 16 {
			if !bytes.Equal(got[i*tSub:(i+1)*tSub], want[i*tSub:(i+1)*tSub]) {
				t.Errorf("sub-block %d of the copy is not from %v", i, from.Locate(i))
			}
		}
	}
	for _, w := range e.rec.written(13) {
		if w[0] < 11*tSub && w[1] > 10*tSub {
			t.Errorf("the copy wrote [%d, %d), into all-zero sub-block 10", w[0], w[1])
		}
	}
	if got := e.read(6*tSeg, tSeg); !bytes.Equal(got, want) {
		t.Error("the segment does not read as the copy")
	}
}

// TestPartialEntryRefused: a partial entry whose layers do not fit the
// disk's segments (made for 256 sub-blocks, the disk has 16) is refused:
// by set_entry with ErrBadRequest, leaving the table as it was; in a
// fault reply, failing the I/O with ErrIO, a stage from one being
// abandoned; no slot is read or written for it.
func TestPartialEntryRefused(t *testing.T) {
	e := newPartialEnv(t)
	wrong := table.Over(loc(6), table.Range(0, 4), table.Entry{Loc: loc(2)}, 256)
	err := e.a.SetEntry(e.ctx, protocol.SetEntry{Disk: tDisk, First: 1, Entries: []table.Entry{wrong}})
	if !errors.Is(err, protocol.ErrBadRequest) {
		t.Errorf("set_entry of %v: %v, want ErrBadRequest", wrong, err)
	}
	if en := e.entry(1); !en.Equal(table.InvalidEntry) {
		t.Errorf("entry 1 is %v after a refused set_entry", en)
	}

	var mu sync.Mutex
	var got []protocol.Fault
	e.fc.setFault(func(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
		mu.Lock()
		got = append(got, f)
		mu.Unlock()
		switch {
		case f.Op == protocol.FaultRead:
			return protocol.Reply{First: f.Segment, Entries: []table.Entry{wrong}}, nil
		case f.Op == protocol.FaultWrite:
			return protocol.Reply{First: f.Segment, Stage: &protocol.Stage{Loc: loc(12), Token: 4, From: wrong, Sparse: true}}, nil
		}
		return protocol.Reply{}, nil // the abandon
	})
	p := make([]byte, 100)
	if err := await(t, async(func() error { return e.d.ReadAt(e.ctx, p, tSeg) }), "read"); !errors.Is(err, protocol.ErrIO) {
		t.Errorf("read with a reply of %v: %v, want ErrIO", wrong, err)
	}
	e.set(2, table.At(loc(2), true))
	if err := await(t, async(func() error { return e.d.WriteAt(e.ctx, p, 2*tSeg, false) }), "write"); !errors.Is(err, protocol.ErrIO) {
		t.Errorf("write staged from %v: %v, want ErrIO", wrong, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 3 || got[2].Op != protocol.FaultCommit || !got[2].Abandon || got[2].Token != 4 {
		t.Errorf("faults %+v: want a read, a write, and the write's stage abandoned", got)
	}
	if w := e.rec.written(12); len(w) != 0 {
		t.Errorf("the refused stage's slot was written: %v", w)
	}
	if en := e.entry(1); !en.Equal(table.InvalidEntry) {
		t.Errorf("entry 1 is %v after a refused reply", en)
	}
}

// TestSparseStageWholeFrom: copy-sub from a whole shared entry (the first
// write after a snapshot), for writes aligned to sub-blocks or not, inside
// one sub-block or across several, up to the segment's end: the new slot
// gets exactly the touched sub-blocks, the write over the shared slot's
// bytes, and nothing else.
func TestSparseStageWholeFrom(t *testing.T) {
	for i, w := range []struct{ off, n int }{
		{7*tSub + 50, 100},        // inside one sub-block
		{2 * tSub, 3 * tSub},      // aligned: no read needed
		{tSub - 1, 2},             // one byte of each of two
		{13*tSub + 7, 3*tSub - 7}, // to the end of the segment
		{0, tSub + 1},             // a whole sub-block and a byte
	} {
		t.Run(fmt.Sprintf("%d+%d", w.off, w.n), func(t *testing.T) {
			e := newPartialEnv(t)
			from := table.At(loc(3), true)
			seg := uint64(i % tSegs)
			e.set(seg, from)
			span := table.SpanOf(tSeg, uint64(w.off), uint64(w.n))
			commit := table.Over(loc(12), span, from, 16)
			stageCtrl(e, protocol.Stage{Loc: loc(12), Token: 1, From: from, Sparse: true}, commit)
			p := bytesOf(w.n, byte(i+3))
			e.write(seg*tSeg+uint64(w.off), p)

			lo, hi := w.off/tSub*tSub, min((w.off+w.n+tSub-1)/tSub*tSub, tSeg)
			written := e.rec.written(12)
			for _, r := range written {
				if r[0] < int64(lo) || r[1] > int64(hi) {
					t.Errorf("wrote [%d, %d) of the new slot, outside the touched [%d, %d)", r[0], r[1], lo, hi)
				}
			}
			if n := func() (n int64) {
				for _, r := range written {
					n += r[1] - r[0]
				}
				return n
			}(); n != int64(hi-lo) {
				t.Errorf("wrote %d bytes of the new slot (%v), want the %d of the touched sub-blocks", n, written, hi-lo)
			}
			want := append([]byte(nil), slotData(3)...)
			copy(want[w.off:], p)
			slot := e.slot(12, 0, tSeg)
			if !bytes.Equal(slot[lo:hi], want[lo:hi]) {
				t.Error("the touched sub-blocks are not the write over the shared slot")
			}
			if !bytes.Equal(slot[:lo], make([]byte, lo)) || !bytes.Equal(slot[hi:], make([]byte, tSeg-hi)) {
				t.Error("untouched sub-blocks of the new slot are not zero")
			}
			if got := e.read(seg*tSeg, tSeg); !bytes.Equal(got, want) {
				t.Error("the segment does not read as the write over the shared slot")
			}
		})
	}
}
