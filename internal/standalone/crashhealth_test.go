package standalone_test

// The crash-point operations of container failure: failing a container,
// bringing it back online, and clearing the errors of a disk. Their
// in-between states hold Error segments, which the byte model cannot
// express: each has a recover step that checks them and completes the
// operation, as an operator would after a crash.

import (
	"bytes"
	"errors"
	"fmt"
	"slices"

	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
)

// errTestFailure is the cause given to FailContainer by the tests.
var errTestFailure = errors.New("failed by the test")

// containerState returns the state of container id.
func (h *fx) containerState(id uint32) (meta.ContainerState, error) {
	cs, err := h.c.Ctrl.ListContainers(h.ctx)
	if err != nil {
		return 0, err
	}
	for _, ct := range cs {
		if ct.ID == id {
			return ct.State, nil
		}
	}
	return 0, fmt.Errorf("container %d: not listed", id)
}

// errorSegments returns the Error segments of every disk of m, by disk.
func (h *fx) errorSegments(m fxModel) (map[string][]uint64, error) {
	out := map[string][]uint64{}
	for _, n := range m.names() {
		exts, err := h.c.Ctrl.ErrorExtents(h.ctx, n)
		if err != nil {
			return nil, err
		}
		for _, x := range exts {
			for off := x.Off; off < x.Off+x.Len; off += seg64 {
				out[n] = append(out[n], off/seg64)
			}
		}
	}
	return out, nil
}

// readSegment reads segment s of disk through agent i.
func (h *fx) readSegment(i int, disk string, s uint64) ([]byte, error) {
	d, err := h.c.Agents[i].Open(h.ctx, disk)
	if err != nil {
		return nil, err
	}
	p := make([]byte, seg64)
	return p, d.ReadAt(h.ctx, p, s*seg64)
}

// errorsRead requires every Error segment of every disk of m to fail
// reads with EIO through both agents, and returns how many there are.
func (h *fx) errorsRead(m fxModel) (int, error) {
	segs, err := h.errorSegments(m)
	if err != nil {
		return 0, err
	}
	n := 0
	for disk, ss := range segs {
		for _, s := range ss {
			n++
			for i := range h.c.Agents {
				if _, err := h.readSegment(i, disk, s); !errors.Is(err, protocol.ErrIO) {
					return n, fmt.Errorf("agent %d: Error segment %d of %s: read %v, want EIO", i, s, disk, err)
				}
			}
		}
	}
	return n, nil
}

// opFailContainer fails container id: every disk keeps its data, the
// segments on it are Error until it is online again. After a crash it is
// failed or online; recover fails it again (a failure seen once more),
// requires its segments to fail with EIO on both agents, and brings it
// back online.
func opFailContainer(id uint32) fxOp {
	return fxOp{name: "fail-container", run: func(h *fx, m fxModel) (fxModel, error) {
		return m.clone(), h.c.Ctrl.FailContainer(h.ctx, id, errTestFailure)
	}, recover: func(h *fx, before fxModel) (string, error) {
		st, err := h.containerState(id)
		if err != nil {
			return "", err
		}
		seen := map[meta.ContainerState]string{meta.ContainerOnline: "before", meta.ContainerFailed: "after"}[st]
		if seen == "" {
			return "", fmt.Errorf("container %d is %v, want failed or online", id, st)
		}
		if err := h.c.Ctrl.FailContainer(h.ctx, id, errTestFailure); err != nil {
			return "", fmt.Errorf("fail container %d again: %w", id, err)
		}
		n, err := h.errorsRead(before)
		if err != nil {
			return "", err
		}
		if n == 0 {
			return "", fmt.Errorf("container %d failed, and no segment is Error", id)
		}
		if _, err := h.c.Ctrl.OnlineContainer(h.ctx, id); err != nil {
			return "", fmt.Errorf("online container %d: %w", id, err)
		}
		return seen, nil
	}}
}

