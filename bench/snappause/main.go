// Command snappause measures how long a snapshot takes and how long a
// concurrent writer stalls while it runs, against a running 'segmap up'.
//
// Two writers run during the whole measurement, each one NBD connection
// doing 4 KiB writes at queue depth 1: "same" rewrites the first block of
// the disk being snapshotted (so the first write after each snapshot also
// pays one copy-on-write fault), "other" rewrites the first block of a
// second disk that is never snapshotted. Every completion time is kept.
//
// Then, one after the other with a pause between, SNAPSHOTS snapshots are
// taken through the CLI ('segmap snapshot DISK --name ...', timed as a
// process round trip) and SNAPSHOTS through the admin gRPC API directly
// (one Snapshot call on an open connection: server time plus one loopback
// round trip). A baseline of both paths is taken with 'disk info' /
// GetDisk. For each snapshot, the writer's gaps between consecutive
// completions that overlap the snapshot's window are its pause.
//
// It prints one JSON object (see result) on stdout. Every loop is bounded:
// the writers stop when the snapshots are done, or after -max.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "segmap/api/segmapv1"
	"segmap/internal/nbd/nbdclient"
)

type result struct {
	Bench     string `json:"bench"`
	Segments  int    `json:"segments"`
	Snapshots int    `json:"snapshots"`
	// Wall times of each snapshot, milliseconds.
	CLIms  []float64 `json:"cli_ms"`
	GRPCms []float64 `json:"grpc_ms"`
	// Baselines: median of 'segmap disk info' and of GetDisk.
	InfoCLIms  float64 `json:"info_cli_ms"`
	InfoGRPCms float64 `json:"info_grpc_ms"`
	// Per snapshot (CLI ones first), the longest completion gap of each
	// writer inside the snapshot's window, milliseconds.
	PauseSameMs  []float64 `json:"pause_same_ms"`
	PauseOtherMs []float64 `json:"pause_other_ms"`
	// p99 of every completion gap inside the windows, pooled, and outside
	// them (the writer's normal rhythm), milliseconds.
	GapP99SameMs     float64 `json:"gap_p99_same_ms"`
	GapP99OtherMs    float64 `json:"gap_p99_other_ms"`
	GapP99IdleSameMs float64 `json:"gap_p99_idle_same_ms"`
	Writes           int     `json:"writes"`
}

type window struct{ from, to time.Duration }

// writer does 4 KiB writes at offset 0 of c until stop is closed or limit
// has passed, and returns the completion times since t0.
func writer(ctx context.Context, c *nbdclient.Client, t0 time.Time, stop <-chan struct{}, limit time.Duration) ([]time.Duration, error) {
	p := make([]byte, 4096)
	for i := range p {
		p[i] = byte(i)
	}
	done := make([]time.Duration, 0, 1<<20)
	for {
		select {
		case <-stop:
			return done, nil
		default:
		}
		if err := c.WriteAt(ctx, p, 0, false); err != nil {
			return done, err
		}
		now := time.Since(t0)
		done = append(done, now)
		if now > limit {
			return done, fmt.Errorf("writer still running after %v", limit)
		}
	}
}

