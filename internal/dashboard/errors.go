package dashboard

import "errors"

// ErrCrossSite: a request that would change something came from another
// site (its Origin or Sec-Fetch-Site says so), or from a page the
// dashboard did not serve (no token or a wrong one), or through a host
// name on a loopback listener (DNS rebinding). It changes nothing.
var ErrCrossSite = errors.New("cross-site request refused")

// ErrNotSnapshot: the dashboard deletes only read-only snapshots; a
// writable disk is deleted with the CLI.
var ErrNotSnapshot = errors.New("not a snapshot")

// ErrBadRequest: a request body the API cannot use (not JSON, a missing
// field, a size that does not parse).
var ErrBadRequest = errors.New("bad request")
