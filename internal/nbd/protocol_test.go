package nbd

import (
	"math/rand/v2"
	"strings"
	"testing"
	"unicode/utf8"
)

func newRand(seed int64) *rand.Rand { return rand.New(rand.NewPCG(uint64(seed), 0x6e6264)) }

func TestTransmissionFlags(t *testing.T) {
	for _, tt := range []struct {
		ro, structured bool
		want           uint16
	}{
		{false, false, tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagCanMultiConn},
		{false, true, tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagCanMultiConn | tflagSendDF},
		{true, false, tflagHasFlags | tflagReadOnly | tflagSendFlush | tflagCanMultiConn},
		{true, true, tflagHasFlags | tflagReadOnly | tflagSendFlush | tflagCanMultiConn | tflagSendDF},
	} {
		if got := transmissionFlags(tt.ro, tt.structured); got != tt.want {
			t.Errorf("transmissionFlags(%v, %v) = %#x, want %#x", tt.ro, tt.structured, got, tt.want)
		}
	}
}

func TestCheckRequest(t *testing.T) {
	rw := params{size: 1 << 20, flags: transmissionFlags(false, false)}
	rwS := params{size: 1 << 20, flags: transmissionFlags(false, true), structured: true}
	ro := params{size: 1 << 20, flags: transmissionFlags(true, false)}
	for _, tt := range []struct {
		name string
		h    requestHeader
		p    params
		want uint32
	}{
		{"read", requestHeader{typ: cmdRead, off: 0, length: 1 << 20}, rw, 0},
		{"read last byte", requestHeader{typ: cmdRead, off: 1<<20 - 1, length: 1}, rw, 0},
		{"read past end", requestHeader{typ: cmdRead, off: 1<<20 - 1, length: 2}, rw, EINVAL},
		{"write past end", requestHeader{typ: cmdWrite, off: 1 << 20, length: 1}, rw, EINVAL},
		{"offset wraps", requestHeader{typ: cmdTrim, off: 1<<64 - 1, length: 2}, rw, EINVAL},
		{"zero length", requestHeader{typ: cmdWriteZeroes}, rw, EINVAL},
		{"big read simple", requestHeader{typ: cmdRead, length: maxPayload + 1}, rw, EINVAL},
		{"big read structured", requestHeader{typ: cmdRead, length: maxPayload + 1}, rwS, EOVERFLOW},
		{"big trim is fine", requestHeader{typ: cmdTrim, length: maxPayload + 1}, params{size: 1 << 30, flags: rw.flags}, 0},
		{"fua write", requestHeader{typ: cmdWrite, flags: cmdFlagFUA, length: 1}, rw, 0},
		{"fua read", requestHeader{typ: cmdRead, flags: cmdFlagFUA, length: 1}, rw, 0},
		{"fua on read-only", requestHeader{typ: cmdRead, flags: cmdFlagFUA, length: 1}, ro, EINVAL},
		{"df simple", requestHeader{typ: cmdRead, flags: cmdFlagDF, length: 1}, rw, EINVAL},
		{"df structured", requestHeader{typ: cmdRead, flags: cmdFlagDF, length: 1}, rwS, 0},
		{"no hole", requestHeader{typ: cmdWriteZeroes, flags: cmdFlagNoHole, length: 1}, rw, 0},
		{"no hole on trim", requestHeader{typ: cmdTrim, flags: cmdFlagNoHole, length: 1}, rw, EINVAL},
		{"fast zero", requestHeader{typ: cmdWriteZeroes, flags: cmdFlagFastZero, length: 1}, rw, EINVAL},
		{"read-only write", requestHeader{typ: cmdWrite, flags: cmdFlagFUA, length: 1}, ro, EPERM},
		{"read-only trim past end", requestHeader{typ: cmdTrim, off: 1 << 30, length: 1}, ro, EPERM},
		{"read-only read", requestHeader{typ: cmdRead, length: 1}, ro, 0},
		{"read-only flush", requestHeader{typ: cmdFlush}, ro, 0},
		{"flush", requestHeader{typ: cmdFlush, flags: cmdFlagFUA}, rw, 0},
		{"flush with length", requestHeader{typ: cmdFlush, length: 1}, rw, EINVAL},
		{"disc", requestHeader{typ: cmdDisc, flags: 0xffff, off: 5}, ro, 0},
		{"cache", requestHeader{typ: cmdCache, length: 1}, rw, EINVAL},
		{"block status", requestHeader{typ: cmdBlockStatus, length: 1}, rwS, EINVAL},
		{"unknown", requestHeader{typ: 0xffff}, rw, EINVAL},
	} {
		errno, msg := checkRequest(tt.h, tt.p)
		if errno != tt.want {
			t.Errorf("%s: errno %d (%s), want %d", tt.name, errno, msg, tt.want)
		}
		if (errno != 0) != (msg != "") {
			t.Errorf("%s: errno %d with message %q", tt.name, errno, msg)
		}
	}
}

