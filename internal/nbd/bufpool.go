package nbd

import (
	"math/bits"
	"sync"

	"segmap/internal/nbd/nbdwire"
)

// Payload buffers come from pools by size class: powers of two from
// 2^minClassShift to maxPayload. A request for n bytes takes a buffer of the
// smallest class that holds n; the steady state allocates nothing.
const (
	minClassShift = 9
	maxClassShift = 25 // log2(maxPayload)
)

var bufPools [maxClassShift - minClassShift + 1]sync.Pool

// sizeClass returns the class index of a buffer for n bytes,
// 0 < n <= maxPayload.
func sizeClass(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// getBuf returns a buffer with len >= n. n must not exceed maxPayload: the
// callers check client lengths before asking.
func getBuf(n int) *[]byte {
	if n > nbdwire.MaxPayload {
		panic("nbd: payload buffer above the maximum payload")
	}
	c := sizeClass(n)
	if p, _ := bufPools[c].Get().(*[]byte); p != nil {
		return p
	}
	b := make([]byte, 1<<(c+minClassShift))
	return &b
}

// putBuf returns a buffer from getBuf to its pool.
func putBuf(p *[]byte) {
	bufPools[sizeClass(len(*p))].Put(p)
}

// budget bounds the payload bytes a connection holds at once. Only the
// connection's request reader acquires, so release wakes one waiter.
type budget struct {
	mu struct {
		sync.Mutex
		avail int
	}
	cond sync.Cond // waits on mu
}

func (b *budget) init(n int) {
	b.cond.L = &b.mu
	b.mu.avail = n
}

// acquire waits until n bytes are available and takes them. n must not
// exceed the budget's total.
func (b *budget) acquire(n int) {
	b.mu.Lock()
	for b.mu.avail < n {
		b.cond.Wait()
	}
	b.mu.avail -= n
	b.mu.Unlock()
}

func (b *budget) release(n int) {
	b.mu.Lock()
	b.mu.avail += n
	b.mu.Unlock()
	b.cond.Signal()
}
