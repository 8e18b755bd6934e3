// Command segmap is the one segmap binary: `segmap up` runs controller,
// agent and a file-backed container pool in one process; the other
// subcommands administer a running segmap.
//
// This build has the core engine only; `segmap up`, the NBD front end and
// the CLI arrive next (see README.md).
package main

import (
	"fmt"
	"os"
)

const usage = `segmap: a distributed virtual block store with instant snapshots

usage:
  segmap up        run controller, agent and a file container pool in one process
  segmap version   print the version

The NBD front end and the admin commands are not built yet: this build holds
the core engine (mapping tables, controller, agent, bbolt metadata, file
containers), exercised by 'make test'.
`

var version = "0.1.0-dev"

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return 2
	}
	switch args[0] {
	case "up":
		fmt.Fprintln(os.Stderr, "segmap up: not implemented yet in this build (the NBD front end comes next); run 'make test' to exercise the engine")
		return 1
	case "version":
		fmt.Println("segmap", version)
		return 0
	case "-h", "--help", "help":
		fmt.Print(usage)
		return 0
	}
	fmt.Fprintf(os.Stderr, "segmap: unknown command %q\n\n%s", args[0], usage)
	return 2
}
