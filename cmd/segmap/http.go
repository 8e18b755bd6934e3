package main

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"

	"segmap/internal/listen"
	"segmap/internal/tlsconf"
)

// httpFlags are the flags of a server's HTTP listener: Prometheus metrics
// at /metrics and, on the commands that have one, the dashboard at /.
type httpFlags struct {
	listen   string
	insecure bool
}

// add registers --http-listen (default def; "" leaves the listener off)
// and --http-insecure on cmd.
func (f *httpFlags) add(cmd *cobra.Command, def, what string) {
	fl := cmd.Flags()
	off := ""
	if def == "" {
		off = "; off by default"
	}
	fl.StringVar(&f.listen, "http-listen", def, fmt.Sprintf("address of the HTTP listener: %s (host:port, unix:PATH or fd:N%s)", what, off))
	fl.BoolVar(&f.insecure, "http-insecure", false, "serve the HTTP listener in plaintext and without authentication even on a non-loopback address")
}

// httpServer is a server's HTTP listener. Registry is the registry its
// components register their metrics with; it exists even when the
// listener is off, so that components need not care.
type httpServer struct {
	Registry *prometheus.Registry
	mux      *http.ServeMux
	l        net.Listener // nil: the listener is off
	tls      bool
	log      *slog.Logger
	srv      *http.Server
	done     chan struct{}
}

// newHTTP binds the listener of f (a busy port is an error now, not
// later) and makes the registry, with the Go runtime's and the process's
// collectors. m is the server's TLS identity (nil: plaintext): with it,
// the listener serves TLS and asks for a certificate of the cluster CA
// (roles admin and controller: the CLI's and a Prometheus given one).
// A non-loopback listener without TLS is refused unless --http-insecure.
func newHTTP(f *httpFlags, m *tlsconf.Material, log *slog.Logger) (*httpServer, error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	s := &httpServer{Registry: reg, mux: http.NewServeMux(), log: log}
	s.mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}))
	if f.listen == "" {
		return s, nil
	}
	l, err := listenChecked("HTTP", "--http-listen", f.listen, m != nil, f.insecure, "--http-insecure (or --insecure)")
	if err != nil {
		return nil, err
	}
	if m != nil {
		cfg := m.Server(tlsconf.RoleAdmin, tlsconf.RoleController)
		cfg.NextProtos = []string{"h2", "http/1.1"}
		l = tls.NewListener(l, cfg)
		s.tls = true
	}
	s.l = l
	return s, nil
}

// listenChecked binds the listener given as flag (a busy port is an
// error now, not later) and refuses it, closed, if refuseExposed does.
func listenChecked(what, flag, given string, secure, insecure bool, insecureFlag string) (net.Listener, error) {
	l, err := listen.Listen(given)
	if err != nil {
		return nil, fmt.Errorf("%s listener: %w", what, err)
	}
	if err := refuseExposed(what, flag, given, l.Addr(), secure, insecure, insecureFlag); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// refuseExposed refuses a listener (given on the command line with flag,
// bound to a) that the network can reach (not loopback, not a Unix
// socket) serving plaintext, unless the user said so with insecureFlag: segmap's listeners hand out disks and the power
// to delete them, and must not do so to a whole network by accident.
func refuseExposed(what, flag, given string, a net.Addr, secure, insecure bool, insecureFlag string) error {
	if secure || insecure || listen.Local(a) {
		return nil
	}
	return exposedError(what, flag, given, a, "give --certs DIR (see 'segmap certs init')", insecureFlag)
}

// exposedError is the error refusing such a listener; fix says how to
// give it TLS.
func exposedError(what, flag, given string, a net.Addr, fix, insecureFlag string) error {
	return usageError{fmt.Errorf("%s listener %s %s (%s) is reachable from the network, without TLS or authentication: "+
		"%s, listen on a loopback address, or pass %s to serve it in plaintext anyway",
		what, flag, given, a, fix, insecureFlag)}
}

// Handle mounts h at pattern (net/http.ServeMux patterns).
func (s *httpServer) Handle(pattern string, h http.Handler) { s.mux.Handle(pattern, h) }

// URL returns the listener's base URL, or "" when it is off.
func (s *httpServer) URL() string {
	if s.l == nil {
		return ""
	}
	scheme := "http"
	if s.tls {
		scheme = "https"
	}
	if _, ok := s.l.Addr().(*net.UnixAddr); ok {
		return scheme + "+unix://" + s.l.Addr().String() + "/"
	}
	return scheme + "://" + s.l.Addr().String() + "/"
}

// Serve starts serving, if the listener is on.
func (s *httpServer) Serve() {
	if s.l == nil {
		return
	}
	s.srv = &http.Server{
		Handler:           s.mux,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	s.done = make(chan struct{})
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(s.l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Warn("HTTP server", "err", err)
		}
	}()
}

// Close stops the server and closes the listener.
func (s *httpServer) Close() {
	switch {
	case s.srv != nil:
		s.srv.Close()
		<-s.done
	case s.l != nil:
		s.l.Close()
	}
}
