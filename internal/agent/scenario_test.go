package agent

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/datadriven"

	"segmap/internal/container"
	"segmap/internal/rpc/protocol"
	"segmap/internal/table"
)

// TestScenario runs the scripts in testdata/: each drives one agent,
// serving one disk of sSegs segments from a memory container, through its
// real API, with a scripted controller that holds every fault until the
// script answers it and a container that holds every data I/O until the
// script finishes it. After every step the test waits until every I/O and
// command it started has either returned or stopped where it can go no
// further without the script (held in the container, a fault out, waiting
// for an activate or a lease, a Blocking command waiting for older I/O),
// and prints what changed. Regenerate the expected output with
//
//	go test ./internal/agent -run TestScenario -rewrite
//
// Where a goroutine stopped is read from its stack (runtime.Stack), not
// guessed from a sleep: a step is finished only when every goroutine is
// provably blocked or done, so the output does not depend on timing.
//
// Commands (<name> names an I/O or command, to refer to it later):
//
//	start-io <name> read|write seg=<i> [off=<o>] [len=<n>] [data=<c>]
//	start-io <name> trim seg=<i> [count=<n>]
//	finish-io <name>                  let its held container I/O go on
//	fault-reply <name> [first=<i>] entries=(<entry>, ...) | stage=<loc> | error=<err>
//	set-entry <name> first=<i> entries=(<entry>, ...) [blocking]
//	set-entry-state <name> first=<i> n=<n> state=<s> on|off [blocking]
//	quiesce <name> [timeout=<d>]
//	activate <name>
//	new-table <name> [segs=<n>]       the new_table command
//	delete-table <name>               the delete_table command
//	fence <name>                      the agent fences itself
//	attach <name>                     re-attach to the controller
//	lease lapsed|held|none
//	hold on|off                       whether data I/O is held (default on)
//	table                             the agent's table, compactly
//	slot n=<s>                        slot s's data, read from the container
//	epochs                            the disk's I/O epochs in flight
//
// Slot s of the container starts filled with the letter 'A'+s, so a read
// shows which slot it read; writes write lower-case letters.
func TestScenario(t *testing.T) {
	datadriven.Walk(t, "testdata", func(t *testing.T, path string) {
		s := newScenario(t)
		datadriven.RunTest(t, path, s.step)
	})
}

// The geometry of the scenario disk.
const (
	sSeg   = 4096
	sSegs  = 8
	sSlots = 16
	sDisk  = protocol.DiskID(3)
)

// scenario is one script's agent and everything it started.
type scenario struct {
	t      *testing.T
	ctx    context.Context
	cancel context.CancelFunc
	// stop releases everything held, at the end.
	stop chan struct{}
	mem  *container.Memory
	ctrl *scriptCtrl
	a    *Agent
	d    *Disk

	mu struct {
		sync.Mutex
		// held and faults are keyed by the goroutine that is waiting.
		held   map[int64]*heldIO
		faults map[int64]*heldFault
		// nfaults counts each goroutine's faults.
		nfaults map[int64]int
		hold    bool
	}

	ops   map[string]*scriptOp
	order []*scriptOp
}

// scriptOp is an I/O or a command that the script started.
type scriptOp struct {
	name string
	goid int64
	// timed commands (a quiesce with a time limit) must answer by
	// themselves: a step waits for them.
	timed bool
	done  chan string
	// state is what was last printed about it.
	state string
	// finished is set once it returned result.
	finished bool
	result   string
}

type heldIO struct {
	write   bool
	off, n  int64
	release chan struct{}
}

type heldFault struct {
	f     protocol.Fault
	n     int
	reply chan faultAnswer
}

type faultAnswer struct {
	r   protocol.Reply
	err error
}

