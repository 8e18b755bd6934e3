package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	pb "segmap/api/segmapv1"
	"segmap/internal/controller"
	"segmap/internal/ha"
	"segmap/internal/offlinecheck"
	"segmap/internal/progress"
	"segmap/internal/rpc/adminapi"
	"segmap/internal/size"
	"segmap/internal/tlsconf"
)

// dial connects to the admin API and returns a client, a context bounded
// by --timeout, and a function that releases both.
func (g *globals) dial() (pb.AdminClient, context.Context, func(), error) {
	d, err := time.ParseDuration(g.timeout)
	if err != nil || d <= 0 {
		return nil, nil, nil, usageError{fmt.Errorf("--timeout %q: want a duration such as 30s", g.timeout)}
	}
	addrs, err := ha.ParseAddrs(g.controller)
	if err != nil {
		return nil, nil, nil, usageError{fmt.Errorf("--controller: %w", err)}
	}
	for i, target := range addrs {
		if strings.HasPrefix(target, "unix:") && !strings.HasPrefix(target, "unix://") {
			// grpc wants unix:ABSPATH or unix://ABSPATH.
			p, err := filepath.Abs(strings.TrimPrefix(target, "unix:"))
			if err != nil {
				return nil, nil, nil, err
			}
			addrs[i] = "unix:" + p
		}
	}
	creds, err := g.tls.client(tlsconf.RoleAdmin, tlsconf.RoleAdmin, false)
	if err != nil {
		return nil, nil, nil, err
	}
	// A controller host that is down must not stall the command for
	// gRPC's default 20 s connect timeout before the next is tried.
	conn, err := ha.Dial(addrs, append(adminapi.DialOptions(), grpc.WithTransportCredentials(creds),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.DefaultConfig, MinConnectTimeout: 2 * time.Second}))...)
	if err != nil {
		return nil, nil, nil, err
	}
	// Say soon that no controller is there; while standbys answer (an
	// election), wait for the leader.
	conn.GiveUp = 2 * time.Second
	var ctx context.Context
	var cancel context.CancelFunc
	if g.noDeadline {
		ctx, cancel = context.WithCancel(context.Background())
	} else {
		ctx, cancel = context.WithTimeout(context.Background(), d)
	}
	return pb.NewAdminClient(conn), ctx, func() { cancel(); conn.Close() }, nil
}

// call runs fn against the admin API, with the connection error made
// readable.
func (g *globals) call(fn func(ctx context.Context, c pb.AdminClient) error) error {
	c, ctx, done, err := g.dial()
	if err != nil {
		return err
	}
	defer done()
	err = fn(ctx, c)
	var ce codeError
	if err == nil || errors.As(err, &ce) {
		return err
	}
	msg := err.Error()
	if st, ok := status.FromError(err); ok {
		msg = st.Message()
	}
	switch {
	case strings.Contains(msg, "connection refused"):
		return fmt.Errorf("no segmap controller at %s (start one with 'segmap up', or pass --controller)", g.controller)
	case g.tls.certs == "" && (strings.Contains(msg, "EOF") || strings.Contains(msg, "handshake") || strings.Contains(msg, "preface")):
		return fmt.Errorf("%s (the controller at %s closed the connection: it may have stopped, or it may require TLS: pass --certs DIR)", msg, g.controller)
	}
	return errors.New(msg)
}

// printJSON writes messages as JSON: one object, or an array.
func printJSON(w io.Writer, msgs ...proto.Message) error {
	opts := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}
	var raw []json.RawMessage
	for _, m := range msgs {
		b, err := opts.Marshal(m)
		if err != nil {
			return err
		}
		raw = append(raw, b)
	}
	var v any = raw
	if len(raw) == 1 {
		v = raw[0]
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, string(b))
	return err
}

// table prints rows under a header, aligned.
func table(w io.Writer, header []string, rows [][]string) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

func policyName(p pb.Policy) string {
	if p == pb.Policy_POLICY_REVERSE {
		return "reverse"
	}
	return "forward"
}

func parsePolicy(s string) (pb.Policy, error) {
	switch s {
	case "forward", "forward-delta":
		return pb.Policy_POLICY_FORWARD, nil
	case "reverse", "reverse-delta":
		return pb.Policy_POLICY_REVERSE, nil
	}
	return 0, usageError{fmt.Errorf("--policy %q: want forward or reverse", s)}
}

