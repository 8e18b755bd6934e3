// Package progress shows how a long operation of the CLI advances (an
// export, a drain, a rebuild, a flatten, a preallocation): a one-line bar
// redrawn in place on a terminal, one JSON line per update for a script,
// or nothing on a pipe.
//
// A Reporter is pure logic over an io.Writer and a clock: the caller feeds
// it absolute counts (Update) or increments (Add) as often as it likes and
// the Reporter decides what to write. It writes only when the count or the
// total changed since its last line, and at most every BarInterval (a bar)
// or JSONInterval (JSON); Finish always writes the last line.
//
// The JSON events, one object a line:
//
//	{"op":"drain","target":"container 3","unit":"slots","done":120,"total":266,
//	 "percent":45.1,"rate":12.5,"eta_seconds":11.7,"elapsed_seconds":9.6,"final":false}
//
//	op               what runs: create, drain, rebuild, replace-replica,
//	                 flatten, export, import, scrub
//	target           what it runs on: "disk vm1", "container 3", "vm1@mon"
//	unit             what done and total count: "bytes", "segments", "slots"
//	done, total      units done so far, and in all (total 0: not known)
//	percent          done of total, 0 to 100 (null while total is not known)
//	rate             units a second over the last 5 seconds (0 in the first half second)
//	eta_seconds      seconds left at that rate (null while not known)
//	elapsed_seconds  since the Reporter was made
//	final            true on the last event, which Finish writes
//	error            on a final event of a failed operation only: why
//
// done never goes down from one event to the next, and the final event of
// an operation that succeeded has done == total.
package progress

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"segmap/internal/size"
)

// Mode is how a Reporter shows progress.
type Mode int

const (
	// Off writes nothing.
	Off Mode = iota
	// Bar redraws one line in place (for a terminal).
	Bar
	// JSON writes an event a line.
	JSON
)

