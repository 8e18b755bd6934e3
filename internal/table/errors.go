package table

import "errors"

var (
	// ErrRange is returned when an entry range is outside the table.
	ErrRange = errors.New("entry range outside the table")
	// ErrVoided is returned when SetEntryState is asked to clear Invalid,
	// Error or Zero: those states void the location, so the entry must be
	// replaced whole with SetEntry.
	ErrVoided = errors.New("state voids the location; replace the entry with set_entry")
	// ErrBadState is returned for an empty or undefined set of state bits.
	ErrBadState = errors.New("undefined entry state")
	// ErrBadPolicy is returned for an unknown copy-on-write policy.
	ErrBadPolicy = errors.New("unknown copy-on-write policy")
)
