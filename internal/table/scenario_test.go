package table_test

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/cockroachdb/datadriven"

	"segmap/internal/table"
)

// TestScenario runs the scripts in testdata/: each drives one mapping
// table through the patent's operations and prints the table after every
// step. Regenerate the expected output with
//
//	go test ./internal/table -run TestScenario -rewrite
//
// and read the diff: it is the behaviour change.
//
// Commands (arguments in any order):
//
//	new-table n=<entries> [fill=<entry>]
//	set-entry first=<i> entries=(<entry>, ...)
//	fill first=<i> n=<count> entry=<entry>
//	set-entry-state first=<i> n=<count> state=<state> (on|off)
//	get first=<i> n=<count>
//	get-status first=<i> n=<count> state=<state>
//	print
//	decide [seg=<i> op=<op>]    with no seg: one "entry op" pair per input line
//	decide-all                  every combination of state bits × every op
//	resolve                     one "entry op [refs=N] [whole] [of=N] [policy=P]" per input line
//	resolve-all entries=(...)   every op × refs 0,1,2 × whole × policy
//	effects                     as resolve, with "[agent-copies]": the plan
//	                            and the ordered steps that carry it out
//	commit-staged PLAN...       the steps of the commit of a staged
//	                            write made for each plan
//	partial                     lines of "over TOP BITS ENTRY", "filled
//	                            ENTRY BITS", "locate ENTRY", "valid ENTRY":
//	                            partial entries built, read and checked
//
// A partial entry is written top first, each layer with the sub-blocks it
// holds, the base without: "c1/s9{0-3,8}<c1/s7{9}<c1/s2".
//
// An entry is written as Entry.String prints it: "c1/s3", "c1/s3+NoWrite",
// "Zero", "Invalid", "Error", or a location with voiding bits, such as
// "c1/s3+Invalid|NoWrite", to show normalisation.
func TestScenario(t *testing.T) {
	datadriven.Walk(t, "testdata", func(t *testing.T, path string) {
		var tab *table.Table
		datadriven.RunTest(t, path, func(t *testing.T, d *datadriven.TestData) string {
			if d.Cmd != "new-table" && !strings.HasPrefix(d.Cmd, "decide") && !strings.HasPrefix(d.Cmd, "resolve") && d.Cmd != "effects" && d.Cmd != "commit-staged" && d.Cmd != "partial" && tab == nil {
				d.Fatalf(t, "%s before new-table", d.Cmd)
			}
			switch d.Cmd {
			case "new-table":
				var n int
				d.ScanArgs(t, "n", &n)
				fill := table.InvalidEntry
				if a, ok := d.Arg("fill"); ok {
					fill = parseEntry(t, d, a.SingleVal(t))
				}
				tab = table.New(n, fill)
				return show(tab)

			case "set-entry":
				var first int
				d.ScanArgs(t, "first", &first)
				a, ok := d.Arg("entries")
				if !ok {
					d.Fatalf(t, "set-entry needs entries=(...)")
				}
				var es []table.Entry
				for _, v := range a.Vals {
					if v != "" { // entries=() is an empty range
						es = append(es, parseEntry(t, d, v))
					}
				}
				return result(tab.SetEntry(first, es), tab)

			case "fill":
				var first, n int
				var e string
				d.ScanArgs(t, "first", &first)
				d.ScanArgs(t, "n", &n)
				d.ScanArgs(t, "entry", &e)
				return result(tab.Fill(first, n, parseEntry(t, d, e)), tab)

			case "set-entry-state":
				var first, n int
				var s string
				d.ScanArgs(t, "first", &first)
				d.ScanArgs(t, "n", &n)
				d.ScanArgs(t, "state", &s)
				on := d.HasArg("on")
				if on == d.HasArg("off") {
					d.Fatalf(t, "set-entry-state needs one of on, off")
				}
				return result(tab.SetEntryState(first, n, parseState(t, d, s), on), tab)

			case "get":
				var first, n int
				d.ScanArgs(t, "first", &first)
				d.ScanArgs(t, "n", &n)
				es, err := tab.GetEntry(first, n)
				if err != nil {
					return errString(err)
				}
				var b strings.Builder
				for i, e := range es {
					fmt.Fprintf(&b, "%d: %v\n", first+i, e)
				}
				return b.String()

			case "get-status":
				var first, n int
				var s string
				d.ScanArgs(t, "first", &first)
				d.ScanArgs(t, "n", &n)
				d.ScanArgs(t, "state", &s)
				bits, err := tab.GetStatus(first, n, parseState(t, d, s))
				if err != nil {
					return errString(err)
				}
				var b strings.Builder
				for _, on := range bits {
					if on {
						b.WriteByte('1')
					} else {
						b.WriteByte('0')
					}
				}
				return b.String() + "\n"

			case "print":
				return show(tab)

			case "decide":
				if d.HasArg("seg") {
					var seg int
					var op string
					d.ScanArgs(t, "seg", &seg)
					d.ScanArgs(t, "op", &op)
					e := tab.Entry(seg)
					return fmt.Sprintf("%d: %v %v -> %v\n", seg, e, parseOp(t, d, op), decision(table.Decide(e, parseOp(t, d, op))))
				}
				var b strings.Builder
				for _, line := range lines(d.Input) {
					f := strings.Fields(line)
					if len(f) != 2 {
						d.Fatalf(t, "decide: want \"entry op\", got %q", line)
					}
					e, op := parseEntry(t, d, f[0]), parseOp(t, d, f[1])
					fmt.Fprintf(&b, "%v %v -> %v\n", f[0], op, decision(table.Decide(e, op)))
				}
				return b.String()

			case "decide-all":
				var b strings.Builder
				fmt.Fprintf(&b, "%-26s %-16s %s\n", "state", "read", "write")
				for s := table.State(0); s.Valid(); s++ {
					e := table.Entry{Loc: table.Location{Container: 1, Slot: 3}, State: s}
					fmt.Fprintf(&b, "%-26v %-16v %v\n", s, decision(table.Decide(e, table.Read)), decision(table.Decide(e, table.Write)))
				}
				return b.String()

			case "resolve", "effects":
				var b strings.Builder
				for _, line := range lines(d.Input) {
					f := strings.Fields(line)
					if len(f) < 2 {
						d.Fatalf(t, "%s: want \"entry op [refs=N] [whole] [policy=P] [agent-copies]\", got %q", d.Cmd, line)
					}
					e, op := parseEntry(t, d, f[0]), parseOp(t, d, f[1])
					refs, whole, p, agentCopies, of := uint32(1), false, table.Forward, false, 0
					blocks := table.Range(0, 1)
					for _, kv := range f[2:] {
						k, v, _ := strings.Cut(kv, "=")
						switch k {
						case "blocks":
							blocks = parseBits(t, d, v)
						case "refs":
							n, err := strconv.ParseUint(v, 10, 32)
							if err != nil {
								d.Fatalf(t, "refs: %v", err)
							}
							refs = uint32(n)
						case "whole":
							whole = true
						case "of":
							n, err := strconv.Atoi(v)
							if err != nil {
								d.Fatalf(t, "of: %v", err)
							}
							of = n
						case "agent-copies":
							agentCopies = true
						case "policy":
							var err error
							if p, err = table.ParsePolicy(v); err != nil {
								d.Fatalf(t, "%v", err)
							}
						default:
							d.Fatalf(t, "resolve: unknown %q", kv)
						}
					}
					plan := table.Resolve(e, op, refs, table.Span{Whole: whole, Blocks: blocks, Of: of}, p)
					if d.Cmd == "resolve" {
						fmt.Fprintf(&b, "%s -> %v\n", line, plan)
						continue
					}
					fmt.Fprintf(&b, "%s -> %v\n", line, plan)
					for i, st := range table.Effects(plan, agentCopies) {
						fmt.Fprintf(&b, "  %d. %v\n", i+1, st)
					}
				}
				return b.String()

			case "commit-staged":
				var b strings.Builder
				for _, name := range strings.Fields(d.Input) {
					var plan table.Plan
					for p := table.Load; p <= table.FillAll; p++ {
						if p.String() == name {
							plan = p
						}
					}
					if plan == 0 {
						d.Fatalf(t, "commit-staged: unknown plan %q", name)
					}
					fmt.Fprintf(&b, "%v:\n", plan)
					for i, st := range table.CommitStaged(plan) {
						fmt.Fprintf(&b, "  %d. %v\n", i+1, st)
					}
				}
				return b.String()

			case "partial":
				// over TOP BITS ENTRY | filled ENTRY BITS | locate ENTRY | valid ENTRY
				var b strings.Builder
				for _, line := range lines(d.Input) {
					f := strings.Fields(line)
					switch {
					case len(f) == 4 && f[0] == "over":
						var top table.Location
						if _, err := fmt.Sscanf(f[1], "c%d/s%d", &top.Container, &top.Slot); err != nil {
							d.Fatalf(t, "over: %v", err)
						}
						fmt.Fprintf(&b, "%s -> %v\n", line, table.Over(top, parseBits(t, d, f[2]), parseEntry(t, d, f[3]), table.SubBlocks))
					case len(f) == 3 && f[0] == "filled":
						fmt.Fprintf(&b, "%s -> %v\n", line, table.Filled(parseEntry(t, d, f[1]), parseBits(t, d, f[2]), table.SubBlocks))
					case len(f) == 2 && f[0] == "locate":
						e := parseEntry(t, d, f[1])
						fmt.Fprintf(&b, "%s ->", line)
						_ = e.Runs(0, table.SubBlocks, func(loc table.Location, lo, hi int) error {
							fmt.Fprintf(&b, " %d-%d:%v", lo, hi-1, loc)
							return nil
						})
						b.WriteString("\n")
					case len(f) == 2 && f[0] == "valid":
						e := parseEntry(t, d, f[1])
						err := error(nil)
						if e.Part != nil {
							err = e.Part.Valid(e.Loc, table.SubBlocks)
						}
						res := "ok"
						if err != nil {
							res = err.Error()
						}
						fmt.Fprintf(&b, "%s -> %v\n", line, res)
					default:
						d.Fatalf(t, "partial: bad line %q", line)
					}
				}
				return b.String()

			case "resolve-all":
				a, ok := d.Arg("entries")
				if !ok {
					d.Fatalf(t, "resolve-all needs entries=(...)")
				}
				var b strings.Builder
				fmt.Fprintf(&b, "%-16s %-5s %4s %-5s %-14s %s\n", "entry", "op", "refs", "whole", "forward", "reverse")
				one := table.Range(0, 1)
				for _, v := range a.Vals {
					e := parseEntry(t, d, v)
					for _, op := range []table.Op{table.Read, table.Write} {
						for refs := uint32(0); refs <= 2; refs++ {
							for _, whole := range []bool{false, true} {
								fmt.Fprintf(&b, "%-16s %-5v %4d %-5v %-14v %v\n", v, op, refs, whole,
									table.Resolve(e, op, refs, table.Span{Whole: whole, Blocks: one}, table.Forward),
									table.Resolve(e, op, refs, table.Span{Whole: whole, Blocks: one}, table.Reverse))
							}
						}
					}
				}
				return b.String()
			}
			d.Fatalf(t, "unknown command %q", d.Cmd)
			return ""
		})
	})
}

