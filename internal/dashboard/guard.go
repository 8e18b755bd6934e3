package dashboard

import (
	"crypto/subtle"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
)

// TokenHeader is the request header that carries the page's token back
// on every action.
const TokenHeader = "X-Segmap-Token"

// checkAction decides whether r, a request that changes something, may
// go ahead. A browser attaches a user's session to requests any page
// makes (here: the reach of a loopback or intranet address), so each of
// these must hold:
//
//   - Sec-Fetch-Site, when the browser sends it, is same-origin;
//   - Origin, when present, is this listener's own scheme and host (the
//     Host the request came on);
//   - the token header equals the token the dashboard's own page carries
//     (another site can neither read the page nor guess the token);
//   - on a loopback connection, Host is an IP address or localhost: a
//     page served from a name that was made to resolve to 127.0.0.1 (DNS
//     rebinding) would otherwise be same-origin.
//
// It returns nil or an error wrapping ErrCrossSite that says which.
func checkAction(r *http.Request, token string) error {
	if err := checkHost(r); err != nil {
		return err
	}
	if s := r.Header.Get("Sec-Fetch-Site"); s != "" && s != "same-origin" {
		return fmt.Errorf("%w: Sec-Fetch-Site %q", ErrCrossSite, s)
	}
	if o := r.Header.Get("Origin"); o != "" {
		u, err := url.Parse(o)
		if err != nil || o == "null" || !strings.EqualFold(u.Host, r.Host) || u.Scheme != scheme(r) {
			return fmt.Errorf("%w: Origin %q is not %s://%s", ErrCrossSite, o, scheme(r), r.Host)
		}
	}
	got := r.Header.Get(TokenHeader)
	if got == "" {
		return fmt.Errorf("%w: no %s header", ErrCrossSite, TokenHeader)
	}
	if subtle.ConstantTimeCompare([]byte(got), []byte(token)) != 1 {
		return fmt.Errorf("%w: wrong %s", ErrCrossSite, TokenHeader)
	}
	return nil
}

// checkHost refuses a request that reached a loopback address under a
// host name other than localhost: the mark of DNS rebinding, by which a
// remote page becomes same-origin with the dashboard. It applies to
// reads too, since the page holds the token.
func checkHost(r *http.Request) error {
	la, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	if !ok {
		return nil
	}
	ta, ok := la.(*net.TCPAddr)
	if !ok || !ta.IP.IsLoopback() {
		return nil
	}
	host := r.Host
	if h, _, err := net.SplitHostPort(r.Host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if _, err := netip.ParseAddr(host); err == nil || strings.EqualFold(host, "localhost") {
		return nil
	}
	return fmt.Errorf("%w: host %q on a loopback listener (use an IP address or localhost)", ErrCrossSite, r.Host)
}

func scheme(r *http.Request) string {
	if r.TLS != nil {
		return "https"
	}
	return "http"
}
