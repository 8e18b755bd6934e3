package faultinject_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"

	"segmap/internal/container"
	"segmap/internal/container/containertest"
	"segmap/internal/faultinject"
	"segmap/internal/meta"
)

// Both wrappers, with no fault, are containers like any other.
func TestConformance(t *testing.T) {
	for _, volatile := range []bool{false, true} {
		name := map[bool]string{false: "passthrough", true: "volatile"}[volatile]
		t.Run(name, func(t *testing.T) {
			containertest.Run(t, func(t *testing.T, slotSize, slots int64) container.Container {
				in := faultinject.New(1)
				m := container.NewMemory(7, slotSize, slots)
				if volatile {
					return in.VolatileContainer("c", m)
				}
				return in.Container("c", m)
			})
		})
	}
}

const slot = 4096

func fill(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

func read(t *testing.T, c container.Container, off int64, n int) []byte {
	t.Helper()
	p := make([]byte, n)
	if _, err := c.ReadAt(p, off); err != nil {
		t.Fatalf("read [%d,+%d): %v", off, n, err)
	}
	return p
}

func TestContainerFaults(t *testing.T) {
	type step struct {
		op      faultinject.Op
		wantErr bool
	}
	w, p, f, r := faultinject.OpWrite, faultinject.OpPunch, faultinject.OpFlush, faultinject.OpRead
	tests := []struct {
		name  string
		fault faultinject.Fault
		steps []step
	}{
		{"write once", faultinject.Fault{Ops: w}, []step{{r, false}, {w, true}, {w, false}, {f, false}}},
		{"second write", faultinject.Fault{Ops: w, Nth: 2}, []step{{w, false}, {w, true}, {w, false}}},
		{"write always", faultinject.Fault{Ops: w, Always: true, Err: syscall.ENOSPC}, []step{{w, true}, {p, false}, {w, true}, {w, true}}},
		{"flush from the second on", faultinject.Fault{Ops: f, Nth: 2, Always: true}, []step{{f, false}, {w, false}, {f, true}, {f, true}}},
		{"punch", faultinject.Fault{Ops: p}, []step{{w, false}, {p, true}, {p, false}}},
		{"read", faultinject.Fault{Ops: r}, []step{{w, false}, {r, true}, {r, false}}},
		{"predicate", faultinject.Fault{Ops: w | p, If: func(c faultinject.Call) bool { return c.Off >= slot }}, []step{{w, false}, {p, false}, {w, false}}},
		{"other target", faultinject.Fault{Ops: faultinject.OpAll, Target: "agent"}, []step{{w, false}, {f, false}, {r, false}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := faultinject.New(1)
			fault := in.Inject(tt.fault)
			c := in.Container("ctrl/c1", container.NewMemory(1, slot, 4))
			want := tt.fault.Err
			if want == nil {
				want = syscall.EIO
			}
			fired := 0
			for i, s := range tt.steps {
				var err error
				switch s.op {
				case w:
					_, err = c.WriteAt(fill(byte(i+1), 10), 0)
				case p:
					err = c.Punch(0, slot)
				case f:
					err = c.Flush()
				case r:
					_, err = c.ReadAt(make([]byte, 10), 0)
				}
				if (err != nil) != s.wantErr {
					t.Fatalf("step %d (%v): err %v, want error %v", i, s.op, err, s.wantErr)
				}
				if err != nil {
					fired++
					var ie *faultinject.InjectedError
					if !errors.Is(err, want) || !errors.As(err, &ie) {
						t.Fatalf("step %d: %v does not wrap %v in an InjectedError", i, err, want)
					}
				}
			}
			if fault.Fired() != fired || in.Injected() != int64(fired) {
				t.Errorf("fault fired %d, injector counts %d, calls failed %d", fault.Fired(), in.Injected(), fired)
			}
		})
	}
}

// A failed write changes nothing; a Durable one lands all the same.
func TestContainerFailedWriteEffect(t *testing.T) {
	for _, durable := range []bool{false, true} {
		in := faultinject.New(1)
		in.Inject(faultinject.Fault{Ops: faultinject.OpWrite, Durable: durable})
		m := container.NewMemory(1, slot, 4)
		c := in.Container("c", m)
		if _, err := c.WriteAt(fill('x', 10), 0); !errors.Is(err, syscall.EIO) {
			t.Fatalf("durable=%v: write: %v, want EIO", durable, err)
		}
		got := read(t, m, 0, 1)[0]
		if want := map[bool]byte{false: 0, true: 'x'}[durable]; got != want {
			t.Errorf("durable=%v: container holds %q after the failed write, want %q", durable, got, want)
		}
	}
}

// A volatile container shows unsynced writes to reads, and a crash keeps
// only what was flushed.
func TestVolatileCrash(t *testing.T) {
	in := faultinject.New(1)
	m := container.NewMemory(1, slot, 4)
	c := in.VolatileContainer("c", m)
	mustWrite(t, c, fill('a', slot), 0)
	mustWrite(t, c, fill('b', slot), slot)
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, c, fill('c', 100), 0)
	if err := c.Punch(slot, slot); err != nil {
		t.Fatal(err)
	}
	if got := read(t, c, 0, 1)[0]; got != 'c' {
		t.Errorf("read after unsynced write: %q, want 'c'", got)
	}
	if got := read(t, c, slot, 1)[0]; got != 0 {
		t.Errorf("read after unsynced punch: %q, want 0", got)
	}
	if got := read(t, m, 0, 1)[0]; got != 'a' {
		t.Errorf("underlying container holds %q before the flush, want 'a'", got)
	}
	if c.Unsynced() != 2 {
		t.Errorf("%d unsynced operations, want 2", c.Unsynced())
	}
	in.Crash()
	if _, err := c.ReadAt(make([]byte, 1), 0); !errors.Is(err, faultinject.ErrCrashed) {
		t.Errorf("read after crash: %v, want ErrCrashed", err)
	}
	if err := c.Flush(); !errors.Is(err, faultinject.ErrCrashed) {
		t.Errorf("flush after crash: %v, want ErrCrashed", err)
	}
	if got := read(t, m, 0, slot+1); got[0] != 'a' || got[slot] != 'b' {
		t.Errorf("after the crash the container holds %q, %q; want the flushed 'a', 'b'", got[0], got[slot])
	}
	if err := c.Close(); err != nil {
		t.Errorf("close after crash: %v", err)
	}
}

