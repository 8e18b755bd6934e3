package leaktest

import (
	"bytes"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	dump := `goroutine 7 [running]:
main.main()
	/x/main.go:3 +0x1

goroutine 18 [chan receive, 2 minutes]:
segmap/internal/nbd.(*conn).serve(0xc000)
	/x/nbd/conn.go:9 +0x2
created by segmap/internal/nbd.(*Server).Serve in goroutine 7
	/x/nbd/server.go:1 +0x3

garbage without a header

goroutine 4294967296 [select]:
google.golang.org/grpc.(*ccBalancerWrapper).watcher()
`
	gs := parse([]byte(dump))
	var got []uint64
	for _, g := range gs {
		got = append(got, g.id)
	}
	if want := []uint64{7, 18, 0, 4294967296}; !slices.Equal(got, want) {
		t.Fatalf("ids %v, want %v", got, want)
	}
	if !strings.HasPrefix(gs[1].stack, "goroutine 18 [") || !strings.HasSuffix(gs[1].stack, "server.go:1 +0x3") {
		t.Errorf("stack of goroutine 18 = %q", gs[1].stack)
	}
	if m := ids(gs); m[0] || len(m) != 3 {
		t.Errorf("ids = %v: want 7, 18 and 4294967296, never 0", m)
	}

	c := newConfig([]Option{Matching("segmap/internal/nbd.", "google.golang.org/grpc")})
	// The first goroutine is the caller's, 18 was there before, 0 and
	// 4294967296 are new but only the latter matches.
	left := c.leaked(map[uint64]bool{18: true}, gs)
	if len(left) != 1 || left[0].id != 4294967296 {
		t.Errorf("leaked = %v, want only goroutine 4294967296", left)
	}
	// Without Matching, every new goroutine counts, the unparsed one too.
	left = newConfig(nil).leaked(map[uint64]bool{18: true}, gs)
	if len(left) != 2 {
		t.Errorf("leaked without Matching = %v, want goroutines 0 and 4294967296", left)
	}
}

// The live dump has the caller first, and every goroutine once.
func TestGoroutines(t *testing.T) {
	stop := make(chan struct{})
	defer close(stop)
	spawn(parked, "leaktest.parked", stop)
	gs := goroutines()
	if !strings.Contains(gs[0].stack, "leaktest.TestGoroutines") {
		t.Errorf("first goroutine is not the caller:\n%s", gs[0].stack)
	}
	n := 0
	for _, g := range gs {
		if g.id == 0 {
			t.Errorf("unparsed goroutine:\n%s", g.stack)
		}
		if strings.Contains(g.stack, "leaktest.parked") {
			n++
		}
	}
	if n != 1 {
		t.Errorf("%d goroutines in parked, want 1", n)
	}
}

// parked and other are goroutines to leak, with names to find in stacks.
//
//go:noinline
func parked(stop chan struct{}) { <-stop }

//go:noinline
func other(stop chan struct{}) { <-stop }

// spawn starts f(stop) and returns once the goroutine is in f, whose name
// is name: a goroutine that has not run yet shows only the wrapper the
// compiler made for the go statement.
func spawn(f func(chan struct{}), name string, stop chan struct{}) {
	before := ids(goroutines())
	go f(stop)
	for {
		for _, g := range goroutines() {
			if !before[g.id] && strings.Contains(g.stack, name) {
				return
			}
		}
		runtime.Gosched()
	}
}

// fakeT records what Check does with a test.
type fakeT struct {
	cleanups []func()
	errors   []string
}

func (f *fakeT) Helper()           {}
func (f *fakeT) Cleanup(fn func()) { f.cleanups = append(f.cleanups, fn) }
func (f *fakeT) Errorf(format string, args ...any) {
	f.errors = append(f.errors, fmt.Sprintf(format, args...))
}

func (f *fakeT) end() {
	for _, fn := range slices.Backward(f.cleanups) {
		fn()
	}
}

