package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"

	"segmap/internal/listen"
)

// servePprof serves the runtime profiles (net/http/pprof) on addr, for
// profiling a running 'segmap up': go tool pprof http://ADDR/debug/pprof/profile.
// It binds before returning, so a busy port is an error now; the returned
// function stops the server. It has no TLS nor authentication, and what
// it serves (the command line, memory, run time) is for the machine's
// own: off loopback it is refused unless insecure (--insecure).
func servePprof(addr string, insecure bool, log *slog.Logger) (stop func(), err error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("pprof listener: %w", err)
	}
	if !insecure && !listen.Local(l.Addr()) {
		l.Close()
		return nil, usageError{fmt.Errorf("pprof listener --pprof %s (%s) is reachable from the network, and pprof has no TLS nor authentication: "+
			"listen on a loopback address (127.0.0.1:PORT, then ssh -L), or pass --insecure to serve it anyway", addr, l.Addr())}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("pprof server", "err", err)
		}
	}()
	return func() {
		srv.Close()
		<-done
	}, nil
}
