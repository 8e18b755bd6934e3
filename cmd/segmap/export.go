package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	pb "segmap/api/segmapv1"
	"segmap/internal/controller"
	"segmap/internal/progress"
)

// exportChunk is how much of a stream one ImportChunk carries.
const exportChunk = 1 << 20

func newExport(g *globals) *cobra.Command {
	var from, out string
	var pf progressFlags
	cmd := &cobra.Command{
		Use:   "export SNAP [--from BASE] [-o FILE] [--progress|--no-progress]",
		Short: "write a snapshot as a stream (all of it, or what changed since BASE)",
		Long: `export writes a read-only snapshot in segmap's stream format
(docs/stream.md) to standard output, or to FILE: every data segment of it,
or with --from only what changed since BASE, an earlier snapshot of the
same disk. 'segmap import' applies it on another cluster:

  segmap export vm1@mon | ssh host segmap import vm1
  segmap export vm1@tue --from vm1@mon | ssh host segmap import vm1

--timeout does not bound an export.
` + progressHelp,
		Args: exactArgs(1, "the snapshot to export"),
		RunE: func(cmd *cobra.Command, args []string) error {
			target := args[0]
			if from != "" {
				target += " from " + from
			}
			p, err := pf.reporter(cmd, g, controller.OpExport, target, progress.Bytes)
			if err != nil {
				return err
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
			g.noDeadline = true
			err = g.call(func(ctx context.Context, c pb.AdminClient) error {
				st, err := c.Export(ctx, &pb.ExportRequest{Snapshot: args[0], Base: from})
				if err != nil {
					return err
				}
				for {
					ch, err := st.Recv()
					if errors.Is(err, io.EOF) {
						p.Finish(nil)
						return nil
					}
					if err != nil {
						p.Finish(err)
						return err
					}
					if ch.TotalDataBytes != 0 {
						p.SetTotal(ch.TotalDataBytes)
					}
					if _, err := w.Write(ch.Data); err != nil {
						err = fmt.Errorf("export: write: %w", err)
						p.Finish(err)
						return err
					}
					p.Add(uint64(len(ch.Data)))
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
	pf.add(cmd)
	return cmd
}

func newImport(g *globals) *cobra.Command {
	var force bool
	var pf progressFlags
	cmd := &cobra.Command{
		Use:   "import [FILE] DISK [--force] [--progress|--no-progress]",
		Short: "apply a stream written by 'segmap export' to a disk",
		Long: `import reads a stream from FILE, or standard input, and applies it:

  a full stream creates DISK, which must not exist;
  an incremental one (export --from) applies only to a DISK whose newest
  snapshot is the stream's base and which has not been written since
  (--force drops those writes).

Either way it ends with a read-only snapshot named like the source
(vm1@mon imported into vm2 gives vm2@mon). A truncated, corrupted or
mismatched stream is refused and DISK is left as it was.
--timeout does not bound an import. The progress counts the stream's
bytes, of its length when it is a file (FILE, or standard input
redirected from one).
` + progressHelp,
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
			p, err := pf.reporter(cmd, g, controller.OpImport, "disk "+disk, progress.Bytes)
			if err != nil {
				return err
			}
			total := streamLength(in)
			p.SetTotal(total)
			g.noDeadline = true
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				r, err := importStream(ctx, c, in, &pb.ImportChunk{Disk: disk, Force: force, TotalBytes: total}, p)
				p.Finish(err)
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
	pf.add(cmd)
	return cmd
}

// streamLength returns the bytes left in r if it is a regular file (0:
// not known).
func streamLength(r io.Reader) uint64 {
	f, ok := r.(*os.File)
	if !ok {
		return 0
	}
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		return 0
	}
	off, err := f.Seek(0, io.SeekCurrent)
	if err != nil || off > fi.Size() {
		return 0
	}
	return uint64(fi.Size() - off)
}

// importStream sends the stream in to Import after first (the disk and
// its options), counting the bytes sent on p, and returns the answer.
func importStream(ctx context.Context, c pb.AdminClient, in io.Reader, first *pb.ImportChunk, p *progress.Reporter) (*pb.ImportResponse, error) {
	st, err := c.Import(ctx)
	if err != nil {
		return nil, err
	}
	if err := st.Send(first); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
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
				return nil, err
			}
			p.Add(uint64(n))
		}
		if errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF) {
			break
		}
		if rerr != nil {
			return nil, fmt.Errorf("import: read: %w", rerr)
		}
	}
	return st.CloseAndRecv()
}
