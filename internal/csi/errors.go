package csi

import "errors"

// The driver's own errors. The errors it answers CSI calls with are gRPC
// statuses with the codes the CSI spec names.
var (
	// ErrBadMode is returned by ParseMode for a mode it does not know.
	ErrBadMode = errors.New("unknown mode")
	// ErrConfig is returned by New for a configuration it cannot run.
	ErrConfig = errors.New("bad configuration")
)

// ErrNoExport is returned by an Attacher for an export the host's agent
// does not serve: no such disk, or one not granted to this agent.
var ErrNoExport = errors.New("the agent serves no such export")
