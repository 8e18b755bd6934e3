package meta

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"segmap/internal/backoff"
)

// etcdAttempts bounds how often Update reruns a transaction that lost a
// conflict; etcdScanBatch is how many keys one range read of a scan asks
// for (about 2.3 MB of table pages).
const (
	etcdAttempts  = 100
	etcdScanBatch = 256
)

// reservedByte starts the store's own bookkeeping keys under the prefix.
// Record keys start with a letter (see the layout in the package doc), so
// the two never meet; Scan skips reserved keys all the same.
const reservedByte = 0

// deletedNS names the deletion markers: <prefix>\x00deleted/<first byte of
// a deleted key>. See Etcd.
const deletedNS = "\x00deleted/"

// Etcd is the store kept in an etcd cluster, under one key prefix, so that
// several controllers (or a controller and its standby) share it.
//
// # Transactions
//
// Transactions are optimistic and serialisable. A transaction reads at one
// revision of the cluster, fixed by its first read, so every read sees one
// snapshot. Update buffers its writes (later reads, scans included, see
// them) and records what it read: each key with its ModRevision or as
// absent, and each prefix it scanned. It commits with one etcd Txn whose
// compares hold only if nothing read has changed since that revision:
//
//   - a key read: ModRevision unchanged; CreateRevision 0 if it was absent;
//   - a prefix scanned: no key under it has a ModRevision above the
//     revision (this sees keys changed or created);
//   - and, because etcd's range compares only look at keys that exist and
//     so cannot see a deletion, the deletion marker of the prefix's first
//     byte unchanged: every commit that deletes a key also rewrites the
//     marker <prefix>\x00deleted/<first byte of the key>.
//
// Keys read under a scanned prefix need no compare of their own. If a
// compare fails, fn is run again from the start on a new snapshot (up to
// 100 attempts, with a short jittered pause between them, then
// ErrConflict), which the Store contract allows. An Update that wrote
// nothing does not commit: its snapshot was consistent. If the commit's
// outcome is unknown (a timeout, a lost connection), Update returns the
// error and does not rerun fn, which might apply the change twice.
//
// View reads at one revision and commits nothing; ErrReadOnlyTx comes from
// the generic Tx. If etcd compacts the revision while a transaction is
// reading, Update starts again and View fails.
//
// # Limits
//
// A transaction is one etcd Txn, and it is never split: that would break
// its atomicity. etcd bounds a Txn by --max-txn-ops (default 128), applied
// separately to its compares and to its writes, and by --max-request-bytes
// (default 1.5 MiB; the client's MaxCallSendMsgSize, default 2 MiB, must
// be at least as large). A commit over either limit fails with
// ErrTxnTooLarge and writes nothing. Updates committed together (group
// commit, see group.go) share one Txn: a batch that exceeds a limit its
// Updates alone would not runs again as two halves, each its own Txn, so
// only an Update too large on its own fails with ErrTxnTooLarge.
//
// The large records are table pages, 9221 bytes (1 + PageEntries entries
// of 9 bytes + 4), and reference pages (of slots and of table pages), 4101
// bytes (1 + PageSlots counts of 4 bytes + 4); a table directory is 9
// bytes plus 12 per page it holds (at most 12.3 kB). With its key and
// framing, a page write costs about 9.3 kB or 4.2 kB of the request. A
// table page with partial entries (sub-segment copy-on-write) is 4 bytes
// more plus at most 323 bytes per partial entry (its index, its sub-blocks
// and up to MaxDepth-1 layers under it): at most 339,977 bytes for a page
// whose 1024 entries are all partial with MaxDepth layers at 256
// sub-blocks, under etcd's default 1.5 MiB. Copying such a shared page
// counts a reference on each slot of each layer as well: up to 8192
// slots, whose reference pages are as many as the containers and
// 1024-slot ranges those slots fall in (a handful for slots allocated
// together; 8 ops or more against --max-txn-ops when they are spread).
// Every other record is under 1 kB. A write or delete is one op (and a
// commit that deletes adds one marker put per distinct first byte of the
// keys it deletes).
//
// Snapshots share table pages (see the package doc): a snapshot of a disk
// of P table pages writes its ceil(P/1024) directories and the reference
// counts of its P pages (ceil(P/1024) records when the pages' ids are
// close, as a disk's pages are; at most P), plus about 8 small records. A
// fully mapped 1 TiB disk at 1 MiB segments (P = 1024) takes about 4
// records and 20 kB: every snapshot fits etcd's defaults (128 ops, 1.5
// MiB) by far. The first write to a shared page afterwards copies that
// page: one fault writes the copy, the directory, the page counts and
// the reference pages of the slots the page maps (at most 1024 of them,
// usually a handful of reference pages). What can still exceed the
// defaults is an operation over many pages at once — deleting or
// shrinking a disk of thousands of pages, or discarding across thousands
// of shared pages: those fail with ErrTxnTooLarge and change nothing
// unless the limits are raised:
//
//	--max-txn-ops       >= pages touched + reference pages + 8
//	--max-request-bytes >= pages touched * 9.3 kB (up to 340 kB each with
//	                       partial entries) + reference pages * 4.2 kB
//
// etcd recommends requests of at most 10 MiB, since every member logs and
// applies each one whole.
//
// Compares are counted against the same --max-txn-ops: one per key read
// outside a scanned prefix (directories, pages and reference pages read),
// one or two per scanned prefix. Old revisions of every page stay in etcd until it
// compacts them: run it with --auto-compaction-retention, or rewritten
// pages fill --quota-backend-bytes.
//
// # Fencing
//
// A store opened WithFence belongs to one term of one elected leader: every
// commit also compares the leader's election key with the creation
// revision it had when the leader won, so that once the key is gone (the
// leader's etcd lease ran out, or it resigned) no commit of that term can
// land, however late it reaches etcd. Such a commit fails with ErrLeadershipLost.
// Every commit of a fenced store also puts the term's writer name in
// <prefix>\x00writer, so that etcd's history shows who wrote each revision.
// The fence adds one compare and one write to every transaction.
type Etcd struct {
	cli    *clientv3.Client
	prefix string
	fence  *EtcdFence
	closed atomic.Bool
	group
}

