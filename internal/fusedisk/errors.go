package fusedisk

import "errors"

var (
	// ErrClosed is returned by requests and by Resize once the disk has
	// been unmounted.
	ErrClosed = errors.New("fusedisk: disk is unmounted")
	// ErrBadConfig is returned by Mount for a Config lacking Addr,
	// Export or Dir.
	ErrBadConfig = errors.New("fusedisk: bad config")
)
