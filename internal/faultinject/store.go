package faultinject

import (
	"context"
	"fmt"

	"segmap/internal/meta"
)

// Store wraps a meta.Store: every View, and every commit, is first put to
// its Injector.
//
// A store that groups commits (meta.GroupCommitter: meta.Bolt and
// meta.Etcd, which run the Updates that arrive together in one
// transaction) is wrapped through its commit hook: each commit is one
// persistence step, whatever number of Updates it carries (Call.Len says
// how many), so a fault or crash at that step fails, keeps or drops the
// whole batch together, as a real fsync error or power cut would. A
// commit is made for every batch, also one whose fns all failed or
// wrote nothing, so Updates made one at a time are one step each. The
// hook is installed on the inner store, which must not be wrapped twice.
//
// Any other store is wrapped around its Update: one step per Update,
// whatever fn does.
type Store struct {
	inner   meta.Store
	name    string
	in      *Injector
	grouped bool // the steps are the inner store's commits
}

var _ meta.Store = (*Store)(nil)

// Store wraps st under name.
func (in *Injector) Store(name string, st meta.Store) *Store {
	s := &Store{inner: st, name: name, in: in}
	if gc, ok := st.(meta.GroupCommitter); ok {
		s.grouped = true
		gc.SetCommitHook(s.commit)
	}
	return s
}

// commit is a grouped inner store's commit hook: a commit of updates
// Updates is one persistence step. A failed commit (not Durable) keeps
// nothing of the batch; a Durable one commits and reports the error; a
// crashing one commits only if the crash keeps its step.
func (s *Store) commit(updates int, commit func() error) error {
	v := s.in.decide(Call{Op: OpUpdate, Target: s.name, Len: int64(updates)})
	if v.crash {
		defer s.in.dropOverlays()
	}
	if !v.perform {
		return v.err
	}
	if err := commit(); err != nil {
		return err
	}
	return v.err
}

// Inner returns the wrapped store.
func (s *Store) Inner() meta.Store { return s.inner }

// View implements meta.Store.
func (s *Store) View(ctx context.Context, fn func(*meta.Tx) error) error {
	v := s.in.decide(Call{Op: OpView, Target: s.name})
	if v.crash {
		s.in.dropOverlays()
		return v.err
	}
	if !v.perform {
		return v.err
	}
	if err := s.inner.View(ctx, fn); err != nil {
		return err
	}
	return v.err
}

// Update implements meta.Store. On a grouped store the step is the
// commit (see Store). Otherwise a failed Update (not Durable) keeps
// nothing; a Durable one commits and reports the error; a crashing one
// commits only if the crash keeps its step.
func (s *Store) Update(ctx context.Context, fn func(*meta.Tx) error) error {
	if s.grouped {
		if s.in.Crashed() {
			return fmt.Errorf("%v: %w", Call{Op: OpUpdate, Target: s.name}, ErrCrashed)
		}
		return s.inner.Update(ctx, fn)
	}
	v := s.in.decide(Call{Op: OpUpdate, Target: s.name})
	if v.crash {
		defer s.in.dropOverlays()
	}
	if !v.perform {
		return v.err
	}
	if err := s.inner.Update(ctx, fn); err != nil {
		return err
	}
	return v.err
}

// Close implements meta.Store: it closes the inner store, even after a
// crash (the test reopens its file).
func (s *Store) Close() error { return s.inner.Close() }
