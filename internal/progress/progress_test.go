package progress

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

// clock is a fake clock that moves only when told.
type clock struct{ t time.Time }

func (c *clock) now() time.Time          { return c.t }
func (c *clock) advance(d time.Duration) { c.t = c.t.Add(d) }
func newClock() *clock                   { return &clock{t: time.Unix(1_700_000_000, 0)} }
func newR(m Mode, unit string) (*Reporter, *bytes.Buffer, *clock) {
	var buf bytes.Buffer
	c := newClock()
	return New(Config{W: &buf, Mode: m, Op: "drain", Target: "container 3", Unit: unit, Now: c.now}), &buf, c
}

func TestChoose(t *testing.T) {
	for _, tc := range []struct {
		force, silence, json, tty bool
		want                      Mode
		err                       error
	}{
		{want: Off},
		{tty: true, want: Bar},
		{force: true, want: Bar},
		{json: true, want: JSON},
		{json: true, tty: true, want: JSON},
		{silence: true, tty: true, want: Off},
		{silence: true, json: true, want: Off},
		{force: true, silence: true, err: ErrBothFlags},
	} {
		m, err := Choose(tc.force, tc.silence, tc.json, tc.tty)
		if !errors.Is(err, tc.err) || m != tc.want {
			t.Errorf("Choose(force %v, silence %v, json %v, tty %v) = %v, %v; want %v, %v", tc.force, tc.silence, tc.json, tc.tty, m, err, tc.want, tc.err)
		}
	}
}

// TestOff: a pipe gets nothing, not even the final line.
func TestOff(t *testing.T) {
	r, buf, c := newR(Off, Slots)
	for i := range 50 {
		c.advance(time.Second)
		r.Update(uint64(i), 50)
	}
	r.Finish(nil)
	if buf.Len() != 0 {
		t.Fatalf("Off wrote %q", buf.String())
	}
	if r.Done() != 49 || r.Rate() == 0 {
		t.Errorf("Off still counts: done %d, rate %v", r.Done(), r.Rate())
	}
}

// TestRateAndETA: the rate is over the last rateWindow, so a change of
// pace shows within it; the ETA is what is left at that rate.
func TestRateAndETA(t *testing.T) {
	r, _, c := newR(Off, Bytes)
	if r.Rate() != 0 {
		t.Fatalf("rate before any time passed: %v", r.Rate())
	}
	c.advance(minRateSpan / 2)
	r.Add(0)
	if r.Rate() != 0 {
		t.Fatalf("rate over %v: %v, want none yet", minRateSpan/2, r.Rate())
	}
	r = New(Config{Now: c.now}) // afresh, for round numbers below
	if _, ok := r.ETA(); ok {
		t.Fatal("ETA known before any progress")
	}
	// 10 units a second for 10 s.
	for range 10 {
		c.advance(time.Second)
		r.Add(10)
	}
	if got := r.Rate(); got != 10 {
		t.Errorf("rate %v, want 10", got)
	}
	if _, ok := r.ETA(); ok {
		t.Error("ETA known without a total")
	}
	r.SetTotal(1000)
	if eta, ok := r.ETA(); !ok || eta != 90*time.Second {
		t.Errorf("ETA %v %v, want 90s (900 left at 10/s)", eta, ok)
	}
	// Then 100 a second: after the window the rate is 100 alone.
	for range 5 {
		c.advance(time.Second)
		r.Add(100)
	}
	if got := r.Rate(); got != 100 {
		t.Errorf("rate %v after 5 s at 100/s, want 100", got)
	}
	if eta, ok := r.ETA(); !ok || eta != 4*time.Second {
		t.Errorf("ETA %v %v, want 4s (400 left at 100/s)", eta, ok)
	}
	// Stalled: the rate falls to 0 and the ETA is unknown again.
	c.advance(10 * time.Second)
	r.Add(0)
	if got := r.Rate(); got != 0 {
		t.Errorf("stalled rate %v, want 0", got)
	}
	if _, ok := r.ETA(); ok {
		t.Error("ETA known while stalled")
	}
	r.Update(1000, 1000)
	if eta, ok := r.ETA(); !ok || eta != 0 {
		t.Errorf("ETA at the end %v %v, want 0", eta, ok)
	}
}

// TestMonotonic: a count that goes back (a stream that restarts a count)
// is not shown going back.
func TestMonotonic(t *testing.T) {
	r, _, _ := newR(Off, Slots)
	r.Update(10, 20)
	r.Update(5, 20)
	if r.Done() != 10 {
		t.Errorf("done %d, want 10", r.Done())
	}
}

func events(t *testing.T, s string) []Event {
	t.Helper()
	var out []Event
	for _, l := range strings.Split(strings.TrimSuffix(s, "\n"), "\n") {
		if l == "" {
			continue
		}
		var e Event
		if err := json.Unmarshal([]byte(l), &e); err != nil {
			t.Fatalf("line %q: %v", l, err)
		}
		out = append(out, e)
	}
	return out
}