// show prints t compactly: one line per run of equal entries, or of mapped
// entries with the same state at consecutive slots of one container, then
// how many pages are allocated.
func show(t *table.Table) string {
	var b strings.Builder
	for i := 0; i < t.Len(); {
		e := t.Entry(i)
		j := i + 1
		for j < t.Len() && follows(t.Entry(j-1), t.Entry(j)) {
			j++
		}
		last := t.Entry(j - 1)
		switch {
		case j-i == 1:
			fmt.Fprintf(&b, "%d: %v\n", i, e)
		case e == last || e.Voided():
			fmt.Fprintf(&b, "%d-%d: %v\n", i, j-1, e)
		default:
			fmt.Fprintf(&b, "%d-%d: %v..%v\n", i, j-1, e.Loc, last)
		}
		i = j
	}
	fmt.Fprintf(&b, "pages: %d\n", t.Pages())
	return b.String()
}

// follows reports whether b continues a run that ends in a: the same entry
// (for voided ones), or the same state at the next slot.
func follows(a, b table.Entry) bool {
	if a.Voided() || b.Voided() {
		return a == b
	}
	return a.State == b.State && a.Loc.Container == b.Loc.Container && b.Loc.Slot == a.Loc.Slot+1
}

// result prints err if there is one, then the table.
func result(err error, t *table.Table) string {
	if err != nil {
		return errString(err) + show(t)
	}
	return show(t)
}