func parseSize(flag, s string) (uint64, error) {
	n, err := size.Parse(s)
	if err != nil {
		return 0, usageError{fmt.Errorf("--%s: %w", flag, err)}
	}
	return n, nil
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func mode(ro bool) string {
	if ro {
		return "ro"
	}
	return "rw"
}

func diskRows(ds []*pb.Disk) [][]string {
	var rows [][]string
	for _, d := range ds {
		held := "-" // a snapshot: what it holds alone is its EXCLUSIVE
		if !d.ReadOnly {
			held = size.Format(d.SnapshotsHold)
		}
		rows = append(rows, []string{
			d.Name, size.Format(d.Size), size.Format(d.SegmentSize), policyName(d.Policy), mode(d.ReadOnly),
			size.Format(d.Allocated), size.Format(d.Exclusive), size.Format(d.Shared), held, orDash(d.Origin),
		})
	}
	return rows
}

// diskHeader: HELD-BY-SNAPS is, on a writable disk's row, what only the
// snapshots of its family hold (what deleting them all gives back), as
// ZFS's USEDSNAP.
var diskHeader = []string{"NAME", "SIZE", "SEGMENT", "POLICY", "MODE", "ALLOCATED", "EXCLUSIVE", "SHARED", "HELD-BY-SNAPS", "ORIGIN"}

// allocatedCell is a container's allocated bytes, or "unknown".
func allocatedCell(ct *pb.Container) string {
	if ct.AllocatedBytes == nil {
		return "unknown"
	}
	return size.Format(*ct.AllocatedBytes)
}

func newDisk(g *globals) *cobra.Command {
	disk := &cobra.Command{Use: "disk", Short: "create, list, inspect, resize and delete disks"}

	var sizeS, segS, policy string
	var agents []string
	var prealloc bool
	var createPF progressFlags
	create := &cobra.Command{
		Use:   "create NAME --size SIZE [--segment-size SIZE] [--policy forward|reverse] [--preallocate [--progress|--no-progress]]",
		Short: "create a thin disk (instant at any size; nothing is allocated until written)",
		Long: `create creates a disk. It is thin: instant at any size, every segment
reads as zeros and a slot is allocated on its first write. With
--preallocate every segment gets a zeroed slot now (a thick disk: no
write to it ever waits for an allocation), which takes a while for a
large disk; its progress is shown in segments.
` + progressHelp,
		Args: exactArgs(1, "one disk name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if sizeS == "" {
				return usageError{fmt.Errorf("--size is required (e.g. --size 10G)")}
			}
			n, err := parseSize("size", sizeS)
			if err != nil {
				return err
			}
			var seg uint64
			if segS != "" {
				if seg, err = parseSize("segment-size", segS); err != nil {
					return err
				}
			}
			pol, err := parsePolicy(policy)
			if err != nil {
				return err
			}
			req := &pb.CreateDiskRequest{Name: args[0], Size: n, SegmentSize: seg, Policy: pol, Agents: agents, Preallocate: prealloc}
			var pr *progress.Reporter
			if prealloc {
				if pr, err = createPF.reporter(cmd, g, controller.OpPreallocate, "disk "+args[0], progress.Segments); err != nil {
					return err
				}
				// A preallocation takes as long as its slots take.
				g.noDeadline = true
			}
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				var d *pb.Disk
				var err error
				if prealloc {
					d, err = createWithProgress(ctx, c, req, pr)
				} else {
					d, err = c.CreateDisk(ctx, req)
				}
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), d)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "created disk %s: %s in %s segments, %s copy-on-write\n", d.Name, size.Format(d.Size), size.Format(d.SegmentSize), policyName(d.Policy))
				return nil
			})
		},
	}
	create.Flags().StringVar(&sizeS, "size", "", "disk size: 512M, 10G, 1T ... (a multiple of 512 bytes)")
	create.Flags().StringVar(&segS, "segment-size", "", "segment size, a power of two from 64K to 64M (default 1M)")
	create.Flags().StringVar(&policy, "policy", "forward", "copy-on-write policy for shared segments: forward or reverse")
	create.Flags().StringSliceVar(&agents, "agent", nil, "agents (hosts) allowed to map the disk; repeat or comma-separate (default: any agent)")
	create.Flags().BoolVar(&prealloc, "preallocate", false, "allocate a zeroed slot for every segment now (a thick disk: no write faults to allocate)")
	createPF.add(create)

	list := &cobra.Command{
		Use: "list", Short: "list disks with their space usage", Args: noArgs,
		Long: `list shows every disk with its space usage, in bytes of segments:

  ALLOCATED      segments that hold a slot
  EXCLUSIVE      slots only this disk references (deleting it frees them)
  SHARED         slots it shares with its snapshots or clones
  HELD-BY-SNAPS  on a writable disk, the slots that only the snapshots of
                 its family (the disk, its snapshots and clones) reference:
                 what deleting every snapshot of the family gives back
                 (of a slot written in part, the part written)
                 ("-" on a snapshot: what it alone holds is its EXCLUSIVE)

With --json the same figures are snapshots_hold, allocated, exclusive and
shared, in bytes.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				r, err := c.ListDisks(ctx, &pb.ListDisksRequest{})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), r)
				}
				return table(cmd.OutOrStdout(), diskHeader, diskRows(r.Disks))
			})
		},
	}

	info := &cobra.Command{
		Use: "info NAME", Short: "show a disk: size, allocated, exclusive and shared bytes, origin", Args: exactArgs(1, "one disk name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				d, err := c.GetDisk(ctx, &pb.GetDiskRequest{Name: args[0]})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), d)
				}
				w := cmd.OutOrStdout()
				fmt.Fprintf(w, "name:         %s\n", d.Name)
				fmt.Fprintf(w, "size:         %s (%d bytes)\n", size.Format(d.Size), d.Size)
				fmt.Fprintf(w, "segment size: %s\n", size.Format(d.SegmentSize))
				fmt.Fprintf(w, "policy:       %s\n", policyName(d.Policy))
				fmt.Fprintf(w, "mode:         %s\n", map[bool]string{true: "read-only", false: "read-write"}[d.ReadOnly])
				fmt.Fprintf(w, "allocated:    %s (%d bytes)\n", size.Format(d.Allocated), d.Allocated)
				fmt.Fprintf(w, "exclusive:    %s (%d bytes)\n", size.Format(d.Exclusive), d.Exclusive)
				fmt.Fprintf(w, "shared:       %s (%d bytes)\n", size.Format(d.Shared), d.Shared)
				if !d.ReadOnly {
					fmt.Fprintf(w, "held by snapshots of its family: %s (%d bytes)\n", size.Format(d.SnapshotsHold), d.SnapshotsHold)
				}
				fmt.Fprintf(w, "origin:       %s\n", orDash(d.Origin))
				if d.AllAgents {
					fmt.Fprintf(w, "agents:       any\n")
				} else {
					fmt.Fprintf(w, "agents:       %s\n", orDash(strings.Join(d.Agents, ", ")))
				}
				fmt.Fprintf(w, "created:      %s\n", time.Unix(0, d.CreatedUnixNano).UTC().Format(time.RFC3339))
				if len(d.ErrorExtents) > 0 {
					fmt.Fprintf(w, "failing I/O:  %s (Error; see disk clear-errors)\n", extentList(d.ErrorExtents))
				}
				return nil
			})
		},
	}

	var newSize string
	var shrink bool
	resize := &cobra.Command{
		Use: "resize NAME --size SIZE [--shrink]", Short: "grow a disk (new space reads as zeros); shrinking needs --shrink", Args: exactArgs(1, "one disk name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if newSize == "" {
				return usageError{fmt.Errorf("--size is required")}
			}
			n, err := parseSize("size", newSize)
			if err != nil {
				return err
			}
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				d, err := c.ResizeDisk(ctx, &pb.ResizeDiskRequest{Name: args[0], Size: n, Shrink: shrink})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), d)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "disk %s is now %s\n", d.Name, size.Format(d.Size))
				return nil
			})
		},
	}
	resize.Flags().StringVar(&newSize, "size", "", "the new size")
	resize.Flags().BoolVar(&shrink, "shrink", false, "allow making the disk smaller (data past the new end is lost)")

	var dryRun bool
	del := &cobra.Command{
		Use: "delete NAME [--dry-run]", Short: "delete a disk; the space only it holds returns to the pool", Args: exactArgs(1, "one disk name"),
		Long: `delete deletes a disk or a snapshot. The slots only it references return to
the pool; those it shares with its snapshots or clones stay theirs. It
costs the table pages only the disk holds, not its data. --dry-run
deletes nothing and says how much would come back. A delete may then let
another disk's partly rewritten segments (written in sub-blocks over a
slot the deleted disk shared) be merged, which gives back a little more.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				r, err := c.DeleteDisk(ctx, &pb.DeleteDiskRequest{Name: args[0], DryRun: dryRun})
				if err != nil {
					return err
				}
				switch {
				case g.json:
					return printJSON(cmd.OutOrStdout(), r)
				case dryRun:
					fmt.Fprintf(cmd.OutOrStdout(), "deleting disk %s would free %s (%d bytes)\n", args[0], size.Format(r.FreedBytes), r.FreedBytes)
				default:
					fmt.Fprintf(cmd.OutOrStdout(), "deleted disk %s, freed %s (%d bytes)\n", args[0], size.Format(r.FreedBytes), r.FreedBytes)
				}
				return nil
			})
		},
	}
	del.Flags().BoolVar(&dryRun, "dry-run", false, "delete nothing; say how many bytes a delete would free")
	var all bool
	grant := &cobra.Command{
		Use: "grant NAME AGENT... | grant NAME --all", Short: "let agents (hosts) map a disk",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 1 || len(args) == 1 && !all {
				return usageError{fmt.Errorf("grant wants a disk and agents (or --all)")}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.changeGrants(cmd, func(ctx context.Context, c pb.AdminClient) (*pb.Disk, error) {
				return c.Grant(ctx, &pb.GrantRequest{Name: args[0], Agents: args[1:], All: all})
			})
		},
	}
	grant.Flags().BoolVar(&all, "all", false, "let any agent map the disk")
	revoke := &cobra.Command{
		Use: "revoke NAME AGENT...", Short: "take a disk away from agents (an agent that maps it forgets it at once)",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 2 {
				return usageError{fmt.Errorf("revoke wants a disk and agents")}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.changeGrants(cmd, func(ctx context.Context, c pb.AdminClient) (*pb.Disk, error) {
				return c.Revoke(ctx, &pb.GrantRequest{Name: args[0], Agents: args[1:]})
			})
		},
	}
	diff := &cobra.Command{
		Use:   "diff FROM TO",
		Short: "the extents in which two disks of one family differ (a snapshot and its disk, two snapshots)",
		Long: `diff prints the byte extents in which two disks of one family (a disk,
its snapshots and clones) differ, from their mapping tables alone: no data
is read, and the time grows with the table pages that differ, not with
the disks.

A segment whose entries differ counts whole, except where a small write
into a shared segment changed only some of its sub-blocks (1/256 of the
segment, at least 4 KiB): then only those. NoWrite alone is no change; a
segment rewritten with the bytes it held counts as changed. Where the
sizes differ, the bytes past the smaller size count as changed.

One extent a line (offset and length in bytes, then in binary units),
then the total. With --json, an array: [{"offset":N,"length":N}, ...].`,
		Args: exactArgs(2, "two disk names, FROM and TO"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				r, err := diffAll(ctx, c, &pb.DiffDisksRequest{From: args[0], To: args[1]})
				if err != nil {
					return err
				}
				return printDiff(cmd.OutOrStdout(), r, g.json)
			})
		},
	}
	disk.AddCommand(create, list, info, resize, del, grant, revoke, diff)
	disk.AddCommand(lineageCommands(g)...)
	disk.AddCommand(errorCommands(g)...)
	return disk
}

