package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	pb "segmap/api/segmapv1"
	"segmap/internal/size"
)

// errorCommands returns `disk set-error` and `disk clear-errors`.
func errorCommands(g *globals) []*cobra.Command {
	var offset, length string
	setError := &cobra.Command{
		Use:   "set-error NAME --offset OFFSET --length LENGTH",
		Short: "make whole segments of a disk fail every read and write (for testing hosts)",
		Long: `set-error makes [OFFSET, OFFSET+LENGTH) of disk NAME fail every read and
write with EIO, on every agent and at once, as dm-flakey does: for testing
how hosts and their file systems take I/O errors. OFFSET and LENGTH must
be whole segments (see disk info). The failing range stays so across
restarts and shows in 'disk info' and 'check'. The data there is dropped
(snapshots taken before keep theirs): 'disk clear-errors' makes the range
read as zeros, and so does a trim or write-zeroes of whole segments.
Read-only disks (snapshots) are refused.`,
		Args: exactArgs(1, "one disk name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if offset == "" || length == "" {
				return usageError{fmt.Errorf("--offset and --length are required")}
			}
			off, err := parseSize("offset", offset)
			if err != nil {
				return err
			}
			n, err := parseSize("length", length)
			if err != nil {
				return err
			}
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				d, err := c.SetDiskError(ctx, &pb.SetDiskErrorRequest{Name: args[0], Offset: off, Length: n})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), d)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "disk %s fails I/O at %s\n", d.Name, extentList(d.ErrorExtents))
				return nil
			})
		},
	}
	setError.Flags().StringVar(&offset, "offset", "", "first byte (a multiple of the segment size; suffixes K, M, G, T)")
	setError.Flags().StringVar(&length, "length", "", "bytes (a multiple of the segment size)")

	clearErrors := &cobra.Command{
		Use:   "clear-errors NAME",
		Short: "make a disk's failing segments read as zeros (their data is declared lost)",
		Long: `clear-errors turns every failing (Error) segment of disk NAME into zeros:
the disk is whole again, every byte readable and writable, and what those
segments held is declared lost. Use it when the container they were on is
gone for good; when it comes back, bring it online instead.`,
		Args: exactArgs(1, "one disk name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				r, err := c.ClearDiskErrors(ctx, &pb.ClearDiskErrorsRequest{Name: args[0]})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), r)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "disk %s: %s of failing segments now read as zeros\n", args[0], size.Format(r.ClearedBytes))
				return nil
			})
		},
	}
	return []*cobra.Command{setError, clearErrors}
}

// extentList formats extents as "OFFSET+LENGTH, ...", "none" if empty.
func extentList(exts []*pb.Extent) string {
	if len(exts) == 0 {
		return "none"
	}
	s := ""
	for i, x := range exts {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprintf("%d+%d", x.Offset, x.Length)
	}
	return s
}

// printDiskErrors prints check's list of disks with failing extents.
func printDiskErrors(w io.Writer, des []*pb.DiskErrors) {
	for _, de := range des {
		var n uint64
		for _, x := range de.Extents {
			n += x.Length
		}
		fmt.Fprintf(w, "check: disk %s fails I/O on %s (Error) at %s\n", de.Disk, size.Format(n), extentList(de.Extents))
	}
}
