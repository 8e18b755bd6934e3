package offlinecheck

import "errors"

// ErrDamaged is wrapped, with the store's own error (which wraps
// meta.ErrCorrupt), when the check could not finish because records are
// corrupt: that is damage found, not a check that failed to run.
var ErrDamaged = errors.New("check")
