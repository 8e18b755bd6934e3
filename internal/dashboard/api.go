package dashboard

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "segmap/api/segmapv1"
	"segmap/internal/size"
)

// state is what GET /api/state returns: everything the page shows but
// the graphs.
type state struct {
	// Role is the controller's: embedded, leader or standby.
	Role       string         `json:"role"`
	Version    string         `json:"version"`
	NBDAddress string         `json:"nbd_address"`
	Space      space          `json:"space"`
	Disks      []*diskNode    `json:"disks"` // trees
	DiskCount  int            `json:"disk_count"`
	Pools      []pool         `json:"pools"`
	Containers []containerRow `json:"containers"`
	Agents     []agentRow     `json:"agents"`
	// Operations are the controller's long operations (drains,
	// rebuilds, flattens, exports, ...): those running and the last
	// ones finished.
	Operations []operationRow `json:"operations"`
}

// operationRow is a long operation and how far it got.
type operationRow struct {
	ID       uint64 `json:"id"`
	Kind     string `json:"kind"`
	Target   string `json:"target"`
	Done     uint64 `json:"done"`
	Total    uint64 `json:"total"` // 0: not known yet
	Unit     string `json:"unit"`
	DoneText string `json:"done_text"`
	State    string `json:"state"`
	Error    string `json:"error,omitempty"`
	Started  int64  `json:"started_unix"`
	Finished int64  `json:"finished_unix"`
}

type space struct {
	Total         uint64 `json:"total"`
	Used          uint64 `json:"used"`
	Free          uint64 `json:"free"`
	SnapshotsHold uint64 `json:"snapshots_hold"`
	TotalText     string `json:"total_text"`
	UsedText      string `json:"used_text"`
	FreeText      string `json:"free_text"`
	SnapsHoldText string `json:"snapshots_hold_text"`
}

// pool is the containers of one slot size: where a disk of that segment
// size gets its slots.
type pool struct {
	SlotSize     uint64 `json:"slot_size"`
	SlotSizeText string `json:"slot_size_text"`
	Containers   int    `json:"containers"`
	Slots        uint64 `json:"slots"`
	UsedSlots    uint64 `json:"used_slots"`
	SizeText     string `json:"size_text"`
	UsedText     string `json:"used_text"`
}

type containerRow struct {
	ID           uint32   `json:"id"`
	URI          string   `json:"uri"`
	State        string   `json:"state"`
	SlotSize     uint64   `json:"slot_size"`
	SlotSizeText string   `json:"slot_size_text"`
	Slots        uint64   `json:"slots"`
	UsedSlots    uint64   `json:"used_slots"`
	SizeText     string   `json:"size_text"`
	UsedText     string   `json:"used_text"`
	Replicas     []string `json:"replicas"` // "URI (state)" of a mirror
}

type agentRow struct {
	Name   string      `json:"name"`
	Disks  uint32      `json:"disks"`
	Mapped []mappedRow `json:"mapped"`
}

// mappedRow is a disk an agent maps, as the agent tells it.
type mappedRow struct {
	Disk string `json:"disk"`
	// Lease: "none", "lapsed", or how long it still holds ("4.2s").
	Lease    string `json:"lease"`
	State    string `json:"state"` // active, quiesced, or why no figures
	Loaded   uint64 `json:"loaded"`
	Segments uint64 `json:"segments"`
	InFlight uint64 `json:"in_flight"`
	Faults   uint64 `json:"faults_out"`
}

// apiState gathers the page's picture with three admin calls.
func (d *Dashboard) apiState(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), d.cfg.Timeout)
	defer cancel()
	st, err := d.cfg.Admin.Status(ctx, &pb.StatusRequest{Agents: true})
	if err != nil {
		d.fail(w, "status", err)
		return
	}
	ld, err := d.cfg.Admin.ListDisks(ctx, &pb.ListDisksRequest{})
	if err != nil {
		d.fail(w, "list disks", err)
		return
	}
	ops, err := d.cfg.Admin.ListOperations(ctx, &pb.ListOperationsRequest{})
	if err != nil {
		d.fail(w, "list operations", err)
		return
	}
	s := buildState(d.cfg.Role(), st, ld.Disks)
	s.Operations = operationRows(ops.Operations)
	writeJSON(w, http.StatusOK, s)
}

