// Package size parses and formats byte sizes the way storage tools write
// them: "512", "64K", "512M", "10G", "1T", "1.5G", with an optional "B" or
// "iB" ("10GiB"). Units are binary (K = 1024).
package size

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

var units = []struct {
	suffix string
	shift  uint
}{{"E", 60}, {"P", 50}, {"T", 40}, {"G", 30}, {"M", 20}, {"K", 10}, {"k", 10}}

// Parse parses s.
func Parse(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "i")
	shift := uint(0)
	for _, u := range units {
		if strings.HasSuffix(t, u.suffix) {
			t, shift = strings.TrimSuffix(t, u.suffix), u.shift
			break
		}
	}
	if t == "" || strings.HasPrefix(t, "-") || strings.HasPrefix(t, "+") {
		return 0, fmt.Errorf("%q: %w", s, ErrSyntax)
	}
	if n, err := strconv.ParseUint(t, 10, 64); err == nil {
		if n > math.MaxUint64>>shift {
			return 0, fmt.Errorf("%q: %w", s, ErrRange)
		}
		return n << shift, nil
	}
	f, err := strconv.ParseFloat(t, 64)
	if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
		return 0, fmt.Errorf("%q: %w", s, ErrSyntax)
	}
	v := f * float64(uint64(1)<<shift)
	if v >= math.MaxUint64 || v != math.Trunc(v) {
		return 0, fmt.Errorf("%q: %w", s, ErrRange)
	}
	return uint64(v), nil
}

// Format writes n with the largest binary unit that keeps it short:
// 1073741824 -> "1G", 1572864 -> "1.5M", 1000 -> "1000".
func Format(n uint64) string {
	for _, u := range units {
		if u.suffix == "k" {
			continue
		}
		unit := uint64(1) << u.shift
		if n >= unit {
			if n%unit == 0 {
				return fmt.Sprintf("%d%s", n/unit, u.suffix)
			}
			return strconv.FormatFloat(float64(n)/float64(unit), 'f', 1, 64) + u.suffix
		}
	}
	return strconv.FormatUint(n, 10)
}