// EtcdFence names the leadership a store's writes depend on.
type EtcdFence struct {
	// Key is the leader's election key and Rev its creation revision
	// (concurrency.Election's Key and Rev after a won campaign).
	Key string
	Rev int64
	// Writer is written with every commit: who wrote it, for audits.
	Writer string
}

// WriterKey is the key, under a store's prefix, that every commit of a
// fenced store writes its EtcdFence.Writer to.
const WriterKey = "\x00writer"

// EtcdOption configures OpenEtcd.
type EtcdOption func(*Etcd)

// WithFence makes every commit conditional on the leadership f names.
func WithFence(f EtcdFence) EtcdOption {
	return func(e *Etcd) { e.fence = &f }
}

// OpenEtcd returns the store kept under prefix in the cluster cli talks to.
// The prefix namespaces every key the store uses; end it in "/" so that no
// other store's prefix extends it. OpenEtcd reads once, so that an
// unreachable cluster fails here (when ctx ends) rather than at the first
// transaction. The store does not own cli: Close leaves it open, and it
// must outlive the store.
func OpenEtcd(ctx context.Context, cli *clientv3.Client, prefix string, opts ...EtcdOption) (*Etcd, error) {
	if prefix == "" {
		return nil, errors.New("open metadata in etcd: empty key prefix")
	}
	e := &Etcd{cli: cli, prefix: prefix}
	e.init(etcdBackend{e}, etcdMaxBatch)
	for _, o := range opts {
		o(e)
	}
	if e.fence != nil && (e.fence.Key == "" || e.fence.Rev <= 0) {
		return nil, fmt.Errorf("open metadata in etcd: fence %q at revision %d: %w", e.fence.Key, e.fence.Rev, ErrInvalid)
	}
	if _, err := cli.Get(ctx, prefix+deletedNS, clientv3.WithPrefix(), clientv3.WithCountOnly()); err != nil {
		return nil, fmt.Errorf("open metadata in etcd %v under %q: %w", cli.Endpoints(), prefix, err)
	}
	return e, nil
}

// usable says why no transaction can start now, if one cannot.
func (e *Etcd) usable(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if e.closed.Load() {
		return ErrClosed
	}
	return nil
}