func TestCheck(t *testing.T) {
	const grace = 100 * time.Millisecond
	t.Run("leak", func(t *testing.T) {
		stop := make(chan struct{})
		defer close(stop)
		ft := &fakeT{}
		Check(ft, Within(grace))
		spawn(parked, "leaktest.parked", stop)
		start := time.Now()
		ft.end()
		if len(ft.errors) != 1 || !strings.Contains(ft.errors[0], "1 goroutines leaked") || !strings.Contains(ft.errors[0], "leaktest.parked") {
			t.Errorf("errors %q, want one naming leaktest.parked", ft.errors)
		}
		if d := time.Since(start); d < grace {
			t.Errorf("gave up after %v, before the grace period of %v", d, grace)
		}
	})
	t.Run("ended in a cleanup", func(t *testing.T) {
		stop := make(chan struct{})
		ft := &fakeT{}
		Check(ft, Within(grace))
		spawn(parked, "leaktest.parked", stop)
		ft.Cleanup(func() { close(stop) })
		ft.end()
		if len(ft.errors) != 0 {
			t.Errorf("errors %q, want none", ft.errors)
		}
	})
	t.Run("ends during the grace period", func(t *testing.T) {
		stop := make(chan struct{})
		ft := &fakeT{}
		Check(ft, Within(5*time.Second))
		spawn(parked, "leaktest.parked", stop)
		time.AfterFunc(50*time.Millisecond, func() { close(stop) })
		ft.end()
		if len(ft.errors) != 0 {
			t.Errorf("errors %q, want none", ft.errors)
		}
	})
	t.Run("older goroutines do not count", func(t *testing.T) {
		stop := make(chan struct{})
		defer close(stop)
		spawn(parked, "leaktest.parked", stop)
		ft := &fakeT{}
		Check(ft, Within(grace))
		ft.end()
		if len(ft.errors) != 0 {
			t.Errorf("errors %q, want none", ft.errors)
		}
	})
	// One old goroutine ends and a new one leaks: the count is the same,
	// but the leak is caught.
	t.Run("swap", func(t *testing.T) {
		old := make(chan struct{})
		spawn(parked, "leaktest.parked", old)
		stop := make(chan struct{})
		defer close(stop)
		ft := &fakeT{}
		Check(ft, Within(grace))
		close(old)
		spawn(other, "leaktest.other", stop)
		ft.end()
		if len(ft.errors) != 1 || !strings.Contains(ft.errors[0], "leaktest.other") || strings.Contains(ft.errors[0], "leaktest.parked") {
			t.Errorf("errors %q, want one naming leaktest.other only", ft.errors)
		}
	})
	t.Run("matching", func(t *testing.T) {
		stop := make(chan struct{})
		defer close(stop)
		ft := &fakeT{}
		Check(ft, Within(grace), Matching("leaktest.other"))
		spawn(parked, "leaktest.parked", stop)
		ft.end()
		if len(ft.errors) != 0 {
			t.Errorf("a goroutine that does not match: errors %q, want none", ft.errors)
		}
		ft = &fakeT{}
		Check(ft, Within(grace), Matching("nothing", "leaktest.other"))
		spawn(other, "leaktest.other", stop)
		ft.end()
		if len(ft.errors) != 1 || !strings.Contains(ft.errors[0], "leaktest.other") {
			t.Errorf("a goroutine that matches: errors %q, want one naming leaktest.other", ft.errors)
		}
	})
}

// fakeM is a testing.M whose Run starts a goroutine parked on stop, unless
// stop is nil, and returns code.
type fakeM struct {
	stop chan struct{}
	code int
}

func (m fakeM) Run() int {
	if m.stop != nil {
		go parked(m.stop)
	}
	return m.code
}

func TestVerifyMain(t *testing.T) {
	stop := make(chan struct{})
	defer close(stop)
	var w bytes.Buffer
	if code := verifyMain(fakeM{stop: stop}, &w, Within(50*time.Millisecond)); code != 1 || !strings.Contains(w.String(), "leaktest.parked") {
		t.Errorf("leak: exit %d, output %q; want 1 and a stack in leaktest.parked", code, w.String())
	}
	w.Reset()
	if code := verifyMain(fakeM{}, &w); code != 0 || w.Len() != 0 {
		t.Errorf("no leak: exit %d, output %q; want 0 and nothing", code, w.String())
	}
	// Failed tests keep their code, and no check is made on top.
	w.Reset()
	start := time.Now()
	if code := verifyMain(fakeM{stop: stop, code: 3}, &w); code != 3 || w.Len() != 0 || time.Since(start) > time.Second {
		t.Errorf("failed tests: exit %d, output %q, after %v; want 3 and nothing, at once", code, w.String(), time.Since(start))
	}
}

// os/signal's loop outlives every test once anything calls signal.Notify
// (the fuzzing engine's workers do): it is never counted as a leak.
func TestSignalLoopIsNotALeak(t *testing.T) {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGUSR2)
	signal.Stop(ch)
	for _, g := range goroutines() {
		if strings.Contains(g.stack, "os/signal.signal_recv") {
			// As if it had started after the check began.
			if left := newConfig(nil).leaked(map[uint64]bool{}, []goroutine{{}, g}); len(left) != 0 {
				t.Fatalf("counted as leaked: %s", join(left))
			}
			return
		}
	}
	t.Fatal("no os/signal loop goroutine after signal.Notify")
}
