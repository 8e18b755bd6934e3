package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// exposed is a non-loopback address: it binds, and every network the
// machine is on reaches it.
const exposed = "0.0.0.0:0"

// refusedRun runs segmap with args, which must exit non-zero within 30s,
// and returns its exit status and stderr.
func refusedRun(t *testing.T, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var errOut syncBuffer
	cmd.Stderr = &errOut
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("segmap %s: still running after 30s, want it refused\n%s", strings.Join(args, " "), errOut.String())
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("segmap %s: %v, want it refused\n%s", strings.Join(args, " "), err, errOut.String())
	}
	return ee.ExitCode(), errOut.String()
}

// TestListenersExposed: every listener of up, controller, agent and
// storage bound to an address other machines reach, without TLS, is
// refused with a message naming it and --insecure; with --insecure (or
// --http-insecure) it serves.
func TestListenersExposed(t *testing.T) {
	t.Parallel()
	certs := filepath.Join(t.TempDir(), "certs")
	if _, errOut, code := runBin(t, "certs", "init", certs, "--agent", "a"); code != 0 {
		t.Fatal(errOut)
	}
	upArgs := func(t *testing.T, nbd, admin, http string, extra ...string) []string {
		return append([]string{"up", "--data", t.TempDir(), "--pool-size", "1G", "--nbd-listen", nbd, "--admin-listen", admin, "--http-listen", http}, extra...)
	}
	ctlArgs := func(t *testing.T, listen, http string, extra ...string) []string {
		return append([]string{"controller", "--data", t.TempDir(), "--listen", listen, "--http-listen", http}, extra...)
	}
	agentArgs := func(nbd, http string, extra ...string) []string {
		return append([]string{"agent", "--controller", "127.0.0.1:1", "--name", "a", "--nbd-listen", nbd, "--http-listen", http}, extra...)
	}
	storageArgs := func(t *testing.T, listen, http string, extra ...string) []string {
		return append([]string{"storage", "--dir", t.TempDir(), "--listen", listen, "--http-listen", http}, extra...)
	}
	lo := "127.0.0.1:0"
	for _, tc := range []struct {
		name string
		args func(t *testing.T) []string
		want []string // in the message, besides --insecure
	}{
		{"up/nbd", func(t *testing.T) []string { return upArgs(t, exposed, lo, lo) }, []string{"NBD listener", "--nbd-listen"}},
		{"up/admin", func(t *testing.T) []string { return upArgs(t, lo, exposed, lo) }, []string{"admin API listener", "--admin-listen"}},
		{"up/http", func(t *testing.T) []string { return upArgs(t, lo, lo, exposed) }, []string{"HTTP listener", "--http-listen", "--http-insecure"}},
		{"up/pprof", func(t *testing.T) []string { return upArgs(t, lo, lo, lo, "--pprof", exposed) }, []string{"pprof listener", "--pprof"}},
		// --certs does not help pprof, which has no TLS.
		{"up/pprof-certs", func(t *testing.T) []string { return upArgs(t, lo, lo, lo, "--pprof", exposed, "--certs", certs) }, []string{"pprof listener", "--pprof"}},
		{"controller/listen", func(t *testing.T) []string { return ctlArgs(t, exposed, lo) }, []string{"admin API listener", "--listen"}},
		{"controller/http", func(t *testing.T) []string { return ctlArgs(t, lo, exposed) }, []string{"HTTP listener", "--http-listen"}},
		{"agent/nbd", func(*testing.T) []string { return agentArgs(exposed, lo) }, []string{"NBD listener", "--nbd-listen", "--nbd-tls"}},
		// TLS to the controller is not TLS to the hosts.
		{"agent/nbd-certs", func(*testing.T) []string { return agentArgs(exposed, lo, "--certs", certs) }, []string{"NBD listener", "--nbd-listen", "--nbd-tls"}},
		{"agent/http", func(*testing.T) []string { return agentArgs(lo, exposed) }, []string{"HTTP listener", "--http-listen"}},
		{"storage/listen", func(t *testing.T) []string { return storageArgs(t, exposed, lo) }, []string{"NBD listener", "--listen"}},
		{"storage/http", func(t *testing.T) []string { return storageArgs(t, lo, exposed) }, []string{"HTTP listener", "--http-listen"}},
	} {
		t.Run("refused/"+tc.name, func(t *testing.T) {
			t.Parallel()
			code, errOut := refusedRun(t, tc.args(t)...)
			if code != 2 {
				t.Errorf("exit %d, want 2 (a usage error)", code)
			}
			for _, w := range append(tc.want, "--insecure", "reachable from the network") {
				if !strings.Contains(errOut, w) {
					t.Errorf("the message does not say %q:\n%s", w, errOut)
				}
			}
		})
	}

	// With --insecure (or --http-insecure for the HTTP listener alone)
	// each starts, and stops cleanly.
	t.Run("insecure/up", func(t *testing.T) {
		t.Parallel()
		u := start(t, "", upArgs(t, exposed, exposed, exposed, "--pprof", exposed, "--insecure")...)
		u.admin = loopback(t, u.admin)
		u.cli("disk", "list")
	})
	t.Run("insecure/up-http", func(t *testing.T) {
		t.Parallel()
		u := start(t, "", upArgs(t, lo, lo, exposed, "--http-insecure")...)
		resp, err := http.Get("http://" + loopback(t, strings.TrimSuffix(strings.TrimPrefix(u.http, "http://"), "/")) + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET /metrics: %s", resp.Status)
		}
	})
	t.Run("insecure/cluster", func(t *testing.T) {
		t.Parallel()
		ctl := start(t, "", ctlArgs(t, exposed, exposed, "--insecure")...)
		start(t, "", "agent", "--controller", loopback(t, ctl.admin), "--name", "a", "--nbd-listen", exposed, "--http-listen", exposed, "--insecure")
		start(t, "", storageArgs(t, exposed, exposed, "--insecure")...)
	})
}