// View implements Store.
func (e *Etcd) View(ctx context.Context, fn func(*Tx) error) error {
	if err := e.usable(ctx); err != nil {
		return err
	}
	return fn(newTx(e.newKV(ctx, false), false))
}

// Update implements Store. It is group committed (see group.go): the
// Updates that arrive while a commit is in flight run in the next
// transaction, one after the other, and commit with one Txn.
func (e *Etcd) Update(ctx context.Context, fn func(*Tx) error) error {
	if err := e.usable(ctx); err != nil {
		return err
	}
	return e.update(ctx, fn)
}

// etcdBackend runs an Etcd's batches: each attempt one transaction (see
// Transactions above), run again on a new snapshot when it goes stale.
type etcdBackend struct{ e *Etcd }

func (be etcdBackend) begin(ctx context.Context) (batchTx, error) {
	if be.e.closed.Load() {
		return nil, ErrClosed
	}
	return etcdBatch{be.e.newKV(ctx, true)}, nil
}

func (etcdBackend) stale(err error) bool {
	return err != nil && (errors.Is(err, errStale) || errors.Is(err, rpctypes.ErrCompacted))
}

func (etcdBackend) again(ctx context.Context, attempt int) error {
	if attempt >= etcdAttempts {
		return fmt.Errorf("update: %d attempts: %w", attempt, ErrConflict)
	}
	return pause(ctx, attempt)
}

func (etcdBackend) tooLarge(err error) bool { return errors.Is(err, ErrTxnTooLarge) }

type etcdBatch struct{ k *etcdKV }

func (b etcdBatch) kv() KV { return b.k }

// commit sends the Txn; with nothing written it sends none (see commit).
func (b etcdBatch) commit(bool) error { return b.k.commit() }

func (etcdBatch) rollback() {}

// collisionBackoff is the schedule of pause: up to 1 ms doubling per
// attempt to at most 32 ms, all of it random.
var collisionBackoff = backoff.Policy{Initial: time.Millisecond, Max: 32 * time.Millisecond, Jitter: 1}

// pause waits a random time before attempt+1, so that transactions that
// collided spread out.
func pause(ctx context.Context, attempt int) error {
	return backoff.Sleep(ctx, collisionBackoff.Jittered(attempt-1)+100*time.Microsecond)
}

// Close implements Store. It does not close the client. It does not wait
// for transactions under way: those that have not yet sent their commit
// fail with ErrClosed.
func (e *Etcd) Close() error {
	e.closed.Store(true)
	return nil
}

// etcdKV is one transaction's KV: reads at one revision, buffered writes.
type etcdKV struct {
	e *Etcd
	// ctx bounds every request of the transaction: KV's methods take
	// none, so the transaction carries its caller's.
	ctx      context.Context
	writable bool

	rev int64 // the snapshot's revision; 0 until the first read
	// seen holds every key read at rev, by its key without the prefix.
	seen map[string]seenKey
	// scanned are the prefixes scanned; complete are those whose every
	// key is in seen, so that a key under one that is not in seen is
	// absent. A prefix is scanned from the start of its scan, complete at
	// its end.
	scanned, complete []string
	writes            map[string]pending
}

// seenKey is a key as the snapshot has it.
type seenKey struct {
	value   []byte
	present bool
	mod     int64 // ModRevision, if present
}

// pending is a buffered write.
type pending struct {
	value []byte // nil for a delete
	del   bool
}

func (e *Etcd) newKV(ctx context.Context, writable bool) *etcdKV {
	return &etcdKV{e: e, ctx: ctx, writable: writable, seen: map[string]seenKey{}, writes: map[string]pending{}}
}

// read runs one range read at the snapshot's revision, fixing it on the
// first.
func (k *etcdKV) read(key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	if k.rev != 0 {
		opts = append(opts, clientv3.WithRev(k.rev))
	}
	resp, err := k.e.cli.Get(k.ctx, key, opts...)
	if err != nil {
		return nil, fmt.Errorf("etcd read %q at revision %d: %w", key, k.rev, err)
	}
	if k.rev == 0 {
		k.rev = resp.Header.Revision
	}
	return resp, nil
}

