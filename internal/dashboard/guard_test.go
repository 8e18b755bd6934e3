package dashboard

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestCheckAction(t *testing.T) {
	const tok = "0123abcd"
	loop := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 10812}
	lan := &net.TCPAddr{IP: net.IPv4(10, 1, 2, 3), Port: 10812}
	for _, tt := range []struct {
		name    string
		local   net.Addr
		host    string
		headers map[string]string
		ok      bool
	}{
		{"the page's own request", loop, "127.0.0.1:10812",
			map[string]string{"Origin": "http://127.0.0.1:10812", "Sec-Fetch-Site": "same-origin", TokenHeader: tok}, true},
		{"a script without Origin or Sec-Fetch-Site, with the token", loop, "127.0.0.1:10812",
			map[string]string{TokenHeader: tok}, true},
		{"localhost", loop, "localhost:10812",
			map[string]string{"Origin": "http://localhost:10812", TokenHeader: tok}, true},
		{"IPv6 loopback", &net.TCPAddr{IP: net.IPv6loopback, Port: 10812}, "[::1]:10812",
			map[string]string{"Origin": "http://[::1]:10812", TokenHeader: tok}, true},
		{"a host name on a LAN listener", lan, "store1.example:10812",
			map[string]string{"Origin": "http://store1.example:10812", TokenHeader: tok}, true},

		{"another site's Origin", loop, "127.0.0.1:10812",
			map[string]string{"Origin": "http://evil.example", TokenHeader: tok}, false},
		{"another port", loop, "127.0.0.1:10812",
			map[string]string{"Origin": "http://127.0.0.1:8080", TokenHeader: tok}, false},
		{"another scheme", loop, "127.0.0.1:10812",
			map[string]string{"Origin": "https://127.0.0.1:10812", TokenHeader: tok}, false},
		{"Origin null (a sandboxed frame, a data: URL)", loop, "127.0.0.1:10812",
			map[string]string{"Origin": "null", TokenHeader: tok}, false},
		{"Sec-Fetch-Site cross-site", loop, "127.0.0.1:10812",
			map[string]string{"Sec-Fetch-Site": "cross-site", TokenHeader: tok}, false},
		{"Sec-Fetch-Site same-site", loop, "127.0.0.1:10812",
			map[string]string{"Sec-Fetch-Site": "same-site", TokenHeader: tok}, false},
		{"no token", loop, "127.0.0.1:10812",
			map[string]string{"Origin": "http://127.0.0.1:10812", "Sec-Fetch-Site": "same-origin"}, false},
		{"wrong token", loop, "127.0.0.1:10812",
			map[string]string{"Origin": "http://127.0.0.1:10812", TokenHeader: "0123abce"}, false},
		{"DNS rebinding: a host name on loopback", loop, "rebind.example:10812",
			map[string]string{"Origin": "http://rebind.example:10812", "Sec-Fetch-Site": "same-origin", TokenHeader: tok}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodPost, "/api/snapshots", strings.NewReader("{}"))
			r = r.WithContext(context.WithValue(r.Context(), http.LocalAddrContextKey, tt.local))
			r.Host = tt.host
			for k, v := range tt.headers {
				r.Header.Set(k, v)
			}
			err := checkAction(r, tok)
			if tt.ok && err != nil {
				t.Errorf("refused: %v", err)
			}
			if !tt.ok && !errors.Is(err, ErrCrossSite) {
				t.Errorf("checkAction = %v, want ErrCrossSite", err)
			}
		})
	}
}