func newScenario(t *testing.T) *scenario {
	checkGoroutines(t)
	s := &scenario{t: t, stop: make(chan struct{}), ops: map[string]*scriptOp{}}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.mu.held = map[int64]*heldIO{}
	s.mu.faults = map[int64]*heldFault{}
	s.mu.nfaults = map[int64]int{}
	s.mu.hold = true
	s.mem = container.NewMemory(1, sSeg, sSlots)
	for slot := range sSlots {
		p := make([]byte, sSeg)
		for i := range p {
			p[i] = 'A' + byte(slot)
		}
		if _, err := s.mem.WriteAt(p, int64(slot)*sSeg); err != nil {
			t.Fatal(err)
		}
	}
	s.ctrl = &scriptCtrl{s: s,
		disk: protocol.Disk{ID: sDisk, Name: "d", Size: sSegs * sSeg, SegmentSize: sSeg},
		cont: protocol.Container{ID: 1, URI: "mem:1", SlotSize: sSeg, Slots: sSlots},
	}
	s.a = New(Config{Name: "host", Controller: s.ctrl, OpenContainer: func(info protocol.Container) (container.Container, error) {
		return &scriptContainer{Container: s.mem, s: s}, nil
	}})
	if err := s.a.Attach(s.ctx, s.ctrl); err != nil {
		t.Fatal(err)
	}
	d, err := s.a.Open(s.ctx, "d")
	if err != nil {
		t.Fatal(err)
	}
	s.d = d
	t.Cleanup(s.close)
	return s
}

// close ends what the script left running: contexts are cancelled and
// everything held is let go, then every op must return.
func (s *scenario) close() {
	s.cancel()
	close(s.stop)
	for _, o := range s.order {
		if o.finished {
			continue
		}
		select {
		case <-o.done:
			o.finished = true
		case <-time.After(mustFinish):
			s.t.Errorf("%s did not return at the end", o.name)
		}
	}
	if err := s.a.Close(); err != nil {
		s.t.Errorf("close agent: %v", err)
	}
}

// goid returns the calling goroutine's id, from its stack header
// ("goroutine 18 [running]:").
func goid() int64 {
	var b [64]byte
	f := strings.Fields(string(b[:runtime.Stack(b[:], false)]))
	id, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil {
		panic(err)
	}
	return id
}

// scriptContainer holds every data I/O, while hold is on, until the
// script finishes it.
type scriptContainer struct {
	container.Container
	s *scenario
}

func (c *scriptContainer) wait(write bool, off, n int64) {
	s := c.s
	s.mu.Lock()
	if !s.mu.hold {
		s.mu.Unlock()
		return
	}
	h := &heldIO{write: write, off: off, n: n, release: make(chan struct{})}
	id := goid()
	s.mu.held[id] = h
	s.mu.Unlock()
	select {
	case <-h.release:
	case <-s.stop:
	}
	s.mu.Lock()
	delete(s.mu.held, id)
	s.mu.Unlock()
}

func (c *scriptContainer) ReadAt(p []byte, off int64) (int, error) {
	c.wait(false, off, int64(len(p)))
	return c.Container.ReadAt(p, off)
}

func (c *scriptContainer) WriteAt(p []byte, off int64) (int, error) {
	c.wait(true, off, int64(len(p)))
	return c.Container.WriteAt(p, off)
}

// scriptCtrl is a controller that serves one disk and one container and
// holds every fault until the script answers it.
type scriptCtrl struct {
	s    *scenario
	disk protocol.Disk
	cont protocol.Container
}

func (c *scriptCtrl) Attach(ctx context.Context, name string, a protocol.Agent, open []protocol.DiskID) error {
	return nil
}
func (c *scriptCtrl) Detach(ctx context.Context, name string) error { return nil }
func (c *scriptCtrl) Exports(ctx context.Context, agent string) ([]protocol.Disk, error) {
	return []protocol.Disk{c.disk}, nil
}
func (c *scriptCtrl) Open(ctx context.Context, agent, disk string) (protocol.Disk, error) {
	if disk != c.disk.Name {
		return protocol.Disk{}, fmt.Errorf("%q: %w", disk, protocol.ErrNotFound)
	}
	return c.disk, nil
}
func (c *scriptCtrl) CloseDisk(ctx context.Context, agent string, disk protocol.DiskID) error {
	return nil
}
func (c *scriptCtrl) Containers(ctx context.Context) ([]protocol.Container, error) {
	return []protocol.Container{c.cont}, nil
}

func (c *scriptCtrl) Fault(ctx context.Context, f protocol.Fault) (protocol.Reply, error) {
	s := c.s
	id := goid()
	h := &heldFault{f: f, reply: make(chan faultAnswer, 1)}
	s.mu.Lock()
	s.mu.nfaults[id]++
	h.n = s.mu.nfaults[id]
	s.mu.faults[id] = h
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.mu.faults, id)
		s.mu.Unlock()
	}()
	select {
	case a := <-h.reply:
		return a.r, a.err
	case <-ctx.Done():
		return protocol.Reply{}, ctx.Err()
	case <-s.stop:
		return protocol.Reply{}, protocol.ErrUnavailable
	}
}

