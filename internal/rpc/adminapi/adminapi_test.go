package adminapi

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"

	"segmap/internal/container"
	"segmap/internal/controller"
	"segmap/internal/meta"
	"segmap/internal/rpc/protocol"
	"segmap/internal/stream"
)

func TestCode(t *testing.T) {
	wrap := func(err error) error { return fmt.Errorf("context: %w", err) }
	for _, tt := range []struct {
		err  error
		want codes.Code
	}{
		{nil, codes.OK},
		{wrap(controller.ErrInvalidName), codes.InvalidArgument},
		{wrap(controller.ErrInvalidSize), codes.InvalidArgument},
		{wrap(controller.ErrInvalidSegmentSize), codes.InvalidArgument},
		{wrap(container.ErrNotContainer), codes.InvalidArgument},
		{wrap(protocol.ErrNotFound), codes.NotFound},
		{wrap(meta.ErrNotFound), codes.NotFound},
		{wrap(controller.ErrExists), codes.AlreadyExists},
		{wrap(controller.ErrShrink), codes.FailedPrecondition},
		{wrap(controller.ErrNoPool), codes.FailedPrecondition},
		{wrap(protocol.ErrNoSpace), codes.ResourceExhausted},
		{wrap(controller.ErrClosed), codes.Unavailable},
		{wrap(meta.ErrLeadershipLost), codes.Unavailable},
		{wrap(meta.ErrUnreachable), codes.Unavailable},
		{wrap(meta.ErrClosed), codes.Unavailable},
		{wrap(controller.ErrRepairRefused), codes.FailedPrecondition},
		{wrap(meta.ErrCorrupt), codes.DataLoss},
		{wrap(stream.ErrCorrupt), codes.InvalidArgument},
		{wrap(stream.ErrTruncated), codes.InvalidArgument},
		{wrap(controller.ErrOtherLineage), codes.InvalidArgument},
		{wrap(controller.ErrWrongBase), codes.FailedPrecondition},
		{wrap(controller.ErrWrittenSince), codes.FailedPrecondition},
		{wrap(controller.ErrContainerInUse), codes.FailedPrecondition},
		{wrap(controller.ErrContainerFailed), codes.FailedPrecondition},
		{wrap(controller.ErrDrainStuck), codes.FailedPrecondition},
		{wrap(controller.ErrNotSnapshot), codes.FailedPrecondition},
		{wrap(&meta.RecordError{Key: []byte("p/1"), Reason: "record of 9 bytes", Truncated: true}), codes.DataLoss},
		{wrap(context.DeadlineExceeded), codes.DeadlineExceeded},
		{errors.New("disk on fire"), codes.Internal},
	} {
		if got := Code(tt.err); got != tt.want {
			t.Errorf("Code(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}