// opOnline brings failed container id back online: every disk's data
// reads back intact. After a crash the container is failed or online;
// recover onlines it again if it is still failed.
func opOnline(id uint32) fxOp {
	return fxOp{name: "online", pre: func(h *fx) error {
		return h.c.Ctrl.FailContainer(h.ctx, id, errTestFailure)
	}, run: func(h *fx, m fxModel) (fxModel, error) {
		_, err := h.c.Ctrl.OnlineContainer(h.ctx, id)
		return m.clone(), err
	}, recover: func(h *fx, before fxModel) (string, error) {
		st, err := h.containerState(id)
		if err != nil {
			return "", err
		}
		seen := "after"
		switch st {
		case meta.ContainerOnline:
		case meta.ContainerFailed:
			seen = "before"
			if _, err := h.errorsRead(before); err != nil {
				return "", fmt.Errorf("container %d still failed: %w", id, err)
			}
			if _, err := h.c.Ctrl.OnlineContainer(h.ctx, id); err != nil {
				return "", fmt.Errorf("online container %d again: %w", id, err)
			}
		default:
			return "", fmt.Errorf("container %d is %v, want failed or online", id, st)
		}
		segs, err := h.errorSegments(before)
		if err != nil {
			return "", err
		}
		if len(segs) > 0 {
			return "", fmt.Errorf("container %d online, and Error segments remain: %v", id, segs)
		}
		return seen, nil
	}}
}

// opClearErrors clears the errors of disk, whose segment errSeg is set
// to Error and whose segments on container failed are Error because it
// failed: they read zeros after, every other byte as before. After a
// crash each of them reads EIO or zeros, never anything else; recover
// clears them again, then brings the container back for the other disks.
func opClearErrors(disk string, errSeg uint64, failed uint32) fxOp {
	var errs []uint64 // disk's Error segments before the operation
	return fxOp{name: "clear-errors", pre: func(h *fx) error {
		if _, err := h.c.Ctrl.SetError(h.ctx, disk, errSeg*seg64, seg64); err != nil {
			return err
		}
		if err := h.c.Ctrl.FailContainer(h.ctx, failed, errTestFailure); err != nil {
			return err
		}
		segs, err := h.errorSegments(fxModel{disk: {}})
		if err != nil {
			return err
		}
		errs = segs[disk]
		if len(errs) < 2 {
			return fmt.Errorf("disk %s has Error segments %v, want segment %d and one on container %d", disk, errs, errSeg, failed)
		}
		return nil
	}, run: func(h *fx, m fxModel) (fxModel, error) {
		after := m.clone()
		data := after.own(disk)
		for _, s := range errs {
			clear(data[s*seg64 : (s+1)*seg64])
		}
		_, err := h.c.Ctrl.ClearErrors(h.ctx, disk)
		return after, err
	}, recover: func(h *fx, before fxModel) (string, error) {
		if st, err := h.containerState(failed); err != nil || st != meta.ContainerFailed {
			return "", fmt.Errorf("container %d: %v %v, want failed", failed, st, err)
		}
		if err := h.checkClean(); err != nil {
			return "", err
		}
		zero := make([]byte, seg64)
		var eio, zeros int // Error segments read as EIO and as zeros
		for s := range uint64(len(before[disk].data) / seg64) {
			want := before[disk].data[s*seg64 : (s+1)*seg64]
			for i := range h.c.Agents {
				got, err := h.readSegment(i, disk, s)
				switch {
				case slices.Contains(errs, s) && errors.Is(err, protocol.ErrIO):
					eio++
				case slices.Contains(errs, s) && err == nil && bytes.Equal(got, zero):
					zeros++
				case slices.Contains(errs, s):
					return "", fmt.Errorf("agent %d: Error segment %d of %s reads neither EIO nor zeros (%v)", i, s, disk, err)
				case err != nil:
					return "", fmt.Errorf("agent %d: segment %d of %s: %w", i, s, disk, err)
				case !bytes.Equal(got, want):
					return "", fmt.Errorf("agent %d: segment %d of %s changed", i, s, disk)
				}
			}
		}
		seen := "torn"
		switch {
		case zeros == 0:
			seen = "before"
		case eio == 0:
			seen = "after"
		}
		if _, err := h.c.Ctrl.ClearErrors(h.ctx, disk); err != nil {
			return "", fmt.Errorf("clear errors of %s again: %w", disk, err)
		}
		if segs, err := h.errorSegments(fxModel{disk: {}}); err != nil || len(segs) > 0 {
			return "", fmt.Errorf("errors cleared, and Error segments remain: %v %v", segs, err)
		}
		if _, err := h.c.Ctrl.OnlineContainer(h.ctx, failed); err != nil {
			return "", fmt.Errorf("online container %d: %w", failed, err)
		}
		return seen, nil
	}}
}
