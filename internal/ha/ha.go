// Package ha makes the controller highly available: several controllers
// share one metadata store in etcd, elect one leader through it, and the
// others stand by.
//
// Run is one controller's life: it campaigns (an etcd concurrency.Election
// under a session lease); while it stands by, every call to it is answered
// with NotLeader, naming the leader; once elected it opens the store fenced
// by its election key (meta.WithFence: no write of a deposed leader can
// land) and serves what Config.Lead builds. It stops leading, at once, when
// its etcd session ends or when it can no longer be sure the session is
// alive: it steps down before the session can have expired in etcd, so
// that the next leader, which can only be elected after that expiry, never
// overlaps it. Then it stands by and campaigns again.
//
// Conn is the other side: a gRPC connection over every controller's
// address that follows the leader.
package ha

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"google.golang.org/grpc"

	"segmap/internal/backoff"
	"segmap/internal/meta"
)

// DefaultTTL is the etcd session TTL: how long a dead leader keeps its
// leadership before a standby can take over.
const DefaultTTL = 4 * time.Second

// Key prefixes under Config.Prefix.
const (
	MetaPrefix     = "meta/"   // the metadata store
	ElectionPrefix = "leader/" // the election
)

// Term is one leadership of one controller.
type Term struct {
	// Name is the controller's name.
	Name string
	// Key and Rev are its election key and that key's creation revision:
	// they fence its writes.
	Key string
	Rev int64
	// Start is when it won.
	Start time.Time
}

// Writer is what each commit of the term writes to meta.WriterKey.
func (t Term) Writer() string { return fmt.Sprintf("%s rev %d", t.Name, t.Rev) }

// Config configures Run.
type Config struct {
	// Client reaches the etcd cluster.
	Client *clientv3.Client
	// Prefix namespaces the cluster's keys in etcd (end it in "/").
	Prefix string
	// Name names this controller; Advertise is the address clients reach
	// it at, which standbys hand out while it leads.
	Name, Advertise string
	// TTL is the session's TTL in etcd, whole seconds; DefaultTTL if 0.
	TTL time.Duration
	// Listener is where the controller serves (its admin API and the
	// agents' mapping protocol).
	Listener net.Listener
	// ServerOptions are the options of every gRPC server Run starts
	// (credentials, interceptors). Lead's server should use them too.
	ServerOptions []grpc.ServerOption
	// Lead is called once elected, with the store fenced by the term: it
	// returns the server to serve (services registered, not yet serving)
	// and a function that stops what it started (the server itself is
	// stopped by Run). ctx ends when the term does. Run calls the stop
	// function once the term's store is closed and the server stopped:
	// from then on the leader no longer acts, whatever the function
	// still waits for.
	Lead func(ctx context.Context, store meta.Store, t Term) (*grpc.Server, func(), error)
	// Logger logs elections; slog.Default() if nil.
	Logger *slog.Logger
	// Now is the clock; time.Now if nil. (Tests.)
	Now func() time.Time
}

// electionBackoff spaces the campaigns that failed: 100 ms doubling to
// 2 s, from the start again after each term.
var electionBackoff = backoff.Policy{Initial: 100 * time.Millisecond, Max: 2 * time.Second}

