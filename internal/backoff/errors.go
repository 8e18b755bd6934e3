package backoff

import "errors"

// ErrGaveUp is returned by Wait once Policy.Limit has passed since the
// Backoff started: the caller should stop retrying and return its last
// error.
var ErrGaveUp = errors.New("backoff: gave up")
