package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	pb "segmap/api/segmapv1"
	"segmap/internal/progress"
	"segmap/internal/size"
)

// progressFlags are the --progress and --no-progress of every long
// operation.
type progressFlags struct{ force, silence bool }

func (p *progressFlags) add(cmd *cobra.Command) {
	cmd.Flags().BoolVar(&p.force, "progress", false, "show a progress bar on standard error even when it is not a terminal")
	cmd.Flags().BoolVar(&p.silence, "no-progress", false, "show no progress (not even --json events)")
}

// progressHelp ends the help of a long operation.
const progressHelp = `
Progress goes to standard error: a bar (done, percent, rate, ETA) on a
terminal, nothing on a pipe; --progress shows the bar anyway,
--no-progress never; with --json, one JSON event a line instead
(docs/progress.md), at most two a second and a last one.`

// reporter returns the reporter of a long operation (op on target,
// counting unit) on the command's standard error, as the flags ask.
func (p *progressFlags) reporter(cmd *cobra.Command, g *globals, op, target, unit string) (*progress.Reporter, error) {
	w := cmd.ErrOrStderr()
	m, err := progress.Choose(p.force, p.silence, g.json, isTerminal(w))
	if err != nil {
		return nil, usageError{fmt.Errorf("%s: %w", cmd.CommandPath(), err)}
	}
	return progress.New(progress.Config{W: w, Mode: m, Op: op, Target: target, Unit: unit}), nil
}

// isTerminal reports whether w is a terminal: a file that answers the
// terminal ioctl (a character device such as /dev/null is not one).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// followMoves shows on pr a stream of slot moves or copies (a drain's, a
// rebuild's) until it ends, and returns its last message (nil if none
// came). pr is finished either way.
func followMoves(pr *progress.Reporter, st interface {
	Recv() (*pb.DrainProgress, error)
}) (*pb.DrainProgress, error) {
	var last *pb.DrainProgress
	for {
		p, err := st.Recv()
		if errors.Is(err, io.EOF) {
			pr.Finish(nil)
			return last, nil
		}
		if err != nil {
			pr.Finish(err)
			return nil, err
		}
		last = p
		pr.Update(p.Done, p.Total)
	}
}

// rebuildProgress shows a rebuild's progress stream and its end.
func rebuildProgress(cmd *cobra.Command, g *globals, op string, id uint32, pf *progressFlags, st interface {
	Recv() (*pb.DrainProgress, error)
}) error {
	start := time.Now()
	pr, err := pf.reporter(cmd, g, op, fmt.Sprintf("container %d", id), progress.Slots)
	if err != nil {
		return err
	}
	last, err := followMoves(pr, st)
	if err != nil {
		return err
	}
	if last == nil {
		last = &pb.DrainProgress{}
	}
	if g.json {
		return printJSON(cmd.OutOrStdout(), last)
	}
	fmt.Fprintf(cmd.OutOrStdout(), "rebuilt the replica of container %d: %s copied in %v\n", id, plural(int(last.Done), "segment"), time.Since(start).Round(time.Millisecond))
	return nil
}

// watchOperation shows on pr the progress of the newest operation of
// kind that the controller lists with an id above after (one that a
// unary call, such as Check's scrub, runs without a stream), polling
// ListOperations until ctx ends.
func watchOperation(ctx context.Context, c pb.AdminClient, pr *progress.Reporter, kind string, after uint64) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		updateFromOperation(ctx, c, pr, kind, after)
	}
}

// updateFromOperation updates pr from the newest operation of kind with
// an id above after, if the controller lists one (an older controller,
// or one busy, does not: then nothing changes).
func updateFromOperation(ctx context.Context, c pb.AdminClient, pr *progress.Reporter, kind string, after uint64) {
	r, err := c.ListOperations(ctx, &pb.ListOperationsRequest{})
	if err != nil {
		return
	}
	for i := len(r.Operations) - 1; i >= 0; i-- {
		if o := r.Operations[i]; o.Id > after && o.Kind == kind {
			pr.Update(o.Done, o.Total)
			return
		}
	}
}

// lastOperationID returns the id of the newest operation the controller
// lists (0 if none, or if it cannot tell).
func lastOperationID(ctx context.Context, c pb.AdminClient) uint64 {
	r, err := c.ListOperations(ctx, &pb.ListOperationsRequest{})
	if err != nil || len(r.Operations) == 0 {
		return 0
	}
	return r.Operations[len(r.Operations)-1].Id
}

func newOperations(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:     "operations",
		Aliases: []string{"ops"},
		Short:   "list the long operations the controller runs, and the last ones that ended",
		Long: `operations lists the long operations of the controller (the leader): the
drains, rebuilds, replica replacements, flattens, exports, imports,
scrubs and preallocations running now, whoever started them (a client, or
the controller itself: a drain or rebuild resumed after a restart, a
replica catching up), and the last 16 that ended. The controller keeps
them in memory: after a restart or a failover the list starts empty.

  ID       numbers the operations in the order they started
  KIND     preallocate, drain, replace-replica, rebuild,
           flatten, export, import, scrub
  TARGET   what it works on
  STATE    running, done or failed
  PROGRESS done of total, in slots, segments or bytes, and the percent
  STARTED  when it started (UTC), and for how long it ran or has run
  ERROR    why it failed ("canceled": its client went away)

With --json, the ListOperations response: every field of each operation,
started_unix and finished_unix in seconds (0 while running).`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				r, err := c.ListOperations(ctx, &pb.ListOperationsRequest{})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), r)
				}
				return table(cmd.OutOrStdout(), []string{"ID", "KIND", "TARGET", "STATE", "PROGRESS", "STARTED", "FOR", "ERROR"}, operationRows(r.Operations, time.Now()))
			})
		},
	}
}

// operationRows are the rows of 'segmap operations' at now.
func operationRows(ops []*pb.Operation, now time.Time) [][]string {
	var rows [][]string
	for _, o := range ops {
		amount := func(n uint64) string {
			if o.Unit == progress.Bytes {
				return size.Format(n)
			}
			return fmt.Sprint(n)
		}
		prog := amount(o.Done)
		if o.Total > 0 {
			prog = fmt.Sprintf("%s/%s (%d%%)", amount(o.Done), amount(o.Total), min(100, o.Done*100/o.Total))
			if o.Unit != progress.Bytes {
				prog = fmt.Sprintf("%d/%d %s (%d%%)", o.Done, o.Total, o.Unit, min(100, o.Done*100/o.Total))
			}
		} else if o.Unit != progress.Bytes {
			prog += " " + o.Unit
		}
		started := time.Unix(o.StartedUnix, 0)
		end := now
		if o.FinishedUnix != 0 {
			end = time.Unix(o.FinishedUnix, 0)
		}
		rows = append(rows, []string{fmt.Sprint(o.Id), o.Kind, orDash(o.Target), o.State, prog,
			started.UTC().Format(time.DateTime), max(0, end.Sub(started)).Round(time.Second).String(), orDash(o.Error)})
	}
	return rows
}
