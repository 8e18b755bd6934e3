package main

import (
	"slices"
	"testing"
	"time"

	pb "segmap/api/segmapv1"
)

// TestOperationRows: 'segmap operations' writes bytes with their unit
// suffix, counts with their unit, a percent when the total is known, and
// how long each ran (or has run, at now).
func TestOperationRows(t *testing.T) {
	now := time.Unix(1_700_000_100, 0)
	rows := operationRows([]*pb.Operation{
		{Id: 1, Kind: "export", Target: "vm1@mon", Unit: "bytes", Done: 1 << 30, Total: 1 << 30, StartedUnix: 1_700_000_000, FinishedUnix: 1_700_000_012, State: "done"},
		{Id: 2, Kind: "drain", Target: "container 3", Unit: "slots", Done: 120, Total: 266, StartedUnix: 1_700_000_090, State: "running"},
		{Id: 3, Kind: "import", Target: "disk vm2", Unit: "bytes", Done: 4 << 20, StartedUnix: 1_700_000_095, FinishedUnix: 1_700_000_096, State: "failed", Error: "canceled"},
	}, now)
	want := [][]string{
		{"1", "export", "vm1@mon", "done", "1G/1G (100%)", "2023-11-14 22:13:20", "12s", "-"},
		{"2", "drain", "container 3", "running", "120/266 slots (45%)", "2023-11-14 22:14:50", "10s", "-"},
		{"3", "import", "disk vm2", "failed", "4M", "2023-11-14 22:14:55", "1s", "canceled"},
	}
	for i := range want {
		if !slices.Equal(rows[i], want[i]) {
			t.Errorf("row %d: %q, want %q", i, rows[i], want[i])
		}
	}
}