// operationRows lists the running operations first, then the finished
// ones, the latest first.
func operationRows(ops []*pb.Operation) []operationRow {
	rows := make([]operationRow, 0, len(ops))
	for _, o := range ops {
		r := operationRow{ID: o.Id, Kind: o.Kind, Target: o.Target, Done: o.Done, Total: o.Total, Unit: o.Unit,
			State: o.State, Error: o.Error, Started: o.StartedUnix, Finished: o.FinishedUnix}
		r.DoneText = fmt.Sprintf("%d", o.Done)
		if o.Total > 0 {
			r.DoneText += fmt.Sprintf(" / %d", o.Total)
		}
		if o.Unit == "bytes" {
			r.DoneText = size.Format(o.Done)
			if o.Total > 0 {
				r.DoneText += " / " + size.Format(o.Total)
			}
		} else {
			r.DoneText += " " + o.Unit
		}
		rows = append(rows, r)
	}
	slices.SortStableFunc(rows, func(a, b operationRow) int {
		if ar, br := a.State == "running", b.State == "running"; ar != br {
			if ar {
				return -1
			}
			return 1
		}
		return cmpU64(b.ID, a.ID)
	})
	return rows
}

// buildState arranges the admin API's answers for the page.
func buildState(role string, st *pb.StatusResponse, disks []*pb.Disk) state {
	s := state{
		Role: role, Version: st.Version, NBDAddress: st.NbdAddress,
		Space: space{
			Total: st.TotalBytes, Used: st.UsedBytes, Free: st.FreeBytes, SnapshotsHold: st.SnapshotsHoldBytes,
			TotalText: size.Format(st.TotalBytes), UsedText: size.Format(st.UsedBytes),
			FreeText: size.Format(st.FreeBytes), SnapsHoldText: size.Format(st.SnapshotsHoldBytes),
		},
		Disks: diskTree(disks), DiskCount: len(disks),
		Pools: []pool{}, Containers: []containerRow{}, Agents: []agentRow{},
	}
	for _, c := range st.Containers {
		row := containerRow{
			ID: c.Id, URI: c.Uri, State: c.State, SlotSize: c.SlotSize, SlotSizeText: size.Format(c.SlotSize),
			Slots: c.Slots, UsedSlots: c.UsedSlots,
			SizeText: size.Format(c.Slots * c.SlotSize), UsedText: size.Format(c.UsedSlots * c.SlotSize),
			Replicas: []string{},
		}
		if row.URI == "" && len(c.Replicas) > 0 {
			row.URI = "mirror"
		}
		for _, rp := range c.Replicas {
			row.Replicas = append(row.Replicas, fmt.Sprintf("%s (%s)", rp.Uri, rp.State))
		}
		s.Containers = append(s.Containers, row)
		i := slices.IndexFunc(s.Pools, func(p pool) bool { return p.SlotSize == c.SlotSize })
		if i < 0 {
			s.Pools = append(s.Pools, pool{SlotSize: c.SlotSize, SlotSizeText: size.Format(c.SlotSize)})
			i = len(s.Pools) - 1
		}
		p := &s.Pools[i]
		p.Containers++
		if c.State != "failed" {
			p.Slots += c.Slots
			p.UsedSlots += c.UsedSlots
		}
	}
	slices.SortFunc(s.Pools, func(a, b pool) int { return cmpU64(a.SlotSize, b.SlotSize) })
	for i := range s.Pools {
		p := &s.Pools[i]
		p.SizeText, p.UsedText = size.Format(p.Slots*p.SlotSize), size.Format(p.UsedSlots*p.SlotSize)
	}
	for _, a := range st.Agents {
		row := agentRow{Name: a.Name, Disks: a.Disks, Mapped: []mappedRow{}}
		for _, m := range a.MappedDisks {
			mr := mappedRow{Disk: m.Name, Lease: "none", State: "active", Loaded: m.Loaded, Segments: m.Segments, InFlight: m.InFlight, Faults: m.FaultsOut}
			if mr.Disk == "" {
				mr.Disk = fmt.Sprintf("#%d", m.Id)
			}
			switch {
			case m.Failure != "":
				mr.State, mr.Lease = m.Failure, "-"
			case m.Quiesced:
				mr.State = "quiesced"
			}
			if m.Leased && m.Failure == "" {
				mr.Lease = "lapsed"
				if m.LeaseLeftMs > 0 {
					mr.Lease = (time.Duration(m.LeaseLeftMs) * time.Millisecond).Round(100 * time.Millisecond).String()
				}
			}
			row.Mapped = append(row.Mapped, mr)
		}
		s.Agents = append(s.Agents, row)
	}
	return s
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// seriesResponse is what GET /api/series returns.
type seriesResponse struct {
	IntervalSeconds float64  `json:"interval_seconds"`
	Samples         []Sample `json:"samples"`
}

func (d *Dashboard) apiSeries(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, seriesResponse{IntervalSeconds: SampleInterval.Seconds(), Samples: d.sample.series()})
}