// TestJSON: events are JSON lines, at most one per JSONInterval, none
// when nothing changed, and a final one with done == total.
func TestJSON(t *testing.T) {
	r, buf, c := newR(JSON, Slots)
	// 100 updates 10 ms apart: 1 s, so the first and one every 500 ms.
	for i := range 100 {
		c.advance(10 * time.Millisecond)
		r.Update(uint64(i+1), 200)
	}
	es := events(t, buf.String())
	if len(es) != 2 {
		t.Fatalf("%d events in 1 s of updates every 10 ms, want 2 (one every %v):\n%s", len(es), JSONInterval, buf.String())
	}
	// The count not shown yet shows at the next update; then, nothing
	// changed: no event, however long.
	c.advance(time.Minute)
	r.Update(100, 200)
	if es := events(t, buf.String()); es[len(es)-1].Done != 100 {
		t.Errorf("last event %+v, want done 100", es[len(es)-1])
	}
	buf.Reset()
	c.advance(time.Minute)
	r.Update(100, 200)
	if buf.Len() != 0 {
		t.Errorf("an update that changed nothing wrote %q", buf.String())
	}
	c.advance(time.Second)
	r.Update(200, 200)
	r.Finish(nil)
	r.Finish(nil) // once only
	es = events(t, buf.String())
	if len(es) != 2 {
		t.Fatalf("events %+v, want an update and the final one", es)
	}
	last := es[1]
	if !last.Final || last.Done != 200 || last.Total != 200 || last.Op != "drain" || last.Target != "container 3" || last.Unit != Slots {
		t.Errorf("final event %+v", last)
	}
	if last.Percent == nil || *last.Percent != 100 || last.ETASeconds == nil || *last.ETASeconds != 0 {
		t.Errorf("final event percent %v eta %v, want 100 and 0", last.Percent, last.ETASeconds)
	}
	if last.ElapsedSeconds != 122 {
		t.Errorf("elapsed %v, want 122", last.ElapsedSeconds)
	}
	// The raw field names are the documented ones.
	var raw map[string]any
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &raw); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"op", "target", "unit", "done", "total", "percent", "rate", "eta_seconds", "elapsed_seconds", "final"} {
		if _, ok := raw[k]; !ok {
			t.Errorf("field %q missing from %s", k, lines[len(lines)-1])
		}
	}
	if _, ok := raw["error"]; ok {
		t.Error("error field on a success")
	}
}

// TestJSONUnknown: with no total and no rate, percent and eta_seconds
// are null; a failure's final event says why.
func TestJSONUnknown(t *testing.T) {
	r, buf, _ := newR(JSON, Bytes)
	r.Add(5)
	r.Finish(errors.New("boom"))
	es := events(t, buf.String())
	if len(es) != 2 {
		t.Fatalf("events %+v", es)
	}
	if es[0].Percent != nil || es[0].ETASeconds != nil || es[0].Final {
		t.Errorf("first event %+v: want percent and eta null", es[0])
	}
	if !es[1].Final || es[1].Error != "boom" {
		t.Errorf("final event %+v: want final with error boom", es[1])
	}
}

// TestBar: the bar redraws in place, at most every BarInterval, and ends
// with a newline.
func TestBar(t *testing.T) {
	r, buf, c := newR(Bar, Slots)
	for i := range 100 {
		c.advance(10 * time.Millisecond)
		r.Update(uint64(i+1), 200)
	}
	if n := strings.Count(buf.String(), "\r\x1b[K"); n != 10 {
		t.Errorf("%d redraws in 1 s of updates every 10 ms, want 10 (one every %v)", n, BarInterval)
	}
	if strings.Contains(buf.String(), "\n") {
		t.Error("a newline before the end")
	}
	c.advance(time.Second)
	r.Update(100, 200) // the count not shown yet
	if !strings.HasSuffix(buf.String(), "100/200 slots  50.0 slots/s  ETA 2s") {
		t.Errorf("bar %q, want 100/200 shown", buf.String())
	}
	buf.Reset()
	c.advance(time.Second)
	r.Update(100, 200) // nothing changed
	if buf.Len() != 0 {
		t.Errorf("an update that changed nothing wrote %q", buf.String())
	}
	r.Update(150, 200)
	want := "\r\x1b[Kdrain container 3 [##################------]  75%  150/200 slots  50.0 slots/s  ETA 1s"
	if buf.String() != want {
		t.Errorf("bar\n%q, want\n%q", buf.String(), want)
	}
	buf.Reset()
	c.advance(time.Second)
	r.Update(200, 200)
	r.Finish(nil)
	got := buf.String()
	if !strings.HasSuffix(got, "\n") || !strings.Contains(got, "100%  200/200 slots") || !strings.Contains(got, "in 4s") {
		t.Errorf("final bar %q", got)
	}
}

// TestBarBytes: bytes are written with their binary unit.
func TestBarBytes(t *testing.T) {
	var buf bytes.Buffer
	c := newClock()
	r := New(Config{W: &buf, Mode: Bar, Op: "export", Target: "vm1@mon", Unit: Bytes, Now: c.now})
	c.advance(time.Second)
	r.Update(256<<20, 1<<30)
	want := "\r\x1b[Kexport vm1@mon [######------------------]  25%  256M/1G  256M/s  ETA 3s"
	if buf.String() != want {
		t.Errorf("bar\n%q, want\n%q", buf.String(), want)
	}
	buf.Reset()
	r.Finish(errors.New("cut"))
	if got := buf.String(); !strings.HasSuffix(got, "  failed\n") {
		t.Errorf("failed bar %q", got)
	}
	// Unknown total: the count and the rate.
	buf.Reset()
	r = New(Config{W: &buf, Mode: Bar, Op: "import", Target: "vm2", Unit: Bytes, Now: c.now})
	c.advance(2 * time.Second)
	r.Add(4 << 20)
	if want := "\r\x1b[Kimport vm2  4M  2M/s"; buf.String() != want {
		t.Errorf("bar\n%q, want\n%q", buf.String(), want)
	}
}