// Run campaigns, leads, and stands by, until ctx ends; it then resigns if
// it leads, so that a standby takes over at once, and returns nil. It fails
// only for a configuration error.
func Run(ctx context.Context, cfg Config) error {
	if cfg.Client == nil || cfg.Listener == nil || cfg.Lead == nil || cfg.Name == "" || cfg.Advertise == "" || cfg.Prefix == "" {
		return errors.New("ha: Client, Listener, Lead, Name, Advertise and Prefix are required")
	}
	if cfg.TTL == 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.TTL < time.Second || cfg.TTL%time.Second != 0 {
		return fmt.Errorf("ha: TTL %v: want whole seconds, at least 1s", cfg.TTL)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	r := &runner{cfg: cfg, mux: newMux(cfg.Listener)}
	go r.mux.run()
	defer r.mux.close()
	r.standby()
	defer func() { r.stopStandby() }()
	b := backoff.New(electionBackoff, nil)
	for ctx.Err() == nil {
		err := r.term(ctx)
		if ctx.Err() != nil {
			break
		}
		if err != nil {
			d := b.Next()
			cfg.Logger.Warn("election", "err", err, "retry_in", d)
			_ = b.Sleep(ctx, d) // ends early with ctx, and so does the loop
			continue
		}
		b.Reset()
	}
	return nil
}

type runner struct {
	cfg Config
	mux *mux

	mu struct {
		sync.Mutex
		stand *grpc.Server // the standby server, while standing by
	}
}

// standby serves NotLeader to every new connection.
func (r *runner) standby() {
	gs := grpc.NewServer(append(r.cfg.ServerOptions[:len(r.cfg.ServerOptions):len(r.cfg.ServerOptions)],
		grpc.UnknownServiceHandler(func(_ any, ss grpc.ServerStream) error {
			return NotLeader(r.cfg.Name, r.leaderAddr(ss.Context()))
		}))...)
	r.mu.Lock()
	r.mu.stand = gs
	r.mu.Unlock()
	r.mux.serve(gs)
}

func (r *runner) stopStandby() {
	r.mu.Lock()
	gs := r.mu.stand
	r.mu.stand = nil
	r.mu.Unlock()
	if gs != nil {
		gs.Stop()
	}
}

// leaderAddr reads the leader's address from etcd: "" if none leads, or if
// etcd does not answer within a second.
func (r *runner) leaderAddr(ctx context.Context) string {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	resp, err := r.cfg.Client.Get(ctx, r.cfg.Prefix+ElectionPrefix, clientv3.WithFirstCreate()...)
	if err != nil || len(resp.Kvs) == 0 {
		// Cut off from etcd, a standby does not know who leads.
		return ""
	}
	return string(resp.Kvs[0].Value)
}

// term campaigns and, once elected, leads until the term ends.
func (r *runner) term(ctx context.Context) error {
	cfg := r.cfg
	cfg.Logger.Info("standing by: campaigning for leadership", "name", cfg.Name)
	l, err := Elect(ctx, cfg)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	defer l.Resign()
	gs, stop, err := cfg.Lead(l.Context(), l.Store, l.Term)
	if err != nil {
		return fmt.Errorf("lead: %w", err)
	}
	cfg.Logger.Info("elected leader", "name", cfg.Name, "rev", l.Rev, "advertise", cfg.Advertise)
	r.mux.serve(gs)
	r.stopStandby()
	<-l.Done()
	// Stop acting before anything else: no more commits (the store), no
	// more leases for agents (their streams end), new connections to
	// the standby.
	l.Store.Close()
	r.standby()
	gs.Stop()
	// It no longer acts: say so now, before stop, which may wait for
	// work of the term that etcd never answers.
	cfg.Logger.Warn("stepped down", "name", cfg.Name, "rev", l.Rev, "led_for", cfg.Now().Sub(l.Start).Round(time.Millisecond), "reason", l.Err())
	stop()
	return nil
}

// Leadership is a won election: a term, and the store fenced by it.
type Leadership struct {
	Term
	// Store is the metadata store, fenced by the term: once the term has
	// ended no commit of it can land.
	Store *meta.Etcd

	parent context.Context
	ctx    context.Context
	end    context.CancelFunc
	sess   *concurrency.Session
	el     *concurrency.Election
	ka     *keepalive
	logger *slog.Logger
}

// Elect campaigns until this controller leads (or ctx ends). Only
// cfg.Client, Prefix, Name, Advertise, TTL, Logger and Now are used.
func Elect(ctx context.Context, cfg Config) (*Leadership, error) {
	if cfg.TTL == 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	sess, err := concurrency.NewSession(cfg.Client, concurrency.WithTTL(int(cfg.TTL/time.Second)), concurrency.WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("etcd session: %w", err)
	}
	el := concurrency.NewElection(sess, cfg.Prefix+"leader")
	// Campaign until elected, or the session is lost.
	cctx, cancel := context.WithCancel(ctx)
	go func() {
		select {
		case <-sess.Done():
		case <-cctx.Done():
		}
		cancel()
	}()
	// A cancelled Campaign resigns with the client's own context, which
	// waits for etcd: while etcd is unreachable it would not return, and
	// a standby could not be stopped. So wait for it here only until ctx
	// ends; it returns once the client is closed.
	errc := make(chan error, 1)
	go func() { errc <- el.Campaign(cctx, cfg.Advertise) }()
	select {
	case err = <-errc:
	case <-ctx.Done():
		err = ctx.Err()
	}
	cancel()
	if err != nil {
		sess.Close()
		return nil, fmt.Errorf("campaign: %w", err)
	}
	l := &Leadership{Term: Term{Name: cfg.Name, Key: el.Key(), Rev: el.Rev(), Start: cfg.Now()}, parent: ctx, sess: sess, el: el, logger: cfg.Logger}
	l.ctx, l.end = context.WithCancel(ctx)
	// The keepalive keeps its own view of the session's lease: it must
	// expire in etcd no sooner than TTL after a keepalive that etcd
	// answered was sent. The term ends a margin before that.
	l.ka = newKeepalive(cfg, sess.Lease())
	if err := l.ka.once(l.ctx); err != nil {
		l.Resign()
		return nil, err
	}
	go l.ka.run(l.ctx, l.end)
	go func() {
		select {
		case <-sess.Done():
			l.end()
		case <-l.ctx.Done():
		}
	}()
	l.Store, err = meta.OpenEtcd(l.ctx, cfg.Client, cfg.Prefix+MetaPrefix, meta.WithFence(meta.EtcdFence{Key: l.Key, Rev: l.Rev, Writer: l.Writer()}))
	if err != nil {
		l.Resign()
		return nil, err
	}
	return l, nil
}

// Context returns a context that ends with the term.
func (l *Leadership) Context() context.Context { return l.ctx }

// Done is closed when the term ends: the session ended, it could not be
// confirmed in time, or the context given to Elect ended.
func (l *Leadership) Done() <-chan struct{} { return l.ctx.Done() }

// Err says why the term ended (nil while it lasts).
func (l *Leadership) Err() error {
	if l.ctx.Err() == nil {
		return nil
	}
	if l.parent.Err() != nil {
		return errors.New("stopping")
	}
	if err := l.ka.err(); err != nil {
		return err
	}
	select {
	case <-l.sess.Done():
		return errors.New("etcd session ended")
	default:
	}
	return l.ctx.Err()
}

// Resign ends the term: the store is closed, and the election key deleted
// (if etcd can be reached within a second) so that a standby need not
// wait out the TTL; closing the session revokes its lease, to the same
// effect, and stops its keepalives either way.
func (l *Leadership) Resign() {
	l.end()
	if l.Store != nil {
		l.Store.Close()
	}
	rctx, cancel := context.WithTimeout(context.Background(), time.Second)
	_ = l.el.Resign(rctx) // best effort: the session's lease ends the term anyway
	cancel()
	l.sess.Close()
}

// keepalive confirms a lease periodically and knows until when it is
// surely alive.
type keepalive struct {
	cfg   Config
	lease clientv3.LeaseID

	mu    sync.Mutex
	until time.Time // the lease lives at least until then
	fail  error
}

func newKeepalive(cfg Config, lease clientv3.LeaseID) *keepalive {
	return &keepalive{cfg: cfg, lease: lease}
}

// once renews the lease and moves until forward.
func (k *keepalive) once(ctx context.Context) error {
	sent := k.cfg.Now()
	ctx, cancel := context.WithTimeout(ctx, k.cfg.TTL/2)
	defer cancel()
	resp, err := k.cfg.Client.KeepAliveOnce(ctx, k.lease)
	if err != nil {
		return fmt.Errorf("renew etcd lease: %w", err)
	}
	k.mu.Lock()
	k.until = sent.Add(time.Duration(resp.TTL) * time.Second)
	k.mu.Unlock()
	return nil
}

func (k *keepalive) err() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.fail
}

// run renews the lease every TTL/6, and calls end once it is within TTL/6
// of a possible expiry: a leader that cannot reach etcd steps down 5/6 of
// the TTL after the last renewal that etcd answered was sent. The deadline
// is a timer of its own, so that a renewal hanging on a silent network
// cannot delay it.
func (k *keepalive) run(ctx context.Context, end func()) {
	margin := k.cfg.TTL / 6
	renewed := make(chan struct{}, 1)
	go func() {
		tick := time.NewTicker(margin)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			if err := k.once(ctx); err != nil {
				if ctx.Err() == nil {
					k.cfg.Logger.Warn("etcd lease not renewed", "err", err)
				}
				continue
			}
			select {
			case renewed <- struct{}{}:
			default:
			}
		}
	}()
	for {
		k.mu.Lock()
		deadline := k.until.Add(-margin)
		k.mu.Unlock()
		t := time.NewTimer(deadline.Sub(k.cfg.Now()))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-renewed:
			t.Stop()
		case <-t.C:
			k.mu.Lock()
			k.fail = fmt.Errorf("%w (last confirmed until %s)", errLeaseUnsure, k.until.Format(time.RFC3339Nano))
			k.mu.Unlock()
			end()
			return
		}
	}
}
