// Package fusedisk turns an NBD export into a regular file, so that a
// loop device can make it a block device on a machine without the kernel
// NBD client (no nbd module) and without device-mapper.
//
// Mount serves a FUSE file system at a directory holding one file, disk,
// whose bytes are the export's: reads and writes go to the export through
// segmap's own NBD client (nbdclient), many in flight at once; fsync (and
// the flush of a close) become an NBD flush. 'losetup -f --show DIR/disk'
// then gives the block device.
//
// Why not nbdfuse (libnbd), which does the same: nbdfuse fixes the file's
// size at the NBD handshake, so a volume could never grow while it is in
// use. Here Resize dials the export again, learns its new size, swaps the
// new connection in for the old one (requests in flight on the old one
// finish there) and makes the kernel see the new size at once: attributes
// are never cached (attribute timeout 0), the inode is invalidated and the
// file stat'ed, so a following 'losetup -c' (LOOP_SET_CAPACITY) and
// resize2fs grow the device and the file system online.
//
// Caching: the file is opened with FOPEN_DIRECT_IO. The loop device's
// users already have a page cache (the file system above it); a second
// copy in the FUSE file's page cache would only cost memory and raise
// the question of staleness after a reconnect. With direct I/O every
// request of the loop device becomes FUSE requests straight to the NBD
// export, a write is with the export when it returns (not yet durable),
// and the loop device's flush (the fsync of the file system above) is a
// FUSE fsync, hence an NBD flush: what the file system synced is durable
// on the export.
//
// Contract of the file:
//
//   - Its size is the export's size as of Mount or the last Resize; it
//     cannot be truncated to any other size (EPERM).
//   - A read at or past the end returns 0 bytes; a read across the end is
//     short. A write at or past the end fails with EFBIG; one across the
//     end is short.
//   - A read-only export gives a read-only file (mode 0400, EROFS).
//   - An NBD error fails that request alone, with the matching errno
//     (EIO for most).
//   - If the connection breaks (the agent restarted), the request dials
//     the export again, with bounded backoff, and is retried on the new
//     connection; after Config.RetryFor (30 s by default) without a
//     connection it fails with EIO. A request that gets no answer within
//     Config.RequestTimeout fails with EIO. Nothing hangs forever.
//   - A retried write writes the same bytes again: harmless. But writes
//     answered and not yet flushed live in the server's write cache; if
//     the new connection reaches another cache (the server says which
//     with segmap's OptSegmapCache), they may be gone, and the next
//     fsync fails with EIO (once) instead of claiming them durable.
//
// Only the user who mounted it (root, for a loop device) can use the
// file: the mount has no allow_other.
package fusedisk
