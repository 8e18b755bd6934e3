package transport

import (
	"fmt"
	"testing"

	pb "segmap/api/segmapv1"
	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
)

// TestCodeOfStepDown: a controller stepping down answers with errors its
// agents retry (on the next leader), not with I/O errors for their hosts.
func TestCodeOfStepDown(t *testing.T) {
	for _, err := range []error{meta.ErrLeadershipLost, meta.ErrClosed, controller.ErrClosed, protocol.ErrUnavailable} {
		if got := codeOf(fmt.Errorf("fault: %w", err)); got != pb.Code_CODE_UNAVAILABLE {
			t.Errorf("codeOf(%v) = %v, want CODE_UNAVAILABLE", err, got)
		}
	}
	if got := codeOf(fmt.Errorf("x: %w", meta.ErrCorrupt)); got != pb.Code_CODE_IO {
		t.Errorf("codeOf(ErrCorrupt) = %v, want CODE_IO", got)
	}
}
