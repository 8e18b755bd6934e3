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
	"segmap/internal/size"
)

// exportChunk is how much of a stream one ImportChunk carries.
const exportChunk = 1 << 20

func newExport(g *globals) *cobra.Command {
	var from, out string
	var progress, noProgress bool
	cmd := &cobra.Command{
		Use:   "export SNAP [--from BASE] [-o FILE] [--progress|--no-progress]",
		Short: "write a snapshot as a stream (all of it, or what changed since BASE)",
		Long: `export writes a read-only snapshot in segmap's stream format
(docs/stream.md) to standard output, or to FILE: every data segment of it,
or with --from only what changed since BASE, an earlier snapshot of the
same disk. 'segmap import' applies it on another cluster:

  segmap export vm1@mon | ssh host segmap import vm1
  segmap export vm1@tue --from vm1@mon | ssh host segmap import vm1

A progress line (bytes, rate, ETA) goes to standard error when it is a
terminal, or with --progress. --timeout does not bound an export.`,
		Args: exactArgs(1, "the snapshot to export"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if progress && noProgress {
				return usageError{errors.New("export: --progress and --no-progress both given")}
			}
			w := cmd.OutOrStdout()
			if out != "" {
				f, err := os.Create(out)
				if err != nil {
					return err
				}
				defer f.Close()
				w = f
			} else if isTerminal(w) {
				return usageError{errors.New("export: standard output is a terminal; redirect it, pipe it or pass -o FILE")}
			}
			show := progress || (!noProgress && isTerminal(cmd.ErrOrStderr()))
			g.noDeadline = true
			err := g.call(func(ctx context.Context, c pb.AdminClient) error {
				st, err := c.Export(ctx, &pb.ExportRequest{Snapshot: args[0], Base: from})
				if err != nil {
					return err
				}
				p := newProgress(cmd.ErrOrStderr(), show)
				for {
					ch, err := st.Recv()
					if errors.Is(err, io.EOF) {
						p.done()
						return nil
					}
					if err != nil {
						p.fail()
						return err
					}
					if ch.TotalDataBytes != 0 {
						p.total = ch.TotalDataBytes
					}
					if _, err := w.Write(ch.Data); err != nil {
						p.fail()
						return fmt.Errorf("export: write: %w", err)
					}
					p.add(uint64(len(ch.Data)))
				}
			})
			if err == nil && out != "" {
				f := w.(*os.File)
				if err = f.Sync(); err == nil {
					err = f.Close()
				}
			}
			return err
		},
	}
	cmd.Flags().StringVar(&from, "from", "", "write only what changed since this earlier snapshot")
	cmd.Flags().StringVarP(&out, "output", "o", "", "write to FILE instead of standard output")
	cmd.Flags().BoolVar(&progress, "progress", false, "show progress on standard error even when it is not a terminal")
	cmd.Flags().BoolVar(&noProgress, "no-progress", false, "never show progress")
	return cmd
}

func newImport(g *globals) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "import [FILE] DISK [--force]",
		Short: "apply a stream written by 'segmap export' to a disk",
		Long: `import reads a stream from FILE, or standard input, and applies it:

  a full stream creates DISK, which must not exist;
  an incremental one (export --from) applies only to a DISK whose newest
  snapshot is the stream's base and which has not been written since
  (--force drops those writes).

Either way it ends with a read-only snapshot named like the source
(vm1@mon imported into vm2 gives vm2@mon). A truncated, corrupted or
mismatched stream is refused and DISK is left as it was.
--timeout does not bound an import.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 1 || len(args) > 2 {
				return usageError{errors.New("import wants [FILE] DISK")}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			in := cmd.InOrStdin()
			if len(args) == 2 {
				f, err := os.Open(args[0])
				if err != nil {
					return err
				}
				defer f.Close()
				in = f
			}
			disk := args[len(args)-1]
			g.noDeadline = true
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				st, err := c.Import(ctx)
				if err != nil {
					return err
				}
				if err := st.Send(&pb.ImportChunk{Disk: disk, Force: force}); err != nil && !errors.Is(err, io.EOF) {
					return err
				}
				buf := make([]byte, exportChunk)
				for {
					n, rerr := io.ReadFull(in, buf)
					if n > 0 {
						if err := st.Send(&pb.ImportChunk{Data: buf[:n]}); err != nil {
							// io.EOF: the server has answered (a
							// refusal); CloseAndRecv says what.
							if errors.Is(err, io.EOF) {
								break
							}
							return err
						}
					}
					if errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF) {
						break
					}
					if rerr != nil {
						return fmt.Errorf("import: read: %w", rerr)
					}
				}
				r, err := st.CloseAndRecv()
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), r)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "imported %s as snapshot %s\n", disk, r.Snapshot.GetName())
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "apply an incremental stream even if DISK was written since its newest snapshot (those writes are lost)")
	return cmd
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

// progress prints a line of bytes, rate and ETA, at most a few times a
// second, redrawn in place.
type progress struct {
	w     io.Writer
	on    bool
	total uint64 // data bytes expected, 0 if unknown
	n     uint64
	start time.Time
	last  time.Time
}

func newProgress(w io.Writer, on bool) *progress {
	now := time.Now()
	return &progress{w: w, on: on, start: now, last: now}
}

func (p *progress) add(n uint64) {
	p.n += n
	if now := time.Now(); p.on && now.Sub(p.last) >= 200*time.Millisecond {
		p.last = now
		p.print(false)
	}
}

func (p *progress) print(final bool) {
	el := time.Since(p.start).Seconds()
	rate := 0.0
	if el > 0 {
		rate = float64(p.n) / el
	}
	line := fmt.Sprintf("%s  %s/s", size.Format(p.n), size.Format(uint64(rate)))
	if p.total > 0 && !final {
		pct := min(100, 100*float64(p.n)/float64(p.total))
		eta := "?"
		if rate > 0 && p.total > p.n {
			eta = time.Duration(float64(p.total-p.n) / rate * float64(time.Second)).Round(time.Second).String()
		} else if p.total <= p.n {
			eta = "0s"
		}
		line += fmt.Sprintf("  %3.0f%% of %s  ETA %s", pct, size.Format(p.total), eta)
	}
	if final {
		line += fmt.Sprintf("  in %s", time.Since(p.start).Round(100*time.Millisecond))
	}
	fmt.Fprintf(p.w, "\r\x1b[K%s", line)
	if final {
		fmt.Fprintln(p.w)
	}
}

func (p *progress) done() {
	if p.on {
		p.print(true)
	}
}

func (p *progress) fail() {
	if p.on {
		fmt.Fprintln(p.w)
	}
}
