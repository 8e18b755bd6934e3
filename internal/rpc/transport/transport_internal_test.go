package transport

import (
	"time"
)

// LeaseEndOf returns a function that reports when the server counts the
// lease of the agent attached under name as running out, or nil if no
// agent of that name is attached. The function keeps reporting for that
// attach even after its stream has ended (and the server has forgotten it),
// so a test can read the lease end a command waited for.
//
// It is exported to the external test package only (this is a _test.go
// file of package transport).
func LeaseEndOf(s *Server, name string) func() time.Time {
	s.mu.Lock()
	ra := s.agents[name]
	s.mu.Unlock()
	if ra == nil {
		return nil
	}
	return func() time.Time {
		ra.mu.Lock()
		defer ra.mu.Unlock()
		return ra.mu.leaseEnd
	}
}
