package leaktest

import "testing"

// TestMain checks this package's own tests, which start goroutines to
// leak on purpose, for leaks: each stops what it started.
func TestMain(m *testing.M) { VerifyTestMain(m) }
