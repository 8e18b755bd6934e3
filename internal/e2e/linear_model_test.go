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

// linMix is what a read returns that saw a write half done: the block
// holds two values of the register, a first and b after it. The file
// containers under the storage nodes give no atomicity between a read and a
// write of the same block (pread(2) on ext4 may copy a page that a
// concurrent pwrite(2) is filling, see TestLinearizable), so a read that
// overlaps a write may see both; it counts as a read of either, and the
// test checks that a write of one of them did overlap it.
type linMix struct{ a, b uint64 }

// linDecode returns what block b of register reg holds: linZero if it is
// all zeros, a value if it is one whole write, a linMix if it is made of
// two values of reg (zeros being one), linBad otherwise.
func linDecode(b []byte, history, reg int) any {
	unit := func(i int) (uint64, bool) {
		v := binary.LittleEndian.Uint64(b[i:])
		tag := binary.LittleEndian.Uint64(b[i+8:])
		switch {
		case v == 0 && tag == 0:
			return linZero, true
		case v != 0 && tag == linTag(history, reg):
			return v, true
		}
		return 0, false
	}
	first, ok := unit(0)
	if !ok {
		return linBad
	}
	second, mixed := first, false
	for i := 16; i < len(b); i += 16 {
		v, ok := unit(i)
		switch {
		case !ok:
			return linBad
		case v == first || mixed && v == second:
		case !mixed:
			second, mixed = v, true
		default:
			return linBad
		}
	}
	if mixed {
		return linMix{first, second}
	}
	return first
}

// linOf describes a read's output for people.
func linOf(out any) string {
	switch o := out.(type) {
	case uint64:
		return linDescribe(o)
	case linMix:
		return fmt.Sprintf("mix(%s, %s)", linDescribe(o.a), linDescribe(o.b))
	}
	return fmt.Sprint(out)
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
		switch out := output.(type) {
		case uint64:
			return out == state.(uint64), state
		case linMix:
			return out.a == state.(uint64) || out.b == state.(uint64), state
		}
		return false, state
	},
	DescribeOperation: func(input, output any) string {
		in := input.(linInput)
		if in.write {
			return fmt.Sprintf("write(b%d, %s)", in.reg, linDescribe(in.value))
		}
		return fmt.Sprintf("read(b%d) → %s", in.reg, linOf(output))
	},
	DescribeState: func(state any) string { return linDescribe(state.(uint64)) },
	DescribeOperationMetadata: func(m any) string {
		if m == nil {
			return ""
		}
		return m.(string)
	},
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
	rm := func(c int, reg int, m linMix, call, ret int64) porcupine.Operation {
		return porcupine.Operation{ClientId: c, Input: linInput{reg: reg}, Output: m, Call: call, Return: ret}
	}
	a, b, c := linValue(0, 1), linValue(1, 1), linValue(2, 1)
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
		{"torn read, old and new", []porcupine.Operation{w(0, 0, a, 0, 1), w(1, 0, b, 2, 10), rm(2, 0, linMix{a, b}, 3, 4)}, porcupine.Ok},
		{"torn read, both stale", []porcupine.Operation{w(0, 0, a, 0, 1), w(1, 0, b, 2, 3), w(0, 0, c, 4, 5), rm(2, 0, linMix{a, b}, 6, 7)}, porcupine.Illegal},
	} {
		if got := porcupine.CheckOperationsTimeout(linModel, tc.ops, 10*time.Second); got != tc.want {
			t.Errorf("%s: %s, want %s", tc.name, got, tc.want)
		}
	}

	block := func(parts ...uint64) []byte { // equal parts of values of register 5
		p := make([]byte, linBlock)
		n := linBlock / len(parts)
		for i, v := range parts {
			if v != linZero {
				linEncode(p[i*n:(i+1)*n], 3, 5, v)
			}
		}
		return p
	}
	other := block(a)
	linEncode(other[linBlock-16:], 3, 6, a)
	for _, tc := range []struct {
		name         string
		b            []byte
		history, reg int
		want         any
	}{
		{"zeros", block(linZero), 3, 5, linZero},
		{"a write", block(a), 3, 5, a},
		{"another register", block(a), 3, 6, linBad},
		{"another history", block(a), 4, 5, linBad},
		{"a torn write", block(a, b), 3, 5, linMix{a, b}},
		{"a torn first write", block(linZero, a), 3, 5, linMix{linZero, a}},
		{"torn back and forth", block(a, b, a, b), 3, 5, linMix{a, b}},
		{"three values", block(a, b, c, a), 3, 5, linBad},
		{"a unit of another register", other, 3, 5, linBad},
	} {
		if got := linDecode(tc.b, tc.history, tc.reg); got != tc.want {
			t.Errorf("%s: decodes as %s, want %s", tc.name, linOf(got), linOf(tc.want))
		}
	}
}