// KeepUnsynced(1) lets every unsynced operation through a crash.
func TestVolatileCrashKeepsSubset(t *testing.T) {
	in := faultinject.New(3)
	in.KeepUnsynced(1)
	m := container.NewMemory(1, slot, 4)
	c := in.VolatileContainer("c", m)
	mustWrite(t, c, fill('z', 10), 0)
	in.Crash()
	if got := read(t, m, 0, 1)[0]; got != 'z' {
		t.Errorf("with KeepUnsynced(1) the crash lost an unsynced write: %q", got)
	}
}

// Persistence steps are numbered across wrappers; CrashAt keeps the step
// or not.
func TestCrashAtStep(t *testing.T) {
	for _, keep := range []bool{false, true} {
		in := faultinject.New(1)
		in.Record(true)
		m := container.NewMemory(1, slot, 4)
		c := in.VolatileContainer("c", m)
		st := openStore(t, in)
		mustWrite(t, c, fill('a', 10), 0) // step 1
		if err := c.Flush(); err != nil { // step 2
			t.Fatal(err)
		}
		put(t, st, "one") // step 3
		in.CrashAt(5, keep)
		mustWrite(t, c, fill('b', 10), 0) // step 4
		err := c.Flush()                  // step 5: the crash
		if !errors.Is(err, faultinject.ErrCrashed) {
			t.Fatalf("flush at the crash step: %v", err)
		}
		if in.Steps() != 5 || len(in.Log()) != 5 || in.Log()[2].Op != faultinject.OpUpdate || in.Log()[4].Step != 5 {
			t.Errorf("steps %d, log %v", in.Steps(), in.Log())
		}
		if err := st.Update(context.Background(), func(tx *meta.Tx) error { return nil }); !errors.Is(err, faultinject.ErrCrashed) {
			t.Errorf("update after crash: %v", err)
		}
		want := map[bool]byte{false: 'a', true: 'b'}[keep]
		if got := read(t, m, 0, 1)[0]; got != want {
			t.Errorf("keep=%v: container holds %q, want %q", keep, got, want)
		}
		if in.Steps() != 5 {
			t.Errorf("calls after the crash counted as steps: %d", in.Steps())
		}
	}
}

func mustWrite(t *testing.T, c container.Container, p []byte, off int64) {
	t.Helper()
	if _, err := c.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
}

// openStore opens a bbolt store under the injector; the test closes it.
func openStore(t *testing.T, in *faultinject.Injector) *faultinject.Store {
	t.Helper()
	b, err := meta.OpenBolt(filepath.Join(t.TempDir(), "meta.db"))
	if err != nil {
		t.Fatal(err)
	}
	st := in.Store("meta", b)
	t.Cleanup(func() { st.Close() })
	return st
}