// errString names err by the package sentinel it wraps, so that the
// scripts do not depend on the wording of messages.
func errString(err error) string {
	for _, s := range []struct {
		err  error
		name string
	}{
		{table.ErrRange, "ErrRange"},
		{table.ErrVoided, "ErrVoided"},
		{table.ErrBadState, "ErrBadState"},
		{table.ErrBadPolicy, "ErrBadPolicy"},
	} {
		if errors.Is(err, s.err) {
			return "error: " + s.name + "\n"
		}
	}
	return "error (no sentinel): " + err.Error() + "\n"
}

func decision(d table.Decision) string {
	if d.Reason != 0 {
		return fmt.Sprintf("%v(%v)", d.Action, d.Reason)
	}
	return d.Action.String()
}

func lines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return out
}

func parseOp(t *testing.T, d *datadriven.TestData, s string) table.Op {
	switch s {
	case "read":
		return table.Read
	case "write":
		return table.Write
	}
	d.Fatalf(t, "unknown op %q (want read or write)", s)
	return 0
}

// parseState parses state names joined by "|" (as State.String prints
// them); "Mapped" is no bit, and "0x10" an undefined one.
func parseState(t *testing.T, d *datadriven.TestData, s string) table.State {
	var st table.State
	for _, name := range strings.Split(s, "|") {
		switch name {
		case "Mapped":
		case "Invalid":
			st |= table.Invalid
		case "Error":
			st |= table.Error
		case "Zero":
			st |= table.Zero
		case "NoWrite":
			st |= table.NoWrite
		default:
			v, err := strconv.ParseUint(strings.TrimPrefix(name, "0x"), 16, 8)
			if err != nil || !strings.HasPrefix(name, "0x") {
				d.Fatalf(t, "unknown state %q", name)
			}
			st |= table.State(v)
		}
	}
	return st
}

