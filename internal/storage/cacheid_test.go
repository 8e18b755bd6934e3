package storage

import "testing"

func TestParseBootID(t *testing.T) {
	for _, tt := range []struct {
		in string
		ok bool
	}{
		{"3c5d2f6e-8b0a-4a43-9d55-0f1e2d3c4b5a\n", true},
		{"3c5d2f6e8b0a4a439d550f1e2d3c4b5a", true},
		{"", false},
		{"3c5d2f6e-8b0a-4a43-9d55-0f1e2d3c4b", false},
		{"zz5d2f6e-8b0a-4a43-9d55-0f1e2d3c4b5a", false},
		{"00000000-0000-0000-0000-000000000000", false},
	} {
		id, err := parseBootID(tt.in)
		if (err == nil) != tt.ok {
			t.Errorf("parseBootID(%q) = %x, %v; want ok %v", tt.in, id, err, tt.ok)
		}
	}
	if id, err := parseBootID("3c5d2f6e-8b0a-4a43-9d55-0f1e2d3c4b5a"); err != nil || id[0] != 0x3c || id[15] != 0x5a {
		t.Errorf("parseBootID: %x, %v", id, err)
	}
	if _, err := CacheID(); err != nil {
		t.Logf("no boot id on this machine: %v", err)
	}
}