func TestParseInfoRequest(t *testing.T) {
	for _, tt := range []struct {
		data []byte
		name string
		reqs int
		ok   bool
	}{
		{infoData("disk"), "disk", 0, true},
		{infoData("", infoName, infoBlockSize), "", 2, true},
		{infoData("disk")[:5], "", 0, false},
		{append(infoData("disk"), 0), "", 0, false},
		{[]byte{0xff, 0xff, 0xff, 0xff, 0, 0}, "", 0, false},
		{[]byte{0, 0, 0, 0, 0, 1}, "", 0, false},
		{nil, "", 0, false},
	} {
		name, reqs, ok := parseInfoRequest(tt.data)
		if ok != tt.ok || name != tt.name || len(reqs) != 2*tt.reqs {
			t.Errorf("parseInfoRequest(% x) = %q, %d reqs, %v", tt.data, name, len(reqs)/2, ok)
		}
	}
}

func TestSizeClass(t *testing.T) {
	for _, tt := range []struct{ n, class int }{
		{1, 0}, {512, 0}, {513, 1}, {4096, 3}, {4097, 4}, {maxPayload, maxClassShift - minClassShift},
	} {
		if c := sizeClass(tt.n); c != tt.class {
			t.Errorf("sizeClass(%d) = %d, want %d", tt.n, c, tt.class)
		}
		p := getBuf(tt.n)
		if len(*p) < tt.n || len(*p) != 1<<(tt.class+minClassShift) {
			t.Errorf("getBuf(%d) has %d bytes", tt.n, len(*p))
		}
		putBuf(p)
	}
}

func TestClipMessage(t *testing.T) {
	long := strings.Repeat("é", 100) // 200 bytes
	for _, in := range []string{"short", long, "nul\x00inside", "bad \xff utf8", ""} {
		out := clipMessage(in)
		if len(out) > maxErrMsg || !validString(out) {
			t.Errorf("clipMessage(%q) = %q", in, out)
		}
	}
	if got := clipMessage(long); !utf8.ValidString(got) || len(got) != maxErrMsg {
		t.Errorf("clipped to %d bytes", len(got))
	}
}

func TestStrings(t *testing.T) {
	for _, tt := range []struct {
		s    interface{ String() string }
		want string
	}{
		{optGo, "NBD_OPT_GO"}, {option(99), "NBD_OPT_99"},
		{repAck, "NBD_REP_ACK"}, {repErrTooBig, "NBD_REP_ERR_TOO_BIG"}, {repType(7), "NBD_REP_7"},
		{cmdWriteZeroes, "NBD_CMD_WRITE_ZEROES"}, {command(42), "NBD_CMD_42"},
		{stateDraining, "draining"},
	} {
		if got := tt.s.String(); got != tt.want {
			t.Errorf("String() = %q, want %q", got, tt.want)
		}
	}
}
