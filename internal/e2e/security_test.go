package e2e

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestClusterSecurity: a client certificate from another CA, an expired
// one, a plaintext connection, and agent A asking for B's disk are all
// refused with clear errors.
func TestClusterSecurity(t *testing.T) {
	requireTools(t, "nbdinfo")
	c := newCluster(t, "host-a", "host-b")
	c.cli("disk", "create", "b-only", "--size", "64M", "--agent", "host-b")
	c.cli("disk", "create", "both", "--size", "64M")

	// Access control: host-a does not see b-only, and cannot open it.
	listA := run(t, 30*time.Second, "nbdinfo", "--list", "nbd://"+c.nbdAddrs["host-a"])
	listB := run(t, 30*time.Second, "nbdinfo", "--list", "nbd://"+c.nbdAddrs["host-b"])
	if strings.Contains(listA, "b-only") || !strings.Contains(listA, "both") {
		t.Errorf("host-a's export list:\n%s", listA)
	}
	if !strings.Contains(listB, "b-only") {
		t.Errorf("host-b's export list lacks b-only:\n%s", listB)
	}
	if out, err := runErr(30*time.Second, "nbdinfo", c.uri("host-a", "b-only")); err == nil {
		t.Errorf("host-a opened b-only:\n%s", out)
	}
	// Grant and revoke.
	c.cli("disk", "grant", "b-only", "host-a")
	run(t, 30*time.Second, "nbdinfo", c.uri("host-a", "b-only"))
	c.cli("disk", "revoke", "b-only", "host-a")
	if out, err := runErr(30*time.Second, "nbdinfo", c.uri("host-a", "b-only")); err == nil {
		t.Errorf("host-a opened b-only after revoke:\n%s", out)
	}

	refused := func(what string, wantMsg string, args ...string) {
		t.Helper()
		_, errOut, code := runBin(t, append([]string{"--controller", c.ctlAddr, "--timeout", "10s"}, args...)...)
		if code == 0 || !strings.Contains(errOut, wantMsg) {
			t.Errorf("%s: exit %d, stderr %q; want a failure saying %q", what, code, errOut, wantMsg)
		}
	}
	// Plaintext against the TLS controller.
	refused("plaintext", "TLS", "disk", "list")
	// A certificate from another CA.
	other := filepath.Join(t.TempDir(), "other")
	if _, errOut, code := runBin(t, "certs", "init", other); code != 0 {
		t.Fatal(errOut)
	}
	refused("another CA's certificate", "certificate", "--certs", other, "disk", "list")
	// An expired certificate (issued by the right CA).
	expired := filepath.Join(t.TempDir(), "expired")
	for _, f := range []string{"ca.crt", "ca.key"} {
		copyFile(t, filepath.Join(c.certs, f), filepath.Join(expired, f))
	}
	if _, errOut, code := runBin(t, "certs", "issue", expired, "--role", "admin", "--name", "admin", "--validity", "-1h"); code != 0 {
		t.Fatal(errOut)
	}
	refused("an expired certificate", "expired", "--certs", expired, "disk", "list")

	// Agent A's certificate presented as agent B: the controller refuses.
	fake := filepath.Join(t.TempDir(), "fake")
	for src, dst := range map[string]string{"ca.crt": "ca.crt", "agent-host-a.crt": "agent-host-b.crt", "agent-host-a.key": "agent-host-b.key"} {
		copyFile(t, filepath.Join(c.certs, src), filepath.Join(fake, dst))
	}
	cmd := exec.Command(bin, "agent", "--controller", c.ctlAddr, "--name", "host-b", "--nbd-listen", "127.0.0.1:0", "--certs", fake)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	cmd.Process.Kill()
	cmd.Wait()
	if strings.Contains(out.String(), "ready") || !strings.Contains(out.String(), "may not act as agent") {
		t.Errorf("agent host-a posing as host-b:\n%s", out.String())
	}
	// The real host-b still serves.
	run(t, 30*time.Second, "nbdinfo", c.uri("host-b", "b-only"))
}

// TestClusterNBDTLS: an agent started with --nbd-tls serves hosts only over
// TLS with a certificate of the cluster CA.
func TestClusterNBDTLS(t *testing.T) {
	t.Parallel()
	requireTools(t, "nbdinfo")
	c := newCluster(t, "host-a")
	c.cli("disk", "create", "sec", "--size", "16M")
	if _, errOut, code := runBin(t, "certs", "issue", c.certs, "--role", "agent", "--name", "host-t"); code != 0 {
		t.Fatal(errOut)
	}
	addr := start(t, c.dir, "agent", "--controller", c.ctlAddr, "--name", "host-t", "--nbd-listen", "127.0.0.1:0",
		"--certs", c.certs, "--nbd-tls").nbd
	if out, err := runErr(30*time.Second, "nbdinfo", "nbd://"+addr+"/sec"); err == nil {
		t.Errorf("plaintext NBD to a --nbd-tls agent succeeded:\n%s", out)
	}
	// libnbd wants ca-cert.pem, client-cert.pem and client-key.pem.
	dir := filepath.Join(t.TempDir(), "host-certs")
	for from, to := range map[string]string{"ca.crt": "ca-cert.pem", "agent-host-a.crt": "client-cert.pem", "agent-host-a.key": "client-key.pem"} {
		copyFile(t, filepath.Join(c.certs, from), filepath.Join(dir, to))
	}
	out := run(t, 30*time.Second, "nbdinfo", "nbds://"+addr+"/sec?tls-certificates="+dir)
	if !strings.Contains(out, "16777216") || !strings.Contains(out, "TLS") {
		t.Errorf("nbdinfo over TLS:\n%s", out)
	}
}
