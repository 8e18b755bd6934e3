package backoff

import (
	"sync"
	"time"
)

// Clock tells the time and makes timers. Real is the system clock;
// ManualClock is one that tests move by hand.
type Clock interface {
	Now() time.Time
	// NewTimer returns a channel that receives once d has passed, and a
	// function that stops the timer (after which the channel may never
	// receive).
	NewTimer(d time.Duration) (c <-chan time.Time, stop func() bool)
}

// Real is the system clock.
var Real Clock = realClock{}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) NewTimer(d time.Duration) (<-chan time.Time, func() bool) {
	t := time.NewTimer(d)
	return t.C, t.Stop
}

// ManualClock is a Clock whose time moves only when Advance is called, so
// that a test can walk a retry loop through its delays without sleeping.
// It is safe for concurrent use.
type ManualClock struct {
	mu struct {
		sync.Mutex
		now    time.Time
		timers []*manualTimer
		// waiters are told each time a timer is made.
		waiters []chan struct{}
	}
}

type manualTimer struct {
	at time.Time
	c  chan time.Time
}

// NewManualClock returns a ManualClock reading now.
func NewManualClock(now time.Time) *ManualClock {
	c := &ManualClock{}
	c.mu.now = now
	return c
}

// Now returns the clock's time.
func (c *ManualClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mu.now
}

// NewTimer implements Clock. A timer of d <= 0 fires at once.
func (c *ManualClock) NewTimer(d time.Duration) (<-chan time.Time, func() bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &manualTimer{at: c.mu.now.Add(d), c: make(chan time.Time, 1)}
	if d <= 0 {
		t.c <- c.mu.now
	} else {
		c.mu.timers = append(c.mu.timers, t)
	}
	for _, w := range c.mu.waiters {
		close(w)
	}
	c.mu.waiters = nil
	return t.c, func() bool { return c.stop(t) }
}

func (c *ManualClock) stop(t *manualTimer) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, x := range c.mu.timers {
		if x == t {
			c.mu.timers = append(c.mu.timers[:i], c.mu.timers[i+1:]...)
			return true
		}
	}
	return false
}

// Advance moves the clock on by d and fires every timer that is due.
func (c *ManualClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.mu.now = c.mu.now.Add(d)
	kept := c.mu.timers[:0]
	for _, t := range c.mu.timers {
		if t.at.After(c.mu.now) {
			kept = append(kept, t)
			continue
		}
		t.c <- c.mu.now // buffered, and sent to once
	}
	clear(c.mu.timers[len(kept):])
	c.mu.timers = kept
}

// Pending returns the delays, from now, of the timers not yet fired or
// stopped, in the order they were made.
func (c *ManualClock) Pending() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]time.Duration, len(c.mu.timers))
	for i, t := range c.mu.timers {
		out[i] = t.at.Sub(c.mu.now)
	}
	return out
}

// TimerMade returns a channel that is closed when the next timer is made:
// a test waits on it to know that the code under test is now waiting.
func (c *ManualClock) TimerMade() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := make(chan struct{})
	c.mu.waiters = append(c.mu.waiters, w)
	return w
}
