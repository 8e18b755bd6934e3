package controller

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
)

// TestSpentErrorMasksRetried: the error of a commit that may have landed
// is ErrIO and keeps its other causes, never one an agent retries on.
func TestSpentErrorMasksRetried(t *testing.T) {
	crash := errors.New("crashed")
	cause := fmt.Errorf("tell agents: %w", errors.Join(
		fmt.Errorf("agent a: %w", protocol.ErrUnavailable),
		fmt.Errorf("agent b: %w: %w", protocol.ErrFenced, context.DeadlineExceeded),
		fmt.Errorf("store: %w", fmt.Errorf("update: %w", crash)),
		meta.ErrUnreachable,
	))
	err := error(&spentError{msg: "commit", causes: keptCauses(cause)})
	if !errors.Is(err, protocol.ErrIO) || !errors.Is(err, crash) {
		t.Errorf("%v: want ErrIO and the crash", err)
	}
	for _, r := range retried {
		if errors.Is(err, r) {
			t.Errorf("%v wraps %v, which an agent retries on", err, r)
		}
	}
}