// known returns key as the snapshot has it, if the transaction has read it
// or scanned a prefix of it.
func (k *etcdKV) known(key string) (seenKey, bool) {
	if s, ok := k.seen[key]; ok {
		return s, true
	}
	for _, p := range k.complete {
		if strings.HasPrefix(key, p) {
			return seenKey{}, true
		}
	}
	return seenKey{}, false
}

func (k *etcdKV) Get(key []byte) ([]byte, error) {
	if w, ok := k.writes[string(key)]; ok {
		return w.value, nil
	}
	s, ok := k.known(string(key))
	if !ok {
		resp, err := k.read(k.e.prefix + string(key))
		if err != nil {
			return nil, err
		}
		if len(resp.Kvs) > 0 {
			kv := resp.Kvs[0]
			s = seenKey{value: kv.Value, present: true, mod: kv.ModRevision}
		}
		k.seen[string(key)] = s
	}
	if s.present && s.value == nil {
		return []byte{}, nil
	}
	return s.value, nil
}

func (k *etcdKV) Put(key, value []byte) error {
	if !k.writable {
		return ErrReadOnlyTx
	}
	if value == nil {
		value = []byte{}
	}
	k.writes[string(key)] = pending{value: value}
	return nil
}

func (k *etcdKV) Delete(key []byte) error {
	if !k.writable {
		return ErrReadOnlyTx
	}
	k.writes[string(key)] = pending{del: true}
	return nil
}

func (k *etcdKV) Scan(prefix []byte, fn func(key, value []byte) error) error {
	p := string(prefix)
	if err := k.fetch(p); err != nil {
		return err
	}
	// The snapshot's keys under p, overlaid with the buffered writes.
	merged := map[string][]byte{}
	for key, s := range k.seen {
		if s.present && strings.HasPrefix(key, p) && !reserved(key) {
			merged[key] = s.value
		}
	}
	for key, w := range k.writes {
		if !strings.HasPrefix(key, p) {
			continue
		}
		if w.del {
			delete(merged, key)
		} else {
			merged[key] = w.value
		}
	}
	keys := make([]string, 0, len(merged))
	for key := range merged {
		keys = append(keys, key)
	}
	slices.Sort(keys)
	for _, key := range keys {
		if err := fn([]byte(key), merged[key]); err != nil {
			return err
		}
	}
	return nil
}

func reserved(key string) bool { return key != "" && key[0] == reservedByte }

// fetch reads every key under prefix p into seen, unless a scan already
// did, in batches at the snapshot's revision.
func (k *etcdKV) fetch(p string) error {
	for _, c := range k.complete {
		if strings.HasPrefix(p, c) {
			return nil
		}
	}
	k.scanned = append(k.scanned, p)
	start := k.e.prefix + p
	end := clientv3.GetPrefixRangeEnd(start)
	for {
		resp, err := k.read(start, clientv3.WithRange(end), clientv3.WithLimit(etcdScanBatch))
		if err != nil {
			return err
		}
		for _, kv := range resp.Kvs {
			k.seen[string(kv.Key[len(k.e.prefix):])] = seenKey{value: kv.Value, present: true, mod: kv.ModRevision}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			break
		}
		start = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
	k.complete = append(k.complete, p)
	return nil
}

// commit writes the buffered writes if nothing the transaction read has
// changed; errStale if something has.
func (k *etcdKV) commit() error {
	var ops []clientv3.Op
	var size int
	markers := map[string]bool{}
	for _, key := range sortedKeys(k.writes) {
		w := k.writes[key]
		full := k.e.prefix + key
		if !w.del {
			ops = append(ops, clientv3.OpPut(full, string(w.value)))
			size += len(full) + len(w.value)
			continue
		}
		// A key the snapshot lacks needs no delete: the compares
		// guarantee it is still absent.
		if s, ok := k.known(key); ok && !s.present {
			continue
		}
		ops = append(ops, clientv3.OpDelete(full))
		size += len(full)
		markers[k.marker(key)] = true
	}
	if len(ops) == 0 {
		return nil
	}
	for _, m := range sortedKeys(markers) {
		ops = append(ops, clientv3.OpPut(m, ""))
		size += len(m)
	}
	if k.e.closed.Load() {
		return ErrClosed
	}
	cmps := k.compares()
	var orElse []clientv3.Op
	if f := k.e.fence; f != nil {
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(f.Key), "=", f.Rev))
		ops = append(ops, clientv3.OpPut(k.e.prefix+WriterKey, f.Writer))
		// On a failed compare, tell a lost leadership from a conflict.
		orElse = append(orElse, clientv3.OpGet(f.Key, clientv3.WithKeysOnly()))
	}
	resp, err := k.e.cli.Txn(k.ctx).If(cmps...).Then(ops...).Else(orElse...).Commit()
	if err == nil && !resp.Succeeded && k.e.fence != nil {
		if kvs := resp.Responses[0].GetResponseRange().GetKvs(); len(kvs) == 0 || kvs[0].CreateRevision != k.e.fence.Rev {
			return fmt.Errorf("commit: election key %q of revision %d is gone: %w", k.e.fence.Key, k.e.fence.Rev, ErrLeadershipLost)
		}
	}
	switch {
	case err != nil && tooLarge(err):
		return fmt.Errorf("commit %d writes of %d bytes with %d compares: %w (etcd: %w)", len(ops), size, len(cmps), ErrTxnTooLarge, err)
	case err != nil && unreachable(err):
		return fmt.Errorf("commit %d writes of %d bytes to etcd: %w: %w", len(ops), size, ErrUnreachable, err)
	case err != nil:
		return fmt.Errorf("commit %d writes of %d bytes to etcd: %w", len(ops), size, err)
	case !resp.Succeeded:
		return errStale
	}
	return nil
}

