package meta_test

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"

	"segmap/internal/etcdtest"
	"segmap/internal/leaktest"
	"segmap/internal/meta"
	"segmap/internal/meta/metatest"
	"segmap/internal/table"
)

// Limits of the test server: well above etcd's defaults (128 ops, 1.5 MiB),
// as a controller's etcd must be (see meta.Etcd).
const (
	testMaxTxnOps       = etcdtest.MaxTxnOps
	testMaxRequestBytes = etcdtest.MaxRequestBytes
)

// Encoded record sizes the Etcd doc comment states.
const (
	tablePageBytes = 1 + meta.PageEntries*9 + 4
	refsPageBytes  = 1 + meta.PageSlots*4 + 4
	// fullPartialPageBytes is the largest table page: its 1024 entries
	// each partial with table.MaxDepth layers, each layer's sub-blocks in
	// 4 words: a count, then per entry its index and depth, and (a word
	// count and 4 words) for the top and (container, slot, a word count
	// and 4 words) for each layer under it.
	fullPartialPageBytes = tablePageBytes + 4 + meta.PageEntries*(2+1+33+(table.MaxDepth-1)*(8+33))
	// etcdDefaultMaxRequestBytes is etcd's default --max-request-bytes.
	etcdDefaultMaxRequestBytes = 3 << 19
)

// dirBytes is the encoded size of a table directory of n pages.
func dirBytes(n int) int { return 1 + 4 + n*12 + 4 }

// TestEtcd runs everything against one embedded etcd server, which takes
// about a second to start; each store lives under a prefix of its own.
func TestEtcd(t *testing.T) {
	checkEtcdGoroutines(t)
	endpoint := startEtcd(t)
	cli := newClient(t, endpoint)
	var n atomic.Int64
	prefix := func() string { return fmt.Sprintf("/segmap-test/%d/", n.Add(1)) }

	// The suite runs on a plain store and on one opened WithFence: the
	// fence's extra compare and write change nothing a transaction sees.
	for _, fenced := range []bool{false, true} {
		name := "Conformance"
		if fenced {
			name = "ConformanceFenced"
		}
		t.Run(name, func(t *testing.T) {
			var opts []meta.EtcdOption
			if fenced {
				sess, err := concurrency.NewSession(cli, concurrency.WithTTL(30))
				if err != nil {
					t.Fatal(err)
				}
				defer sess.Close()
				el := concurrency.NewElection(sess, prefix()+"election/")
				if err := el.Campaign(t.Context(), "conformance"); err != nil {
					t.Fatal(err)
				}
				opts = append(opts, meta.WithFence(meta.EtcdFence{Key: el.Key(), Rev: el.Rev(), Writer: "conformance"}))
			}
			metatest.Run(t, func(t *testing.T) meta.Store {
				s, err := meta.OpenEtcd(t.Context(), cli, prefix(), opts...)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() {
					if err := s.Close(); err != nil {
						t.Errorf("Close: %v", err)
					}
				})
				return s
			})
		})
	}

	t.Run("GroupCommit", func(t *testing.T) {
		metatest.RunGroupCommit(t, func(t *testing.T) meta.Store {
			s := openEtcd(t, cli, prefix())
			t.Cleanup(func() {
				if err := s.Close(); err != nil {
					t.Errorf("Close: %v", err)
				}
			})
			return s
		})
	})

	t.Run("Persistence", func(t *testing.T) {
		// The store "kept in dir" is the one under a prefix named after
		// dir: reopening is a new Etcd over the same server and prefix.
		metatest.RunPersistence(t, func(t *testing.T, dir string) meta.Store {
			return openEtcd(t, cli, "/segmap-persist"+dir+"/")
		})
	})

	t.Run("CloseLeavesClientOpen", func(t *testing.T) {
		s := openEtcd(t, cli, prefix())
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := cli.Get(t.Context(), "/any"); err != nil {
			t.Errorf("client after the store's Close: %v", err)
		}
	})

	t.Run("RecordSizes", func(t *testing.T) { testEtcdRecordSizes(t, cli, prefix()) })
	t.Run("PartialPageFitsDefaults", func(t *testing.T) { testEtcdPartialPage(t, cli, prefix()) })
	t.Run("TwoStoresConflict", func(t *testing.T) {
		testEtcdTwoStores(t, cli, newClient(t, endpoint), prefix())
	})
	t.Run("ConflictDetected", func(t *testing.T) { testEtcdConflicts(t, cli, prefix) })
	t.Run("BatchSplitsWhenTooLarge", func(t *testing.T) { testEtcdBatchSplits(t, cli, prefix()) })
	t.Run("BatchConflictRunsAgain", func(t *testing.T) { testEtcdBatchConflict(t, cli, prefix()) })
	testEtcdTooLarge(t, cli, prefix)
	t.Run("Fence", func(t *testing.T) { testEtcdFence(t, cli, newClient(t, endpoint), prefix()) })
}

