package meta

import (
	"fmt"
	"runtime"
	"strings"
)

// recoverBoltPanic, deferred by a read-only transaction, turns a panic
// raised inside bbolt (its assertions on a damaged page: a page that does
// not identify as itself, an unknown page type, a page id past the end of
// the file) into an error matching ErrCorrupt, so that a damaged file fails
// the request that read it, not the process. A panic raised anywhere else
// (the transaction's function) goes on.
func recoverBoltPanic(err *error) {
	r := recover()
	if r == nil {
		return
	}
	if !raisedInBolt() {
		panic(r)
	}
	*err = fmt.Errorf("bbolt file damaged: %v: %w", r, ErrCorrupt)
}

// raisedInBolt says whether the panic being recovered was raised by a
// function of bbolt: the first frame below runtime.gopanic that is not the
// runtime's own (an index out of range or a nil dereference inside bbolt
// goes through runtime.goPanicIndex or runtime.sigpanic first).
func raisedInBolt() bool {
	pcs := make([]uintptr, 64)
	n := runtime.Callers(0, pcs)
	frames := runtime.CallersFrames(pcs[:n])
	panicking := false
	for {
		f, more := frames.Next()
		if panicking && !strings.HasPrefix(f.Function, "runtime.") {
			return strings.HasPrefix(f.Function, "go.etcd.io/bbolt.") || strings.HasPrefix(f.Function, "go.etcd.io/bbolt/")
		}
		panicking = f.Function == "runtime.gopanic"
		if !more {
			return false
		}
	}
}