// createWithProgress creates a disk through CreateDiskProgress, showing
// its preallocation on pr, and returns the disk.
func createWithProgress(ctx context.Context, c pb.AdminClient, req *pb.CreateDiskRequest, pr *progress.Reporter) (*pb.Disk, error) {
	st, err := c.CreateDiskProgress(ctx, req)
	if err != nil {
		return nil, err
	}
	for {
		p, err := st.Recv()
		if errors.Is(err, io.EOF) {
			err = fmt.Errorf("create disk %s: the controller sent no disk", req.Name)
		}
		if err != nil {
			pr.Finish(err)
			return nil, err
		}
		pr.Update(p.Done, p.Total)
		if p.Disk != nil {
			pr.Finish(nil)
			return p.Disk, nil
		}
	}
}

// diffAll asks for a diff page by page (a response holds a bounded
// number of extents) and returns the pages as one response.
func diffAll(ctx context.Context, c pb.AdminClient, req *pb.DiffDisksRequest) (*pb.DiffDisksResponse, error) {
	all := &pb.DiffDisksResponse{}
	for {
		r, err := c.DiffDisks(ctx, req)
		if err != nil {
			return nil, err
		}
		all.Extents = append(all.Extents, r.Extents...)
		all.ChangedBytes += r.ChangedBytes
		all.FromSize, all.ToSize, all.SegmentSize = r.FromSize, r.ToSize, r.SegmentSize
		if r.NextOffset == 0 {
			return all, nil
		}
		if r.NextOffset <= req.Offset {
			return nil, fmt.Errorf("diff: the controller asked to go on from %d, not past %d", r.NextOffset, req.Offset)
		}
		if req.Length > 0 {
			req.Length -= r.NextOffset - req.Offset // the same end
		}
		req.Offset = r.NextOffset
	}
}

// diffExtent is the JSON form of one extent of disk diff: a stable
// array of these, numbers as numbers (protojson would quote uint64s).
type diffExtent struct {
	Offset uint64 `json:"offset"`
	Length uint64 `json:"length"`
}

// printDiff prints what disk diff found: one extent a line and the
// total, or a JSON array of extents.
func printDiff(w io.Writer, r *pb.DiffDisksResponse, asJSON bool) error {
	if asJSON {
		out := make([]diffExtent, len(r.Extents))
		for i, x := range r.Extents {
			out[i] = diffExtent{Offset: x.Offset, Length: x.Length}
		}
		b, err := json.Marshal(out)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintln(w, string(b))
		return err
	}
	rows := make([][]string, len(r.Extents))
	for i, x := range r.Extents {
		rows[i] = []string{
			fmt.Sprint(x.Offset), fmt.Sprint(x.Length),
			exactSize(x.Offset) + ".." + exactSize(x.Offset+x.Length), exactSize(x.Length),
		}
	}
	if len(rows) > 0 {
		if err := table(w, []string{"OFFSET", "LENGTH", "RANGE", "SIZE"}, rows); err != nil {
			return err
		}
	}
	noun := "extents"
	if len(r.Extents) == 1 {
		noun = "extent"
	}
	_, err := fmt.Fprintf(w, "total: %d %s, %s changed (%d bytes) of %s\n", len(r.Extents), noun,
		size.Format(r.ChangedBytes), r.ChangedBytes, size.Format(max(r.FromSize, r.ToSize)))
	return err
}

// exactSize writes n in the largest binary unit that divides it (5M,
// 5124K, 1536), so that an extent's ends read exactly.
func exactSize(n uint64) string {
	for _, u := range []struct {
		shift  uint
		suffix string
	}{{40, "T"}, {30, "G"}, {20, "M"}, {10, "K"}} {
		if n >= 1<<u.shift && n%(1<<u.shift) == 0 {
			return fmt.Sprintf("%d%s", n>>u.shift, u.suffix)
		}
	}
	return fmt.Sprint(n)
}

