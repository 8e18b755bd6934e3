package backoff

import (
	"context"
	"errors"
	"math"
	"slices"
	"testing"
	"time"
)

const ms = time.Millisecond

// The schedules of the loops that use this package: each must give the
// same delays as the hand-written loop it replaced.
func TestDelay(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    Policy
		want []time.Duration
	}{
		{
			// agent.Open and transport.Client.Fault: min(20ms<<min(try, 6), 1s).
			name: "fault", p: Policy{Initial: 20 * ms, Max: time.Second},
			want: []time.Duration{20 * ms, 40 * ms, 80 * ms, 160 * ms, 320 * ms, 640 * ms, time.Second, time.Second, time.Second},
		},
		{
			// ha mux and nbd accept: min(max(2*d, 5ms), 1s) from d = 0.
			name: "accept", p: Accept,
			want: []time.Duration{5 * ms, 10 * ms, 20 * ms, 40 * ms, 80 * ms, 160 * ms, 320 * ms, 640 * ms, time.Second, time.Second},
		},
		{
			// transport.RunAgent: 100ms doubling to 500ms.
			name: "attach", p: Policy{Initial: 100 * ms, Max: 500 * ms},
			want: []time.Duration{100 * ms, 200 * ms, 400 * ms, 500 * ms, 500 * ms},
		},
		{
			// ha election: 100ms doubling to 2s.
			name: "election", p: Policy{Initial: 100 * ms, Max: 2 * time.Second},
			want: []time.Duration{100 * ms, 200 * ms, 400 * ms, 800 * ms, 1600 * ms, 2 * time.Second, 2 * time.Second},
		},
		{
			// ha.Conn: 50ms doubling to 1s.
			name: "conn", p: Policy{Initial: 50 * ms, Max: time.Second},
			want: []time.Duration{50 * ms, 100 * ms, 200 * ms, 400 * ms, 800 * ms, time.Second},
		},
		{
			name: "multiplier 1.5", p: Policy{Initial: 100 * ms, Max: 300 * ms, Multiplier: 1.5},
			want: []time.Duration{100 * ms, 150 * ms, 225 * ms, 300 * ms, 300 * ms},
		},
		{
			name: "multiplier below 1 is 1", p: Policy{Initial: 7 * ms, Multiplier: 0.5},
			want: []time.Duration{7 * ms, 7 * ms, 7 * ms},
		},
		{
			name: "initial above the cap", p: Policy{Initial: 3 * time.Second, Max: time.Second},
			want: []time.Duration{time.Second, time.Second},
		},
		{
			name: "zero", p: Policy{},
			want: []time.Duration{0, 0, 0},
		},
		{
			name: "negative initial", p: Policy{Initial: -time.Second},
			want: []time.Duration{0, 0},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []time.Duration
			for n := range tc.want {
				got = append(got, tc.p.Delay(n))
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("Delay(0..%d) = %v, want %v", len(tc.want)-1, got, tc.want)
			}
			// Next walks the same schedule, and Reset goes back to
			// its start.
			b := New(tc.p, NewManualClock(time.Time{}))
			for round := range 2 {
				got = got[:0]
				for range tc.want {
					got = append(got, b.Next())
				}
				if !slices.Equal(got, tc.want) {
					t.Errorf("round %d: Next = %v, want %v", round, got, tc.want)
				}
				b.Reset()
			}
		})
	}
}

// Without a cap, the delays saturate instead of overflowing.
func TestDelayNoCapSaturates(t *testing.T) {
	p := Policy{Initial: time.Second}
	if d := p.Delay(1000); d != math.MaxInt64 {
		t.Errorf("Delay(1000) = %v, want the largest Duration", d)
	}
	b := New(p, NewManualClock(time.Time{}))
	prev := time.Duration(0)
	for i := range 100 {
		d := b.Next()
		if d < prev {
			t.Fatalf("Next #%d = %v, below the one before (%v)", i, d, prev)
		}
		prev = d
	}
	if prev != math.MaxInt64 {
		t.Errorf("after 100 delays: %v, want the largest Duration", prev)
	}
}

func TestJitter(t *testing.T) {
	p := Policy{Initial: 100 * ms, Max: 400 * ms, Jitter: 0.25}
	for _, tc := range []struct {
		r    float64
		want []time.Duration
	}{
		{r: 0, want: []time.Duration{100 * ms, 200 * ms, 400 * ms, 400 * ms}},
		{r: 0.5, want: []time.Duration{87500 * time.Microsecond, 175 * ms, 350 * ms, 350 * ms}},
		{r: 0.999999, want: []time.Duration{75000025 * time.Nanosecond, 150000050 * time.Nanosecond, 300000100 * time.Nanosecond, 300000100 * time.Nanosecond}},
	} {
		b := New(p, NewManualClock(time.Time{}))
		b.SetRand(func() float64 { return tc.r })
		var got []time.Duration
		for range tc.want {
			got = append(got, b.Next())
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("r=%v: Next = %v, want %v", tc.r, got, tc.want)
		}
	}
	// Jitter is clamped to [0, 1]: never negative, never longer.
	for _, j := range []float64{-1, 2} {
		b := New(Policy{Initial: 10 * ms, Jitter: j}, NewManualClock(time.Time{}))
		b.SetRand(func() float64 { return 0.999 })
		if d := b.Next(); d < 0 || d > 10*ms {
			t.Errorf("Jitter %v: delay %v outside [0, 10ms]", j, d)
		}
	}
	// With the real source, every delay stays in [d·(1-J), d].
	b := New(p, nil)
	for i := range 1000 {
		want := p.Delay(i)
		if d := b.Next(); d > want || d < want*3/4 {
			t.Fatalf("delay #%d = %v, want in [%v, %v]", i, d, want*3/4, want)
		}
	}
}