// loopback turns the address a server listening on every address
// printed (0.0.0.0:P, [::]:P) into 127.0.0.1:P, which its certificate
// names.
func loopback(t *testing.T, addr string) string {
	t.Helper()
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	return net.JoinHostPort("127.0.0.1", port)
}

// TestUpCerts: 'segmap up --certs DIR' on addresses the network reaches
// serves mutual TLS on every listener: the CLI with the admin
// certificate works and without it is refused, NBD wants STARTTLS and a
// certificate of the cluster CA, HTTPS wants a client certificate.
func TestUpCerts(t *testing.T) {
	t.Parallel()
	requireTools(t, "nbdinfo")
	certs := filepath.Join(t.TempDir(), "certs")
	if _, errOut, code := runBin(t, "certs", "init", certs); code != 0 {
		t.Fatal(errOut)
	}
	u := start(t, "", "up", "--data", t.TempDir(), "--pool-size", "1G", "--nbd-listen", exposed, "--admin-listen", exposed, "--http-listen", exposed, "--certs", certs)
	admin, nbd := loopback(t, u.admin), loopback(t, u.nbd)
	if !strings.HasPrefix(u.http, "https://") {
		t.Fatalf("HTTP listener %q: want https", u.http)
	}
	httpAddr := loopback(t, strings.TrimSuffix(strings.TrimPrefix(u.http, "https://"), "/"))

	cli := func(args ...string) (string, string, int) {
		return runBin(t, append([]string{"--controller", admin, "--timeout", "10s"}, args...)...)
	}
	if out, errOut, code := cli("--certs", certs, "disk", "create", "d", "--size", "16M"); code != 0 {
		t.Fatalf("disk create with --certs: exit %d\n%s%s", code, out, errOut)
	}
	if out, errOut, code := cli("--certs", certs, "--json", "disk", "list"); code != 0 || !strings.Contains(out, `"d"`) {
		t.Errorf("disk list with --certs: exit %d\n%s%s", code, out, errOut)
	}
	if out, errOut, code := cli("disk", "list"); code == 0 {
		t.Errorf("disk list in plaintext succeeded:\n%s", out)
	} else if !strings.Contains(errOut, "TLS") && !strings.Contains(errOut, "tls") && !strings.Contains(errOut, "connection") {
		t.Errorf("disk list in plaintext: exit %d, %q", code, errOut)
	}

	// NBD: plaintext refused, TLS with a certificate of the cluster CA
	// (here the admin's: libnbd wants ca-cert.pem, client-cert.pem and
	// client-key.pem) served.
	if out, err := runErr(30*time.Second, "nbdinfo", "nbd://"+nbd+"/d"); err == nil {
		t.Errorf("plaintext NBD to 'up --certs' succeeded:\n%s", out)
	}
	host := filepath.Join(t.TempDir(), "host-certs")
	for from, to := range map[string]string{"ca.crt": "ca-cert.pem", "admin-admin.crt": "client-cert.pem", "admin-admin.key": "client-key.pem"} {
		copyFile(t, filepath.Join(certs, from), filepath.Join(host, to))
	}
	if out := run(t, 30*time.Second, "nbdinfo", "nbds://"+nbd+"/d?tls-certificates="+host); !strings.Contains(out, "16777216") {
		t.Errorf("nbdinfo over TLS:\n%s", out)
	}

	// HTTPS: the server's certificate is the cluster's; a client
	// without a certificate is refused, the admin's is served.
	pool := x509.NewCertPool()
	ca, err := os.ReadFile(filepath.Join(certs, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	pool.AppendCertsFromPEM(ca)
	get := func(cfg *tls.Config, path string) (*http.Response, error) {
		c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
		defer c.CloseIdleConnections()
		return c.Get("https://" + httpAddr + path)
	}
	if resp, err := get(&tls.Config{RootCAs: pool}, "/metrics"); err == nil {
		resp.Body.Close()
		t.Errorf("GET /metrics without a client certificate: %s, want refused", resp.Status)
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(certs, "admin-admin.crt"), filepath.Join(certs, "admin-admin.key"))
	if err != nil {
		t.Fatal(err)
	}
	admCfg := &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}
	for path, want := range map[string]string{
		"/metrics": "go_goroutines",
		// The dashboard reads up's admin API over TLS, with up's
		// own certificate.
		"/api/state": `"d"`,
	} {
		resp, err := get(admCfg, path)
		if err != nil {
			t.Fatalf("GET %s with the admin certificate: %v", path, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), want) {
			t.Errorf("GET %s with the admin certificate: %s, want %s in\n%.500s", path, resp.Status, want, body)
		}
	}
}

// TestLogs: the servers' logs follow --log-format and --log-level: JSON
// lines with level, msg and, for a line about a disk, the disk; warn
// drops the info lines; a format segmap does not know is a usage error.
func TestLogs(t *testing.T) {
	t.Parallel()
	u := startUp(t, t.TempDir(), "--log-format", "json", "--log-level", "debug")
	u.cli("disk", "create", "logged", "--size", "16M")
	u.cli("snapshot", "logged", "--name", "logged-snap")
	u.cli("disk", "delete", "logged-snap")
	u.stop()
	// u.out mixes stdout (the banner) with stderr (the log): the log's
	// lines are the ones starting with '{', and every one must parse.
	var sawDisk, sawSnapshot, sawDelete bool
	sc := bufio.NewScanner(strings.NewReader(u.out.String()))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "{") {
			if strings.Contains(line, "level=") || strings.Contains(line, "msg=") {
				t.Errorf("a text log line under --log-format json: %s", line)
			}
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Errorf("not JSON: %s: %v", line, err)
			continue
		}
		if m["level"] == nil || m["msg"] == nil {
			t.Errorf("no level or msg: %s", line)
		}
		switch m["msg"] {
		case "disk created":
			sawDisk = sawDisk || m["disk"] == "logged"
		case "snapshot created":
			sawSnapshot = sawSnapshot || (m["disk"] == "logged-snap" && m["source"] == "logged")
		case "disk deleted":
			sawDelete = sawDelete || m["disk"] == "logged-snap"
		}
	}
	if !sawDisk || !sawSnapshot || !sawDelete {
		t.Errorf("want JSON lines 'disk created' with disk=logged (%v), 'snapshot created' with disk=logged-snap, source=logged (%v), 'disk deleted' with disk=logged-snap (%v):\n%s", sawDisk, sawSnapshot, sawDelete, u.out)
	}

	w := startUp(t, t.TempDir(), "--log-level", "warn")
	w.cli("disk", "create", "quiet", "--size", "16M")
	w.stop()
	if strings.Contains(w.out.String(), "level=INFO") || strings.Contains(w.out.String(), "disk created") {
		t.Errorf("an info line under --log-level warn:\n%s", w.out)
	}

	for _, args := range [][]string{{"--log-format", "xml"}, {"--log-level", "loud"}} {
		code, errOut := refusedRun(t, append([]string{"up", "--data", t.TempDir()}, args...)...)
		if code != 2 || !strings.Contains(errOut, args[0]) {
			t.Errorf("segmap up %s: exit %d, %q; want exit 2 naming %s", strings.Join(args, " "), code, errOut, args[0])
		}
	}
}
