package fusedisk

import "errors"

var (
	// ErrClosed is returned by requests and by Resize once the disk has
	// been unmounted.
	ErrClosed = errors.New("fusedisk: disk is unmounted")
	// ErrBadConfig is returned by Mount for a Config lacking Addr,
	// Export or Dir.
	ErrBadConfig = errors.New("fusedisk: bad config")
	// ErrUnflushedLost fails a flush (EIO to fsync) when writes answered
	// but not yet flushed may have been lost: the connection was replaced
	// by one to a server with another write cache (it restarted and says
	// so through nbdwire.OptSegmapCache).
	ErrUnflushedLost = errors.New("fusedisk: unflushed writes may have been lost with the server's write cache")
)
