package nbd

import (
	"math/rand/v2"
	"strings"
	"testing"
	"unicode/utf8"

	"segmap/internal/nbd/nbdwire"
)

func newRand(seed int64) *rand.Rand { return rand.New(rand.NewPCG(uint64(seed), 0x6e6264)) }

func TestTransmissionFlags(t *testing.T) {
	for _, tt := range []struct {
		ro, structured bool
		want           uint16
	}{
		{false, false, nbdwire.TFlagHasFlags | nbdwire.TFlagSendFlush | nbdwire.TFlagSendFUA | nbdwire.TFlagSendTrim | nbdwire.TFlagSendWriteZeroes | nbdwire.TFlagCanMultiConn},
		{false, true, nbdwire.TFlagHasFlags | nbdwire.TFlagSendFlush | nbdwire.TFlagSendFUA | nbdwire.TFlagSendTrim | nbdwire.TFlagSendWriteZeroes | nbdwire.TFlagCanMultiConn | nbdwire.TFlagSendDF},
		{true, false, nbdwire.TFlagHasFlags | nbdwire.TFlagReadOnly | nbdwire.TFlagSendFlush | nbdwire.TFlagCanMultiConn},
		{true, true, nbdwire.TFlagHasFlags | nbdwire.TFlagReadOnly | nbdwire.TFlagSendFlush | nbdwire.TFlagCanMultiConn | nbdwire.TFlagSendDF},
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
		{"read", requestHeader{typ: nbdwire.CmdRead, off: 0, length: 1 << 20}, rw, 0},
		{"read last byte", requestHeader{typ: nbdwire.CmdRead, off: 1<<20 - 1, length: 1}, rw, 0},
		{"read past end", requestHeader{typ: nbdwire.CmdRead, off: 1<<20 - 1, length: 2}, rw, nbdwire.EINVAL},
		{"write past end", requestHeader{typ: nbdwire.CmdWrite, off: 1 << 20, length: 1}, rw, nbdwire.EINVAL},
		{"offset wraps", requestHeader{typ: nbdwire.CmdTrim, off: 1<<64 - 1, length: 2}, rw, nbdwire.EINVAL},
		{"zero length", requestHeader{typ: nbdwire.CmdWriteZeroes}, rw, nbdwire.EINVAL},
		{"big read simple", requestHeader{typ: nbdwire.CmdRead, length: nbdwire.MaxPayload + 1}, rw, nbdwire.EINVAL},
		{"big read structured", requestHeader{typ: nbdwire.CmdRead, length: nbdwire.MaxPayload + 1}, rwS, nbdwire.EOVERFLOW},
		{"big trim is fine", requestHeader{typ: nbdwire.CmdTrim, length: nbdwire.MaxPayload + 1}, params{size: 1 << 30, flags: rw.flags}, 0},
		{"fua write", requestHeader{typ: nbdwire.CmdWrite, flags: nbdwire.CmdFlagFUA, length: 1}, rw, 0},
		{"fua read", requestHeader{typ: nbdwire.CmdRead, flags: nbdwire.CmdFlagFUA, length: 1}, rw, 0},
		{"fua on read-only", requestHeader{typ: nbdwire.CmdRead, flags: nbdwire.CmdFlagFUA, length: 1}, ro, nbdwire.EINVAL},
		{"df simple", requestHeader{typ: nbdwire.CmdRead, flags: nbdwire.CmdFlagDF, length: 1}, rw, nbdwire.EINVAL},
		{"df structured", requestHeader{typ: nbdwire.CmdRead, flags: nbdwire.CmdFlagDF, length: 1}, rwS, 0},
		{"no hole", requestHeader{typ: nbdwire.CmdWriteZeroes, flags: nbdwire.CmdFlagNoHole, length: 1}, rw, 0},
		{"no hole on trim", requestHeader{typ: nbdwire.CmdTrim, flags: nbdwire.CmdFlagNoHole, length: 1}, rw, nbdwire.EINVAL},
		{"fast zero", requestHeader{typ: nbdwire.CmdWriteZeroes, flags: nbdwire.CmdFlagFastZero, length: 1}, rw, nbdwire.EINVAL},
		{"read-only write", requestHeader{typ: nbdwire.CmdWrite, flags: nbdwire.CmdFlagFUA, length: 1}, ro, nbdwire.EPERM},
		{"read-only trim past end", requestHeader{typ: nbdwire.CmdTrim, off: 1 << 30, length: 1}, ro, nbdwire.EPERM},
		{"read-only read", requestHeader{typ: nbdwire.CmdRead, length: 1}, ro, 0},
		{"read-only flush", requestHeader{typ: nbdwire.CmdFlush}, ro, 0},
		{"flush", requestHeader{typ: nbdwire.CmdFlush, flags: nbdwire.CmdFlagFUA}, rw, 0},
		{"flush with length", requestHeader{typ: nbdwire.CmdFlush, length: 1}, rw, nbdwire.EINVAL},
		{"disc", requestHeader{typ: nbdwire.CmdDisc, flags: 0xffff, off: 5}, ro, 0},
		{"cache", requestHeader{typ: nbdwire.CmdCache, length: 1}, rw, nbdwire.EINVAL},
		{"block status", requestHeader{typ: nbdwire.CmdBlockStatus, length: 1}, rwS, nbdwire.EINVAL},
		{"unknown", requestHeader{typ: 0xffff}, rw, nbdwire.EINVAL},
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
		{infoData("", nbdwire.InfoName, nbdwire.InfoBlockSize), "", 2, true},
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
		{1, 0}, {512, 0}, {513, 1}, {4096, 3}, {4097, 4}, {nbdwire.MaxPayload, maxClassShift - minClassShift},
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
		out := nbdwire.ClipMessage(in)
		if len(out) > nbdwire.MaxErrMsg || !nbdwire.ValidString(out) {
			t.Errorf("clipMessage(%q) = %q", in, out)
		}
	}
	if got := nbdwire.ClipMessage(long); !utf8.ValidString(got) || len(got) != nbdwire.MaxErrMsg {
		t.Errorf("clipped to %d bytes", len(got))
	}
}

func TestStrings(t *testing.T) {
	for _, tt := range []struct {
		s    interface{ String() string }
		want string
	}{
		{nbdwire.OptGo, "NBD_OPT_GO"}, {nbdwire.Option(99), "NBD_OPT_99"},
		{nbdwire.RepAck, "NBD_REP_ACK"}, {nbdwire.RepErrTooBig, "NBD_REP_ERR_TOO_BIG"}, {nbdwire.RepType(7), "NBD_REP_7"},
		{nbdwire.CmdWriteZeroes, "NBD_CMD_WRITE_ZEROES"}, {nbdwire.Command(42), "NBD_CMD_42"},
		{stateDraining, "draining"},
	} {
		if got := tt.s.String(); got != tt.want {
			t.Errorf("String() = %q, want %q", got, tt.want)
		}
	}
}