// changeGrants runs a grant or revoke and prints the disk's agents.
func (g *globals) changeGrants(cmd *cobra.Command, fn func(context.Context, pb.AdminClient) (*pb.Disk, error)) error {
	return g.call(func(ctx context.Context, c pb.AdminClient) error {
		d, err := fn(ctx, c)
		if err != nil {
			return err
		}
		if g.json {
			return printJSON(cmd.OutOrStdout(), d)
		}
		fmt.Fprintf(cmd.OutOrStdout(), "disk %s: agents %s\n", d.Name, agentList(d))
		return nil
	})
}

func agentList(d *pb.Disk) string {
	if d.AllAgents {
		return "any"
	}
	return orDash(strings.Join(d.Agents, ", "))
}

func newSnapshot(g *globals) *cobra.Command {
	var name string
	var writable, group bool
	var quiesce time.Duration
	cmd := &cobra.Command{
		Use:   "snapshot SRC [--name NAME] [--writable] | snapshot --group D1 D2 ... [--name NAME]",
		Short: "snapshot a disk, or several at one consistent point in time (--group)",
		Long: `snapshot copies a disk's mapping table, not its data: it is instant and
shares every segment with the source until one of them is written.

  segmap snapshot vm1                    read-only snapshot vm1@YYYYMMDD-HHMMSS
  segmap snapshot vm1 --name vm1-gold    named snapshot
  segmap snapshot vm1-gold --name vm2 --writable   a writable clone
  segmap snapshot --group db-data db-log --name nightly
                                          db-data@nightly and db-log@nightly,
                                          consistent with each other`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return usageError{fmt.Errorf("snapshot wants a source disk (or --group and several)")}
			}
			if !group && len(args) > 1 {
				return usageError{fmt.Errorf("several sources need --group (one consistent point in time across all of them)")}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &pb.SnapshotRequest{Sources: args, Writable: writable, QuiesceTimeoutMs: uint32(quiesce / time.Millisecond)}
			if name != "" {
				if group {
					for _, s := range args {
						req.Names = append(req.Names, s+"@"+name)
					}
				} else {
					req.Names = []string{name}
				}
			}
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				r, err := c.Snapshot(ctx, req)
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), r)
				}
				for _, d := range r.Disks {
					kind := "snapshot"
					if !d.ReadOnly {
						kind = "clone"
					}
					fmt.Fprintf(cmd.OutOrStdout(), "%s %s of %s\n", kind, d.Name, d.Origin)
				}
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "the snapshot's name (with --group: a suffix, giving SRC@NAME)")
	cmd.Flags().BoolVar(&writable, "writable", false, "make a writable clone instead of a read-only snapshot")
	cmd.Flags().BoolVar(&group, "group", false, "snapshot all the given disks at one consistent point in time")
	cmd.Flags().DurationVar(&quiesce, "quiesce-timeout", 0, "how long a group snapshot waits for in-flight I/O (default 30s)")
	return cmd
}

func newContainer(g *globals) *cobra.Command {
	ctr := &cobra.Command{Use: "container", Short: "list, add, drain and remove storage containers"}
	list := &cobra.Command{
		Use: "list", Short: "list storage containers and their use", Args: noArgs,
		Long: `list shows every container: its state, its slots, the slots in use (USED,
and USED-BYTES: USED x SLOT) and ALLOCATED, what its backing holds on
storage, header included (a file's allocated blocks, what du counts): less
than USED-BYTES where slots are sparse. ALLOCATED is "unknown" for an
nbd:// container or a block device (--json: allocated_bytes absent).

STATE is online (new slots are allocated on it), draining (none are: a
drain is moving its slots away, or stopped and can be run again) or
failed. A removed container is not listed. A mirrored container is listed
with its replicas under it, each healthy, failed or rebuilding.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				r, err := c.ListContainers(ctx, &pb.ListContainersRequest{})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), r)
				}
				var rows [][]string
				for _, ct := range r.Containers {
					uri := ct.Uri
					if len(ct.Replicas) > 0 {
						uri = fmt.Sprintf("mirror of %d (epoch %d)", len(ct.Replicas), ct.Epoch)
					}
					rows = append(rows, []string{fmt.Sprint(ct.Id), uri, ct.State, size.Format(ct.SlotSize), fmt.Sprint(ct.Slots),
						fmt.Sprint(ct.UsedSlots), size.Format(ct.Slots * ct.SlotSize), size.Format(ct.UsedSlots * ct.SlotSize), allocatedCell(ct)})
					for _, rp := range ct.Replicas {
						rows = append(rows, []string{"", "  " + rp.Uri, rp.State, "", "", "", "", "", ""})
					}
				}
				return table(cmd.OutOrStdout(), []string{"ID", "URI", "STATE", "SLOT", "SLOTS", "USED", "SIZE", "USED-BYTES", "ALLOCATED"}, rows)
			})
		},
	}
	var slotS, sizeS string
	var format, force bool
	var mirror []string
	add := &cobra.Command{
		Use:   "add PATH|URI [--size SIZE --slot-size SIZE] | add DEVICE|PATH|nbd://HOST:PORT/EXPORT --format [--slot-size SIZE] [--force] | add --mirror URI1,URI2[,URI3] [--format|--size SIZE] [--slot-size SIZE]",
		Short: "add a storage container (--size: create a new container file first; --format: write a container header onto a block device, file or NBD export first)",
		Long: `add registers a container with the controller. With --size, the controller
creates a new sparse container file at PATH first. With --format, it writes
a container header onto what is already there: a block device (/dev/sdb,
/dev/loop0, /dev/disk/by-id/...), an existing file, or an NBD export
(nbd://HOST:PORT/EXPORT, such as one a 'segmap storage' node serves); the
target's size gives the slots, (size - 1 MiB header) / slot size. Paths
are the controller's: it opens them, and so must every agent.

--format refuses a target that already holds a file system (ext2/3/4, XFS,
btrfs, FAT, NTFS), a partition table (MBR, GPT), a swap area, an LVM or
LUKS volume, or a segmap container header, and names what it found;
--force formats over it, destroying it. A block device that is mounted or
in use by the kernel is refused even with --force.

--mirror makes one container out of two or three replicas, each an nbd://
export on its own storage node (or a file or device): every write goes to
all of them, reads to one, and the mirror goes on when one fails. With
--format (or --size, for new files) each replica is formatted with the
same container id; without, they must have been formatted together.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(mirror) > 0 {
				return exactArgs(0, "no path: --mirror names the replicas")(cmd, args)
			}
			return exactArgs(1, "one path or URI")(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &pb.AddContainerRequest{Force: force}
			if len(args) > 0 {
				req.Uri = args[0]
			}
			absURI := func(u string) (string, error) {
				if strings.Contains(u, "://") {
					return u, nil
				}
				p, err := filepath.Abs(u)
				if err != nil {
					return "", err
				}
				return "file://" + p, nil
			}
			for _, u := range mirror {
				a, err := absURI(u)
				if err != nil {
					return err
				}
				req.Mirror = append(req.Mirror, a)
			}
			if req.Uri != "" {
				var err error
				if req.Uri, err = absURI(req.Uri); err != nil {
					return err
				}
			}
			if force && !format {
				return usageError{fmt.Errorf("--force is for --format")}
			}
			if format {
				if sizeS != "" {
					return usageError{fmt.Errorf("--format takes the size of the device, file or export; --size is for a new file")}
				}
				slot, err := parseSize("slot-size", slotS)
				if err != nil {
					return err
				}
				req.SlotSize = slot
			} else if sizeS != "" {
				total, err := parseSize("size", sizeS)
				if err != nil {
					return err
				}
				slot, err := parseSize("slot-size", slotS)
				if err != nil {
					return err
				}
				if slot == 0 || total < slot {
					return usageError{fmt.Errorf("--size %s holds no %s slot", sizeS, slotS)}
				}
				req.SlotSize, req.Slots = slot, total/slot
			}
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				ct, err := c.AddContainer(ctx, req)
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), ct)
				}
				if len(ct.Replicas) > 0 {
					fmt.Fprintf(cmd.OutOrStdout(), "added mirrored container %d: %d replicas, %d slots of %s\n", ct.Id, len(ct.Replicas), ct.Slots, size.Format(ct.SlotSize))
					return nil
				}
				fmt.Fprintf(cmd.OutOrStdout(), "added container %d: %s, %d slots of %s\n", ct.Id, ct.Uri, ct.Slots, size.Format(ct.SlotSize))
				return nil
			})
		},
	}
	add.Flags().StringVar(&sizeS, "size", "", "create a new container file of this size")
	add.Flags().BoolVar(&format, "format", false, "write a new container header onto the block device, file or NBD export (its contents are lost)")
	add.Flags().BoolVar(&force, "force", false, "with --format: format even over a file system, partition table or container found there")
	add.Flags().StringVar(&slotS, "slot-size", "1M", "slot size of a new container (the segment size of the disks it serves)")
	add.Flags().StringSliceVar(&mirror, "mirror", nil, "make a mirrored container of these two or three replicas (comma-separated URIs or paths)")
	ctr.AddCommand(list, add, newContainerDrain(g), newContainerRemove(g), newContainerOnline(g), newReplaceReplica(g), newRebuildReplica(g))
	return ctr
}

