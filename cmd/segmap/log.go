package main

import (
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/spf13/cobra"
)

// logFlags are the global flags that shape the servers' logs (up,
// controller, agent, storage): text for a person at a terminal, JSON for
// a log collector, and how much.
type logFlags struct {
	format string
	level  string
}

// logFormats and logLevels are the values the flags take.
var (
	logFormats = []string{"text", "json"}
	logLevels  = map[string]slog.Level{"debug": slog.LevelDebug, "info": slog.LevelInfo, "warn": slog.LevelWarn, "error": slog.LevelError}
)

// add registers --log-format and --log-level on root, for every command.
func (f *logFlags) add(root *cobra.Command) {
	fl := root.PersistentFlags()
	fl.StringVar(&f.format, "log-format", "text", "format of the servers' logs on stderr: text or json (one object a line)")
	fl.StringVar(&f.level, "log-level", "info", "least level of the servers' logs: debug, info, warn or error")
}

// check refuses values the flags do not take, as a usage error.
func (f *logFlags) check() error {
	ok := false
	for _, v := range logFormats {
		ok = ok || f.format == v
	}
	if !ok {
		return usageError{fmt.Errorf("--log-format %q: want %s", f.format, strings.Join(logFormats, " or "))}
	}
	if _, ok := logLevels[f.level]; !ok {
		return usageError{fmt.Errorf("--log-level %q: want debug, info, warn or error", f.level)}
	}
	return nil
}

// logs holds the global log flags; newRoot registers them and checks
// them before any command runs.
var logs logFlags

// newLogger returns the logger of a server writing to w, as the global
// flags ask, and makes it slog's default, so that a component not
// handed it logs alike. Every server builds its logger here.
func newLogger(w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: logLevels[logs.level]}
	var h slog.Handler = slog.NewTextHandler(w, opts)
	if logs.format == "json" {
		h = slog.NewJSONHandler(w, opts)
	}
	l := slog.New(h)
	slog.SetDefault(l)
	return l
}
