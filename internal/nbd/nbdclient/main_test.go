package nbdclient

import (
	"testing"

	"segmap/internal/leaktest"
)

// TestMain fails the package if a goroutine of the client or of the server
// it is tested against outlives the tests (the fuzzing engine's own are
// not counted).
func TestMain(m *testing.M) {
	leaktest.VerifyTestMain(m, leaktest.Matching("segmap/internal/nbd"))
}
