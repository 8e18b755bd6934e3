package main

import (
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"segmap/internal/tlsconf"
)

func newCerts() *cobra.Command {
	certs := &cobra.Command{
		Use:   "certs",
		Short: "create the cluster CA and the certificates segmap components authenticate each other with",
		Long: `segmap components talk over mutual TLS under one cluster CA. Each
certificate names one identity: a role (controller, agent, storage or
admin for the CLI) and a name. 'certs init' creates the CA and a first set
of certificates; 'certs issue' adds one more, signed by the same CA.

Files in DIR: ca.crt and ca.key, and ROLE-NAME.crt and ROLE-NAME.key for
each identity (keys readable by their owner only). Copy to each machine
ca.crt and its own certificate and key; keep ca.key where only whoever
issues certificates can read it.`,
	}
	certs.AddCommand(newCertsInit(), newCertsIssue())
	return certs
}

func parseValidity(s string, allowExpired bool) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil || d == 0 || (d < 0 && !allowExpired) {
		return 0, usageError{fmt.Errorf("--validity %q: want a positive duration such as 87600h", s)}
	}
	return d, nil
}

// certsError turns the errors a caller can fix by changing the command
// line into usage errors.
func certsError(err error) error {
	if errors.Is(err, tlsconf.ErrInvalidName) || errors.Is(err, tlsconf.ErrUnknownRole) {
		return usageError{err}
	}
	return err
}

func newCertsInit() *cobra.Command {
	var controllers, agents, storage, hosts []string
	var validity string
	var force bool
	cmd := &cobra.Command{
		Use:   "init DIR [--controller NAME ...] [--agent NAME ...] [--storage NAME ...] [--host H ...] [--validity 87600h] [--force]",
		Short: "create a cluster CA in DIR and certificates for the given identities (and the admin CLI)",
		Long: `init creates DIR/ca.crt and DIR/ca.key (ECDSA P-256) and a certificate
and key for every controller, agent and storage server named, plus the
admin certificate the CLI uses. Server certificates are valid for their
name and for each --host (DNS name or IP address; default localhost and
127.0.0.1). init refuses to replace an existing CA unless --force: every
certificate signed by the old one would stop being trusted.`,
		Args: exactArgs(1, "one directory"),
		RunE: func(cmd *cobra.Command, args []string) error {
			d, err := parseValidity(validity, false)
			if err != nil {
				return err
			}
			if len(controllers) == 0 {
				controllers = []string{tlsconf.RoleController}
			}
			opts := tlsconf.InitOptions{
				Controllers: controllers,
				Agents:      agents,
				Storage:     storage,
				Admin:       true,
				Hosts:       hosts,
				Validity:    d,
				Force:       force,
			}
			dir := args[0]
			if err := tlsconf.Init(dir, opts); err != nil {
				if errors.Is(err, tlsconf.ErrExists) {
					return fmt.Errorf("%w (pass --force to replace the CA and every certificate)", err)
				}
				return certsError(err)
			}
			w := cmd.OutOrStdout()
			rows := [][]string{{"CA", "-", filepath.Join(dir, tlsconf.CACertFile), filepath.Join(dir, tlsconf.CAKeyFile)}}
			for _, id := range []struct {
				role  string
				names []string
			}{
				{tlsconf.RoleController, controllers},
				{tlsconf.RoleAgent, agents},
				{tlsconf.RoleStorage, storage},
				{tlsconf.RoleAdmin, []string{tlsconf.RoleAdmin}},
			} {
				for _, n := range id.names {
					rows = append(rows, identityRow(dir, id.role, n))
				}
			}
			if err := table(w, filesHeader, rows); err != nil {
				return err
			}
			printValid(w, d)
			printHosts(w, hosts)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringSliceVar(&controllers, "controller", nil, "name of a controller (repeat or separate with commas; default \"controller\")")
	fl.StringSliceVar(&agents, "agent", nil, "name of an agent (repeat or separate with commas)")
	fl.StringSliceVar(&storage, "storage", nil, "name of a storage server (repeat or separate with commas)")
	fl.StringSliceVar(&hosts, "host", nil, "DNS name or IP address added to every server certificate (default localhost and 127.0.0.1)")
	fl.StringVar(&validity, "validity", "87600h", "how long the certificates are valid")
	fl.BoolVar(&force, "force", false, "replace an existing CA and certificates")
	return cmd
}

func newCertsIssue() *cobra.Command {
	var role, name, validity string
	var hosts []string
	cmd := &cobra.Command{
		Use:   "issue DIR --role R --name N [--host H ...] [--validity 87600h]",
		Short: "add one certificate signed by the cluster CA in DIR",
		Long: `issue writes DIR/ROLE-NAME.crt and DIR/ROLE-NAME.key, signed by DIR/ca.crt
and DIR/ca.key. It refuses to overwrite them: remove both to reissue. A
negative --validity issues a certificate that expired that long ago, for
testing that peers refuse it.`,
		Args: exactArgs(1, "one directory (holding ca.crt and ca.key)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if role == "" || name == "" {
				return usageError{fmt.Errorf("--role and --name are required (roles: %s)", strings.Join(tlsconf.Roles, ", "))}
			}
			d, err := parseValidity(validity, true)
			if err != nil {
				return err
			}
			if err := tlsconf.Issue(args[0], role, name, hosts, d); err != nil {
				return certsError(err)
			}
			w := cmd.OutOrStdout()
			if err := table(w, filesHeader, [][]string{identityRow(args[0], role, name)}); err != nil {
				return err
			}
			printValid(w, d)
			if role != tlsconf.RoleAdmin {
				printHosts(w, hosts)
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&role, "role", "", "role: "+strings.Join(tlsconf.Roles, ", "))
	fl.StringVar(&name, "name", "", "name of the identity (the certificate's Common Name)")
	fl.StringSliceVar(&hosts, "host", nil, "DNS name or IP address the server certificate is valid for besides its name (default localhost and 127.0.0.1)")
	fl.StringVar(&validity, "validity", "87600h", "how long the certificate is valid (negative: already expired, for tests)")
	return cmd
}

var filesHeader = []string{"ROLE", "NAME", "CERTIFICATE", "KEY"}

func identityRow(dir, role, name string) []string {
	f := tlsconf.DirFiles(dir, role, name)
	return []string{role, name, f.Cert, f.Key}
}

func printValid(w io.Writer, d time.Duration) {
	if d < 0 {
		fmt.Fprintf(w, "expired %s ago\n", -d)
		return
	}
	fmt.Fprintf(w, "valid until about %s\n", time.Now().Add(d).UTC().Format(time.DateOnly))
}

func printHosts(w io.Writer, hosts []string) {
	if len(hosts) == 0 {
		hosts = tlsconf.DefaultHosts
	}
	fmt.Fprintf(w, "server certificates also valid for: %s\n", strings.Join(hosts, ", "))
}
