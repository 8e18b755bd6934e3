package nbd

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"segmap/internal/nbd/nbdwire"
)

// BenchmarkServer measures 4 KiB requests through the server over loopback
// TCP against the in-memory export, at queue depth 1 and 16. The client
// allocates nothing per request, so allocs/op is the server's.
//
//	go test -run XXX -bench BenchmarkServer -benchtime 2s -count 5 ./internal/nbd/
func BenchmarkServer(b *testing.B) {
	disk := newMem("disk", 64<<20)
	h := startServer(b, func(c *Config) { c.Logger = slog.New(slog.DiscardHandler) }, disk)
	for _, op := range []nbdwire.Command{nbdwire.CmdRead, nbdwire.CmdWrite} {
		for _, qd := range []int{1, 16} {
			name := fmt.Sprintf("op=%s/qd=%d", map[nbdwire.Command]string{nbdwire.CmdRead: "read", nbdwire.CmdWrite: "write"}[op], qd)
			b.Run(name, func(b *testing.B) {
				bc := newBenchClient(b, h.addr)
				defer bc.nc.Close()
				b.SetBytes(4096)
				b.ReportAllocs()
				b.ResetTimer()
				bc.run(b, op, qd)
			})
		}
	}
}

// benchClient is a minimal pipelining client: simple replies, one request
// buffer, no allocation per request.
type benchClient struct {
	nc    net.Conn
	rd    *bufio.Reader
	req   []byte // request header + 4 KiB payload
	reply []byte
}

const benchBlock = 4096

func newBenchClient(b *testing.B, addr string) *benchClient {
	c := dialFlags(b, addr, nbdwire.CFlagFixedNewstyle|nbdwire.CFlagNoZeroes)
	c.sendOpt(nbdwire.OptExportName, []byte("disk"))
	var info [10]byte
	c.readFull(info[:])
	c.nc.SetDeadline(time.Time{})
	return &benchClient{
		nc:    c.nc,
		rd:    c.rd,
		req:   make([]byte, nbdwire.RequestSize+benchBlock),
		reply: make([]byte, nbdwire.SimpleReplySize+benchBlock),
	}
}

func (bc *benchClient) send(op nbdwire.Command, i int) error {
	r := bc.req
	be.PutUint32(r[0:], nbdwire.MagicRequest)
	be.PutUint16(r[4:], 0)
	be.PutUint16(r[6:], uint16(op))
	be.PutUint64(r[8:], uint64(i))
	be.PutUint64(r[16:], uint64(i%(64<<20/benchBlock))*benchBlock)
	be.PutUint32(r[24:], benchBlock)
	if op == nbdwire.CmdRead {
		r = r[:nbdwire.RequestSize]
	}
	_, err := bc.nc.Write(r)
	return err
}

func (bc *benchClient) recv(op nbdwire.Command) error {
	r := bc.reply[:nbdwire.SimpleReplySize]
	if op == nbdwire.CmdRead {
		r = bc.reply
	}
	if _, err := io.ReadFull(bc.rd, r); err != nil {
		return err
	}
	if be.Uint32(r) != nbdwire.MagicSimpleReply || be.Uint32(r[4:]) != 0 {
		return fmt.Errorf("bad reply % x", r[:16])
	}
	return nil
}

// run sends b.N requests keeping qd of them in flight.
func (bc *benchClient) run(b *testing.B, op nbdwire.Command, qd int) {
	sent, inflight := 0, 0
	for done := 0; done < b.N; {
		for inflight < qd && sent < b.N {
			if err := bc.send(op, sent); err != nil {
				b.Fatal(err)
			}
			sent++
			inflight++
		}
		if err := bc.recv(op); err != nil {
			b.Fatal(err)
		}
		inflight--
		done++
	}
}
