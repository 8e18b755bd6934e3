// Package containertest is the conformance suite for container.Container
// backends, in the manner of testing/fstest: every backend's tests call Run
// with a constructor, and Run checks the whole Container contract against
// it.
//
// The suite checks behaviour only through the Container interface, so it
// holds for any backend: zeros for unwritten and punched ranges, exact
// range checks with no partial transfers, data kept across slot boundaries,
// freedom from data races under concurrent I/O (run it with -race), and the
// open -> closed state transition. Randomised parts use fixed seeds that
// are printed with every failure, so a failure can be replayed.
package containertest

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"testing"

	"segmap/internal/container"
)

// geometries are the container shapes every check runs on: slots smaller
// than the 64 KiB allocation unit of container.Memory, and slots equal to
// it, so chunk and slot boundaries both coincide and differ.
var geometries = []struct{ slotSize, slots int64 }{
	{4096, 8},
	{64 << 10, 3},
}

// Run runs the conformance suite against containers made by newC, which
// must return a fresh, empty container with the given slot size and slot
// count each time it is called. Slot sizes are powers of two of at least
// 4096 and there are at least 3 slots. Run closes the containers it makes;
// newC may register further cleanup with t.Cleanup.
func Run(t *testing.T, newC func(t *testing.T, slotSize, slots int64) container.Container) {
	checks := []struct {
		name string
		fn   func(t *testing.T, c container.Container)
	}{
		{"Geometry", testGeometry},
		{"FreshReadsZero", testFreshReadsZero},
		{"ReadWrite", testReadWrite},
		{"Model", testModel},
		{"Concurrent", testConcurrent},
		{"Punch", testPunch},
		{"OutOfRange", testOutOfRange},
		{"Flush", testFlush},
		{"Close", testClose},
		{"CloseDuringIO", testCloseDuringIO},
	}
	for _, g := range geometries {
		t.Run(fmt.Sprintf("%dx%d", g.slotSize, g.slots), func(t *testing.T) {
			for _, ck := range checks {
				t.Run(ck.name, func(t *testing.T) {
					c := newC(t, g.slotSize, g.slots)
					t.Cleanup(func() { c.Close() }) // may already be closed
					if c.SlotSize() != g.slotSize || c.Slots() != g.slots {
						t.Fatalf("newC(%d, %d) made a container with slot size %d and %d slots",
							g.slotSize, g.slots, c.SlotSize(), c.Slots())
					}
					ck.fn(t, c)
				})
			}
		})
	}
}

// pattern returns n bytes of recognisable, never-zero content for offset
// off, different for each seed, so that misplaced or missing data shows.
func pattern(seed uint64, off, n int64) []byte {
	p := make([]byte, n)
	for i := range p {
		x := uint64(off+int64(i))*0x9e3779b97f4a7c15 + seed*0xbf58476d1ce4e5b9
		x ^= x >> 29
		p[i] = byte(1 + x%255)
	}
	return p
}

// write writes p at off, failing the test on error or a short write.
func write(t *testing.T, c container.Container, p []byte, off int64) {
	t.Helper()
	n, err := c.WriteAt(p, off)
	if err != nil || n != len(p) {
		t.Fatalf("WriteAt(%d bytes, %d) = %d, %v; want %d, nil", len(p), off, n, err, len(p))
	}
}

// read reads n bytes at off, failing the test on error or a short read.
func read(t *testing.T, c container.Container, off, n int64) []byte {
	t.Helper()
	p := make([]byte, n)
	m, err := c.ReadAt(p, off)
	if err != nil || m != len(p) {
		t.Fatalf("ReadAt(%d bytes, %d) = %d, %v; want %d, nil", n, off, m, err, n)
	}
	return p
}

// punch punches [off, off+n) and mirrors it in model.
func punch(t *testing.T, c container.Container, model []byte, off, n int64) {
	t.Helper()
	if err := c.Punch(off, n); err != nil {
		t.Fatalf("Punch(%d, %d) = %v", off, n, err)
	}
	clear(model[off : off+n])
}

