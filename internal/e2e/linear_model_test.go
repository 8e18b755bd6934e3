package e2e

import (
	"encoding/binary"
	"fmt"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
)

// The linearizability test (linear_test.go) treats each 4 KiB block of a
// small region of one disk as a register. This file holds its sequential
// specification for porcupine and the block encoding that lets a read
// tell which write it saw.

// linBlock is the size of one register: one 4 KiB block.
const linBlock = 4096

// linInput is what a client asked: a read or a write of one register. A
// write's value is unique in the test (linValue).
type linInput struct {
	write bool
	reg   int
	value uint64
}

// Values a read can return besides a written value: the zeros of a block
// never written, and a block that is no whole write of this register
// (torn, misdirected, or from another history): it matches no state, so
// a history holding it is not linearizable.
const (
	linZero uint64 = 0
	linBad  uint64 = ^uint64(0)
)

// linValue is the value of a write: the porcupine client id of its writer
// and the writer's sequence number, never zero.
func linValue(client int, seq uint32) uint64 { return uint64(client+1)<<32 | uint64(seq) }

// linTag ties a block to one register of one history, so that a read of a
// block written for another register or left over from another disk is
// told apart from a write of this one.
func linTag(history, reg int) uint64 {
	return 0x5e6d_0000_0000_0000 | uint64(history)<<16 | uint64(reg)
}

// linEncode fills b (linBlock bytes) with value v of register reg: the
// pair (v, tag) repeated, so that a torn block shows.
func linEncode(b []byte, history, reg int, v uint64) {
	tag := linTag(history, reg)
	for i := 0; i < len(b); i += 16 {
		binary.LittleEndian.PutUint64(b[i:], v)
		binary.LittleEndian.PutUint64(b[i+8:], tag)
	}
}

// linDecode returns the value held by block b of register reg: linZero if
// b is all zeros, linBad if it is not one whole write of reg in this
// history.
func linDecode(b []byte, history, reg int) uint64 {
	v := binary.LittleEndian.Uint64(b)
	tag := binary.LittleEndian.Uint64(b[8:])
	if v == 0 && tag == 0 {
		for _, x := range b {
			if x != 0 {
				return linBad
			}
		}
		return linZero
	}
	if tag != linTag(history, reg) || v == 0 {
		return linBad
	}
	for i := 16; i < len(b); i += 16 {
		if binary.LittleEndian.Uint64(b[i:]) != v || binary.LittleEndian.Uint64(b[i+8:]) != tag {
			return linBad
		}
	}
	return v
}

// linDescribe names a value for people: "0", "bad" or "c3#17" (client 3's
// 17th write).
func linDescribe(v uint64) string {
	switch v {
	case linZero:
		return "0"
	case linBad:
		return "bad"
	}
	return fmt.Sprintf("c%d#%d", v>>32-1, uint32(v))
}

// linModel is a set of independent registers, all zero at first: a read
// returns the last value written. Histories are partitioned by register,
// which keeps checking linear in the number of registers.
var linModel = porcupine.Model{
	Partition: func(h []porcupine.Operation) [][]porcupine.Operation {
		by := map[int][]porcupine.Operation{}
		var regs []int
		for _, op := range h {
			r := op.Input.(linInput).reg
			if _, ok := by[r]; !ok {
				regs = append(regs, r)
			}
			by[r] = append(by[r], op)
		}
		out := make([][]porcupine.Operation, 0, len(regs))
		for _, r := range regs {
			out = append(out, by[r])
		}
		return out
	},
	Init: func() any { return linZero },
	Step: func(state, input, output any) (bool, any) {
		in := input.(linInput)
		if in.write {
			return true, in.value
		}
		return output.(uint64) == state.(uint64), state
	},
	DescribeOperation: func(input, output any) string {
		in := input.(linInput)
		if in.write {
			return fmt.Sprintf("write(b%d, %s)", in.reg, linDescribe(in.value))
		}
		return fmt.Sprintf("read(b%d) → %s", in.reg, linDescribe(output.(uint64)))
	},
	DescribeState: func(state any) string { return linDescribe(state.(uint64)) },
}

