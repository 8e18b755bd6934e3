package main

import (
	"fmt"
	"log/slog"
	"net"
	"path/filepath"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	pb "segmap/api/segmapv1"
	"segmap/internal/dashboard"
)

// mountDashboard mounts the dashboard at / on hs, talking to the admin API
// listening at admin (the server's own) with creds, and reading hs's
// registry for its graphs. role says what the controller is. The
// returned function stops it.
func mountDashboard(hs *httpServer, admin net.Addr, creds credentials.TransportCredentials, role func() string, log *slog.Logger) (func(), error) {
	if hs.URL() == "" {
		return func() {}, nil // no listener: nobody to serve it to
	}
	conn, err := grpc.NewClient(selfTarget(admin), grpc.WithTransportCredentials(creds))
	if err != nil {
		return nil, fmt.Errorf("dashboard: admin client: %w", err)
	}
	d := dashboard.New(dashboard.Config{Admin: pb.NewAdminClient(conn), Gatherer: hs.Registry, Logger: log, Role: role})
	hs.Handle("/", d)
	return func() {
		d.Close()
		conn.Close()
	}, nil
}

// selfTarget is the gRPC target that reaches a listener of this process
// bound to a: a wildcard address is reached on loopback.
func selfTarget(a net.Addr) string {
	switch a := a.(type) {
	case *net.UnixAddr:
		if p, err := filepath.Abs(a.Name); err == nil {
			return "unix:" + p // gRPC wants unix:ABSPATH
		}
		return "unix:" + a.Name
	case *net.TCPAddr:
		ip := a.IP
		if ip == nil || ip.IsUnspecified() {
			ip = net.IPv4(127, 0, 0, 1)
			if a.IP != nil && a.IP.To4() == nil {
				ip = net.IPv6loopback
			}
		}
		return net.JoinHostPort(ip.String(), fmt.Sprint(a.Port))
	}
	return a.String()
}
