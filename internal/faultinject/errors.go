package faultinject

import "errors"

// Errors of this package.
var (
	// ErrCrashed is returned by every call of every wrapper of an
	// injector that has crashed.
	ErrCrashed = errors.New("faultinject: crashed")
)