// checkContents reads the whole container in pieces of an awkward size (so
// that reads straddle slot boundaries) and compares it with model.
func checkContents(t *testing.T, c container.Container, model []byte, what string) {
	t.Helper()
	const piece = 5000
	for off := int64(0); off < int64(len(model)); off += piece {
		n := min(piece, int64(len(model))-off)
		got := read(t, c, off, n)
		if want := model[off : off+n]; !bytes.Equal(got, want) {
			i := int64(firstDiff(got, want))
			t.Fatalf("%s: byte at offset %d (slot %d) is %#02x, want %#02x",
				what, off+i, (off+i)/c.SlotSize(), got[i], want[i])
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return len(a)
}

// fill writes pattern(seed) over the whole container and returns the model.
func fill(t *testing.T, c container.Container, seed uint64) []byte {
	t.Helper()
	model := pattern(seed, 0, c.Size())
	write(t, c, model, 0)
	return model
}

func testGeometry(t *testing.T, c container.Container) {
	if got, want := c.Size(), c.SlotSize()*c.Slots(); got != want {
		t.Errorf("Size() = %d, want SlotSize()*Slots() = %d", got, want)
	}
	if id := c.ID(); c.ID() != id {
		t.Errorf("ID() changed between calls")
	}
}

func testFreshReadsZero(t *testing.T, c container.Container) {
	checkContents(t, c, make([]byte, c.Size()), "fresh container")
	// One read of everything, and single bytes at both ends.
	if p := read(t, c, 0, c.Size()); !bytes.Equal(p, make([]byte, c.Size())) {
		t.Errorf("fresh container: whole read is not all zero")
	}
	for _, off := range []int64{0, c.Size() - 1} {
		if p := read(t, c, off, 1); p[0] != 0 {
			t.Errorf("fresh container: byte %d is %#02x, want 0", off, p[0])
		}
	}
}

func testReadWrite(t *testing.T, c container.Container) {
	ss, size := c.SlotSize(), c.Size()
	model := make([]byte, size)
	writes := []struct{ off, n int64 }{
		{0, 1},                    // first byte
		{ss - 1, 2},               // straddles slots 0 and 1
		{ss/2 + 3, ss + 17},       // starts and ends mid-slot, crosses a boundary
		{7, 2*ss + 11},            // spans three slots
		{size - 1, 1},             // last byte
		{size - ss - 5, ss + 5},   // runs to the very end
		{ss - 100, 200},           // overwrites earlier data
		{2*ss - 4096, 4096 + 512}, // page-aligned start
	}
	for i, w := range writes {
		p := pattern(uint64(i+1), w.off, w.n)
		write(t, c, p, w.off)
		copy(model[w.off:], p)
		if got := read(t, c, w.off, w.n); !bytes.Equal(got, p) {
			t.Fatalf("read back of write %d (%d bytes at %d) differs at byte %d", i, w.n, w.off, firstDiff(got, p))
		}
		checkContents(t, c, model, fmt.Sprintf("after write %d (%d bytes at %d)", i, w.n, w.off))
	}
}

// testModel applies random writes, punches and reads and compares the
// container with a plain byte slice after each step.
func testModel(t *testing.T, c container.Container) {
	const seed = 1
	rng := rand.New(rand.NewPCG(seed, uint64(c.SlotSize())))
	size, ss := c.Size(), c.SlotSize()
	model := make([]byte, size)
	randRange := func() (off, n int64) {
		off = rng.Int64N(size)
		n = min(rng.Int64N(2*ss+1), size-off)
		return off, n
	}
	for step := range 300 {
		off, n := randRange()
		switch op := rng.IntN(10); {
		case op < 5:
			p := pattern(uint64(step), off, n)
			write(t, c, p, off)
			copy(model[off:], p)
		case op < 7:
			punch(t, c, model, off, n)
		case op < 8:
			slot := rng.Int64N(c.Slots())
			if err := container.FreeSlot(c, slot); err != nil {
				t.Fatalf("seed %d step %d: FreeSlot(%d) = %v", seed, step, slot, err)
			}
			clear(model[slot*ss : (slot+1)*ss])
		default:
			if got, want := read(t, c, off, n), model[off:off+n]; !bytes.Equal(got, want) {
				i := int64(firstDiff(got, want))
				t.Fatalf("seed %d step %d: byte %d is %#02x, want %#02x", seed, step, off+i, got[i], want[i])
			}
		}
	}
	checkContents(t, c, model, fmt.Sprintf("seed %d: final", seed))
}

// testConcurrent runs writers on disjoint regions alongside readers that
// read across all of them. Writer w only ever writes the byte w+1, so a
// reader must see 0 or w+1 in w's region, and exactly the initial pattern
// in the static region nobody writes.
func testConcurrent(t *testing.T, c container.Container) {
	const writers, readers = 4, 4
	size := c.Size()
	region := size / (writers + 1) // last region (with the rest) is static
	staticOff := writers * region
	static := pattern(99, staticOff, size-staticOff)
	write(t, c, static, staticOff)

	owner := func(off int64) int { return int(min(off/region, writers)) }

	var wg sync.WaitGroup
	done := make(chan struct{})
	var writersWG sync.WaitGroup
	for w := range writers {
		writersWG.Add(1)
		wg.Go(func() {
			defer writersWG.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			base, val := int64(w)*region, byte(w+1)
			buf := bytes.Repeat([]byte{val}, int(region))
			for range 100 {
				off := rng.Int64N(region)
				n := 1 + rng.Int64N(region-off)
				if _, err := c.WriteAt(buf[:n], base+off); err != nil {
					t.Errorf("writer %d: WriteAt(%d, %d): %v", w, n, base+off, err)
					return
				}
			}
			// Finish with the whole region in odd-sized pieces, so the end
			// state is known.
			for off := int64(0); off < region; off += 3001 {
				n := min(3001, region-off)
				if _, err := c.WriteAt(buf[:n], base+off); err != nil {
					t.Errorf("writer %d: WriteAt(%d, %d): %v", w, n, base+off, err)
					return
				}
			}
		})
	}
	for r := range readers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(r), 2))
			p := make([]byte, 2*c.SlotSize())
			for i := 0; ; i++ {
				select {
				case <-done:
					if i > 0 {
						return
					}
				default:
				}
				off := rng.Int64N(size)
				n := min(1+rng.Int64N(int64(len(p))), size-off)
				if _, err := c.ReadAt(p[:n], off); err != nil {
					t.Errorf("reader %d: ReadAt(%d, %d): %v", r, n, off, err)
					return
				}
				for j, b := range p[:n] {
					at := off + int64(j)
					o := owner(at)
					var ok bool
					if o == writers {
						ok = b == static[at-staticOff]
					} else {
						ok = b == 0 || b == byte(o+1)
					}
					if !ok {
						t.Errorf("reader %d: byte %d is %#02x, which no writer wrote", r, at, b)
						return
					}
				}
			}
		})
	}
	writersWG.Wait()
	close(done)
	wg.Wait()
	if t.Failed() {
		return
	}

	model := make([]byte, size)
	for w := range writers {
		for i := int64(0); i < region; i++ {
			model[int64(w)*region+i] = byte(w + 1)
		}
	}
	copy(model[staticOff:], static)
	checkContents(t, c, model, "after concurrent writes")
}

