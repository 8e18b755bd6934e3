package heldport

import (
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"testing"
	"time"
)

// TestRefuseWhileNoServer: with no server, a connection is closed at once
// (the client reads EOF, it does not wait), and the port cannot be bound
// by anyone else.
func TestRefuseWhileNoServer(t *testing.T) {
	p := New(t)
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("read from a refused connection: %v, want EOF", err)
	}
	if l, err := net.Listen("tcp", p.Addr()); err == nil {
		l.Close()
		t.Fatal("a held port could be bound again")
	}
}

// TestHandOverAndBack: a server that inherits the port accepts on it;
// after it has gone, the port refuses again; a second server gets it too.
func TestHandOverAndBack(t *testing.T) {
	p := New(t)
	for run := range 2 {
		f, err := p.File()
		if err != nil {
			t.Fatal(err)
		}
		// The "server" here is a listener made from the inherited copy,
		// as a child process would make it.
		l, err := net.FileListener(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		accepted := make(chan error, 1)
		go func() {
			c, err := l.Accept()
			if err == nil {
				_, err = c.Write([]byte{byte(run)})
				c.Close()
			}
			accepted <- err
		}()
		c, err := net.Dial("tcp", p.Addr())
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 1)
		if _, err := io.ReadFull(c, b); err != nil || b[0] != byte(run) {
			t.Fatalf("run %d: read %v, %v from the server", run, b, err)
		}
		c.Close()
		if err := <-accepted; err != nil {
			t.Fatal(err)
		}
		l.Close()
		p.Refuse()
	}
}

// TestActivate: qemu-nbd serves on a socket handed over by socket
// activation.
func TestActivate(t *testing.T) {
	if _, err := exec.LookPath("qemu-nbd"); err != nil {
		t.Fatal("qemu-nbd is missing: run 'make deps'")
	}
	img := t.TempDir() + "/x.img"
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	p := New(t)
	f, err := p.File()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("qemu-nbd", "-f", "raw", "-x", "disk", img)
	Activate(cmd, f)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	// The NBD server greets first: "NBDMAGIC".
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	b := make([]byte, 8)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "NBDMAGIC" {
		t.Fatalf("greeting %q, %v; want NBDMAGIC", b, err)
	}
}