var _ protocol.Controller = (*scriptCtrl)(nil)

// start runs fn as op name in a goroutine of its own.
func (s *scenario) start(t *testing.T, d *datadriven.TestData, name string, timed bool, fn func() string) {
	if o := s.ops[name]; o != nil && !o.finished {
		d.Fatalf(t, "%s is still running", name)
	}
	o := &scriptOp{name: name, timed: timed, done: make(chan string, 1)}
	ids := make(chan int64)
	go func() {
		ids <- goid()
		o.done <- fn()
	}()
	o.goid = <-ids
	s.ops[name] = o
	s.order = append(s.order, o)
}

func (s *scenario) step(t *testing.T, d *datadriven.TestData) string {
	var out strings.Builder
	name := ""
	if len(d.CmdArgs) > 0 && len(d.CmdArgs[0].Vals) == 0 {
		name = d.CmdArgs[0].Key
	}
	needName := func() {
		if name == "" {
			d.Fatalf(t, "%s needs a name", d.Cmd)
		}
	}
	switch d.Cmd {
	case "start-io":
		needName()
		if len(d.CmdArgs) < 2 {
			d.Fatalf(t, "start-io <name> read|write seg=<i>")
		}
		kind := d.CmdArgs[1].Key
		var seg, off uint64
		d.ScanArgs(t, "seg", &seg)
		if kind == "trim" {
			count := uint64(1)
			d.MaybeScanArgs(t, "count", &count)
			s.start(t, d, name, false, func() string { return errName(s.d.Trim(s.ctx, seg*sSeg, count*sSeg)) })
			break
		}
		write := kind == "write"
		if !write && kind != "read" {
			d.Fatalf(t, "start-io: %q is not read, write or trim", kind)
		}
		n := 512
		d.MaybeScanArgs(t, "off", &off)
		d.MaybeScanArgs(t, "len", &n)
		p := make([]byte, n)
		if write {
			var c string
			d.ScanArgs(t, "data", &c)
			for i := range p {
				p[i] = c[0]
			}
		}
		pos := seg*sSeg + off
		s.start(t, d, name, false, func() string {
			if write {
				return errName(s.d.WriteAt(s.ctx, p, pos, false))
			}
			if err := s.d.ReadAt(s.ctx, p, pos); err != nil {
				return errName(err)
			}
			return "ok, read " + summary(p)
		})

	case "finish-io":
		needName()
		h := s.heldOf(t, d, name)
		close(h.release)

	case "fault-reply":
		needName()
		h := s.faultOf(t, d, name)
		var a faultAnswer
		if e, ok := d.Arg("error"); ok {
			a.err = parseErr(t, d, e.SingleVal(t))
		} else if st, ok := d.Arg("stage"); ok {
			a.r.Stage = &protocol.Stage{Loc: parseEntry(t, d, st.SingleVal(t)).Loc, Token: 1}
		} else {
			a.r.First = h.f.Segment
			d.MaybeScanArgs(t, "first", &a.r.First)
			a.r.Entries = parseEntries(t, d)
		}
		h.reply <- a

	case "set-entry":
		needName()
		c := protocol.SetEntry{Disk: sDisk, Blocking: d.HasArg("blocking")}
		d.ScanArgs(t, "first", &c.First)
		c.Entries = parseEntries(t, d)
		s.start(t, d, name, false, func() string { return errName(s.a.SetEntry(s.ctx, c)) })

	case "set-entry-state":
		needName()
		c := protocol.SetEntryState{Disk: sDisk, Blocking: d.HasArg("blocking"), On: d.HasArg("on")}
		if c.On == d.HasArg("off") {
			d.Fatalf(t, "set-entry-state needs one of on, off")
		}
		var st string
		d.ScanArgs(t, "first", &c.First)
		d.ScanArgs(t, "n", &c.Count)
		d.ScanArgs(t, "state", &st)
		c.State = parseState(t, d, st)
		s.start(t, d, name, false, func() string { return errName(s.a.SetEntryState(s.ctx, c)) })

	case "quiesce":
		needName()
		var timeout time.Duration
		if a, ok := d.Arg("timeout"); ok {
			var err error
			if timeout, err = time.ParseDuration(a.SingleVal(t)); err != nil {
				d.Fatalf(t, "timeout: %v", err)
			}
		}
		s.start(t, d, name, timeout > 0, func() string { return errName(s.a.Quiesce(s.ctx, sDisk, timeout)) })

	case "activate":
		needName()
		s.start(t, d, name, false, func() string { return errName(s.a.Activate(s.ctx, sDisk)) })

	case "fence":
		needName()
		s.start(t, d, name, false, func() string { return errName(s.a.Fence(s.ctx)) })

	case "new-table":
		needName()
		info := s.ctrl.disk
		segs := uint64(sSegs)
		d.MaybeScanArgs(t, "segs", &segs)
		info.Size = segs * sSeg
		s.start(t, d, name, false, func() string { return errName(s.a.NewTable(s.ctx, info)) })

	case "delete-table":
		needName()
		s.start(t, d, name, false, func() string { return errName(s.a.DeleteTable(s.ctx, sDisk)) })

	case "attach":
		needName()
		s.start(t, d, name, false, func() string { return errName(s.a.Attach(s.ctx, s.ctrl)) })

	case "lease":
		if len(d.CmdArgs) != 1 {
			d.Fatalf(t, "lease lapsed|held|none")
		}
		switch d.CmdArgs[0].Key {
		case "lapsed":
			s.a.SetLease(time.Now().Add(-time.Second))
		case "held":
			s.a.SetLease(time.Now().Add(time.Hour))
		case "none":
			s.a.SetLease(time.Time{})
		default:
			d.Fatalf(t, "lease %s: want lapsed, held or none", d.CmdArgs[0].Key)
		}

	case "hold":
		s.mu.Lock()
		s.mu.hold = d.HasArg("on")
		s.mu.Unlock()

	case "table":
		s.d.mu.RLock()
		out.WriteString(showTable(s.d.mu.tab))
		s.d.mu.RUnlock()

	case "slot":
		var slot int64
		d.ScanArgs(t, "n", &slot)
		p := make([]byte, sSeg)
		if _, err := s.mem.ReadAt(p, slot*sSeg); err != nil {
			d.Fatalf(t, "slot %d: %v", slot, err)
		}
		out.WriteString(summary(p) + "\n")

	case "epochs":
		s.d.mu.RLock()
		fmt.Fprintf(&out, "current: epoch %d, %d in flight\n", s.d.mu.cur.gen, s.d.mu.cur.n.Load())
		for _, ep := range s.d.mu.pending {
			if n := ep.n.Load(); n > 0 {
				fmt.Fprintf(&out, "closed: epoch %d, %d in flight\n", ep.gen, n)
			}
		}
		s.d.mu.RUnlock()

	default:
		d.Fatalf(t, "unknown command %q", d.Cmd)
	}
	out.WriteString(s.settle(t, d))
	return out.String()
}

