// Package leaktest fails tests that leave goroutines running: whoever
// starts a goroutine must stop it and wait for it.
//
// A package checks all its tests at once from TestMain:
//
//	func TestMain(m *testing.M) { leaktest.VerifyTestMain(m) }
//
// and one test, when it must be told apart from the others, with
//
//	leaktest.Check(t) // first, so that its cleanup runs last
//
// Both note the goroutines alive when they are called; a goroutine started
// afterwards that is still alive once the tests (or the test and its
// cleanups) are over, and stays alive for a grace period (Within, 5 s by
// default, so that goroutines that are ending get to end on a loaded
// machine), is a leak: its stack is printed and the run (or the test)
// fails. Goroutines are told apart by their ids, which the runtime never
// reuses, so a leak is caught even when another goroutine ended meanwhile.
//
// Matching narrows the check to goroutines with given code on their stack,
// for packages whose tests run code that keeps goroutines of its own (the
// fuzzing engine, an embedded etcd server).
//
// Check is not for tests that run in parallel with others: it cannot tell
// whose goroutine is whose.
package leaktest

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// Option adjusts a check.
type Option func(*config)

type config struct {
	match  []string
	within time.Duration
}

// Matching counts only goroutines whose stack contains one of substrs: a
// package path ("segmap/internal/"), or a package's function prefix
// ("segmap/internal/nbd.").
func Matching(substrs ...string) Option {
	return func(c *config) { c.match = append(c.match, substrs...) }
}

// Within sets how long leftover goroutines get to end before they count as
// leaked; the default is 5 s.
func Within(d time.Duration) Option {
	return func(c *config) { c.within = d }
}

func newConfig(opts []Option) config {
	c := config{within: 5 * time.Second}
	for _, o := range opts {
		o(&c)
	}
	return c
}

// M is what VerifyTestMain runs; *testing.M is one.
type M interface{ Run() int }

// VerifyTestMain runs the tests of m and exits with their code; if they
// passed but goroutines started since VerifyTestMain was called are still
// running after the grace period, it prints their stacks to stderr and
// exits with 1.
func VerifyTestMain(m M, opts ...Option) {
	os.Exit(verifyMain(m, os.Stderr, opts...))
}

func verifyMain(m M, w io.Writer, opts ...Option) int {
	c := newConfig(opts)
	before := ids(goroutines())
	code := m.Run()
	if code != 0 {
		return code
	}
	if left := c.wait(before); len(left) > 0 {
		fmt.Fprintf(w, "leaktest: %d goroutines leaked:\n\n%s\n", len(left), join(left))
		return 1
	}
	return 0
}

// TB is what Check uses of a test; testing.TB is one.
type TB interface {
	Helper()
	Cleanup(func())
	Errorf(format string, args ...any)
}

// Check fails t if goroutines started from now on are still running once
// t and its cleanups are over, after the grace period. Call it first in
// the test, so that its cleanup runs last.
func Check(t TB, opts ...Option) {
	t.Helper()
	c := newConfig(opts)
	before := ids(goroutines())
	t.Cleanup(func() {
		if left := c.wait(before); len(left) > 0 {
			t.Errorf("leaktest: %d goroutines leaked:\n\n%s", len(left), join(left))
		}
	})
}

// wait polls until no goroutine is leaked beyond before, or the grace
// period ends; it returns the leaked goroutines.
func (c config) wait(before map[uint64]bool) []goroutine {
	deadline := time.Now().Add(c.within)
	for {
		left := c.leaked(before, goroutines())
		if len(left) == 0 || !time.Now().Before(deadline) {
			return left
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// leaked returns the goroutines of all, but the first (the caller's), that
// are not in before and match c.
func (c config) leaked(before map[uint64]bool, all []goroutine) []goroutine {
	var out []goroutine
	for i, g := range all {
		if i == 0 || before[g.id] || !c.matches(g) || permanent(g) {
			continue
		}
		out = append(out, g)
	}
	return out
}

// permanent reports whether g is one of the goroutines the standard
// library starts once and keeps for the life of the process, which no
// test can stop: os/signal's loop, started by the first signal.Notify
// (the fuzzing engine's workers call it, so every fuzz run "leaked" it).
func permanent(g goroutine) bool {
	return strings.Contains(g.stack, "os/signal.loop(")
}

func (c config) matches(g goroutine) bool {
	if len(c.match) == 0 {
		return true
	}
	for _, s := range c.match {
		if strings.Contains(g.stack, s) {
			return true
		}
	}
	return false
}

// goroutine is one goroutine of a stack dump.
type goroutine struct {
	id    uint64
	stack string // its part of the dump, header included
}

// goroutines returns every goroutine's stack, the caller's first.
func goroutines() []goroutine {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return parse(buf[:n])
		}
		buf = make([]byte, 2*len(buf))
	}
}

// parse splits a dump of runtime.Stack(buf, true) into goroutines. Blocks
// whose header it cannot read are kept with id 0, so that they are never
// mistaken for a goroutine noted before.
func parse(dump []byte) []goroutine {
	var out []goroutine
	for block := range bytes.SplitSeq(bytes.TrimSpace(dump), []byte("\n\n")) {
		if len(block) == 0 {
			continue
		}
		g := goroutine{stack: string(block)}
		// "goroutine 18 [chan receive, 2 minutes]:"
		if f := strings.Fields(strings.SplitN(g.stack, "\n", 2)[0]); len(f) > 1 && f[0] == "goroutine" {
			g.id, _ = strconv.ParseUint(f[1], 10, 64)
		}
		out = append(out, g)
	}
	return out
}

func ids(gs []goroutine) map[uint64]bool {
	m := make(map[uint64]bool, len(gs))
	for _, g := range gs {
		if g.id != 0 {
			m[g.id] = true
		}
	}
	return m
}

func join(gs []goroutine) string {
	s := make([]string, len(gs))
	for i, g := range gs {
		s[i] = g.stack
	}
	return strings.Join(s, "\n\n")
}
