// Package backoff spaces out the retries of a loop that waits for something
// to come back: a controller after a restart, a listener out of file
// descriptors, an etcd election.
//
// A Policy is the schedule: the first delay, a multiplier (2 unless set),
// a cap, an optional jitter and an optional limit on the whole wait. A
// Backoff is one loop's place in that schedule. The schedule itself is pure
// (Policy.Delay); waiting goes through a Clock, which is the real one unless
// a test supplies a ManualClock, so that tests step the time instead of
// sleeping.
//
// Contract:
//
//   - Delays never exceed Policy.Max (when set) and never go below
//     (1-Jitter) times the delay without jitter; without jitter the n-th
//     delay is min(Initial·Multiplierⁿ, Max) exactly.
//   - Wait returns ErrGaveUp, without waiting, once more than Policy.Limit
//     has passed since the Backoff was made or last Reset; the caller then
//     returns its last error.
//   - Wait and Sleep return ctx.Err() as soon as ctx ends, and stop their
//     timer: nothing is left running when they return.
//   - A Backoff is used by one goroutine; it is not safe for concurrent use.
//
// The caller decides what is worth retrying and what it logs: this package
// only says how long to wait.
package backoff

import (
	"context"
	"math"
	"math/rand/v2"
	"time"
)

// Accept is the schedule of a server's accept loop after a temporary error
// (out of file descriptors, say): 5 ms doubling to 1 s, as net/http's
// Server.Serve waits. The loop Resets after each accepted connection.
var Accept = Policy{Initial: 5 * time.Millisecond, Max: time.Second}

// Policy is a schedule of delays between attempts. The zero Policy waits
// nothing.
type Policy struct {
	// Initial is the first delay.
	Initial time.Duration
	// Max caps every delay; 0 means no cap.
	Max time.Duration
	// Multiplier is the growth of each delay over the one before; 0
	// means 2. Values below 1 are taken as 1.
	Multiplier float64
	// Jitter, in [0, 1], is the fraction of each delay that is random:
	// the delay d becomes a uniform draw from [d·(1-Jitter), d]. Jitter
	// only shortens delays, so Max still holds. 0 means none.
	Jitter float64
	// Limit, if positive, is how long a Backoff keeps retrying: Wait
	// returns ErrGaveUp once more than Limit has passed since New or
	// Reset.
	Limit time.Duration
}

// Delay returns the delay before retry n (n = 0 is the first), without
// jitter.
func (p Policy) Delay(n int) time.Duration {
	d := p.clamp(float64(max(p.Initial, 0)))
	for range max(n, 0) {
		next := p.clamp(float64(d) * p.multiplier())
		if next == d {
			break // at the cap, or not growing
		}
		d = next
	}
	return d
}

// Jittered returns Delay(n) shortened by the jitter, drawn from
// math/rand/v2: for loops that keep their own count of attempts.
func (p Policy) Jittered(n int) time.Duration {
	return p.jittered(p.Delay(n), rand.Float64())
}

// jittered returns d shortened by the jitter, r being a uniform draw from
// [0, 1).
func (p Policy) jittered(d time.Duration, r float64) time.Duration {
	j := min(max(p.Jitter, 0), 1)
	if j == 0 {
		return d
	}
	return d - time.Duration(float64(d)*j*r)
}

func (p Policy) multiplier() float64 {
	switch {
	case p.Multiplier == 0:
		return 2
	case p.Multiplier < 1:
		return 1
	}
	return p.Multiplier
}

// clamp converts d to a Duration no larger than Max (if set) or the
// largest Duration.
func (p Policy) clamp(d float64) time.Duration {
	if p.Max > 0 && d >= float64(p.Max) {
		return p.Max
	}
	if d >= math.MaxInt64 {
		return math.MaxInt64
	}
	return time.Duration(d)
}

// Backoff is one retry loop's place in a Policy.
type Backoff struct {
	p     Policy
	clock Clock
	rand  func() float64

	cur   time.Duration // the next delay before jitter; 0 before the first
	start time.Time     // since when Limit counts
}

// New returns a Backoff at the start of p, measuring time with clock (the
// real clock if nil). Its Limit, if any, counts from now.
func New(p Policy, clock Clock) *Backoff {
	if clock == nil {
		clock = Real
	}
	b := &Backoff{p: p, clock: clock, rand: rand.Float64}
	b.Reset()
	return b
}

// SetRand replaces the source of jitter, a function returning uniform
// draws from [0, 1). For tests.
func (b *Backoff) SetRand(r func() float64) { b.rand = r }

// Reset starts the schedule again: the next delay is Policy.Initial, and
// Limit counts from now. Call it after an attempt succeeds.
func (b *Backoff) Reset() {
	b.cur = 0
	b.start = b.clock.Now()
}

// Next returns the delay to wait now and moves on to the next one.
func (b *Backoff) Next() time.Duration {
	if b.cur == 0 {
		b.cur = b.p.clamp(float64(max(b.p.Initial, 0)))
	}
	d := b.cur
	b.cur = b.p.clamp(float64(b.cur) * b.p.multiplier())
	return b.p.jittered(d, b.rand())
}

// Expired reports whether more than Policy.Limit has passed since New or
// Reset. It is always false without a Limit.
func (b *Backoff) Expired() bool {
	return b.p.Limit > 0 && b.clock.Now().After(b.start.Add(b.p.Limit))
}

// Wait waits for the next delay. It returns nil after the delay,
// ErrGaveUp at once if the Backoff has Expired, or ctx.Err() if ctx ends
// first.
func (b *Backoff) Wait(ctx context.Context) error {
	if b.Expired() {
		return ErrGaveUp
	}
	return b.Sleep(ctx, b.Next())
}

// Sleep waits for d on b's clock; it returns ctx.Err() if ctx ends first,
// nil otherwise. It is for callers that take Next themselves, to log it.
func (b *Backoff) Sleep(ctx context.Context, d time.Duration) error {
	return sleep(ctx, b.clock, d)
}

// Sleep waits for d on the real clock; it returns ctx.Err() if ctx ends
// first, nil otherwise.
func Sleep(ctx context.Context, d time.Duration) error {
	return sleep(ctx, Real, d)
}

func sleep(ctx context.Context, clock Clock, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c, stop := clock.NewTimer(d)
	defer stop()
	select {
	case <-c:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
