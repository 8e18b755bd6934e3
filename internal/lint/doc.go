// Package lint checks the house rules (STYLE.md) that a machine can
// check, as a test: `go test ./internal/lint` fails on a violation, with
// the file, line and rule. The rules read the source with go/parser, so
// they need no build and no tools beyond the standard library.
//
// The rules walk every package under internal/ and cmd/, except where a
// rule names its packages (the wall clock rule). Existing exceptions are
// listed in allow-lists in lint_test.go, each with its reason; an allow-list entry
// that no longer matches anything fails the test too, so the lists only
// shrink.
package lint
