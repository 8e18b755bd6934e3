package e2e

import (
	"strings"
	"testing"
	"time"
)

// agentsStatus is the JSON of 'segmap status --agents'.
type agentsStatus struct {
	Agents []struct {
		Name        string `json:"name"`
		MappedDisks []struct {
			Name     string `json:"name"`
			Failure  string `json:"failure"`
			Segments string `json:"segments"` // protojson writes uint64 as a string
			Loaded   string `json:"loaded"`
			Invalid  string `json:"invalid"`
			Error    string `json:"error"`
			Mapped   string `json:"mapped"`
			InFlight string `json:"in_flight"`
			Quiesced bool   `json:"quiesced"`
		} `json:"mapped_disks"`
	} `json:"agents"`
}

// TestCLIStatusAgents: 'segmap status --agents' asks the agent of 'segmap
// up' how the disks it maps stand: none before a host connects; while
// qemu-io holds the disk open after writing half of it, the disk with
// every written segment loaded and mapped, the rest Invalid, and nothing
// in flight; after 'disk set-error' on 1 MiB of it, 16 Error entries in
// place of mapped ones. Plain 'status' still shows its agent table.
func TestCLIStatusAgents(t *testing.T) {
	requireTools(t, "qemu-io")
	u := startUp(t, t.TempDir())
	u.cli("disk", "create", "s", "--size", "8M", "--segment-size", "64K")

	out := u.cli("status", "--agents")
	if !strings.Contains(out, "AGENT") || !strings.Contains(out, "local") || !strings.Contains(out, "no disks mapped") {
		t.Errorf("status --agents with no disk open:\n%s", out)
	}

	// qemu-io writes 4 MiB (64 segments) and keeps the disk open.
	background(t, "qemu-io", "-f", "raw", u.uri("s"), "-c", "write -P 1 0 4M", "-c", "flush", "-c", "sleep 60000")
	deadline := time.Now().Add(30 * time.Second)
	for {
		var st agentsStatus
		u.cliJSON(&st, "status", "--agents")
		var seen string
		for _, a := range st.Agents {
			for _, d := range a.MappedDisks {
				if a.Name != "local" || d.Name != "s" {
					continue
				}
				seen = d.Loaded
				if d.Failure != "" {
					t.Fatalf("status of s: %s", d.Failure)
				}
				if mustUint(t, d.Loaded) < 64 {
					continue
				}
				if mustUint(t, d.Segments) != 128 || mustUint(t, d.Mapped) < 64 ||
					mustUint(t, d.Invalid) != 128-mustUint(t, d.Loaded) || mustUint(t, d.InFlight) != 0 || d.Quiesced {
					t.Fatalf("status of s after a 4 MiB write: %+v", d)
				}
				out := u.cli("status", "--agents")
				if !strings.Contains(out, "IN-FLIGHT") || !strings.Contains(out, "active") {
					t.Errorf("status --agents:\n%s", out)
				}
				t.Logf("status --agents:\n%s", out)
				if out := u.cli("status"); !strings.Contains(out, "AGENT") || strings.Contains(out, "IN-FLIGHT") {
					t.Errorf("plain status changed:\n%s", out)
				}
				// set-error sends the Error entries to the agent
				// before it answers.
				mapped := mustUint(t, d.Mapped)
				u.cli("disk", "set-error", "s", "--offset", "0", "--length", "1M")
				var after agentsStatus
				u.cliJSON(&after, "status", "--agents")
				if len(after.Agents) != 1 || len(after.Agents[0].MappedDisks) != 1 {
					t.Fatalf("status --agents after set-error: %+v", after)
				}
				e := after.Agents[0].MappedDisks[0]
				if mustUint(t, e.Error) != 16 || mustUint(t, e.Mapped) != mapped-16 {
					t.Errorf("status of s after set-error on its first 16 segments (%d mapped before): %+v", mapped, e)
				}
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent never showed s with 64 segments loaded (last seen %q loaded)", seen)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