func TestJittered(t *testing.T) {
	p := Policy{Initial: ms, Max: 32 * ms, Jitter: 1}
	for n := range 10 {
		want := p.Delay(n)
		lo, hi := want, time.Duration(0)
		for range 200 {
			d := p.Jittered(n)
			if d <= 0 || d > want {
				t.Fatalf("Jittered(%d) = %v, want in (0, %v]", n, d, want)
			}
			lo, hi = min(lo, d), max(hi, d)
		}
		// 200 uniform draws: the range is almost surely covered.
		if lo > want/4 || hi < want*3/4 {
			t.Errorf("Jittered(%d) ranged over [%v, %v] of (0, %v]: not spread", n, lo, hi, want)
		}
	}
}

func TestSleep(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	start := time.Now()
	if err := Sleep(ctx, time.Hour); !errors.Is(err, context.Canceled) {
		t.Errorf("Sleep on an ended context = %v", err)
	}
	if err := Sleep(t.Context(), ms); err != nil {
		t.Errorf("Sleep = %v", err)
	}
	if d := time.Since(start); d < ms || d > time.Minute {
		t.Errorf("Sleeps took %v", d)
	}
}

// waitAsync runs b.Wait(ctx) in a goroutine, returning once it has made
// its timer (or returned without one).
func waitAsync(t *testing.T, ctx context.Context, b *Backoff, clock *ManualClock) <-chan error {
	t.Helper()
	made := clock.TimerMade()
	done := make(chan error, 1)
	go func() { done <- b.Wait(ctx) }()
	select {
	case <-made:
	case err := <-done:
		done <- err
	}
	return done
}

func TestWaitFollowsTheClock(t *testing.T) {
	clock := NewManualClock(time.Unix(1000, 0))
	b := New(Policy{Initial: 20 * ms, Max: 50 * ms}, clock)
	for i, want := range []time.Duration{20 * ms, 40 * ms, 50 * ms, 50 * ms} {
		done := waitAsync(t, t.Context(), b, clock)
		if got := clock.Pending(); !slices.Equal(got, []time.Duration{want}) {
			t.Fatalf("wait #%d: pending timers %v, want [%v]", i, got, want)
		}
		clock.Advance(want - 1)
		select {
		case err := <-done:
			t.Fatalf("wait #%d returned %v before its delay", i, err)
		default:
		}
		clock.Advance(1)
		if err := <-done; err != nil {
			t.Fatalf("wait #%d: %v", i, err)
		}
	}
}

func TestWaitCancelled(t *testing.T) {
	clock := NewManualClock(time.Unix(1000, 0))
	b := New(Policy{Initial: time.Hour}, clock)
	ctx, cancel := context.WithCancel(t.Context())
	done := waitAsync(t, ctx, b, clock)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Wait after cancel = %v, want context.Canceled", err)
	}
	if p := clock.Pending(); len(p) != 0 {
		t.Errorf("timers left after a cancelled Wait: %v", p)
	}
	// An ended context returns at once, without a timer.
	if err := b.Wait(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Wait on an ended context = %v, want context.Canceled", err)
	}
	if p := clock.Pending(); len(p) != 0 {
		t.Errorf("Wait on an ended context made timers: %v", p)
	}
}

func TestLimit(t *testing.T) {
	clock := NewManualClock(time.Unix(1000, 0))
	b := New(Policy{Initial: 10 * ms, Limit: time.Second}, clock)
	for _, tc := range []struct {
		advance time.Duration
		expired bool
	}{
		{0, false},
		{999 * ms, false},
		{ms, false}, // exactly Limit: not yet past it
		{1, true},
	} {
		clock.Advance(tc.advance)
		if got := b.Expired(); got != tc.expired {
			t.Fatalf("after %v: Expired = %v, want %v", clock.Now().Sub(time.Unix(1000, 0)), got, tc.expired)
		}
	}
	if err := b.Wait(t.Context()); !errors.Is(err, ErrGaveUp) {
		t.Fatalf("Wait after Limit = %v, want ErrGaveUp", err)
	}
	if p := clock.Pending(); len(p) != 0 {
		t.Errorf("Wait after Limit made timers: %v", p)
	}
	b.Reset()
	if b.Expired() {
		t.Error("Expired right after Reset")
	}
	done := waitAsync(t, t.Context(), b, clock)
	clock.Advance(10 * ms)
	if err := <-done; err != nil {
		t.Errorf("Wait after Reset = %v", err)
	}
	// No Limit: never expires.
	nb := New(Policy{Initial: ms}, clock)
	clock.Advance(1000 * time.Hour)
	if nb.Expired() {
		t.Error("a Backoff without Limit expired")
	}
}

func TestManualClockStop(t *testing.T) {
	clock := NewManualClock(time.Unix(0, 0))
	c1, stop1 := clock.NewTimer(time.Second)
	c2, _ := clock.NewTimer(2 * time.Second)
	if !stop1() {
		t.Error("stop of a pending timer = false")
	}
	if stop1() {
		t.Error("second stop = true")
	}
	clock.Advance(time.Minute)
	select {
	case <-c1:
		t.Error("a stopped timer fired")
	default:
	}
	if got := <-c2; !got.Equal(time.Unix(60, 0)) {
		t.Errorf("timer fired with %v, want the time it was advanced to", got)
	}
	c3, stop3 := clock.NewTimer(0)
	<-c3
	if stop3() {
		t.Error("stop of a fired timer = true")
	}
}

func TestRealSleep(t *testing.T) {
	b := New(Policy{Initial: ms}, nil)
	start := time.Now()
	if err := b.Wait(t.Context()); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < ms {
		t.Errorf("Wait returned after %v, want at least 1ms", d)
	}
}