// containerID parses a container id argument.
func containerID(arg string) (uint32, error) {
	id, err := strconv.ParseUint(arg, 10, 32)
	if err != nil || id == 0 {
		return 0, usageError{fmt.Errorf("container id %q: want a number from 'segmap container list'", arg)}
	}
	return uint32(id), nil
}

func newContainerDrain(g *globals) *cobra.Command {
	var pf progressFlags
	cmd := &cobra.Command{
		Use:   "drain ID [--progress|--no-progress]",
		Short: "move every slot off a container while hosts keep using its disks",
		Long: `drain moves every slot of container ID onto the other online containers of
its slot size, one segment at a time, while hosts keep reading and writing
the disks that use it: the controller stops writes to the segment (agents
finish those on their way), copies it, points every disk that maps it
(snapshots and clones included: a shared slot moves once and stays
shared) at the copy, and frees the old slot.

The container is marked draining first: from then on no new slot lands on
it, and it stays draining. An interrupted drain (Ctrl-C, a controller
restart or failover) is continued by running drain again. Once it ends,
'container remove ID' removes the container.
` + progressHelp,
		Args: exactArgs(1, "one container id"),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := containerID(args[0])
			if err != nil {
				return err
			}
			pr, err := pf.reporter(cmd, g, controller.OpDrain, fmt.Sprintf("container %d", id), progress.Slots)
			if err != nil {
				return err
			}
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				st, err := c.DrainContainer(ctx, &pb.DrainContainerRequest{Id: id})
				if err != nil {
					return err
				}
				start := time.Now()
				last, err := followMoves(pr, st)
				if err != nil {
					return err
				}
				if last == nil {
					return fmt.Errorf("drain container %d: the controller sent no progress", id)
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), last)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "drained container %d: %s moved (%s) in %v\n", id, plural(int(last.Done), "slot"),
					size.Format(last.Done*last.SlotSize), time.Since(start).Round(time.Millisecond))
				return nil
			})
		},
	}
	pf.add(cmd)
	return cmd
}

func newReplaceReplica(g *globals) *cobra.Command {
	var oldURI, newURI string
	var format, force bool
	var pf progressFlags
	cmd := &cobra.Command{
		Use:   "replace-replica ID --old URI --new URI [--format [--force]]",
		Short: "replace a replica of a mirrored container and rebuild it while hosts keep writing",
		Long: `replace-replica puts the container at --new in place of the replica at --old
of mirrored container ID (healthy, failed or rebuilding) and rebuilds it:
every holder writes it from then on, every used slot is copied onto it
from a healthy replica (each segment's writers paused for its copy), and
it is marked healthy. With --format, --new is formatted first with the
container's id and slot size (a new file is created at its size).
An interrupted rebuild (Ctrl-C, a controller restart) goes on by itself,
or with 'container rebuild ID'.
` + progressHelp,
		Args: exactArgs(1, "one container id"),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := containerID(args[0])
			if err != nil {
				return err
			}
			if oldURI == "" || newURI == "" {
				return usageError{fmt.Errorf("--old and --new are both needed")}
			}
			if !strings.Contains(newURI, "://") {
				p, err := filepath.Abs(newURI)
				if err != nil {
					return err
				}
				newURI = "file://" + p
			}
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				st, err := c.ReplaceReplica(ctx, &pb.ReplaceReplicaRequest{Id: id, OldUri: oldURI, NewUri: newURI, Format: format, Force: force})
				if err != nil {
					return err
				}
				return rebuildProgress(cmd, g, controller.OpReplaceReplica, id, &pf, st)
			})
		},
	}
	cmd.Flags().StringVar(&oldURI, "old", "", "the replica to replace, as 'container list' shows it")
	cmd.Flags().StringVar(&newURI, "new", "", "the new replica: an nbd:// export, a device or a path")
	cmd.Flags().BoolVar(&format, "format", false, "format the new replica first")
	cmd.Flags().BoolVar(&force, "force", false, "with --format: format even over a file system or container found there")
	pf.add(cmd)
	return cmd
}