func testPunch(t *testing.T, c container.Container) {
	ss, size := c.SlotSize(), c.Size()
	model := fill(t, c, 7)

	punch(t, c, model, ss/2-3, 100) // inside slot 0, unaligned
	checkContents(t, c, model, "after sub-slot punch")

	punch(t, c, model, 2*ss-10, 20) // straddles slots 1 and 2
	checkContents(t, c, model, "after punch across a slot boundary")

	punch(t, c, model, 5, 0) // empty: no effect
	checkContents(t, c, model, "after empty punch")

	last := size - ss
	punch(t, c, model, last, 4096) // aligned page at the start of the last slot
	checkContents(t, c, model, "after aligned page punch")

	punch(t, c, model, size-1, 1) // very last byte
	checkContents(t, c, model, "after punching the last byte")

	if err := container.FreeSlot(c, 1); err != nil {
		t.Fatalf("FreeSlot(1) = %v", err)
	}
	clear(model[ss : 2*ss])
	checkContents(t, c, model, "after FreeSlot(1)")

	// Punching twice is harmless, and a punched range takes new data.
	punch(t, c, model, ss, ss)
	p := pattern(8, ss+100, 300)
	write(t, c, p, ss+100)
	copy(model[ss+100:], p)
	checkContents(t, c, model, "after writing into a freed slot")

	punch(t, c, model, 0, size)
	checkContents(t, c, model, "after punching everything")
}

