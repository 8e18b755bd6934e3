// Package offlinecheck checks, and repairs, a controller's metadata
// without a running controller: the bbolt store of a stopped controller
// or 'segmap up' (Bolt), or the store in etcd read at one revision (Etcd).
// It is 'segmap check --data' and 'segmap check --etcd'.
//
// Damage that bbolt itself panics on is reported as a problem, never as a
// crash; a check that cannot finish because records are corrupt returns
// an error wrapping ErrDamaged. Repair only reclaims leaked slots, and only
// when nothing else is wrong (controller.Repairable); it opens the store
// for writing only then.
package offlinecheck

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	clientv3 "go.etcd.io/etcd/client/v3"

	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/meta"
)

// Result is what a check found and, with repair, what it fixed.
type Result struct {
	// Problems are those found (after a repair: those left).
	Problems []controller.Problem
	// Repaired are those a repair fixed.
	Repaired []controller.Problem
	// Refused, if not empty, says why a repair was refused, changing
	// nothing.
	Refused string
}

// Bolt checks (and with repair, repairs) the bbolt store DIR/meta.db of a
// stopped controller. It opens the store read-only, and for writing only
// to reclaim leaks when nothing else is wrong.
func Bolt(ctx context.Context, dir string, repair bool) (*Result, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	path := filepath.Join(dir, "meta.db")
	check := func(st *meta.Bolt) (ps []controller.Problem, err error) {
		// bbolt panics on some damage below the records; Check runs
		// its own file check first, which reports that damage
		// without panicking, but it may not see everything.
		defer func() {
			if r := recover(); r != nil {
				ps, err = []controller.Problem{{Kind: controller.DamagedFile, Detail: fmt.Sprintf("bbolt: %v", r)}}, nil
			}
		}()
		ps, err = controller.New(controller.Config{Store: st}).Check(ctx)
		return ps, corruptAsDamage(err)
	}
	st, err := meta.OpenBoltReadOnly(path)
	switch {
	case errors.Is(err, meta.ErrLocked):
		return nil, fmt.Errorf("%s is in use by a running controller: stop it, or check through it (without --data)", path)
	case errors.Is(err, meta.ErrCorrupt):
		// Both of bbolt's meta pages fail, or the root does: nothing
		// to read.
		ps := []controller.Problem{{Kind: controller.DamagedFile, Detail: err.Error()}}
		out := &Result{Problems: ps}
		if repair {
			out.Refused = controller.Repairable(ps).Error()
		}
		return out, nil
	case err != nil:
		return nil, fmt.Errorf("no metadata store at %s: %w", path, err)
	}
	ps, err := check(st)
	st.Close()
	if err != nil {
		return nil, err
	}
	out := &Result{Problems: ps}
	if !repair || len(ps) == 0 {
		return out, nil
	}
	if err := controller.Repairable(ps); err != nil {
		out.Refused = err.Error()
		return out, nil
	}
	rw, err := meta.OpenBolt(path)
	if errors.Is(err, meta.ErrLocked) {
		return nil, fmt.Errorf("%s is in use by a running controller: stop it, or check through it (without --data)", path)
	}
	if err != nil {
		return nil, err
	}
	defer rw.Close()
	ctrl := controller.New(controller.Config{Store: rw, OpenContainer: container.OpenURI})
	defer ctrl.Close()
	fixed, err := ctrl.Repair(ctx)
	switch {
	case errors.Is(err, controller.ErrRepairRefused):
		out.Refused = err.Error()
	case err != nil:
		return nil, corruptAsDamage(err)
	}
	out.Repaired = fixed
	if ps, err = controller.New(controller.Config{Store: rw}).Check(ctx); err != nil {
		return nil, corruptAsDamage(err)
	}
	out.Problems = ps
	return out, nil
}

// Etcd checks the store in etcd under prefix (the controllers' prefix
// followed by ha.MetaPrefix), read at one revision. It changes nothing.
func Etcd(ctx context.Context, cli *clientv3.Client, prefix string) (*Result, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	st, err := meta.OpenEtcd(ctx, cli, prefix)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	ps, err := controller.New(controller.Config{Store: st}).Check(ctx)
	if err != nil {
		return nil, corruptAsDamage(err)
	}
	return &Result{Problems: ps}, nil
}

// corruptAsDamage marks a corrupt record error as damage found.
func corruptAsDamage(err error) error {
	if errors.Is(err, meta.ErrCorrupt) {
		return fmt.Errorf("%w: %w", ErrDamaged, err)
	}
	return err
}
