package ha

import (
	"errors"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"

	"segmap/internal/backoff"
)

// mux hands the connections of one listener to whichever gRPC server is
// current: the standby's or the leader's. Connections a server has taken
// stay with it until it stops.
type mux struct {
	l net.Listener

	mu  sync.Mutex
	cur *chanListener
}

func newMux(l net.Listener) *mux { return &mux{l: l} }

// serve makes gs the server of new connections; it serves until stopped.
func (m *mux) serve(gs *grpc.Server) {
	cl := &chanListener{addr: m.l.Addr(), c: make(chan net.Conn), done: make(chan struct{})}
	m.mu.Lock()
	m.cur = cl
	m.mu.Unlock()
	go func() { _ = gs.Serve(cl) }() // ends when gs stops; nothing to report
}

// run accepts until the listener closes.
func (m *mux) run() {
	b := backoff.New(backoff.Accept, nil)
	for {
		c, err := m.l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors, say: wait and go on, as
			// net/http does; the controller must not stop
			// accepting for good while it keeps its leadership.
			time.Sleep(b.Next())
			continue
		}
		b.Reset()
		m.mu.Lock()
		cl := m.cur
		m.mu.Unlock()
		if cl == nil {
			c.Close()
			continue
		}
		select {
		case cl.c <- c:
		case <-cl.done:
			c.Close() // its server stopped meanwhile: the client reconnects
		}
	}
}

func (m *mux) close() { m.l.Close() }

// chanListener is a net.Listener fed by a mux.
type chanListener struct {
	addr net.Addr
	c    chan net.Conn
	done chan struct{}
	once sync.Once
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.c:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return l.addr }
