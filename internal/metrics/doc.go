package metrics

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"segmap/internal/nbd"
)

// Family describes one metric family, as docs/metrics.md lists it.
type Family struct {
	Name, Type, Help string
	Labels           []string
}

// Families returns every family All registers, sorted by name: each
// component is made with a throwaway registry and given one sample of
// everything, so that families with labels show up in a gather.
func Families() ([]Family, error) {
	mfs, err := sampled().Gather()
	if err != nil {
		return nil, err
	}
	var out []Family
	for _, mf := range mfs {
		f := Family{Name: mf.GetName(), Type: strings.ToLower(mf.GetType().String()), Help: mf.GetHelp()}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if !slices.Contains(f.Labels, l.GetName()) {
					f.Labels = append(f.Labels, l.GetName())
				}
			}
		}
		out = append(out, f)
	}
	slices.SortFunc(out, func(a, b Family) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// sampled returns a registry with every family of every component, each
// given a sample.
func sampled() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	a := NewAgent(reg)
	e := a.NBD.Export("d")
	e.Request(nbd.OpRead, 1, 0, time.Millisecond)
	e.Request(nbd.OpRead, 1, 5, time.Millisecond)
	e.Connected(1)
	d := a.Disk("d")
	d.Fault(time.Millisecond)
	d.Held(HoldQuiesced, 1, time.Millisecond)
	c := NewController(reg, func(context.Context) (State, error) {
		return State{Disks: map[string]int{"disk": 1}, Agents: map[string]int{"a": 1}, Containers: []ContainerState{{ID: 1, State: "online"}}}, nil
	})
	c.Fault("load", time.Millisecond)
	c.Snapshot(1, time.Millisecond)
	c.Quiesced(time.Millisecond)
	c.Commit("bolt", 1, time.Millisecond)
	c.Leader(true, true)
	s := NewStorage(reg).Export("e")
	s.Request(nbd.OpRead, 1, 0, time.Millisecond)
	s.Request(nbd.OpRead, 1, 5, time.Millisecond)
	s.Connected(1)
	return reg
}

// Markdown writes docs/metrics.md: every family in a table.
func Markdown(w io.Writer) error {
	fs, err := Families()
	if err != nil {
		return err
	}
	fmt.Fprintln(w, "# Metrics")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Generated from internal/metrics by `go run ./scripts/metricsdoc > docs/metrics.md`; a test")
	fmt.Fprintln(w, "(internal/metrics TestDocCurrent) fails when this file is stale. Every server")
	fmt.Fprintln(w, "also exposes the Go runtime's (`go_*`) and the process's (`process_*`) metrics.")
	fmt.Fprintln(w, "`segmap up` exposes the agent's and the controller's families, `segmap agent`")
	fmt.Fprintln(w, "the agent's, `segmap controller` the controller's, `segmap storage` the storage node's.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| name | type | labels | help |")
	fmt.Fprintln(w, "|---|---|---|---|")
	for _, f := range fs {
		fmt.Fprintf(w, "| `%s` | %s | %s | %s |\n", f.Name, f.Type, strings.Join(f.Labels, ", "), strings.ReplaceAll(f.Help, "|", "\\|"))
	}
	return nil
}