// gaps returns, per window, the longest gap between consecutive
// completions that overlaps it, every such gap, and the gaps that overlap
// no window.
func gaps(done []time.Duration, ws []window) (longest []float64, in, out []float64) {
	longest = make([]float64, len(ws))
	for k := 1; k < len(done); k++ {
		a, b := done[k-1], done[k]
		g := ms(b - a)
		hit := false
		for i, w := range ws {
			if a < w.to && b > w.from {
				hit = true
				longest[i] = max(longest[i], g)
			}
		}
		if hit {
			in = append(in, g)
		} else {
			out = append(out, g)
		}
	}
	return longest, in, out
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

func quantile(xs []float64, q float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[min(len(s)-1, int(q*float64(len(s))))]
}

func median(xs []float64) float64 { return quantile(xs, 0.5) }

func main() {
	var (
		nbdAddr   = flag.String("nbd", "127.0.0.1:10809", "segmap's NBD address")
		admin     = flag.String("admin", "127.0.0.1:10810", "segmap's admin address")
		bin       = flag.String("segmap", "segmap", "the segmap binary (for the CLI timings)")
		disk      = flag.String("disk", "", "the disk to snapshot")
		other     = flag.String("other", "", "a second disk, never snapshotted")
		segments  = flag.Int("segments", 0, "allocated segments of -disk (a label)")
		snapshots = flag.Int("snapshots", 3, "snapshots per path (CLI, gRPC)")
		pause     = flag.Duration("pause", 300*time.Millisecond, "idle time between snapshots")
		maxT      = flag.Duration("max", 20*time.Minute, "stop the writers after this long whatever happens")
	)
	flag.Parse()
	if *disk == "" || *other == "" {
		log.Fatal("snappause: -disk and -other are required")
	}
	ctx := context.Background()

	conn, err := grpc.NewClient(*admin, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	ac := pb.NewAdminClient(conn)

	cli := func(args ...string) time.Duration {
		t := time.Now()
		cmd := exec.Command(*bin, append([]string{"--controller", *admin}, args...)...)
		cmd.Stderr = os.Stderr
		if err := cmd.Run(); err != nil {
			log.Fatalf("snappause: segmap %v: %v", args, err)
		}
		return time.Since(t)
	}
	res := result{Bench: "snap", Segments: *segments, Snapshots: *snapshots}

	// Baselines.
	var infoCLI, infoRPC []float64
	for range 5 {
		infoCLI = append(infoCLI, ms(cli("disk", "info", *disk)))
		t := time.Now()
		if _, err := ac.GetDisk(ctx, &pb.GetDiskRequest{Name: *disk}); err != nil {
			log.Fatal(err)
		}
		infoRPC = append(infoRPC, ms(time.Since(t)))
	}
	res.InfoCLIms, res.InfoGRPCms = median(infoCLI), median(infoRPC)

	// Writers.
	t0 := time.Now()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var doneSame, doneOther []time.Duration
	var errSame, errOther error
	for _, w := range []struct {
		name string
		done *[]time.Duration
		err  *error
	}{{*disk, &doneSame, &errSame}, {*other, &doneOther, &errOther}} {
		c, err := nbdclient.Dial(ctx, *nbdAddr, w.name, nbdclient.ClientConfig{})
		if err != nil {
			log.Fatalf("snappause: dial %s: %v", w.name, err)
		}
		defer c.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			*w.done, *w.err = writer(ctx, c, t0, stop, *maxT)
		}()
	}

	var ws []window
	time.Sleep(*pause)
	for i := range *snapshots {
		from := time.Since(t0)
		d := cli("snapshot", *disk, "--name", fmt.Sprintf("%s@cli%d", *disk, i))
		ws = append(ws, window{from, time.Since(t0)})
		res.CLIms = append(res.CLIms, ms(d))
		time.Sleep(*pause)
	}
	for i := range *snapshots {
		from := time.Since(t0)
		if _, err := ac.Snapshot(ctx, &pb.SnapshotRequest{Sources: []string{*disk}, Names: []string{fmt.Sprintf("%s@rpc%d", *disk, i)}}); err != nil {
			log.Fatal(err)
		}
		to := time.Since(t0)
		ws = append(ws, window{from, to})
		res.GRPCms = append(res.GRPCms, ms(to-from))
		time.Sleep(*pause)
	}
	close(stop)
	wg.Wait()
	if errSame != nil || errOther != nil {
		log.Fatalf("snappause: writers: %v, %v", errSame, errOther)
	}

	var inSame, outSame, inOther []float64
	res.PauseSameMs, inSame, outSame = gaps(doneSame, ws)
	res.PauseOtherMs, inOther, _ = gaps(doneOther, ws)
	res.GapP99SameMs = quantile(inSame, 0.99)
	res.GapP99OtherMs = quantile(inOther, 0.99)
	res.GapP99IdleSameMs = quantile(outSame, 0.99)
	res.Writes = len(doneSame) + len(doneOther)
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		log.Fatal(err)
	}
}
