package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	pb "segmap/api/segmapv1"
	"segmap/internal/controller"
	"segmap/internal/disktree"
	"segmap/internal/progress"
	"segmap/internal/size"
)

// lineageCommands returns the disk commands that act on a disk's lineage:
// rollback, rename, set and tree.
func lineageCommands(g *globals) []*cobra.Command {
	var to string
	rollback := &cobra.Command{
		Use:   "rollback DISK --to SNAP",
		Short: "make a disk's contents a snapshot's, in place (later snapshots stay)",
		Long: `rollback makes DISK read what its snapshot SNAP holds, in place: DISK
keeps its name and identity, hosts keep their NBD connections open and
read SNAP's data from then on, and every snapshot (SNAP, and any taken
after it) stays as it was. Like a snapshot it copies table pages, not
data; the space only DISK's current contents held is freed. DISK takes
SNAP's size. SNAP must be a read-only snapshot of DISK's lineage.

Writes in flight when it starts finish first; stop the writers (unmount
the filesystem) before, as with any restore, or they see their disk
change under them.`,
		Args: exactArgs(1, "one disk name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return usageError{fmt.Errorf("--to SNAP is required")}
			}
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				d, err := c.RollbackDisk(ctx, &pb.RollbackDiskRequest{Name: args[0], To: to})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), d)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "rolled back disk %s to %s (%s)\n", d.Name, to, size.Format(d.Size))
				return nil
			})
		},
	}
	rollback.Flags().StringVar(&to, "to", "", "the snapshot to roll back to")

	rename := &cobra.Command{
		Use: "rename OLD NEW", Short: "rename a disk (its snapshots, clones and grants stay)", Args: exactArgs(2, "the disk's name and its new name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				d, err := c.RenameDisk(ctx, &pb.RenameDiskRequest{Name: args[0], NewName: args[1]})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), d)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "renamed disk %s to %s\n", args[0], d.Name)
				return nil
			})
		},
	}

	var ro string
	set := &cobra.Command{
		Use:   "set NAME --read-only=true|false",
		Short: "freeze a disk (read-only) or promote a snapshot to writable",
		Args:  exactArgs(1, "one disk name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if ro == "" {
				return usageError{fmt.Errorf("nothing to set: give --read-only=true or --read-only=false")}
			}
			v, err := strconv.ParseBool(ro)
			if err != nil {
				return usageError{fmt.Errorf("--read-only %q: want true or false", ro)}
			}
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				d, err := c.SetDisk(ctx, &pb.SetDiskRequest{Name: args[0], ReadOnly: &v})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), d)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "disk %s is %s\n", d.Name, map[bool]string{true: "read-only", false: "writable"}[d.ReadOnly])
				return nil
			})
		},
	}
	set.Flags().StringVar(&ro, "read-only", "", "true: refuse writes; false: accept them")

	tree := &cobra.Command{
		Use:   "tree [NAME]",
		Short: "show disks, their snapshots and clones as a tree (NAME's lineage only)",
		Long: `tree shows where each disk came from: a snapshot or clone under the disk
it was taken from, in order of creation. With NAME, only NAME's lineage
(from the disk it all started from) is shown. A disk whose origin was
deleted starts a tree of its own. With --json, a list of trees:
{"name", "read_only", "size", "created_unix_nano", "children": [...]}.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 1 {
				return usageError{fmt.Errorf("tree wants at most one disk name")}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				r, err := c.ListDisks(ctx, &pb.ListDisksRequest{})
				if err != nil {
					return err
				}
				roots := lineage(r.Disks)
				if len(args) == 1 {
					root := rootOf(roots, args[0])
					if root == nil {
						return fmt.Errorf("disk %q: not found", args[0])
					}
					roots = []*treeNode{root}
				}
				if g.json {
					enc := json.NewEncoder(cmd.OutOrStdout())
					enc.SetIndent("", "  ")
					return enc.Encode(roots)
				}
				for _, n := range roots {
					printTree(cmd.OutOrStdout(), n, "", "")
				}
				return nil
			})
		},
	}
	var pf progressFlags
	flatten := &cobra.Command{
		Use:   "flatten NAME [--progress|--no-progress]",
		Short: "give a clone storage of its own: it stops sharing with its origin (online)",
		Long: `flatten copies every segment the writable disk NAME shares with the other
disks of its lineage (its origin snapshot, their clones) to storage of its
own, one segment at a time, while hosts keep reading and writing it. It
then no longer depends on its origin: deleting the origin's snapshots
frees what they hold, and 'disk tree' shows NAME on its own. It takes the
space of what it copies. Interrupted, it can be run again: it copies what
is still shared.
` + progressHelp,
		Args: exactArgs(1, "one disk name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			pr, err := pf.reporter(cmd, g, controller.OpFlatten, "disk "+args[0], progress.Segments)
			if err != nil {
				return err
			}
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				st, err := c.FlattenDisk(ctx, &pb.FlattenDiskRequest{Name: args[0]})
				if err != nil {
					return err
				}
				start := time.Now()
				var last *pb.FlattenProgress
				for {
					p, err := st.Recv()
					if errors.Is(err, io.EOF) {
						break
					}
					if err != nil {
						pr.Finish(err)
						return err
					}
					last = p
					pr.Update(p.Done, p.Total)
				}
				pr.Finish(nil)
				if last == nil {
					return fmt.Errorf("flatten %s: the controller sent no progress", args[0])
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), last)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "flattened disk %s (%d segments) in %v\n", args[0], last.Total, time.Since(start).Round(time.Millisecond))
				return nil
			})
		},
	}
	pf.add(flatten)
	return []*cobra.Command{rollback, rename, set, tree, flatten}
}

// treeNode is a disk in `disk tree`.
type treeNode struct {
	Name     string      `json:"name"`
	ReadOnly bool        `json:"read_only"`
	Size     uint64      `json:"size"`
	Created  int64       `json:"created_unix_nano"`
	Children []*treeNode `json:"children"`
}

// lineage arranges disks into trees by origin (disktree.Build).
func lineage(disks []*pb.Disk) []*treeNode {
	return treeNodes(disktree.Build(disks))
}

// treeNodes returns the `disk tree` nodes of trees ns.
func treeNodes(ns []*disktree.Node) []*treeNode {
	out := make([]*treeNode, 0, len(ns))
	for _, n := range ns {
		d := n.Disk
		out = append(out, &treeNode{Name: d.Name, ReadOnly: d.ReadOnly, Size: d.Size, Created: d.CreatedUnixNano, Children: treeNodes(n.Children)})
	}
	return out
}

// rootOf returns the root of the tree that holds name, or nil.
func rootOf(roots []*treeNode, name string) *treeNode {
	var has func(n *treeNode) bool
	has = func(n *treeNode) bool {
		return n.Name == name || slices.ContainsFunc(n.Children, has)
	}
	for _, r := range roots {
		if has(r) {
			return r
		}
	}
	return nil
}

// printTree prints n and its children, first prefixing n's line with
// lead and its children's lines with indent.
func printTree(w io.Writer, n *treeNode, lead, indent string) {
	kind := "writable"
	if n.ReadOnly {
		kind = "snapshot"
	}
	fmt.Fprintf(w, "%s%s  (%s, %s)\n", lead, n.Name, kind, size.Format(n.Size))
	for i, c := range n.Children {
		if i == len(n.Children)-1 {
			printTree(w, c, indent+"└── ", indent+"    ")
		} else {
			printTree(w, c, indent+"├── ", indent+"│   ")
		}
	}
}
