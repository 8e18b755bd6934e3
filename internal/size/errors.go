package size

import "errors"

// ErrSyntax is returned for a string that is not a size.
var ErrSyntax = errors.New("not a size (want a number with an optional unit: 4096, 64K, 512M, 10G, 1T)")

// ErrRange is returned for a size that does not fit 64 bits or is not a
// whole number of bytes.
var ErrRange = errors.New("size out of range")
