package controller

import "testing"

func TestAllZero(t *testing.T) {
	for _, n := range []int{0, 1, 7, 8, 4096, 64 << 10, 64<<10 + 1, 1<<20 + 3} {
		b := make([]byte, n)
		if !allZero(b) {
			t.Errorf("%d zero bytes: not all zero", n)
		}
		for _, at := range []int{0, n / 2, n - 1} {
			if n == 0 {
				break
			}
			b[at] = 1
			if allZero(b) {
				t.Errorf("%d bytes with byte %d set: all zero", n, at)
			}
			b[at] = 0
		}
	}
}