func newRebuildReplica(g *globals) *cobra.Command {
	var pf progressFlags
	cmd := &cobra.Command{
		Use:   "rebuild ID",
		Short: "rebuild a mirrored container's failed or rebuilding replica",
		Long: `rebuild brings back the failed replica of mirrored container ID, or continues
a rebuild that stopped: a replica that was away copies only the slots
written meanwhile (recorded before each was written), a new one every
used slot. The controller starts it by itself once a failed replica has
answered for a few seconds; this runs it at once.
` + progressHelp,
		Args: exactArgs(1, "one container id"),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := containerID(args[0])
			if err != nil {
				return err
			}
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				st, err := c.RebuildReplica(ctx, &pb.RebuildReplicaRequest{Id: id})
				if err != nil {
					return err
				}
				return rebuildProgress(cmd, g, controller.OpRebuild, id, &pf, st)
			})
		},
	}
	pf.add(cmd)
	return cmd
}

func newContainerRemove(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "remove ID",
		Short: "remove a container that holds no slot (drain it first)",
		Long: `remove takes container ID out of the cluster: the controller forgets it
and no disk uses it any more; its file or device is left as it is. It is
refused, with the number of slots in use, while the container holds any:
run 'container drain ID' first. A container that never held a slot can be
removed at once.`,
		Args: exactArgs(1, "one container id"),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := containerID(args[0])
			if err != nil {
				return err
			}
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				r, err := c.RemoveContainer(ctx, &pb.RemoveContainerRequest{Id: id})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), r)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "removed container %d\n", id)
				return nil
			})
		},
	}
}

func newContainerOnline(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "online ID",
		Short: "bring a failed container back once its storage is back (data intact)",
		Long: `online brings container ID back after its storage failed and came back
(a storage node restarted after the failure timeout, a device
reconnected): the controller opens it afresh, checks that its header is
the one registered, marks it online, and the segments on it read and
write again with the data they held. If the storage is lost for good, run
'disk clear-errors NAME' on each disk that 'check' lists instead.`,
		Args: exactArgs(1, "one container id"),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := containerID(args[0])
			if err != nil {
				return err
			}
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				r, err := c.OnlineContainer(ctx, &pb.OnlineContainerRequest{Id: id})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), r)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "container %d is %s\n", r.Id, r.State)
				return nil
			})
		},
	}
}

func problemRows(ps []*pb.Problem) [][]string {
	var rows [][]string
	for _, p := range ps {
		where := "-" // container ids start at 1
		switch {
		case p.Key != "":
			where = p.Key
		case p.Container != 0:
			where = fmt.Sprintf("c%d/s%d", p.Container, p.Slot)
		}
		seg := "-"
		if p.Disk != "" {
			seg = fmt.Sprint(p.Segment)
		}
		rows = append(rows, []string{p.Kind, where, orDash(p.Disk), seg, p.Detail})
	}
	return rows
}

// Exit statuses of check (0 clean, 1 could not check, 2 usage).
const (
	exitDamage  = 3 // damage found
	exitRefused = 4 // --repair refused: damage other than leaked slots; nothing changed
)

const checkLong = `check verifies the metadata through the controller (the leader, with
several). With --data it opens the bbolt store of a stopped controller or
'segmap up' (DIR/meta.db) directly, read-only unless --repair has leaks to
reclaim. With --etcd it reads the store in etcd directly, without a
controller (read-only: --repair goes through the leader).

check first runs bbolt's own check of the file (a bbolt store), then
decodes every record; if either finds damage it reports all of it and
stops there (counting references without every record would report the
slots of the unreadable ones as leaked). Otherwise it recounts every
reference from every table. Each kind of damage has its own name; a row
gives the kind, the slot (cC/sS) or the record key (p/17: table page 17,
c/1: container 1, d/3: the record of disk 3, t/3/0, r/1/0, q/0, n/NAME),
the disk and segment concerned, and what is wrong (docs/check.md has an
example of each):

  leaked-slot                 a slot is counted as used but no table maps it
                              (space lost, no data at risk); --repair frees it
  referenced-free-slot        a table maps a slot whose count is 0: it could
                              be handed out again while in use
  wrong-reference-count       a slot's count differs from the number of table
                              pages that map it
  shared-slot-writable        a slot that several table pages map, or a table
                              page that several disks hold, has count 1, so a
                              write through one disk would land in place and
                              change the others' data (shared without No-write)
  location-out-of-range       an entry points at a missing container, past its
                              last slot, at a slot size that is not the disk's
                              segment size, or lies past the disk's end
  wrong-used-count            a container's used-slot count disagrees with its
                              slot counts
  wrong-page-reference-count  a table page's count differs from the number of
                              disks whose tables hold it
  leaked-table-page           a table page (or its count) that no disk holds
  missing-table-page          a disk's table holds a page that is not stored
  corrupt-record              a record fails its checksum, does not decode, or
                              contradicts its key or the record it names
  truncated-record            a record is shorter than its layout: it cannot
                              hold its fields or its checksum
  damaged-file                the bbolt file is damaged below the records (its
                              pages, free list or meta pages)
  invalid-partial-entry       a partial entry's layers do not fit its segment
                              size (too deep, a base that does not hold every
                              sub-block, a slot named twice, ...)

--repair only ever reclaims leaked slots. If anything else is found it
refuses and changes nothing (the file of --data stays byte for byte as it
was): every other kind needs a person to decide, and with it present a slot
that looks leaked may not be.

--scrub also compares the replicas of every mirrored container (not
failed, with two healthy replicas or more), once the metadata is found
sound: every used slot is read on each healthy replica, with the hosts'
writes to it paused meanwhile, and must read the same; every free slot
must read zero. It reads every slot of those containers, so it takes as
long as reading them. It adds two kinds:

  replica-mismatch            the healthy replicas of a used slot differ; the
                              row names the disk and segment that map it, and
                              the detail the replicas and the first byte
  free-slot-not-zero          a free slot does not read zero on a replica

With --repair, the replicas that differ are rewritten from a source
replica: with three, the two that agree; else, for a slot written while a
replica was away, one that has not caught up since; else the replica
hosts read the slot from, so that what they have read stays (the detail
then says so: nothing tells which one holds the last write). Free slots that do not read zero
are punched. A summary line follows: "scrub: N slots compared on M
mirrored containers, K mismatches". While it runs, its progress (slots
compared) goes to standard error: a bar on a terminal, nothing on a pipe,
JSON events with --json; --progress and --no-progress as for every long
operation (docs/progress.md).

Exit status: 0 clean (after --repair: clean once the leaks are reclaimed
and the replicas rewritten), 3 damage or a scrub mismatch found, 4
--repair refused (damage other than leaked slots, nothing changed), 1 the
check could not run (store missing or in use, controller unreachable), 2
usage.`

