package container

import (
	"fmt"
	"sync"
)

// chunkSize is the allocation unit of Memory. Chunks are allocated on first
// write, so an untouched Memory of any size costs only its map.
const chunkSize = 64 << 10

// chunk is one chunkSize piece of a Memory's data area.
type chunk = [chunkSize]byte

// Memory is a sparse in-memory Container for tests. Data lives in a map of
// 64 KiB chunks allocated on first write; missing chunks read as zero, and
// punching a whole chunk drops it again.
//
// Reads share a lock and writes and punches take it exclusively, so any mix
// of concurrent calls is free of data races, at the cost of serialising
// writers. That is the right trade for a test backend.
type Memory struct {
	id       uint32
	slotSize int64
	slots    int64

	mu struct {
		sync.RWMutex
		closed bool
		chunks map[int64]*chunk // keyed by offset / chunkSize
	}
}

var (
	_ Container = (*Memory)(nil)
	_ Allocator = (*Memory)(nil)
)

// NewMemory returns an empty in-memory container. Unlike Create it accepts
// any positive slot size, so tests can use odd geometries; it panics if
// slotSize or slots is not positive or if the container would be too large
// to address.
func NewMemory(id uint32, slotSize, slots int64) *Memory {
	if slotSize <= 0 || slots <= 0 || slots > (1<<63-1)/slotSize {
		panic("container: NewMemory: invalid geometry")
	}
	m := &Memory{id: id, slotSize: slotSize, slots: slots}
	m.mu.chunks = make(map[int64]*chunk)
	return m
}

// ID implements Container.
func (m *Memory) ID() uint32 { return m.id }

// SlotSize implements Container.
func (m *Memory) SlotSize() int64 { return m.slotSize }

// Slots implements Container.
func (m *Memory) Slots() int64 { return m.slots }

// Size implements Container.
func (m *Memory) Size() int64 { return m.slots * m.slotSize }

// ReadAt implements io.ReaderAt; see Container.
func (m *Memory) ReadAt(p []byte, off int64) (int, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.mu.closed {
		return 0, m.errClosed()
	}
	if err := checkRange(m.id, "read", off, int64(len(p)), m.Size()); err != nil {
		return 0, err
	}
	for n := 0; n < len(p); {
		pos := off + int64(n)
		idx, in := pos/chunkSize, pos%chunkSize
		dst := p[n:min(len(p), n+int(chunkSize-in))]
		if c := m.mu.chunks[idx]; c != nil {
			copy(dst, c[in:])
		} else {
			clear(dst)
		}
		n += len(dst)
	}
	return len(p), nil
}

// WriteAt implements io.WriterAt; see Container.
func (m *Memory) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.mu.closed {
		return 0, m.errClosed()
	}
	if err := checkRange(m.id, "write", off, int64(len(p)), m.Size()); err != nil {
		return 0, err
	}
	for n := 0; n < len(p); {
		pos := off + int64(n)
		idx, in := pos/chunkSize, pos%chunkSize
		c := m.mu.chunks[idx]
		if c == nil {
			c = new(chunk)
			m.mu.chunks[idx] = c
		}
		n += copy(c[in:], p[n:])
	}
	return len(p), nil
}

// Punch implements Container. Whole chunks inside the range are released;
// partly covered chunks are zeroed.
func (m *Memory) Punch(off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.mu.closed {
		return m.errClosed()
	}
	if err := checkRange(m.id, "punch", off, n, m.Size()); err != nil {
		return err
	}
	for end := off + n; off < end; {
		idx, in := off/chunkSize, off%chunkSize
		l := min(end-off, chunkSize-in)
		if c := m.mu.chunks[idx]; c != nil {
			if l == chunkSize {
				delete(m.mu.chunks, idx)
			} else {
				clear(c[in : in+l])
			}
		}
		off += l
	}
	return nil
}

// Allocated implements Allocator: the chunks that hold data.
func (m *Memory) Allocated() (int64, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.mu.closed {
		return 0, m.errClosed()
	}
	return int64(len(m.mu.chunks)) * chunkSize, nil
}

// Flush implements Container. Memory has nothing to make durable.
func (m *Memory) Flush() error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.mu.closed {
		return m.errClosed()
	}
	return nil
}

// Close implements Container and drops the data.
func (m *Memory) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.mu.closed {
		return m.errClosed()
	}
	m.mu.closed = true
	m.mu.chunks = nil
	return nil
}

func (m *Memory) errClosed() error {
	return fmt.Errorf("memory container %d: %w", m.id, ErrClosed)
}
