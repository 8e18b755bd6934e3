package e2e

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestExportImport backs a disk up from one 'segmap up' to another, each
// with its own data directory and ports, through the CLI: a full stream,
// then five incremental ones with random writes (qemu-io), a trim and a
// resize between snapshots. Every snapshot hashes the same on both sides
// (nbdcopy), each incremental stream is within 10% of the bytes written
// since its base plus headers, and a stream flipped in one byte,
// truncated or applied to the wrong base is refused and leaves the
// target as it was, with check clean.
func TestExportImport(t *testing.T) {
	t.Parallel()
	requireTools(t, "qemu-io", "nbdcopy")
	src := startUp(t, t.TempDir())
	dst := startUp(t, t.TempDir())
	dir := t.TempDir()
	const mib = 1 << 20
	src.cli("disk", "create", "vm1", "--size", "64M", "--segment-size", "64K")

	qio := func(cmds ...string) {
		args := []string{"-f", "raw", src.uri("vm1")}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		if out := run(t, 60*time.Second, "qemu-io", args...); strings.Contains(out, "error") {
			t.Fatalf("qemu-io %v:\n%s", cmds, out)
		}
	}
	hash := func(u *up, name string) string {
		t.Helper()
		out := run(t, 60*time.Second, "sh", "-c", fmt.Sprintf("nbdcopy %q - | sha256sum", u.uri(name)))
		return strings.Fields(out)[0]
	}
	export := func(snap, base string) (string, int) {
		t.Helper()
		p := filepath.Join(dir, strings.ReplaceAll(snap, "@", "_")+".stream")
		args := []string{"export", snap, "-o", p}
		if base != "" {
			args = append(args, "--from", base)
		}
		// Standard error is not a terminal: no progress line.
		if out, errOut, code := src.cliResult(args...); code != 0 || errOut != "" {
			t.Fatalf("export %v: exit %d, %q%q (no progress line on a pipe)", args, code, out, errOut)
		}
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		return p, int(fi.Size())
	}
	checkClean := func(u *up) {
		t.Helper()
		if out, errOut, code := u.cliResult("check"); code != 0 {
			t.Fatalf("check: exit %d\n%s%s", code, out, errOut)
		}
	}

	rng := rand.New(rand.NewPCG(14, 3))
	size := 64 * mib
	qio("write -P 0x5a 0 8M", "write -P 0x11 20M 1M")
	src.cli("snapshot", "vm1", "--name", "vm1@s0")
	full, n := export("vm1@s0", "")
	if n > 9*mib+mib/10 {
		t.Errorf("full stream of %d bytes for 9 MiB of data: holes were sent", n)
	}
	dst.cli("import", full, "vm1")
	if a, b := hash(src, "vm1@s0"), hash(dst, "vm1@s0"); a != b {
		t.Fatalf("vm1@s0: sha256 %s on the source, %s on the target", a, b)
	}
	checkClean(dst)

	prev := "vm1@s0"
	streams := map[string]string{}
	hashes := map[string]string{"vm1@s0": hash(src, "vm1@s0")}
	for i := 1; i <= 5; i++ {
		written := 0
		var cmds []string
		for range 6 {
			l := 4096 * (1 + rng.IntN(64))
			off := rng.IntN(size-l) &^ 4095
			cmds = append(cmds, fmt.Sprintf("write -P 0x%02x %d %d", 1+rng.IntN(250), off, l))
			written += l
		}
		qio(cmds...)
		switch i {
		case 2:
			run(t, 60*time.Second, "qemu-io", "-d", "unmap", "-f", "raw", src.uri("vm1"), "-c", "discard 0 2M")
		case 3:
			size += 16 * mib
			src.cli("disk", "resize", "vm1", "--size", fmt.Sprint(size))
			qio(fmt.Sprintf("write -P 0x77 %d 1M", size-mib))
			written += mib
		}
		name := fmt.Sprintf("vm1@s%d", i)
		src.cli("snapshot", "vm1", "--name", name)
		p, n := export(name, prev)
		streams[name] = p
		// Headers: the preamble, header and end records, 12 bytes
		// per record, a zero record per trimmed range.
		limit := written + written/10 + 4096
		t.Logf("%s from %s: stream of %d bytes, %d bytes written", name, prev, n, written)
		if n > limit {
			t.Errorf("%s from %s: stream of %d bytes for %d written, want at most %d", name, prev, n, written, limit)
		}
		out := dst.cli("import", p, "vm1")
		if !strings.Contains(out, name) {
			t.Errorf("import said %q, want the snapshot %s named", out, name)
		}
		hashes[name] = hash(src, name)
		if b := hash(dst, name); hashes[name] != b {
			t.Fatalf("%s: sha256 %s on the source, %s on the target", name, hashes[name], b)
		}
		checkClean(dst)
		prev = name
	}
	// Later imports left the earlier snapshots as they were, and vm1
	// reads as the last.
	if b := hash(dst, "vm1"); b != hashes[prev] {
		t.Fatalf("vm1 after importing %s: sha256 %s, want %s", prev, b, hashes[prev])
	}
	for i := 0; i < 5; i++ {
		name := fmt.Sprintf("vm1@s%d", i)
		if b := hash(dst, name); b != hashes[name] {
			t.Fatalf("%s at the end: sha256 %s on the target, %s on the source", name, b, hashes[name])
		}
	}

	// Refused streams change nothing.
	qio("write -P 0x99 1M 64K")
	src.cli("snapshot", "vm1", "--name", "vm1@s6")
	p6, _ := export("vm1@s6", prev)
	b6, err := os.ReadFile(p6)
	if err != nil {
		t.Fatal(err)
	}
	flipped := append([]byte(nil), b6...)
	flipped[len(flipped)/2] ^= 0x01
	truncated := b6[:len(b6)-100]
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	before := hashes[prev]
	list := dst.cli("disk", "list")
	for _, tc := range []struct{ what, path, msg string }{
		{"flipped", write("flipped", flipped), "stream: corrupt"},
		{"truncated", write("truncated", truncated), "stream: truncated"},
		{"wrong base", streams["vm1@s3"], "newest snapshot"},
	} {
		out, errOut, code := dst.cliResult("import", tc.path, "vm1")
		if code == 0 || !strings.Contains(errOut, tc.msg) {
			t.Errorf("%s stream: exit %d, %q%q; want a refusal saying %q", tc.what, code, out, errOut, tc.msg)
		}
		if got := dst.cli("disk", "list"); got != list {
			t.Errorf("%s stream changed the disk list:\n%s\nwant\n%s", tc.what, got, list)
		}
		checkClean(dst)
	}
	if got := hash(dst, "vm1"); got != before {
		t.Errorf("a refused stream changed vm1")
	}
	// The good one still applies, from standard input.
	cmd := fmt.Sprintf("%q --controller %s import vm1 < %q", bin, dst.admin, p6)
	run(t, 60*time.Second, "sh", "-c", cmd)
	if a, b := hash(src, "vm1@s6"), hash(dst, "vm1@s6"); a != b {
		t.Fatalf("vm1@s6: sha256 %s on the source, %s on the target", a, b)
	}
	checkClean(dst)
}