// parseEntry parses "c<container>/s<slot>[+<state>]" or "<state>".
func parseEntry(t *testing.T, d *datadriven.TestData, s string) table.Entry {
	if !strings.HasPrefix(s, "c") {
		return table.Entry{State: parseState(t, d, s)}
	}
	loc, st, _ := strings.Cut(s, "+")
	var e table.Entry
	layers := strings.Split(loc, "<")
	parseLayer := func(s string) table.Layer {
		var l table.Layer
		at, bits, partial := strings.Cut(s, "{")
		if _, err := fmt.Sscanf(at, "c%d/s%d", &l.Loc.Container, &l.Loc.Slot); err != nil {
			d.Fatalf(t, "entry %q: %v", s, err)
		}
		l.Bits = table.Full(table.SubBlocks)
		if partial {
			l.Bits = parseBits(t, d, strings.TrimSuffix(bits, "}"))
		}
		return l
	}
	top := parseLayer(layers[0])
	e.Loc = top.Loc
	if len(layers) > 1 {
		e.Part = &table.Partial{Bits: top.Bits}
		for _, l := range layers[1:] {
			e.Part.Under = append(e.Part.Under, parseLayer(l))
		}
	}
	if st != "" {
		e.State = parseState(t, d, st)
	}
	return e
}

// parseBits parses sub-block ranges: "0-3,8".
func parseBits(t *testing.T, d *datadriven.TestData, s string) table.Bits {
	var b table.Bits
	for _, r := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(r, "-")
		l, err := strconv.Atoi(lo)
		h := l
		if err == nil && isRange {
			h, err = strconv.Atoi(hi)
		}
		if err != nil {
			d.Fatalf(t, "sub-blocks %q: %v", s, err)
		}
		b = b.Or(table.Range(l, h+1))
	}
	return b
}
