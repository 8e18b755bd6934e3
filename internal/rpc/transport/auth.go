package transport

import (
	"context"
	"fmt"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"segmap/internal/rpc/protocol"
	"segmap/internal/tlsconf"
)

// peerIdentity returns the role and name of the caller's verified
// certificate; tls is false on a plaintext connection (an --insecure
// cluster), where there is nothing to enforce.
func peerIdentity(ctx context.Context) (role, name string, tls bool, err error) {
	p, ok := peer.FromContext(ctx)
	if !ok || p.AuthInfo == nil {
		return "", "", false, nil
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return "", "", false, nil
	}
	role, name, err = tlsconf.PeerIdentity(info.State)
	return role, name, true, err
}

// checkAgent makes sure a request that names agent comes from that agent:
// with TLS, an agent's certificate is its identity, and agent A cannot
// act as B.
func checkAgent(ctx context.Context, agent string) error {
	role, name, tls, err := peerIdentity(ctx)
	if !tls {
		return nil
	}
	if err != nil {
		return fmt.Errorf("caller's certificate: %v: %w", err, protocol.ErrFenced)
	}
	if role != tlsconf.RoleAgent || name != agent {
		return status.Errorf(codes.PermissionDenied, "certificate %s %q may not act as agent %q", role, name, agent)
	}
	return nil
}

// Role checks every call against the role its service needs: the admin
// API takes the admin (CLI) certificate, the mapping protocol an agent's.
// On plaintext connections nothing is checked.
func roleFor(method string) string {
	switch {
	case strings.HasPrefix(method, "/segmap.v1.Admin/"):
		return tlsconf.RoleAdmin
	case strings.HasPrefix(method, "/segmap.v1.Mapping/"):
		return tlsconf.RoleAgent
	}
	return ""
}

func checkRole(ctx context.Context, method string) error {
	role, name, tls, err := peerIdentity(ctx)
	if !tls {
		return nil
	}
	if err != nil {
		return status.Errorf(codes.Unauthenticated, "caller's certificate: %v", err)
	}
	if want := roleFor(method); want == "" || role != want {
		return status.Errorf(codes.PermissionDenied, "certificate %s %q may not call %s", role, name, method)
	}
	return nil
}

// ServerOptions returns the gRPC server options that enforce roles per
// service.
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			if err := checkRole(ctx, info.FullMethod); err != nil {
				return nil, err
			}
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if err := checkRole(ss.Context(), info.FullMethod); err != nil {
				return err
			}
			return h(srv, ss)
		}),
	}
}
