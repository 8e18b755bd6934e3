package ha

import "errors"

// errLeaseUnsure ends a term whose session may have expired in etcd.
var errLeaseUnsure = errors.New("cannot confirm the etcd session: it may have expired")