func newCheck(g *globals) *cobra.Command {
	var repair, scrub bool
	var pf progressFlags
	var data string
	ef := &etcdFlags{}
	cmd := &cobra.Command{
		Use:   "check [--repair] [--scrub] [--data DIR | --etcd URLS]",
		Short: "verify the metadata: records, reference counts, sharing, locations (--repair reclaims leaked slots only)",
		Long:  checkLong,
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if scrub && (data != "" || ef.endpoints != "") {
				return usageError{fmt.Errorf("--scrub reads the containers: run it through the leading controller, without --data or --etcd")}
			}
			if data != "" {
				if ef.endpoints != "" {
					return usageError{fmt.Errorf("--data and --etcd: the metadata is in one or the other")}
				}
				r, err := checkData(cmd.Context(), data, repair)
				if err != nil {
					return err
				}
				return printCheck(cmd.OutOrStdout(), g.json, r, false)
			}
			if ef.endpoints != "" {
				if repair {
					return usageError{fmt.Errorf("--repair changes the store: run it through the leading controller, without --etcd")}
				}
				r, err := checkEtcd(cmd.Context(), ef)
				if err != nil {
					return err
				}
				return printCheck(cmd.OutOrStdout(), g.json, r, false)
			}
			pr, err := pf.reporter(cmd, g, controller.OpScrub, "mirrored containers", progress.Slots)
			if err != nil {
				return err
			}
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				req := &pb.CheckRequest{Repair: repair, Scrub: scrub}
				var r *pb.CheckResponse
				if scrub {
					r, err = scrubWithProgress(ctx, c, req, pr)
				} else {
					r, err = c.Check(ctx, req)
				}
				if err != nil {
					return err
				}
				return printCheck(cmd.OutOrStdout(), g.json, r, scrub)
			})
		},
	}
	cmd.Flags().BoolVar(&repair, "repair", false, "reclaim leaked slots (refused, changing nothing, if there is any other damage); with --scrub, also rewrite mismatched replicas")
	cmd.Flags().BoolVar(&scrub, "scrub", false, "also compare the replicas of every mirrored container, slot by slot (reads every slot of them)")
	cmd.Flags().StringVar(&data, "data", "", "check the bbolt store in DIR/meta.db of a stopped controller or 'segmap up'")
	ef.add(cmd)
	pf.add(cmd)
	return cmd
}

// scrubWithProgress runs a check with a scrub, showing the scrub's
// progress on pr: Check is one call, so the progress is the scrub's
// operation, polled from ListOperations meanwhile.
func scrubWithProgress(ctx context.Context, c pb.AdminClient, req *pb.CheckRequest, pr *progress.Reporter) (*pb.CheckResponse, error) {
	if pr.Mode() == progress.Off {
		return c.Check(ctx, req)
	}
	after := lastOperationID(ctx, c)
	wctx, stop := context.WithCancel(ctx)
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		watchOperation(wctx, c, pr, controller.OpScrub, after)
	}()
	r, err := c.Check(ctx, req)
	stop()
	<-watched
	if err == nil {
		// The scrub's last count, which a poll may have missed.
		updateFromOperation(ctx, c, pr, controller.OpScrub, after)
	}
	pr.Finish(err)
	return r, err
}

// checkData is 'segmap check --data DIR [--repair]'.
func checkData(ctx context.Context, dir string, repair bool) (*pb.CheckResponse, error) {
	r, err := offlinecheck.Bolt(ctx, dir, repair)
	return checkResponse(r, err)
}

// checkEtcd is 'segmap check --etcd URLS'.
func checkEtcd(ctx context.Context, ef *etcdFlags) (*pb.CheckResponse, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	cli, err := ef.client()
	if err != nil {
		return nil, err
	}
	defer cli.Close()
	if err := ef.reachable(ctx, cli); err != nil {
		return nil, err
	}
	r, err := offlinecheck.Etcd(ctx, cli, ef.prefix+ha.MetaPrefix)
	return checkResponse(r, err)
}

// checkResponse is an offline check's result as the admin API's Check
// answers it, and damage found as check's exit status (3).
func checkResponse(r *offlinecheck.Result, err error) (*pb.CheckResponse, error) {
	if errors.Is(err, offlinecheck.ErrDamaged) {
		return nil, codeError{exitDamage, err}
	}
	if err != nil {
		return nil, err
	}
	return &pb.CheckResponse{Problems: adminapi.Problems(r.Problems), Repaired: adminapi.Problems(r.Repaired), Refused: r.Refused}, nil
}

// printCheck prints r (with the scrub's results if scrub was asked for)
// and returns check's exit status as an error.
func printCheck(w io.Writer, asJSON bool, r *pb.CheckResponse, scrub bool) error {
	if asJSON {
		if err := printJSON(w, r); err != nil {
			return err
		}
	} else {
		if len(r.Repaired) > 0 {
			fmt.Fprintf(w, "repaired %s:\n", plural(len(r.Repaired), "problem"))
			if err := table(w, []string{"KIND", "WHERE", "DISK", "SEGMENT", "DETAIL"}, problemRows(r.Repaired)); err != nil {
				return err
			}
		}
		printDiskErrors(w, r.DiskErrors)
		if len(r.Problems) == 0 {
			fmt.Fprintln(w, "check: clean")
		} else {
			fmt.Fprintf(w, "check: %s:\n", plural(len(r.Problems), "problem"))
			if err := table(w, []string{"KIND", "WHERE", "DISK", "SEGMENT", "DETAIL"}, problemRows(r.Problems)); err != nil {
				return err
			}
			for _, p := range r.Problems {
				if p.Kind == controller.CorruptRecord.String() || p.Kind == controller.TruncatedRecord.String() {
					fmt.Fprintln(w, "check: reference counts not checked: they cannot be recounted while records are damaged")
					break
				}
			}
		}
		if scrub {
			if err := printScrub(w, r); err != nil {
				return err
			}
		}
	}
	if r.Refused != "" {
		return codeError{exitRefused, fmt.Errorf("check --repair: %s", r.Refused)}
	}
	if len(r.Problems) > 0 {
		return codeError{exitDamage, fmt.Errorf("check found %s", plural(len(r.Problems), "problem"))}
	}
	if len(r.ScrubProblems) > 0 {
		return codeError{exitDamage, fmt.Errorf("check --scrub found %s", mismatches(len(r.ScrubProblems)))}
	}
	return nil
}