func (s *scenario) heldOf(t *testing.T, d *datadriven.TestData, name string) *heldIO {
	o := s.ops[name]
	if o == nil {
		d.Fatalf(t, "no op %s", name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.mu.held[o.goid]
	if h == nil {
		d.Fatalf(t, "%s has no I/O held in the container", name)
	}
	delete(s.mu.held, o.goid) // released: not held any more
	return h
}

func (s *scenario) faultOf(t *testing.T, d *datadriven.TestData, name string) *heldFault {
	o := s.ops[name]
	if o == nil {
		d.Fatalf(t, "no op %s", name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.mu.faults[o.goid]
	if h == nil {
		d.Fatalf(t, "%s has no fault out", name)
	}
	delete(s.mu.faults, o.goid) // answered
	return h
}

// settle waits until every op that has not returned is stopped where only
// the script can move it on, then prints each op whose state changed, in
// the order they were started.
func (s *scenario) settle(t *testing.T, d *datadriven.TestData) string {
	deadline := time.Now().Add(2 * mustFinish)
	for {
		states, ok := s.where()
		if ok {
			var b strings.Builder
			for _, o := range s.order {
				st := states[o]
				if st == o.state {
					continue
				}
				o.state = st
				fmt.Fprintf(&b, "%s: %s\n", o.name, st)
			}
			return b.String()
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			d.Fatalf(t, "the agent did not settle: %v\n%s", states, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(time.Millisecond)
	}
}

// where returns the state of every op, and whether each is done or
// stopped where only the script can move it on.
//
// A goroutine's stack is a snapshot: one that was blocked when the stacks
// were taken may have been woken just after by another op's progress (an
// I/O that ends wakes a Blocking command). So the ops' own marks (done,
// held, fault out) are taken before and after the stacks, and the stacks
// are trusted only if no op moved in between: every wake-up comes from an
// op that moves on to a new mark, or from the script, which waits here.
func (s *scenario) where() (map[*scriptOp]string, bool) {
	before := s.marks()
	stacks := goroutines()
	s.d.mu.RLock()
	quiesced := s.d.mu.quiesced
	s.d.mu.RUnlock()
	leaseHeld := s.a.leaseHeld()
	states := s.marks()
	settled := len(before) == len(states)
	for _, o := range s.order {
		if st, ok := states[o]; ok {
			if before[o] != st {
				settled = false
			}
			continue
		}
		if _, ok := before[o]; ok {
			settled = false
		}
		g := stacks[o.goid]
		blocked := strings.HasPrefix(g.status, "select") || strings.HasPrefix(g.status, "chan receive")
		switch {
		case blocked && strings.Contains(g.stack, ".(*Disk).waitDrained("):
			states[o] = "waiting for older I/O"
			if o.timed {
				settled = false // it answers by itself
			}
		case strings.Contains(g.stack, ".(*Agent).waitLease(") && !leaseHeld:
			states[o] = "waiting for the lease"
		case blocked && strings.Contains(g.stack, ".(*Disk).begin(") && quiesced:
			states[o] = "waiting for the disk to be active"
		default:
			states[o] = "running: " + g.status
			settled = false
		}
	}
	return states, settled
}

// marks returns the state of each op that is done, or held in the
// container, or has a fault out.
func (s *scenario) marks() map[*scriptOp]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	states := map[*scriptOp]string{}
	for _, o := range s.order {
		if !o.finished {
			select {
			case r := <-o.done:
				o.finished, o.result = true, r
			default:
			}
		}
		if o.finished {
			states[o] = "done: " + o.result
			continue
		}
		if h := s.mu.held[o.goid]; h != nil {
			verb := "read"
			if h.write {
				verb = "write"
			}
			states[o] = fmt.Sprintf("%s of slot %d held in the container", verb, h.off/sSeg)
			continue
		}
		if h := s.mu.faults[o.goid]; h != nil {
			f := h.f
			var more string
			if f.Count != 1 {
				more += fmt.Sprintf(" count %d", f.Count)
			}
			if f.Whole {
				more += " whole"
			}
			if f.Reason != 0 {
				more += fmt.Sprintf(" (%v)", f.Reason)
			}
			states[o] = fmt.Sprintf("fault %d out: %v seg %d%s", h.n, f.Op, f.Segment, more)
		}
	}
	return states
}

// gstack is one goroutine's status and stack.
type gstack struct {
	status string
	stack  string
}

// goroutines returns every goroutine's stack, by id.
func goroutines() map[int64]gstack {
	buf := make([]byte, 1<<16)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	out := map[int64]gstack{}
	for _, blk := range strings.Split(string(buf), "\n\n") {
		header, stack, _ := strings.Cut(blk, "\n")
		// goroutine 18 [select, 2 minutes]:
		// goroutine 18 gp=0xc000102a80 m=nil [select]: (GOTRACEBACK=system)
		f := strings.Fields(header)
		i, j := strings.Index(header, "["), strings.LastIndex(header, "]")
		if len(f) < 3 || f[0] != "goroutine" || i < 0 || j < i {
			continue
		}
		id, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			continue
		}
		out[id] = gstack{status: header[i+1 : j], stack: stack}
	}
	return out
}

// errName names err by the sentinel it wraps, so that the scripts do not
// depend on the wording of messages.
func errName(err error) string {
	if err == nil {
		return "ok"
	}
	for _, s := range []struct {
		err  error
		name string
	}{
		{ErrQuiesceTimeout, "ErrQuiesceTimeout"},
		{ErrGone, "ErrGone"},
		{ErrRange, "ErrRange"},
		{ErrNoTable, "ErrNoTable"},
		{ErrClosed, "ErrClosed"},
		{protocol.ErrReadOnly, "ErrReadOnly"},
		{protocol.ErrFenced, "ErrFenced"},
		{protocol.ErrUnavailable, "ErrUnavailable"},
		{protocol.ErrIO, "ErrIO"},
		{table.ErrRange, "table.ErrRange"},
		{table.ErrVoided, "table.ErrVoided"},
		{context.Canceled, "context.Canceled"},
	} {
		if errors.Is(err, s.err) {
			return "error " + s.name
		}
	}
	return "error (no sentinel): " + err.Error()
}

func parseErr(t *testing.T, d *datadriven.TestData, s string) error {
	switch s {
	case "io":
		return protocol.ErrIO
	case "fenced":
		return protocol.ErrFenced
	case "unavailable":
		return protocol.ErrUnavailable
	case "stale":
		return protocol.ErrStale
	}
	d.Fatalf(t, "unknown error %q (want io, fenced, unavailable or stale)", s)
	return nil
}

// summary describes a read's data: the letter it is made of (which slot,
// or which write), "zeros", or the runs of letters.
func summary(p []byte) string {
	var b strings.Builder
	for i := 0; i < len(p); {
		j := i
		for j < len(p) && p[j] == p[i] {
			j++
		}
		if b.Len() > 0 {
			b.WriteString(" ")
		}
		c := string(p[i])
		if p[i] == 0 {
			c = "0"
		}
		fmt.Fprintf(&b, "%s×%d", c, j-i)
		i = j
	}
	return b.String()
}

// showTable prints t compactly: one line per run of equal entries, or of
// mapped entries with the same state at consecutive slots.
func showTable(t *table.Table) string {
	var b strings.Builder
	for i := 0; i < t.Len(); {
		e := t.Entry(i)
		j := i + 1
		for j < t.Len() {
			p, q := t.Entry(j-1), t.Entry(j)
			if p.Voided() || q.Voided() {
				if p != q {
					break
				}
			} else if p.State != q.State || p.Loc.Container != q.Loc.Container || q.Loc.Slot != p.Loc.Slot+1 {
				break
			}
			j++
		}
		last := t.Entry(j - 1)
		switch {
		case j-i == 1:
			fmt.Fprintf(&b, "%d: %v\n", i, e)
		case e == last:
			fmt.Fprintf(&b, "%d-%d: %v\n", i, j-1, e)
		default:
			fmt.Fprintf(&b, "%d-%d: %v..%v\n", i, j-1, e.Loc, last)
		}
		i = j
	}
	return b.String()
}

func parseEntries(t *testing.T, d *datadriven.TestData) []table.Entry {
	a, ok := d.Arg("entries")
	if !ok {
		d.Fatalf(t, "%s needs entries=(...)", d.Cmd)
	}
	var es []table.Entry
	for _, v := range a.Vals {
		if v != "" {
			es = append(es, parseEntry(t, d, v))
		}
	}
	return es
}

// parseState parses state names joined by "|", as State.String prints them.
func parseState(t *testing.T, d *datadriven.TestData, s string) table.State {
	var st table.State
	for _, name := range strings.Split(s, "|") {
		switch name {
		case "Invalid":
			st |= table.Invalid
		case "Error":
			st |= table.Error
		case "Zero":
			st |= table.Zero
		case "NoWrite":
			st |= table.NoWrite
		default:
			d.Fatalf(t, "unknown state %q", name)
		}
	}
	return st
}

// parseEntry parses "c<container>/s<slot>[+<state>]" or "<state>", as
// Entry.String prints them.
func parseEntry(t *testing.T, d *datadriven.TestData, s string) table.Entry {
	if !strings.HasPrefix(s, "c") {
		return table.Entry{State: parseState(t, d, s)}
	}
	loc, st, _ := strings.Cut(s, "+")
	var e table.Entry
	if _, err := fmt.Sscanf(loc, "c%d/s%d", &e.Loc.Container, &e.Loc.Slot); err != nil {
		d.Fatalf(t, "entry %q: %v", s, err)
	}
	if st != "" {
		e.State = parseState(t, d, st)
	}
	return e
}

func (c *scriptCtrl) ReportReplica(ctx context.Context, r protocol.ReplicaReport) (protocol.Membership, error) {
	return protocol.Membership{}, protocol.ErrBadRequest
}
