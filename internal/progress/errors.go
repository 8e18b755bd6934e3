package progress

import "errors"

// ErrBothFlags is returned by Choose for --progress with --no-progress.
var ErrBothFlags = errors.New("--progress and --no-progress both given")
