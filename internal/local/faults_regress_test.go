package local_test

// Regression tests for bugs the crash-point and error-injection tests
// found: each fails on the code before its fix.

import (
	"errors"
	"testing"

	"segmap/internal/faultinject"
)

// A controller that dies between committing a resize and telling the
// agents (a grow is told after its commit), or after telling them of a
// shrink it then does not commit, left each agent serving the disk at the
// size it last heard of, even after re-attaching to the next controller.
func TestRegressResizeCrashAgentSize(t *testing.T) {
	tests := []struct {
		name string
		segs int  // the new size, in segments
		keep bool // the resize's commit survives the crash
		want int  // the size the agents must see after the restart
	}{
		{"grow committed", fxSegs + 2, true, fxSegs + 2},
		{"shrink not committed", 1, false, fxSegs},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := openFx(t, t.TempDir(), false)
			defer h.close()
			m, err := opCreate("F", false).run(h, fxModel{})
			if err != nil {
				t.Fatal(err)
			}
			if m, err = opWrite(0, "F", 0, pattern(1, fxSegs*seg64)).run(h, m); err != nil {
				t.Fatal(err)
			}
			if err := h.prepare(m); err != nil {
				t.Fatal(err)
			}
			in := h.ctrl.Load()
			in.CrashAt(in.Steps()+1, tt.keep) // the resize's commit
			_, err = opResize("F", tt.segs).run(h, m)
			if !errors.Is(err, faultinject.ErrCrashed) {
				t.Fatalf("resize: %v, want the crash", err)
			}
			if err := h.restartController(); err != nil {
				t.Fatal(err)
			}
			for _, a := range h.c.Agents {
				d, err := a.Open(h.ctx, "F")
				if err != nil {
					t.Fatal(err)
				}
				if got := d.Size(); got != uint64(tt.want*seg64) {
					t.Errorf("agent %s serves F at %d bytes after the restart, want %d", a.Name(), got, tt.want*seg64)
				}
			}
		})
	}
}