// compares returns the conditions under which the snapshot at rev is still
// what the transaction would read.
func (k *etcdKV) compares() []clientv3.Cmp {
	var cmps []clientv3.Cmp
	// The scanned prefixes, less those inside another.
	slices.Sort(k.scanned)
	var prefixes []string
	for _, p := range k.scanned {
		if n := len(prefixes); n == 0 || !strings.HasPrefix(p, prefixes[n-1]) {
			prefixes = append(prefixes, p)
		}
	}
	markers := map[string]bool{}
	for _, p := range prefixes {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(k.e.prefix+p), "<", k.rev+1).WithPrefix())
		if p == "" {
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(k.e.prefix+deletedNS), "<", k.rev+1).WithPrefix())
		} else {
			markers[k.marker(p)] = true
		}
	}
	for _, m := range sortedKeys(markers) {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(m), "<", k.rev+1))
	}
	for _, key := range sortedKeys(k.seen) {
		if slices.ContainsFunc(prefixes, func(p string) bool { return strings.HasPrefix(key, p) }) {
			continue
		}
		full := k.e.prefix + key
		if s := k.seen[key]; s.present {
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(full), "=", s.mod))
		} else {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(full), "=", 0))
		}
	}
	return cmps
}

// marker returns the deletion marker that covers key (and every prefix
// that starts with the same byte).
func (k *etcdKV) marker(key string) string { return k.e.prefix + deletedNS + key[:1] }

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for key := range m {
		keys = append(keys, key)
	}
	slices.Sort(keys)
	return keys
}

// tooLarge says whether a commit failed for its size: etcd's op or request
// size limit, or gRPC's message size limit on either side (which gRPC
// reports as ResourceExhausted, a code etcd also uses for a full
// database, so etcd's own errors are told apart first).
// unreachable reports whether a commit failed for want of etcd rather
// than on its merits: the connection broke, or etcd timed out or lost its
// leader. Its outcome is unknown.
func unreachable(err error) bool {
	for _, e := range []error{rpctypes.ErrTimeout, rpctypes.ErrTimeoutDueToLeaderFail, rpctypes.ErrTimeoutDueToConnectionLost,
		rpctypes.ErrLeaderChanged, rpctypes.ErrNoLeader} {
		if errors.Is(err, e) {
			return true
		}
	}
	return status.Code(err) == codes.Unavailable
}

func tooLarge(err error) bool {
	if errors.Is(err, rpctypes.ErrTooManyOps) || errors.Is(err, rpctypes.ErrRequestTooLarge) {
		return true
	}
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) {
		return false
	}
	return status.Code(err) == codes.ResourceExhausted
}

var _ Store = (*Etcd)(nil)