// put stores an agent registry of one name: a small committed change.
func put(t *testing.T, st meta.Store, name string) {
	t.Helper()
	if err := st.Update(context.Background(), func(tx *meta.Tx) error { return tx.SetAgents([]string{name}) }); err != nil {
		t.Fatal(err)
	}
}

func agents(t *testing.T, st meta.Store) []string {
	t.Helper()
	var out []string
	if err := st.View(context.Background(), func(tx *meta.Tx) error {
		var err error
		out, err = tx.Agents()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestStoreFaults(t *testing.T) {
	tests := []struct {
		name  string
		fault faultinject.Fault
		// kept: the failed update's change is in the store afterwards.
		kept bool
	}{
		{"before commit", faultinject.Fault{Ops: faultinject.OpUpdate}, false},
		{"after commit", faultinject.Fault{Ops: faultinject.OpUpdate, Durable: true, Err: syscall.ENOSPC}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := faultinject.New(1)
			st := openStore(t, in)
			put(t, st, "before")
			f := in.Inject(tt.fault)
			err := st.Update(context.Background(), func(tx *meta.Tx) error { return tx.SetAgents([]string{"failed"}) })
			want := tt.fault.Err
			if want == nil {
				want = syscall.EIO
			}
			if !errors.Is(err, want) {
				t.Fatalf("update: %v, want %v", err, want)
			}
			got := agents(t, st)
			if kept := len(got) == 1 && got[0] == "failed"; kept != tt.kept {
				t.Errorf("store holds %v after the failed update; kept %v, want %v", got, kept, tt.kept)
			}
			put(t, st, "after") // once: the next update goes through
			if f.Fired() != 1 {
				t.Errorf("fault fired %d times", f.Fired())
			}
		})
	}
}

// A crash at an Update keeps its change or not, and the store reopens with
// exactly that.
func TestStoreCrash(t *testing.T) {
	for _, keep := range []bool{false, true} {
		dir := t.TempDir()
		path := filepath.Join(dir, "meta.db")
		b, err := meta.OpenBolt(path)
		if err != nil {
			t.Fatal(err)
		}
		in := faultinject.New(1)
		st := in.Store("meta", b)
		put(t, st, "one")
		in.CrashAt(2, keep)
		if err := st.Update(context.Background(), func(tx *meta.Tx) error { return tx.SetAgents([]string{"two"}) }); !errors.Is(err, faultinject.ErrCrashed) {
			t.Fatalf("crashing update: %v", err)
		}
		if err := st.View(context.Background(), func(*meta.Tx) error { return nil }); !errors.Is(err, faultinject.ErrCrashed) {
			t.Errorf("view after crash: %v", err)
		}
		if err := st.Close(); err != nil {
			t.Fatal(err)
		}
		b, err = meta.OpenBolt(path)
		if err != nil {
			t.Fatal(err)
		}
		got := agents(t, b)
		b.Close()
		want := map[bool]string{false: "one", true: "two"}[keep]
		if len(got) != 1 || got[0] != want {
			t.Errorf("keep=%v: reopened store holds %v, want [%s]", keep, got, want)
		}
	}
}

// A Crash fault crashes the injector at the Nth matching call: here the
// second Update, kept or not.
func TestCrashFault(t *testing.T) {
	for _, keep := range []bool{false, true} {
		in := faultinject.New(1)
		in.Inject(faultinject.Fault{Ops: faultinject.OpUpdate, Nth: 2, Crash: true, Durable: keep})
		m := container.NewMemory(1, slot, 4)
		c := in.VolatileContainer("c", m)
		st := openStore(t, in)
		put(t, st, "one")
		mustWrite(t, c, fill('u', 10), 0) // unsynced: lost in the crash
		err := st.Update(context.Background(), func(tx *meta.Tx) error { return tx.SetAgents([]string{"two"}) })
		if !errors.Is(err, faultinject.ErrCrashed) || !in.Crashed() {
			t.Fatalf("keep=%v: second update: %v, crashed %v", keep, err, in.Crashed())
		}
		if got := read(t, m, 0, 1)[0]; got != 0 {
			t.Errorf("keep=%v: the crash kept an unsynced write: %q", keep, got)
		}
		got := agents(t, st.Inner())
		want := map[bool]string{false: "one", true: "two"}[keep]
		if len(got) != 1 || got[0] != want {
			t.Errorf("keep=%v: store holds %v, want [%s]", keep, got, want)
		}
	}
}

// A batch of Updates committed together (meta's group commit) is one
// persistence step: a crash at it keeps every Update of the batch or
// none, a fault there fails them all, and an Update whose own fn failed
// is never in the store. The first Update's fn holds the group busy while
// the others queue behind it (the store's queue hook says when), so the
// batch is the same every run: step 1 the first Update, step 2 the eight
// queued ones.
func TestStoreBatchIsOneStep(t *testing.T) {
	const n = 8
	cases := []struct {
		name  string
		set   func(in *faultinject.Injector)
		kept  bool  // the batch is in the store afterwards
		err   error // what its callers get
		crash bool
	}{
		{"crash-dropped", func(in *faultinject.Injector) { in.CrashAt(2, false) }, false, faultinject.ErrCrashed, true},
		{"crash-kept", func(in *faultinject.Injector) { in.CrashAt(2, true) }, true, faultinject.ErrCrashed, true},
		{"fault", func(in *faultinject.Injector) {
			in.Inject(faultinject.Fault{Ops: faultinject.OpUpdate, Nth: 2, Err: syscall.EIO})
		}, false, syscall.EIO, false},
		{"fault-durable", func(in *faultinject.Injector) {
			in.Inject(faultinject.Fault{Ops: faultinject.OpUpdate, Nth: 2, Err: syscall.ENOSPC, Durable: true})
		}, true, syscall.ENOSPC, false},
		{"none", func(*faultinject.Injector) {}, true, nil, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "meta.db")
			b, err := meta.OpenBolt(path)
			if err != nil {
				t.Fatal(err)
			}
			in := faultinject.New(1)
			in.Record(true)
			st := in.Store("meta", b)
			queued := make(chan int, n)
			b.SetQueueHook(func(k int) { queued <- k })
			tc.set(in)

			ctx := t.Context()
			held, release := make(chan struct{}), make(chan struct{})
			var wg sync.WaitGroup
			var firstErr error
			wg.Go(func() {
				firstErr = st.Update(ctx, func(tx *meta.Tx) error {
					if err := tx.SetAgents([]string{"first"}); err != nil {
						return err
					}
					close(held)
					<-release
					return nil
				})
			})
			<-held
			errs := make([]error, n+1)
			for i := range n + 1 {
				wg.Go(func() {
					errs[i] = st.Update(ctx, func(tx *meta.Tx) error {
						if _, err := tx.NextSeq(fmt.Sprintf("u%d", i)); err != nil {
							return err
						}
						if i == n {
							return errOwn // its own failure: never kept
						}
						return nil
					})
				})
			}
			for k := range queued {
				if k == n+1 {
					break
				}
			}
			close(release)
			wg.Wait()
			if firstErr != nil {
				t.Fatalf("first update: %v", firstErr)
			}
			for i, err := range errs[:n] {
				if tc.err == nil && err != nil || tc.err != nil && !errors.Is(err, tc.err) {
					t.Errorf("update %d of the batch: %v, want %v", i, err, tc.err)
				}
			}
			if !errors.Is(errs[n], errOwn) {
				t.Errorf("the failing update: %v, want its own error", errs[n])
			}
			log := in.Log()
			if len(log) != 2 || log[1].Op != faultinject.OpUpdate || log[1].Step != 2 || log[1].Len != n {
				t.Errorf("log %v; want two steps, the second an update of %d updates", log, n)
			}
			if in.Crashed() != tc.crash {
				t.Errorf("crashed %v, want %v", in.Crashed(), tc.crash)
			}
			if err := st.Close(); err != nil {
				t.Fatal(err)
			}
			// Reopen, as a restart would: the batch is all there or
			// all gone.
			b, err = meta.OpenBolt(path)
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			var present []int
			if err := b.Update(ctx, func(tx *meta.Tx) error {
				present = present[:0]
				for i := range n + 1 {
					v, err := tx.NextSeq(fmt.Sprintf("u%d", i))
					if err != nil {
						return err
					}
					if v == 2 {
						present = append(present, i)
					}
				}
				return errOwn // look only
			}); !errors.Is(err, errOwn) {
				t.Fatal(err)
			}
			want := []int{}
			if tc.kept {
				for i := range n {
					want = append(want, i)
				}
			}
			if !slices.Equal(present, want) {
				t.Errorf("updates in the reopened store: %v, want %v", present, want)
			}
			if got := agents(t, b); len(got) != 1 || got[0] != "first" {
				t.Errorf("the first update's change: %v", got)
			}
		})
	}
}

var errOwn = errors.New("the update's own failure")
