// Package e2e holds segmap's end-to-end tests: they build the segmap
// binary, start `segmap up` as a real process, and drive it with the
// standard Linux NBD clients (nbdinfo, nbdcopy, qemu-io, fio's nbd engine,
// libnbd's Python binding, nbdfuse + losetup + mkfs.ext4), with the
// segmap CLI, and with headless Chromium for the dashboard. `make deps` installs the clients; a missing one fails the
// tests rather than skipping them.
package e2e
