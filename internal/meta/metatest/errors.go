package metatest

import "errors"

// errStop is returned by callbacks to stop an iteration, and by transaction
// functions to abort an Update.
var errStop = errors.New("metatest: stop")

// errInjected is the error a commit hook fails a commit with.
var errInjected = errors.New("metatest: injected commit failure")
