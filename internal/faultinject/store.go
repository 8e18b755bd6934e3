package faultinject

import (
	"context"

	"segmap/internal/meta"
)

// Store wraps a meta.Store: every View and Update is first put to its
// Injector. An Update is one persistence step, whatever fn does.
type Store struct {
	inner meta.Store
	name  string
	in    *Injector
}

var _ meta.Store = (*Store)(nil)

// Store wraps st under name.
func (in *Injector) Store(name string, st meta.Store) *Store {
	return &Store{inner: st, name: name, in: in}
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

// Update implements meta.Store. A failed Update (not Durable) keeps
// nothing; a Durable one commits and reports the error; a crashing one
// commits only if the crash keeps its step.
func (s *Store) Update(ctx context.Context, fn func(*meta.Tx) error) error {
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