// startEtcd starts a one-member etcd in a temporary directory, stopped when
// t ends, and returns its client URL.
func startEtcd(t *testing.T) string { return etcdtest.StartOne(t) }

// newClient returns a client of endpoint, closed when t ends, whose send
// limit is above the server's request limit, so that the server's limit is
// the one that refuses.
func newClient(t *testing.T, endpoint string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:          []string{endpoint},
		DialTimeout:        5 * time.Second,
		MaxCallSendMsgSize: 2 * testMaxRequestBytes,
		Logger:             zap.NewNop(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func openEtcd(t *testing.T, cli *clientv3.Client, prefix string) *meta.Etcd {
	t.Helper()
	s, err := meta.OpenEtcd(t.Context(), cli, prefix)
	if err != nil {
		t.Fatalf("OpenEtcd: %v", err)
	}
	return s
}

// checkEtcdGoroutines fails t if goroutines of the server, the clients or
// the store outlive its cleanups. Call it first, so that its cleanup runs
// last.
func checkEtcdGoroutines(t *testing.T) {
	t.Helper()
	leaktest.Check(t, leaktest.Matching("segmap/internal/", "go.etcd.io/", "google.golang.org/grpc"))
}

var testCreated = time.Date(2025, 3, 14, 15, 9, 26, 0, time.UTC)

func etcdTestDisk(name string) meta.Disk {
	return meta.Disk{Name: name, Size: 1 << 40, SegmentSize: 1 << 20, Policy: table.Forward, Created: testCreated}
}

// testEtcdRecordSizes checks the page sizes that the limits in the Etcd doc
// comment are computed from, as etcd stores them.
func testEtcdRecordSizes(t *testing.T, cli *clientv3.Client, prefix string) {
	s := openEtcd(t, cli, prefix)
	defer s.Close()
	err := s.Update(t.Context(), func(tx *meta.Tx) error {
		d, err := tx.CreateDisk(etcdTestDisk("vol"))
		if err != nil {
			return err
		}
		c, err := tx.AddContainer(meta.Container{URI: "c", SlotSize: 1 << 20, Slots: 10})
		if err != nil {
			return err
		}
		l := table.Location{Container: c.ID, Slot: 1}
		if err := tx.SetEntries(d.ID, 0, []table.Entry{table.At(l, false)}); err != nil {
			return err
		}
		return tx.SetRefs(l, 1)
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []struct {
		sub  string
		size int
	}{{"p/", tablePageBytes}, {"r/", refsPageBytes}, {"q/", refsPageBytes}, {"t/", dirBytes(1)}} {
		resp, err := cli.Get(t.Context(), prefix+r.sub, clientv3.WithPrefix())
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) != 1 {
			t.Fatalf("%d keys under %q, want 1", len(resp.Kvs), r.sub)
		}
		if got := len(resp.Kvs[0].Value); got != r.size {
			t.Errorf("record under %q is %d bytes, want %d", r.sub, got, r.size)
		}
	}
}

// testEtcdPartialPage stores the largest table page, one whose every entry
// is partial with MaxDepth layers, and has a second disk copy it on
// write: the page and the whole commit of the copy (the page, the
// reference counts of its 8192 slots, the directory and the page counts)
// are under etcd's default request limit.
func testEtcdPartialPage(t *testing.T, cli *clientv3.Client, prefix string) {
	s := openEtcd(t, cli, prefix)
	defer s.Close()
	es := meta.FullPartialPage()
	var b meta.Disk
	err := s.Update(t.Context(), func(tx *meta.Tx) error {
		a, err := tx.CreateDisk(etcdTestDisk("a"))
		if err != nil {
			return err
		}
		if b, err = tx.CreateDisk(etcdTestDisk("b")); err != nil {
			return err
		}
		if _, err := tx.AddContainer(meta.Container{ID: 1, URI: "c", SlotSize: 1 << 20, Slots: meta.PageEntries * table.MaxDepth}); err != nil {
			return err
		}
		if err := tx.SetEntries(a.ID, 0, es); err != nil {
			return err
		}
		for _, e := range es {
			var err error
			e.Slots(func(l table.Location) {
				if err == nil {
					err = tx.SetRefs(l, 1)
				}
			})
			if err != nil {
				return err
			}
		}
		return tx.CopyTable(a.ID, b.ID)
	})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Get(t.Context(), prefix+"p/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 1 || len(resp.Kvs[0].Value) != fullPartialPageBytes {
		t.Fatalf("%d pages stored, want one of %d bytes", len(resp.Kvs), fullPartialPageBytes)
	}
	if fullPartialPageBytes > etcdDefaultMaxRequestBytes {
		t.Errorf("the largest table page, %d bytes, is over etcd's default request limit", fullPartialPageBytes)
	}
	// The copy on write of the shared page: every slot gains a reference.
	if err := s.Update(t.Context(), func(tx *meta.Tx) error { return tx.Unshare(b.ID, 0, 1) }); err != nil {
		t.Fatal(err)
	}
	all, err := cli.Get(t.Context(), prefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	var written, ops int
	for _, kv := range all.Kvs {
		if kv.ModRevision == all.Header.Revision {
			written += len(kv.Key) + len(kv.Value)
			ops++
		}
	}
	t.Logf("copy on write of a page of %d partial entries of depth %d: %d writes, %d bytes", len(es), table.MaxDepth, ops, written)
	if written > etcdDefaultMaxRequestBytes || ops > 128 {
		t.Errorf("copy on write of the largest page writes %d records, %d bytes: over etcd's defaults (128, %d)", ops, written, etcdDefaultMaxRequestBytes)
	}
	err = s.View(t.Context(), func(tx *meta.Tx) error {
		for _, e := range es {
			var err error
			e.Slots(func(l table.Location) {
				if n, rerr := tx.Refs(l); err == nil && (rerr != nil || n != 2) {
					err = fmt.Errorf("slot %v: count %d (%v), want 2", l, n, rerr)
				}
			})
			if err != nil {
				return err
			}
		}
		got, err := tx.Entries(b.ID, 0, meta.PageEntries)
		if err != nil {
			return err
		}
		for i := range es {
			if !got[i].Equal(es[i]) {
				return fmt.Errorf("entry %d of the copy: %v, want %v", i, got[i], es[i])
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// testEtcdTwoStores runs conflicting Updates through two stores, each with
// its own client, and checks that no increment is lost.
func testEtcdTwoStores(t *testing.T, cli1, cli2 *clientv3.Client, prefix string) {
	const rounds = 100
	s1, s2 := openEtcd(t, cli1, prefix), openEtcd(t, cli2, prefix)
	defer s1.Close()
	defer s2.Close()
	var c meta.Container
	if err := s1.Update(t.Context(), func(tx *meta.Tx) error {
		var err error
		c, err = tx.AddContainer(meta.Container{URI: "c", SlotSize: 1 << 20, Slots: 10})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	shared := table.Location{Container: c.ID, Slot: 3}
	var calls atomic.Int64
	var wg sync.WaitGroup
	for i, s := range []*meta.Etcd{s1, s2} {
		wg.Go(func() {
			for r := range rounds {
				err := s.Update(t.Context(), func(tx *meta.Tx) error {
					calls.Add(1)
					_, err := meta.AddRefs(tx, shared, 1)
					return err
				})
				if err != nil {
					t.Errorf("store %d round %d: %v", i+1, r, err)
					return
				}
			}
		})
	}
	wg.Wait()
	t.Logf("%d increments took %d runs of the transaction function", 2*rounds, calls.Load())
	for i, s := range []*meta.Etcd{s1, s2} {
		if err := s.View(t.Context(), func(tx *meta.Tx) error {
			n, err := tx.Refs(shared)
			if err != nil {
				return err
			}
			if n != 2*rounds {
				t.Errorf("store %d: count %d, want %d", i+1, n, 2*rounds)
			}
			ct, err := tx.Container(c.ID)
			if err == nil && ct.Used != 1 {
				t.Errorf("store %d: Used %d, want 1", i+1, ct.Used)
			}
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
}

// testEtcdConflicts checks each kind of read a commit is conditional on:
// between a transaction's read and its commit another store changes what
// it read, and the transaction must run again and see the change.
func testEtcdConflicts(t *testing.T, cli *clientv3.Client, prefix func() string) {
	cases := []struct {
		name string
		// read is the first transaction's read; it returns what it saw.
		read func(tx *meta.Tx, ids []meta.DiskID) (string, error)
		// change is the other store's transaction.
		change func(tx *meta.Tx, ids []meta.DiskID) error
	}{
		{
			name: "KeyModified",
			read: func(tx *meta.Tx, ids []meta.DiskID) (string, error) {
				d, err := tx.DiskByID(ids[0])
				return fmt.Sprint(d.ReadOnly), err
			},
			change: func(tx *meta.Tx, ids []meta.DiskID) error {
				d, err := tx.DiskByID(ids[0])
				if err != nil {
					return err
				}
				d.ReadOnly = true
				return tx.PutDisk(d)
			},
		},
		{
			name: "AbsentKeyCreated",
			read: func(tx *meta.Tx, ids []meta.DiskID) (string, error) {
				_, err := tx.Disk("new")
				if errors.Is(err, meta.ErrNotFound) {
					return "absent", nil
				}
				return "present", err
			},
			change: func(tx *meta.Tx, ids []meta.DiskID) error {
				_, err := tx.CreateDisk(etcdTestDisk("new"))
				return err
			},
		},
		{
			name: "KeyDeleted",
			read: func(tx *meta.Tx, ids []meta.DiskID) (string, error) {
				_, err := tx.DiskByID(ids[1])
				if errors.Is(err, meta.ErrNotFound) {
					return "absent", nil
				}
				return "present", err
			},
			change: func(tx *meta.Tx, ids []meta.DiskID) error { _, err := tx.DeleteDisk(ids[1]); return err },
		},
		{
			name: "ScanSeesCreate",
			read: func(tx *meta.Tx, ids []meta.DiskID) (string, error) {
				ds, err := tx.Disks()
				return fmt.Sprint(len(ds)), err
			},
			change: func(tx *meta.Tx, ids []meta.DiskID) error {
				_, err := tx.CreateDisk(etcdTestDisk("new"))
				return err
			},
		},
		{
			// etcd's range compares see only keys that exist: this is the
			// case the deletion markers are for.
			name: "ScanSeesDelete",
			read: func(tx *meta.Tx, ids []meta.DiskID) (string, error) {
				ds, err := tx.Disks()
				return fmt.Sprint(len(ds)), err
			},
			change: func(tx *meta.Tx, ids []meta.DiskID) error { _, err := tx.DeleteDisk(ids[1]); return err },
		},
		{
			name: "ScanSeesModify",
			read: func(tx *meta.Tx, ids []meta.DiskID) (string, error) {
				var n int
				err := tx.ForEachMapped(ids[0], func(uint64, table.Entry) error { n++; return nil })
				return fmt.Sprint(n), err
			},
			change: func(tx *meta.Tx, ids []meta.DiskID) error {
				return tx.SetEntries(ids[0], 5, []table.Entry{table.At(table.Location{Container: 1, Slot: 9}, false)})
			},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := prefix()
			s1, s2 := openEtcd(t, cli, p), openEtcd(t, cli, p)
			defer s1.Close()
			defer s2.Close()
			var ids []meta.DiskID
			if err := s1.Update(t.Context(), func(tx *meta.Tx) error {
				ids = ids[:0]
				for _, name := range []string{"a", "b"} {
					d, err := tx.CreateDisk(etcdTestDisk(name))
					if err != nil {
						return err
					}
					ids = append(ids, d.ID)
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			var saw []string
			err := s1.Update(t.Context(), func(tx *meta.Tx) error {
				v, err := c.read(tx, ids)
				if err != nil {
					return err
				}
				saw = append(saw, v)
				if len(saw) == 1 {
					if err := s2.Update(t.Context(), func(tx *meta.Tx) error { return c.change(tx, ids) }); err != nil {
						return fmt.Errorf("other store: %w", err)
					}
				}
				// A write, so that the transaction commits.
				_, err = tx.NextSeq("writes")
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			if len(saw) != 2 || saw[0] == saw[1] {
				t.Errorf("transaction saw %q, want two runs that differ", saw)
			}
			if err := s1.View(t.Context(), func(tx *meta.Tx) error {
				v, err := c.read(tx, ids)
				if err == nil && len(saw) > 0 && v != saw[len(saw)-1] {
					t.Errorf("after commit: read %q, the last run read %q", v, saw[len(saw)-1])
				}
				return err
			}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// etcdKeys counts the keys under prefix, read with the client directly.
func etcdKeys(t *testing.T, cli *clientv3.Client, prefix string) int64 {
	t.Helper()
	resp, err := cli.Get(t.Context(), prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	return resp.Count
}

// testEtcdTooLarge commits Updates over each of the server's limits, more
// writes than --max-txn-ops or fewer writes but more bytes than
// --max-request-bytes: each fails with ErrTxnTooLarge, runs its function
// once (a size error is not retried) and writes nothing.
func testEtcdTooLarge(t *testing.T, cli *clientv3.Client, prefix func() string) {
	const pages = testMaxRequestBytes/tablePageBytes + 16
	if pages >= testMaxTxnOps {
		t.Fatalf("%d pages would exceed the op limit too", pages)
	}
	cases := []struct {
		name, what string
		// write makes the Update too large.
		write func(tx *meta.Tx, d meta.Disk) error
		// unwritten checks, in an Update, that nothing write did is there.
		unwritten func(t *testing.T, tx *meta.Tx, d meta.Disk) error
	}{
		{
			name: "TooManyOps",
			what: fmt.Sprintf("%d writes", testMaxTxnOps+1),
			write: func(tx *meta.Tx, _ meta.Disk) error {
				if _, err := tx.NextSeq("counter"); err != nil {
					return err
				}
				// SetGrants writes one small record without reading.
				for id := range meta.DiskID(testMaxTxnOps) {
					if err := tx.SetGrants(id+100, []string{"agent"}, false); err != nil {
						return err
					}
				}
				return nil
			},
			unwritten: func(t *testing.T, tx *meta.Tx, _ meta.Disk) error {
				_, all, err := tx.Grants(100)
				if err == nil && !all {
					t.Error("grants of the refused Update were stored")
				}
				n, err := tx.NextSeq("counter")
				if err == nil && n != 1 {
					t.Errorf("counter after the refused Update: next is %d, want 1", n)
				}
				return err
			},
		},
		{
			name: "TooManyBytes",
			what: fmt.Sprintf("%d table pages", pages),
			write: func(tx *meta.Tx, d meta.Disk) error {
				// Scanning the (empty) table first lets the pages be
				// read without a request each.
				if err := tx.ForEachMapped(d.ID, func(uint64, table.Entry) error { return nil }); err != nil {
					return err
				}
				e := []table.Entry{table.At(table.Location{Container: 1, Slot: 1}, false)}
				for pg := range uint64(pages) {
					if err := tx.SetEntries(d.ID, pg*meta.PageEntries, e); err != nil {
						return err
					}
				}
				return nil
			},
			unwritten: func(t *testing.T, tx *meta.Tx, d meta.Disk) error {
				return tx.ForEachMapped(d.ID, func(seg uint64, e table.Entry) error {
					t.Errorf("entry %d of the refused Update was stored: %v", seg, e)
					return nil
				})
			},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := prefix()
			s := openEtcd(t, cli, p)
			defer s.Close()
			var d meta.Disk
			if err := s.Update(t.Context(), func(tx *meta.Tx) error {
				var err error
				d, err = tx.CreateDisk(etcdTestDisk("vol"))
				return err
			}); err != nil {
				t.Fatal(err)
			}
			keys := etcdKeys(t, cli, p)
			calls := 0
			err := s.Update(t.Context(), func(tx *meta.Tx) error {
				calls++
				return c.write(tx, d)
			})
			if !errors.Is(err, meta.ErrTxnTooLarge) {
				t.Fatalf("Update of %s: %v, want ErrTxnTooLarge", c.what, err)
			}
			t.Logf("Update of %s: %v", c.what, err)
			if calls != 1 {
				t.Errorf("transaction function ran %d times, want 1 (a size error is not retried)", calls)
			}
			if got := etcdKeys(t, cli, p); got != keys {
				t.Errorf("%d keys after the refused Update, %d before", got, keys)
			}
			if err := s.Update(t.Context(), func(tx *meta.Tx) error { return c.unwritten(t, tx, d) }); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// testEtcdFence: a leader's store writes while it leads, records who wrote,
// and writes nothing once its election key is gone, however the next
// leader's writes interleave; a second leader's store then writes.
func testEtcdFence(t *testing.T, cli1, cli2 *clientv3.Client, prefix string) {
	ctx := t.Context()
	campaign := func(cli *clientv3.Client, name string) (*concurrency.Session, *concurrency.Election) {
		t.Helper()
		sess, err := concurrency.NewSession(cli, concurrency.WithTTL(30))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sess.Close() })
		el := concurrency.NewElection(sess, prefix+"election/")
		if err := el.Campaign(ctx, name); err != nil {
			t.Fatal(err)
		}
		return sess, el
	}
	open := func(cli *clientv3.Client, el *concurrency.Election, writer string) *meta.Etcd {
		t.Helper()
		s, err := meta.OpenEtcd(ctx, cli, prefix+"meta/", meta.WithFence(meta.EtcdFence{Key: el.Key(), Rev: el.Rev(), Writer: writer}))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	create := func(s *meta.Etcd, name string) error {
		return s.Update(ctx, func(tx *meta.Tx) error {
			_, err := tx.CreateDisk(etcdTestDisk(name))
			return err
		})
	}
	writer := func() string {
		t.Helper()
		r, err := cli1.Get(ctx, prefix+"meta/"+meta.WriterKey)
		if err != nil || len(r.Kvs) != 1 {
			t.Fatalf("writer key: %v %v", r, err)
		}
		return string(r.Kvs[0].Value)
	}

	sess1, el1 := campaign(cli1, "one")
	s1 := open(cli1, el1, "one/1")
	if err := create(s1, "a"); err != nil {
		t.Fatalf("leader's write: %v", err)
	}
	if w := writer(); w != "one/1" {
		t.Errorf("writer %q, want one/1", w)
	}
	if _, err := meta.OpenEtcd(ctx, cli1, prefix+"x/", meta.WithFence(meta.EtcdFence{Key: el1.Key()})); !errors.Is(err, meta.ErrInvalid) {
		t.Errorf("fence without a revision: %v, want ErrInvalid", err)
	}

	// The second campaigns; the first loses its lease (as when its etcd
	// session expires), and the second wins.
	won := make(chan *concurrency.Election, 1)
	go func() {
		_, el2 := campaign(cli2, "two")
		won <- el2
	}()
	if _, err := cli1.Revoke(ctx, sess1.Lease()); err != nil {
		t.Fatal(err)
	}
	el2 := <-won
	if err := create(s1, "b"); !errors.Is(err, meta.ErrLeadershipLost) {
		t.Fatalf("deposed leader's write: %v, want ErrLeadershipLost", err)
	}
	s2 := open(cli2, el2, "two/2")
	if err := create(s2, "c"); err != nil {
		t.Fatalf("new leader's write: %v", err)
	}
	if err := create(s1, "d"); !errors.Is(err, meta.ErrLeadershipLost) {
		t.Fatalf("deposed leader's write after the new leader's: %v, want ErrLeadershipLost", err)
	}
	if w := writer(); w != "two/2" {
		t.Errorf("writer %q, want two/2", w)
	}
	if err := s2.View(ctx, func(tx *meta.Tx) error {
		ds, err := tx.Disks()
		if err != nil {
			return err
		}
		var names []string
		for _, d := range ds {
			names = append(names, d.Name)
		}
		if strings.Join(names, ",") != "a,c" {
			t.Errorf("disks %v, want a and c", names)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}