// apiDeletePreview says what deleting a disk would free (a dry run: it
// changes nothing), for the confirmation.
func (d *Dashboard) apiDeletePreview(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), d.cfg.Timeout)
	defer cancel()
	resp, err := d.cfg.Admin.DeleteDisk(ctx, &pb.DeleteDiskRequest{Name: r.PathValue("name"), DryRun: true})
	if err != nil {
		d.fail(w, "delete preview", err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"freed_bytes": resp.FreedBytes, "freed_text": size.Format(resp.FreedBytes)})
}

// createDiskRequest is POST /api/disks's body. Size is bytes or a size
// as the CLI takes it ("10G").
type createDiskRequest struct {
	Name string `json:"name"`
	Size string `json:"size"`
}

func (d *Dashboard) apiCreateDisk(ctx context.Context, r *http.Request) (any, error) {
	var req createDiskRequest
	if err := decodeJSON(r, &req); err != nil {
		return nil, err
	}
	if req.Name == "" || req.Size == "" {
		return nil, fmt.Errorf("%w: a disk needs a name and a size", ErrBadRequest)
	}
	n, err := size.Parse(req.Size)
	if err != nil {
		return nil, fmt.Errorf("%w: size: %w", ErrBadRequest, err)
	}
	disk, err := d.cfg.Admin.CreateDisk(ctx, &pb.CreateDiskRequest{Name: req.Name, Size: n})
	if err != nil {
		return nil, fmt.Errorf("create disk %s: %w", req.Name, err)
	}
	d.cfg.Logger.Info("dashboard: created disk", "disk", disk.Name, "size", disk.Size)
	return map[string]any{"name": disk.Name, "size": disk.Size}, nil
}

// snapshotRequest is POST /api/snapshots's body: a read-only snapshot of
// Disk named Name ("": SOURCE@TIMESTAMP, as the CLI's).
type snapshotRequest struct {
	Disk string `json:"disk"`
	Name string `json:"name"`
}

func (d *Dashboard) apiSnapshot(ctx context.Context, r *http.Request) (any, error) {
	var req snapshotRequest
	if err := decodeJSON(r, &req); err != nil {
		return nil, err
	}
	if req.Disk == "" {
		return nil, fmt.Errorf("%w: which disk?", ErrBadRequest)
	}
	sr := &pb.SnapshotRequest{Sources: []string{req.Disk}}
	if req.Name != "" {
		sr.Names = []string{req.Name}
	}
	resp, err := d.cfg.Admin.Snapshot(ctx, sr)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", req.Disk, err)
	}
	names := []string{}
	for _, s := range resp.Disks {
		names = append(names, s.Name)
	}
	d.cfg.Logger.Info("dashboard: snapshot", "disk", req.Disk, "snapshot", names)
	return map[string]any{"snapshots": names}, nil
}