func (m Mode) String() string {
	switch m {
	case Off:
		return "off"
	case Bar:
		return "bar"
	case JSON:
		return "json"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// Choose picks the mode from the command's flags and whether its progress
// writer (standard error) is a terminal: --no-progress silences it,
// --json asks for events, --progress forces the bar, and otherwise a bar
// shows on a terminal only. --progress with --no-progress is
// ErrBothFlags.
func Choose(force, silence, asJSON, terminal bool) (Mode, error) {
	switch {
	case force && silence:
		return Off, ErrBothFlags
	case silence:
		return Off, nil
	case asJSON:
		return JSON, nil
	case force || terminal:
		return Bar, nil
	}
	return Off, nil
}

// Units of Config.Unit that the bar formats specially.
const (
	Bytes    = "bytes"
	Segments = "segments"
	Slots    = "slots"
)

// Intervals between two lines of an operation that goes on.
const (
	BarInterval  = 100 * time.Millisecond
	JSONInterval = 500 * time.Millisecond
)

// rateWindow is how far back the rate looks: long enough to smooth the
// steps of an operation that reports per chunk, short enough to follow a
// change of pace.
const rateWindow = 5 * time.Second

// minRateSpan is how long the samples must span before there is a rate:
// the first step of an operation, over a few milliseconds, says little
// about the rest.
const minRateSpan = 500 * time.Millisecond

// Config configures a Reporter.
type Config struct {
	W      io.Writer
	Mode   Mode
	Op     string // the operation: "drain", "export" ...
	Target string // what it runs on: "container 3", "disk vm1" ...
	Unit   string // Bytes, Segments, Slots
	// Now returns the time; time.Now if nil.
	Now func() time.Time
}

// sample is a count at a time, for the rate.
type sample struct {
	at   time.Time
	done uint64
}

// Reporter shows one operation's progress. It is not safe for concurrent
// use: one goroutine (the one that reads the operation's stream) feeds it.
type Reporter struct {
	cfg         Config
	start       time.Time
	done, total uint64
	samples     []sample // in time order, the oldest at most rateWindow before the newest
	// what the last line showed, and when
	wrote               bool
	lastAt              time.Time
	lastDone, lastTotal uint64
	finished            bool
}

// New returns a Reporter that starts its clock now.
func New(cfg Config) *Reporter {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.W == nil {
		cfg.Mode = Off
	}
	now := cfg.Now()
	return &Reporter{cfg: cfg, start: now, samples: []sample{{at: now}}}
}

// Mode returns how r shows progress.
func (r *Reporter) Mode() Mode { return r.cfg.Mode }

// Done returns the count so far.
func (r *Reporter) Done() uint64 { return r.done }

// Total returns the total (0 if not known).
func (r *Reporter) Total() uint64 { return r.total }

// Add counts n more units done.
func (r *Reporter) Add(n uint64) { r.Update(r.done+n, r.total) }

// SetTotal sets the total (0: not known).
func (r *Reporter) SetTotal(total uint64) { r.Update(r.done, total) }

// Update sets the count and the total (0: not known). A count lower than
// the last one is taken as the last one: shown progress never goes back.
func (r *Reporter) Update(done, total uint64) {
	if r.finished {
		return
	}
	r.done, r.total = max(done, r.done), total
	now := r.cfg.Now()
	r.sample(now)
	if r.cfg.Mode == Off {
		return
	}
	if r.wrote && r.done == r.lastDone && r.total == r.lastTotal {
		return // nothing changed
	}
	every := BarInterval
	if r.cfg.Mode == JSON {
		every = JSONInterval
	}
	if r.wrote && now.Sub(r.lastAt) < every {
		return
	}
	r.write(now, false, nil)
}

// Finish writes the last line: the final count, which becomes the total
// too (and its newline, on a bar), or with err, where it stopped and why
// (on a bar, err is left to the caller to print). Later calls do nothing.
func (r *Reporter) Finish(err error) {
	if r.finished {
		return
	}
	if err == nil {
		// Done is what it took: an estimate of the total (an
		// export's, which counts data without the stream's headers)
		// gives way to it.
		r.total = r.done
	}
	now := r.cfg.Now()
	r.sample(now)
	r.finished = true
	if r.cfg.Mode == Off {
		return
	}
	r.write(now, true, err)
}

// sample records the count at now and drops what fell out of the window,
// keeping one sample older than it so that the window stays full.
func (r *Reporter) sample(now time.Time) {
	if n := len(r.samples); n > 1 && !now.After(r.samples[n-1].at) {
		r.samples[n-1].done = r.done // no time passed since the last one
		return
	}
	r.samples = append(r.samples, sample{at: now, done: r.done})
	i := 0
	for i+1 < len(r.samples)-1 && now.Sub(r.samples[i+1].at) >= rateWindow {
		i++
	}
	r.samples = r.samples[i:]
}

// Rate returns the units a second over the last few seconds (0 until
// minRateSpan has passed).
func (r *Reporter) Rate() float64 {
	first, last := r.samples[0], r.samples[len(r.samples)-1]
	span := last.at.Sub(first.at)
	dt := span.Seconds()
	if span < minRateSpan || last.done < first.done {
		return 0
	}
	return float64(last.done-first.done) / dt
}

// ETA returns the time left at the current rate, and false while it is
// not known (no total, or no rate yet).
func (r *Reporter) ETA() (time.Duration, bool) {
	if r.total == 0 {
		return 0, false
	}
	if r.done >= r.total {
		return 0, true
	}
	rate := r.Rate()
	if rate <= 0 {
		return 0, false
	}
	return time.Duration(float64(r.total-r.done) / rate * float64(time.Second)), true
}

// Event is one JSON progress event (see the package comment).
type Event struct {
	Op             string   `json:"op"`
	Target         string   `json:"target"`
	Unit           string   `json:"unit"`
	Done           uint64   `json:"done"`
	Total          uint64   `json:"total"`
	Percent        *float64 `json:"percent"`
	Rate           float64  `json:"rate"`
	ETASeconds     *float64 `json:"eta_seconds"`
	ElapsedSeconds float64  `json:"elapsed_seconds"`
	Final          bool     `json:"final"`
	Error          string   `json:"error,omitempty"`
}

// event returns the state as an Event.
func (r *Reporter) event(now time.Time, final bool, err error) Event {
	e := Event{
		Op: r.cfg.Op, Target: r.cfg.Target, Unit: r.cfg.Unit, Done: r.done, Total: r.total,
		Rate: round(r.Rate(), 3), ElapsedSeconds: round(now.Sub(r.start).Seconds(), 3), Final: final,
	}
	if r.total > 0 {
		p := round(min(100, 100*float64(r.done)/float64(r.total)), 1)
		e.Percent = &p
	}
	if eta, ok := r.ETA(); ok {
		s := round(eta.Seconds(), 1)
		e.ETASeconds = &s
	}
	if err != nil {
		e.Error = err.Error()
	}
	return e
}

func round(f float64, digits int) float64 {
	m := 1.0
	for range digits {
		m *= 10
	}
	return float64(int64(f*m+0.5)) / m
}

// write writes a line (a write error is ignored: progress is no reason to
// fail the operation).
func (r *Reporter) write(now time.Time, final bool, err error) {
	r.wrote, r.lastAt, r.lastDone, r.lastTotal = true, now, r.done, r.total
	switch r.cfg.Mode {
	case JSON:
		b, jerr := json.Marshal(r.event(now, final, err))
		if jerr == nil {
			_, _ = r.cfg.W.Write(append(b, '\n'))
		}
	case Bar:
		line := "\r\x1b[K" + r.barLine(now, final, err)
		if final {
			line += "\n"
		}
		_, _ = io.WriteString(r.cfg.W, line)
	}
}

// barWidth is the number of cells of the bar.
const barWidth = 24

// barLine is the bar's text:
//
//	drain container 3 [##########--------------]  45%  120/266 slots  12.5 slots/s  ETA 11s
//	export vm1@mon [########################] 100%  1G/1G  85.3M/s  in 12.1s
func (r *Reporter) barLine(now time.Time, final bool, err error) string {
	var b strings.Builder
	b.WriteString(r.cfg.Op)
	if r.cfg.Target != "" {
		b.WriteString(" " + r.cfg.Target)
	}
	if r.total > 0 {
		frac := min(1, float64(r.done)/float64(r.total))
		full := int(frac * barWidth)
		fmt.Fprintf(&b, " [%s%s] %3d%%", strings.Repeat("#", full), strings.Repeat("-", barWidth-full), int(frac*100))
		fmt.Fprintf(&b, "  %s/%s", r.amount(r.done, false), r.amount(r.total, true))
	} else {
		fmt.Fprintf(&b, "  %s", r.amount(r.done, true))
	}
	rate := r.Rate()
	if final {
		rate = 0
		if el := now.Sub(r.start).Seconds(); el > 0 {
			rate = float64(r.done) / el
		}
	}
	fmt.Fprintf(&b, "  %s", r.rate(rate))
	switch {
	case err != nil:
		b.WriteString("  failed")
	case final:
		fmt.Fprintf(&b, "  in %s", now.Sub(r.start).Round(100*time.Millisecond))
	default:
		if eta, ok := r.ETA(); ok {
			fmt.Fprintf(&b, "  ETA %s", eta.Round(time.Second))
		} else if r.total > 0 {
			b.WriteString("  ETA ?")
		}
	}
	return b.String()
}

// amount formats n units; withUnit names the unit (bytes are written
// with their binary suffix instead).
func (r *Reporter) amount(n uint64, withUnit bool) string {
	if r.cfg.Unit == Bytes {
		return size.Format(n)
	}
	if withUnit && r.cfg.Unit != "" {
		return fmt.Sprintf("%d %s", n, r.cfg.Unit)
	}
	return fmt.Sprint(n)
}

// rate formats a rate in units a second.
func (r *Reporter) rate(f float64) string {
	if r.cfg.Unit == Bytes {
		return size.Format(uint64(f)) + "/s"
	}
	return fmt.Sprintf("%.1f %s/s", f, r.cfg.Unit)
}
