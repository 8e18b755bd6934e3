package standalone_test

import (
	"testing"

	"segmap/internal/leaktest"
)

// TestMain fails the package if goroutines started by its tests are still
// running a few seconds after the last test: whoever starts a goroutine
// must stop it.
func TestMain(m *testing.M) { leaktest.VerifyTestMain(m) }
