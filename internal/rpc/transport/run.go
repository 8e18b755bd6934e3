package transport

import (
	"context"
	"log/slog"
	"time"

	"segmap/internal/agent"
	"segmap/internal/backoff"
)

// attachBackoff spaces RunAgent's failed attaches: 100 ms doubling to
// 500 ms, from the start again after each attach.
var attachBackoff = backoff.Policy{Initial: 100 * time.Millisecond, Max: 500 * time.Millisecond}

// RunAgent keeps agent a attached to the controller behind c until ctx
// ends: it attaches, and whenever the session ends (the stream broke, the
// lease is about to lapse) it fences the agent (every entry Invalid, I/O
// held) and attaches again, with backoff. I/O resumes after each attach,
// reloading entries by faulting. attached, if not nil, is called after
// each successful attach.
func RunAgent(ctx context.Context, a *agent.Agent, c *Client, logger *slog.Logger, attached func()) {
	if logger == nil {
		logger = slog.Default()
	}
	b := backoff.New(attachBackoff, nil)
	for ctx.Err() == nil {
		actx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := a.Attach(actx, c)
		cancel()
		if err != nil {
			d := b.Next()
			logger.Warn("attach failed; retrying", "err", err, "in", d)
			_ = b.Sleep(ctx, d) // ends early with ctx, and so does the loop
			continue
		}
		b.Reset()
		logger.Info("attached to the controller", "lease_end", c.LeaseEnd())
		if attached != nil {
			attached()
		}
		select {
		case <-c.Done():
			logger.Warn("session with the controller ended; fencing")
			c.EndCommands()
			fctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			if err := a.Fence(fctx); err != nil {
				logger.Warn("fence", "err", err)
			}
			cancel()
		case <-ctx.Done():
		}
	}
}