// apiDeleteSnapshot deletes a read-only snapshot; a writable disk is
// refused (the CLI deletes those: a page click should not throw away a
// running VM's disk).
func (d *Dashboard) apiDeleteSnapshot(ctx context.Context, r *http.Request) (any, error) {
	name := r.PathValue("name")
	disk, err := d.cfg.Admin.GetDisk(ctx, &pb.GetDiskRequest{Name: name})
	if err != nil {
		return nil, fmt.Errorf("delete %s: %w", name, err)
	}
	if !disk.ReadOnly {
		return nil, fmt.Errorf("delete %s: %w: it is a writable disk (delete it with 'segmap disk delete')", name, ErrNotSnapshot)
	}
	resp, err := d.cfg.Admin.DeleteDisk(ctx, &pb.DeleteDiskRequest{Name: name})
	if err != nil {
		return nil, fmt.Errorf("delete %s: %w", name, err)
	}
	d.cfg.Logger.Info("dashboard: deleted snapshot", "disk", name, "freed", resp.FreedBytes)
	return map[string]any{"freed_bytes": resp.FreedBytes, "freed_text": size.Format(resp.FreedBytes)}, nil
}

// action wraps a handler that changes something: checkAction first,
// the admin calls bounded by the timeout, the answer or error as JSON.
func (d *Dashboard) action(fn func(ctx context.Context, r *http.Request) (any, error)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := checkAction(r, d.token); err != nil {
			d.cfg.Logger.Warn("dashboard: refused", "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr, "err", err)
			writeJSON(w, http.StatusForbidden, errorBody{Error: err.Error()})
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), d.cfg.Timeout)
		defer cancel()
		v, err := fn(ctx, r)
		if err != nil {
			d.fail(w, "", err)
			return
		}
		writeJSON(w, http.StatusOK, v)
	})
}

// decodeJSON reads r's JSON body (at most 64 KiB) into v.
func decodeJSON(r *http.Request, v any) error {
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		return fmt.Errorf("%w: the body must be application/json", ErrBadRequest)
	}
	dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %w", ErrBadRequest, err)
	}
	return nil
}

// grpcError is an error of the admin API (a gRPC status).
type grpcError interface {
	error
	GRPCStatus() *status.Status
}

type errorBody struct {
	Error string `json:"error"`
}

// fail answers err as JSON with an HTTP status from its kind: the admin
// API's gRPC code, or the dashboard's own sentinels.
func (d *Dashboard) fail(w http.ResponseWriter, what string, err error) {
	msg := err.Error()
	var gs grpcError
	if errors.As(err, &gs) {
		// The admin API's message, not "rpc error: code = ... desc = ...".
		msg = strings.Replace(msg, gs.Error(), gs.GRPCStatus().Message(), 1)
	}
	if what != "" {
		msg = what + ": " + msg
	}
	code := httpStatus(err)
	if code >= 500 {
		d.cfg.Logger.Warn("dashboard: admin API", "err", err)
	}
	writeJSON(w, code, errorBody{Error: msg})
}

// httpStatus maps an error to the HTTP status the API answers it with.
func httpStatus(err error) int {
	switch {
	case errors.Is(err, ErrBadRequest):
		return http.StatusBadRequest
	case errors.Is(err, ErrNotSnapshot):
		return http.StatusConflict
	case errors.Is(err, ErrCrossSite):
		return http.StatusForbidden
	case errors.Is(err, context.DeadlineExceeded):
		return http.StatusGatewayTimeout
	}
	var gs grpcError
	if !errors.As(err, &gs) {
		return http.StatusInternalServerError
	}
	switch gs.GRPCStatus().Code() {
	case codes.InvalidArgument, codes.OutOfRange:
		return http.StatusBadRequest
	case codes.NotFound:
		return http.StatusNotFound
	case codes.AlreadyExists, codes.FailedPrecondition, codes.Aborted:
		return http.StatusConflict
	case codes.ResourceExhausted:
		return http.StatusInsufficientStorage
	case codes.Unavailable:
		return http.StatusServiceUnavailable
	case codes.DeadlineExceeded:
		return http.StatusGatewayTimeout
	case codes.PermissionDenied, codes.Unauthenticated:
		return http.StatusForbidden
	}
	return http.StatusBadGateway
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v) // the client went away
}
