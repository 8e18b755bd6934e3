// Command segmap is the one segmap binary.
//
//	segmap up                       run controller, agent (NBD) and a file container pool in one process
//	segmap controller               a controller alone (admin API and the agents' mapping protocol)
//	segmap agent                    a mapping agent serving NBD on a host
//	segmap storage                  a storage node serving files as NBD exports
//	segmap certs init|issue         the cluster CA and certificates
//	segmap disk create|list|info|resize|delete|grant|revoke
//	segmap snapshot SRC [--name N] [--writable] | --group D1 D2 ...
//	segmap container list|add
//	segmap check [--repair]
//	segmap status
//
// The admin commands talk to a controller over its gRPC admin API
// (--controller, default 127.0.0.1:10810 or $SEGMAP_CONTROLLER; --certs
// DIR for a controller with TLS).
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

var version = "0.1.0-dev"

// usageError marks errors in how a command was called (exit status 2).
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func main() {
	root := newRoot()
	err := root.Execute()
	if err == nil {
		return
	}
	fmt.Fprintf(os.Stderr, "segmap: %s\n", err)
	var ue usageError
	var ce codeError
	switch {
	case errors.As(err, &ue):
		os.Exit(2)
	case errors.As(err, &ce):
		os.Exit(ce.code)
	}
	os.Exit(1)
}

// codeError carries a specific exit status.
type codeError struct {
	code int
	err  error
}

func (e codeError) Error() string { return e.err.Error() }
func (e codeError) Unwrap() error { return e.err }

// globals are the flags every admin command takes.
type globals struct {
	controller string
	json       bool
	timeout    string
	tls        tlsFlags
	// noDeadline leaves a command unbounded by --timeout (a stream
	// takes as long as its bytes take).
	noDeadline bool
}

func newRoot() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:           "segmap",
		Short:         "segmap: a distributed virtual block store with instant snapshots",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version,
	}
	def := os.Getenv("SEGMAP_CONTROLLER")
	if def == "" {
		def = "127.0.0.1:10810"
	}
	root.PersistentFlags().StringVar(&g.controller, "controller", def, "admin API address of the controller (host:port or unix:PATH), or of every controller, comma-separated ($SEGMAP_CONTROLLER)")
	root.PersistentFlags().BoolVar(&g.json, "json", false, "print JSON instead of tables")
	root.PersistentFlags().StringVar(&g.timeout, "timeout", "60s", "how long an admin command may take")
	g.tls.add(root, "", true)
	logs.add(root)
	root.PersistentPreRunE = func(*cobra.Command, []string) error { return logs.check() }
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return usageError{fmt.Errorf("%w (see '%s --help')", err, c.CommandPath())}
	})
	root.AddCommand(newUp(), newController(), newAgent(), newDisk(g), newSnapshot(g), newContainer(g), newCheck(g), newStatus(g), newExport(g), newImport(g), newOperations(g), newCerts(), newStorage(), newCSI(g), newFusedisk(),
		&cobra.Command{
			Use:   "version",
			Short: "print the version",
			Args:  noArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				fmt.Fprintln(cmd.OutOrStdout(), "segmap", version)
				return nil
			},
		})
	return root
}

// noArgs refuses positional arguments with a usage error.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usageError{fmt.Errorf("%s takes no arguments, got %q", cmd.CommandPath(), args)}
	}
	return nil
}

// exactArgs wants n positional arguments.
func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usageError{fmt.Errorf("%s wants %s", cmd.CommandPath(), what)}
		}
		return nil
	}
}
