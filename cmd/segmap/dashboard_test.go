package main

import (
	"net"
	"testing"
)

func TestSelfTarget(t *testing.T) {
	for _, tt := range []struct {
		a    net.Addr
		want string
	}{
		{&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 10810}, "127.0.0.1:10810"},
		{&net.TCPAddr{IP: net.IPv4zero, Port: 10810}, "127.0.0.1:10810"},
		{&net.TCPAddr{IP: net.IPv6unspecified, Port: 10810}, "[::1]:10810"},
		{&net.TCPAddr{Port: 10810}, "127.0.0.1:10810"},
		{&net.TCPAddr{IP: net.ParseIP("10.0.0.5"), Port: 10810}, "10.0.0.5:10810"},
		{&net.UnixAddr{Name: "/run/segmap/admin.sock", Net: "unix"}, "unix:/run/segmap/admin.sock"},
	} {
		if got := selfTarget(tt.a); got != tt.want {
			t.Errorf("selfTarget(%v) = %q, want %q", tt.a, got, tt.want)
		}
	}
}
