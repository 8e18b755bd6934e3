package size

import (
	"errors"
	"testing"
)

func TestParse(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want uint64
		err  error
	}{
		{"4096", 4096, nil},
		{"64K", 64 << 10, nil},
		{"64k", 64 << 10, nil},
		{"512M", 512 << 20, nil},
		{"10G", 10 << 30, nil},
		{"10GiB", 10 << 30, nil},
		{"10GB", 10 << 30, nil},
		{"1T", 1 << 40, nil},
		{"1.5G", 3 << 29, nil},
		{" 2M ", 2 << 20, nil},
		{"16E", 0, ErrRange},
		{"0.3K", 0, ErrRange},
		{"", 0, ErrSyntax},
		{"G", 0, ErrSyntax},
		{"-1G", 0, ErrSyntax},
		{"ten", 0, ErrSyntax},
		{"1X", 0, ErrSyntax},
		{"NaN", 0, ErrSyntax},
		{"18446744073709551615", 1<<64 - 1, nil},
		{"18446744073709551616", 0, ErrRange},
	} {
		got, err := Parse(tt.in)
		if !errors.Is(err, tt.err) || got != tt.want {
			t.Errorf("Parse(%q) = %d, %v; want %d, %v", tt.in, got, err, tt.want, tt.err)
		}
	}
}

func TestFormat(t *testing.T) {
	for _, tt := range []struct {
		in   uint64
		want string
	}{{0, "0"}, {1000, "1000"}, {1024, "1K"}, {1 << 30, "1G"}, {3 << 19, "1.5M"}, {1 << 40, "1T"}} {
		if got := Format(tt.in); got != tt.want {
			t.Errorf("Format(%d) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