// printScrub prints what check --scrub found and repaired, and its
// summary line.
func printScrub(w io.Writer, r *pb.CheckResponse) error {
	if len(r.Problems) > 0 {
		fmt.Fprintln(w, "scrub: not run: the metadata has problems (a repair of replicas would trust its counts)")
		return nil
	}
	cols := []string{"KIND", "WHERE", "DISK", "SEGMENT", "DETAIL"}
	if len(r.ScrubRepaired) > 0 {
		fmt.Fprintf(w, "scrub: repaired %s:\n", mismatches(len(r.ScrubRepaired)))
		if err := table(w, cols, problemRows(r.ScrubRepaired)); err != nil {
			return err
		}
	}
	if len(r.ScrubProblems) > 0 {
		fmt.Fprintf(w, "scrub: %s:\n", mismatches(len(r.ScrubProblems)))
		if err := table(w, cols, problemRows(r.ScrubProblems)); err != nil {
			return err
		}
	}
	line := fmt.Sprintf("scrub: %s compared on %s, %s",
		plural(int(r.ScrubbedSlots), "slot"), plural(int(r.ScrubbedContainers), "mirrored container"),
		mismatches(len(r.ScrubProblems)+len(r.ScrubRepaired)))
	if len(r.ScrubRepaired) > 0 {
		line += fmt.Sprintf(", %d repaired", len(r.ScrubRepaired))
	}
	fmt.Fprintln(w, line)
	return nil
}

// mismatches returns "1 mismatch", "2 mismatches".
func mismatches(n int) string {
	if n == 1 {
		return "1 mismatch"
	}
	return fmt.Sprintf("%d mismatches", n)
}

// plural returns "1 problem", "2 problems".
func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}

func newStatus(g *globals) *cobra.Command {
	var agents bool
	status := &cobra.Command{
		Use: "status", Short: "show agents, containers, used and free space", Args: noArgs,
		Long: `status shows the agents, the containers and the pool's space:

  space              slots in use x slot size, of the pool's total
  on storage         what the container files hold on storage (their
                     allocated blocks, what du counts); nbd:// containers
                     and block devices cannot tell and are not counted
  held by snapshots  the slots only snapshots reference, no writable disk:
                     what deleting every snapshot gives back

With --agents it asks every attached agent how each disk it maps stands
(the mapping protocol's get_status) and shows one row per agent and disk:

  SEGMENTS           entries in the agent's table
  LOADED             entries the agent holds (not Invalid): loaded by faults
                     or set by the controller; the rest fault on first use
  INVALID ERROR      entries with that state (Error entries fail their I/O)
  ZERO NOWRITE
  MAPPED             entries that point at storage (writable or No-write)
  IN-FLIGHT          I/Os at storage now
  FAULTS             faults sent to the controller and not yet answered
  LEASE              how long the agent's lease still holds
  STATE              active, quiesced (new I/O held), or why the agent
                     gave no figures (no answer within 2s, no table yet)`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.call(func(ctx context.Context, c pb.AdminClient) error {
				r, err := c.Status(ctx, &pb.StatusRequest{Agents: agents})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), r)
				}
				w := cmd.OutOrStdout()
				if agents {
					return agentTable(w, r.Agents)
				}
				fmt.Fprintf(w, "segmap %s, NBD on %s\n", r.Version, orDash(r.NbdAddress))
				fmt.Fprintf(w, "disks: %d\n", r.Disks)
				fmt.Fprintf(w, "space: %s used of %s, %s free (%d bytes used)\n", size.Format(r.UsedBytes), size.Format(r.TotalBytes), size.Format(r.FreeBytes), r.UsedBytes)
				unknown := ""
				if r.AllocatedUnknown > 0 {
					unknown = fmt.Sprintf(", not counting %s that cannot tell", plural(int(r.AllocatedUnknown), "container"))
				}
				fmt.Fprintf(w, "on storage: %s allocated (%d bytes)%s\n", size.Format(r.AllocatedBytes), r.AllocatedBytes, unknown)
				fmt.Fprintf(w, "held by snapshots: %s (%d bytes), given back when they are deleted\n", size.Format(r.SnapshotsHoldBytes), r.SnapshotsHoldBytes)
				var rows [][]string
				for _, a := range r.Agents {
					rows = append(rows, []string{a.Name, fmt.Sprint(a.Disks)})
				}
				fmt.Fprintln(w)
				if err := table(w, []string{"AGENT", "DISKS"}, rows); err != nil {
					return err
				}
				rows = nil
				for _, ct := range r.Containers {
					rows = append(rows, []string{fmt.Sprint(ct.Id), ct.Uri, ct.State, size.Format(ct.SlotSize), size.Format(ct.UsedSlots * ct.SlotSize), allocatedCell(ct), size.Format(ct.Slots * ct.SlotSize)})
				}
				fmt.Fprintln(w)
				return table(w, []string{"CONTAINER", "URI", "STATE", "SLOT", "USED", "ALLOCATED", "SIZE"}, rows)
			})
		},
	}
	status.Flags().BoolVar(&agents, "agents", false, "show, for every agent, how each disk it maps stands (its table, I/O in flight, faults out, quiesce, lease)")
	return status
}

// agentTable prints status --agents: a row per agent and disk it maps,
// and a row for an agent that maps none.
func agentTable(w io.Writer, agents []*pb.Agent) error {
	var rows [][]string
	for _, a := range agents {
		if len(a.MappedDisks) == 0 {
			rows = append(rows, []string{a.Name, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "no disks mapped"})
			continue
		}
		for _, d := range a.MappedDisks {
			name := d.Name
			if name == "" {
				name = fmt.Sprintf("#%d", d.Id)
			}
			if d.Failure != "" {
				rows = append(rows, []string{a.Name, name, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", d.Failure})
				continue
			}
			state := "active"
			if d.Quiesced {
				state = "quiesced"
			}
			lease := "none"
			if d.Leased {
				lease = "lapsed"
				if d.LeaseLeftMs > 0 {
					lease = (time.Duration(d.LeaseLeftMs) * time.Millisecond).Round(100 * time.Millisecond).String()
				}
			}
			rows = append(rows, []string{a.Name, name, fmt.Sprint(d.Segments), fmt.Sprint(d.Loaded),
				fmt.Sprint(d.Invalid), fmt.Sprint(d.Error), fmt.Sprint(d.Zero), fmt.Sprint(d.NoWrite), fmt.Sprint(d.Mapped),
				fmt.Sprint(d.InFlight), fmt.Sprint(d.FaultsOut), lease, state})
		}
	}
	return table(w, []string{"AGENT", "DISK", "SEGMENTS", "LOADED", "INVALID", "ERROR", "ZERO", "NOWRITE", "MAPPED", "IN-FLIGHT", "FAULTS", "LEASE", "STATE"}, rows)
}