func testOutOfRange(t *testing.T, c container.Container) {
	size := c.Size()
	model := fill(t, c, 3)

	bad := []struct{ off, n int64 }{
		{-1, 1},
		{-1, 0},
		{size, 1},
		{size - 1, 2},
		{size + 1, 0},
		{0, size + 1},
		{math.MaxInt64 - 1, 4},
		{math.MinInt64, 4},
	}
	for _, r := range bad {
		p := make([]byte, min(r.n, size+1))
		if n, err := c.ReadAt(p, r.off); !errors.Is(err, container.ErrOutOfRange) {
			t.Errorf("ReadAt(%d bytes, %d) = %d, %v; want ErrOutOfRange", len(p), r.off, n, err)
		}
		src := pattern(4, 0, int64(len(p)))
		if n, err := c.WriteAt(src, r.off); !errors.Is(err, container.ErrOutOfRange) || n != 0 {
			t.Errorf("WriteAt(%d bytes, %d) = %d, %v; want 0, ErrOutOfRange", len(src), r.off, n, err)
		}
	}
	badPunch := []struct{ off, n int64 }{
		{-1, 1},
		{size - 1, 2},
		{size, 1},
		{size + 1, 0},
		{0, -1},
		{0, size + 1},
		{1, math.MaxInt64},
		{math.MaxInt64, 1},
	}
	for _, r := range badPunch {
		if err := c.Punch(r.off, r.n); !errors.Is(err, container.ErrOutOfRange) {
			t.Errorf("Punch(%d, %d) = %v; want ErrOutOfRange", r.off, r.n, err)
		}
	}
	for _, slot := range []int64{-1, c.Slots(), math.MaxInt64} {
		if err := container.FreeSlot(c, slot); !errors.Is(err, container.ErrOutOfRange) {
			t.Errorf("FreeSlot(%d) = %v; want ErrOutOfRange", slot, err)
		}
	}
	checkContents(t, c, model, "after out-of-range requests")

	// Empty requests anywhere in [0, Size()] are fine.
	if n, err := c.ReadAt(nil, size); n != 0 || err != nil {
		t.Errorf("ReadAt(nil, Size()) = %d, %v; want 0, nil", n, err)
	}
	if n, err := c.WriteAt(nil, size); n != 0 || err != nil {
		t.Errorf("WriteAt(nil, Size()) = %d, %v; want 0, nil", n, err)
	}
	if err := c.Punch(size, 0); err != nil {
		t.Errorf("Punch(Size(), 0) = %v; want nil", err)
	}
}

func testFlush(t *testing.T, c container.Container) {
	p := pattern(5, 123, 4567)
	write(t, c, p, 123)
	if err := c.Flush(); err != nil {
		t.Fatalf("Flush() = %v", err)
	}
	if got := read(t, c, 123, int64(len(p))); !bytes.Equal(got, p) {
		t.Errorf("data changed by Flush")
	}
	if err := c.Flush(); err != nil {
		t.Fatalf("second Flush() = %v", err)
	}
}

func testClose(t *testing.T, c container.Container) {
	write(t, c, pattern(6, 0, 10), 0)
	if err := c.Close(); err != nil {
		t.Fatalf("Close() = %v", err)
	}
	p := make([]byte, 10)
	wantClosed := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, container.ErrClosed) {
			t.Errorf("%s after Close = %v; want ErrClosed", what, err)
		}
	}
	_, err := c.ReadAt(p, 0)
	wantClosed("ReadAt", err)
	_, err = c.WriteAt(p, 0)
	wantClosed("WriteAt", err)
	wantClosed("Punch", c.Punch(0, 10))
	wantClosed("FreeSlot", container.FreeSlot(c, 0))
	wantClosed("Flush", c.Flush())
	wantClosed("Close", c.Close())
	// The geometry stays readable.
	if c.SlotSize() <= 0 || c.Slots() <= 0 || c.Size() != c.SlotSize()*c.Slots() {
		t.Errorf("geometry after Close: slot size %d, %d slots, size %d", c.SlotSize(), c.Slots(), c.Size())
	}
}

// testCloseDuringIO closes the container while readers and writers are
// busy; each must stop with ErrClosed and nothing else.
func testCloseDuringIO(t *testing.T, c container.Container) {
	const workers = 4
	var wg sync.WaitGroup
	started := make(chan struct{}, workers)
	for w := range workers {
		wg.Go(func() {
			p := make([]byte, 4096)
			off := int64(w) * c.SlotSize() % c.Size()
			for i := 0; ; i++ {
				var err error
				if w%2 == 0 {
					_, err = c.ReadAt(p, off)
				} else {
					_, err = c.WriteAt(p, off)
				}
				if i == 0 {
					started <- struct{}{}
				}
				if err != nil {
					if !errors.Is(err, container.ErrClosed) {
						t.Errorf("worker %d: I/O during Close failed with %v; want ErrClosed", w, err)
					}
					return
				}
			}
		})
	}
	for range workers {
		<-started
	}
	if err := c.Close(); err != nil {
		t.Errorf("Close() = %v", err)
	}
	wg.Wait()
}
