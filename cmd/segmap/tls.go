package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"segmap/internal/tlsconf"
)

// tlsFlags are the TLS flags of the cluster commands: certificates from a
// directory made by 'segmap certs init', or plaintext only when asked for.
type tlsFlags struct {
	certs      string // directory with ca.crt and ROLE-NAME.crt/.key
	name       string // this component's certificate name
	insecure   bool
	serverName string // the controller's certificate name (clients)
}

func (f *tlsFlags) add(cmd *cobra.Command, defName string, client bool) {
	fl := cmd.Flags()
	if client {
		fl = cmd.PersistentFlags()
	}
	fl.StringVar(&f.certs, "certs", "", "directory of TLS certificates made by 'segmap certs init' (ca.crt, ROLE-NAME.crt, ROLE-NAME.key)")
	fl.BoolVar(&f.insecure, "insecure", false, "talk plaintext, without TLS (only on a trusted network)")
	if defName != "" {
		fl.StringVar(&f.name, "cert-name", defName, "name of this component's certificate in --certs")
	}
	if client {
		fl.StringVar(&f.serverName, "controller-name", "controller", "the controller's certificate name")
	}
}

func (f *tlsFlags) material(role, name string) (*tlsconf.Material, error) {
	m, err := tlsconf.DirFiles(f.certs, role, name).Load()
	if err != nil {
		return nil, fmt.Errorf("TLS: %w", err)
	}
	return m, nil
}

// identity returns this component's TLS identity, role/name from --certs,
// or nil for plaintext: with --insecure, or, unless required, with
// neither flag.
func (f *tlsFlags) identity(role, name string, required bool) (*tlsconf.Material, error) {
	if f.certs == "" {
		if required {
			return nil, f.require()
		}
		return nil, nil
	}
	return f.material(role, name)
}

// require refuses plaintext unless --insecure says so: the servers that
// talk to the rest of a cluster run with --certs or --insecure.
func (f *tlsFlags) require() error {
	if f.certs == "" && !f.insecure {
		return usageError{errors.New("TLS: pass --certs DIR (see 'segmap certs init'), or --insecure for plaintext")}
	}
	return nil
}

// serverCreds returns the gRPC credentials of a server holding m (nil:
// plaintext) that accepts the given client roles.
func serverCreds(m *tlsconf.Material, clientRoles ...string) credentials.TransportCredentials {
	if m == nil {
		return insecure.NewCredentials()
	}
	return credentials.NewTLS(m.Server(clientRoles...))
}

// client returns the credentials for connecting to the controller as role
// name. required: --certs or --insecure must be given (agents); otherwise
// no --certs means plaintext (the CLI against 'segmap up').
func (f *tlsFlags) client(role, name string, required bool) (credentials.TransportCredentials, error) {
	m, err := f.identity(role, name, required)
	if err != nil {
		return nil, err
	}
	return f.clientCreds(m), nil
}

// clientCreds returns the gRPC credentials for connecting to the
// controller holding m (nil: plaintext).
func (f *tlsFlags) clientCreds(m *tlsconf.Material) credentials.TransportCredentials {
	if m == nil {
		return insecure.NewCredentials()
	}
	return credentials.NewTLS(m.Client(f.serverName, tlsconf.RoleController))
}