// TestLinearModel: the model and the block encoding tell linearizable
// histories from the rest, so that TestLinearizable can fail.
func TestLinearModel(t *testing.T) {
	w := func(c int, reg int, v uint64, call, ret int64) porcupine.Operation {
		return porcupine.Operation{ClientId: c, Input: linInput{write: true, reg: reg, value: v}, Call: call, Return: ret}
	}
	r := func(c int, reg int, v uint64, call, ret int64) porcupine.Operation {
		return porcupine.Operation{ClientId: c, Input: linInput{reg: reg}, Output: v, Call: call, Return: ret}
	}
	a, b := linValue(0, 1), linValue(1, 1)
	for _, tc := range []struct {
		name string
		ops  []porcupine.Operation
		want porcupine.CheckResult
	}{
		{"zero at first", []porcupine.Operation{r(0, 0, linZero, 0, 1)}, porcupine.Ok},
		{"read after write", []porcupine.Operation{w(0, 0, a, 0, 1), r(1, 0, a, 2, 3)}, porcupine.Ok},
		{"stale read after write", []porcupine.Operation{w(0, 0, a, 0, 1), r(1, 0, linZero, 2, 3)}, porcupine.Illegal},
		{"read overlapping write, old", []porcupine.Operation{w(0, 0, a, 0, 10), r(1, 0, linZero, 2, 3)}, porcupine.Ok},
		{"read overlapping write, new", []porcupine.Operation{w(0, 0, a, 0, 10), r(1, 0, a, 2, 3)}, porcupine.Ok},
		{"new then old", []porcupine.Operation{w(0, 0, a, 0, 10), r(1, 0, a, 2, 3), r(1, 0, linZero, 4, 5)}, porcupine.Illegal},
		{"pending write seen late", []porcupine.Operation{w(0, 0, a, 0, linPending), r(1, 0, linZero, 2, 3), r(1, 0, a, 100, 101)}, porcupine.Ok},
		{"lost write", []porcupine.Operation{w(0, 0, a, 0, 1), w(1, 0, b, 2, 3), r(0, 0, a, 4, 5)}, porcupine.Illegal},
		{"registers apart", []porcupine.Operation{w(0, 0, a, 0, 1), r(1, 1, linZero, 2, 3), r(1, 0, a, 2, 3)}, porcupine.Ok},
		{"bad block", []porcupine.Operation{r(0, 0, linBad, 0, 1)}, porcupine.Illegal},
	} {
		if got := porcupine.CheckOperationsTimeout(linModel, tc.ops, 10*time.Second); got != tc.want {
			t.Errorf("%s: %s, want %s", tc.name, got, tc.want)
		}
	}

	b1, b2 := make([]byte, linBlock), make([]byte, linBlock)
	if got := linDecode(b1, 3, 5); got != linZero {
		t.Errorf("zeros decode as %s", linDescribe(got))
	}
	linEncode(b1, 3, 5, a)
	if got := linDecode(b1, 3, 5); got != a {
		t.Errorf("a write decodes as %s, want %s", linDescribe(got), linDescribe(a))
	}
	for _, tc := range []struct {
		name         string
		history, reg int
	}{{"another register", 3, 6}, {"another history", 4, 5}} {
		if got := linDecode(b1, tc.history, tc.reg); got != linBad {
			t.Errorf("%s: decodes as %s, want bad", tc.name, linDescribe(got))
		}
	}
	linEncode(b2, 3, 5, b)
	copy(b1[linBlock/2:], b2[linBlock/2:])
	if got := linDecode(b1, 3, 5); got != linBad {
		t.Errorf("a torn block decodes as %s, want bad", linDescribe(got))
	}
}
