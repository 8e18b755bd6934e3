// Package dashboard is segmap's web dashboard: one page, served from
// files built into the binary (no CDN, it works offline), that shows the
// disks with their space and their snapshot/clone tree, the containers
// and pools with their fill, the agents with their leases and mapped
// disks, the controller's role, and live graphs of IOPS, throughput,
// latency and fault rate; and that creates disks and snapshots and
// deletes snapshots.
//
// Everything it shows or does goes through the admin API (a
// pb.AdminClient), never the store: it sees and may do what the CLI
// does, no more. The graphs come from the process's Prometheus registry:
// a sampler reads it every SampleInterval and keeps SampleWindow of
// rates.
//
// The page calls a small JSON API under /api/ (docs/dashboard.md). GET
// never changes anything; the actions are POST or DELETE with a JSON
// body and pass checkAction: same-origin (Origin, Sec-Fetch-Site) and
// carrying the per-process token of the page's <meta> tag in
// TokenHeader. A cross-site request gets 403 and changes nothing.
package dashboard

import (
	"bytes"
	"context"
	"crypto/rand"
	"embed"
	"encoding/hex"
	"html/template"
	"io/fs"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	pb "segmap/api/segmapv1"
)

//go:embed static
var static embed.FS

// Config configures a Dashboard.
type Config struct {
	// Admin is the admin API everything goes through.
	Admin pb.AdminClient
	// Gatherer is read for the live graphs (nil: flat graphs).
	Gatherer prometheus.Gatherer
	// Logger; slog.Default if nil.
	Logger *slog.Logger
	// Role says what the controller behind Admin is: "embedded",
	// "leader", "standby" (nil: "embedded"). It is called for every
	// page refresh.
	Role func() string
	// Timeout bounds each admin call of a request (0: 10 s).
	Timeout time.Duration
}

// Dashboard is the dashboard's http.Handler. Close stops its sampler.
type Dashboard struct {
	cfg    Config
	token  string
	mux    *http.ServeMux
	index  []byte // the page, token included
	sample *sampler
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// New returns the dashboard, its sampler started. The caller mounts it
// at / and calls Close when it stops serving.
func New(cfg Config) *Dashboard {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Gatherer == nil {
		cfg.Gatherer = prometheus.NewRegistry()
	}
	if cfg.Role == nil {
		cfg.Role = func() string { return "embedded" }
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	d := &Dashboard{cfg: cfg, token: newToken(), mux: http.NewServeMux()}
	d.index = renderIndex(d.token)
	d.sample = newSampler(cfg.Gatherer, cfg.Logger, time.Now())
	ctx, cancel := context.WithCancel(context.Background())
	d.cancel = cancel
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		d.sample.run(ctx)
	}()
	d.routes()
	return d
}

// Close stops the sampler and waits for it.
func (d *Dashboard) Close() {
	d.cancel()
	d.wg.Wait()
}

// Token returns the per-process token the actions require (tests).
func (d *Dashboard) Token() string { return d.token }

func (d *Dashboard) routes() {
	sub, err := fs.Sub(static, "static")
	if err != nil {
		panic(err) // the embedded tree is fixed at build time
	}
	d.mux.HandleFunc("GET /{$}", d.serveIndex)
	d.mux.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(sub)))
	d.mux.HandleFunc("GET /api/state", d.apiState)
	d.mux.HandleFunc("GET /api/series", d.apiSeries)
	d.mux.HandleFunc("GET /api/disks/{name}/delete-preview", d.apiDeletePreview)
	d.mux.Handle("POST /api/disks", d.action(d.apiCreateDisk))
	d.mux.Handle("POST /api/snapshots", d.action(d.apiSnapshot))
	d.mux.Handle("DELETE /api/snapshots/{name}", d.action(d.apiDeleteSnapshot))
}

// ServeHTTP serves the page, its files and the API.
func (d *Dashboard) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	// The page is its own: no framing (a click on a framed, hidden
	// dashboard would be an action), no script or style from elsewhere.
	h.Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
	h.Set("X-Frame-Options", "DENY")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	if err := checkHost(r); err != nil {
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	d.mux.ServeHTTP(w, r)
}

func (d *Dashboard) serveIndex(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(d.index)
}

// newToken returns 32 random bytes in hex.
func newToken() string {
	var b [32]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24)
	return hex.EncodeToString(b[:])
}

// renderIndex fills the page's template with the token.
func renderIndex(token string) []byte {
	t := template.Must(template.ParseFS(static, "static/index.html"))
	var b bytes.Buffer
	if err := t.Execute(&b, struct{ Token string }{token}); err != nil {
		panic(err) // the template is fixed at build time
	}
	return b.Bytes()
}
