package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"image/png"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"segmap/internal/size"
)

// TestDashboard drives the dashboard of a real 'segmap up' in headless
// Chromium: the page shows the disks with the sizes the CLI shows and
// their tree (a clone under its snapshot under its disk), takes a
// snapshot, creates a disk and deletes the snapshot from the page (the CLI
// sees each), shows the admin API's refusal, and a cross-site POST is
// refused and changes nothing. With -update-screenshot it writes the
// screenshot the README shows to docs/dashboard.png.
func TestDashboard(t *testing.T) {
	t.Parallel()
	requireTools(t, "chromium", "qemu-io")
	u := startUp(t, t.TempDir())
	if u.http == "" {
		t.Fatalf("segmap up printed no HTTP listener:\n%s", u.out.String())
	}

	// A disk with data, its snapshot, a writable clone of the snapshot
	// that writes on its own, and an unrelated disk.
	u.cli("disk", "create", "vm1", "--size", "256M")
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("vm1"), "-c", "write -P 1 0 24M")
	u.cli("snapshot", "vm1", "--name", "vm1@gold")
	u.cli("snapshot", "vm1@gold", "--name", "vm1-clone", "--writable")
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("vm1"), "-c", "write -P 2 0 8M")
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("vm1-clone"), "-c", "write -P 3 16M 4M")
	u.cli("disk", "create", "db", "--size", "1G", "--segment-size", "4M")
	run(t, 30*time.Second, "qemu-io", "-f", "raw", u.uri("db"), "-c", "write -P 4 0 12M")
	// A long operation, done: the page lists it.
	u.cli("export", "vm1@gold", "-o", filepath.Join(t.TempDir(), "gold.smx"))

	ctx := newBrowser(t)
	tctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := chromedp.Do(tctx,
		chromedp.Navigate(u.http),
		chromedp.WaitVisible(chromedp.CSS(`body[data-loaded="true"] li.disk`)),
	); err != nil {
		t.Fatalf("load %s: %v", u.http, err)
	}

	// The tree and the sizes, as the page's DOM has them.
	type pageDisk struct {
		Name      string   `json:"name"`
		Kind      string   `json:"kind"`
		Size      string   `json:"size"`
		Allocated string   `json:"allocated"`
		Exclusive string   `json:"exclusive"`
		Shared    string   `json:"shared"`
		Path      []string `json:"path"` // the disks it sits under, outermost first
	}
	page, err := chromedp.Run(tctx, chromedp.Evaluate[[]pageDisk](`Array.from(document.querySelectorAll("li.disk")).map((li) => {
		const cell = (c) => li.querySelector(":scope > .row ." + c).textContent.trim();
		const path = [];
		for (let p = li.parentElement.closest("li.disk"); p; p = p.parentElement.closest("li.disk")) path.unshift(p.dataset.disk);
		return { name: li.dataset.disk, kind: cell("kind"), size: cell("size"), allocated: cell("alloc"),
			exclusive: cell("exclusive"), shared: cell("shared"), path };
	})`))
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Disks []diskInfo `json:"disks"`
	}
	u.cliJSON(&list, "disk", "list")
	if len(page) != len(list.Disks) {
		t.Fatalf("the page shows %d disks, the CLI lists %d: %+v", len(page), len(list.Disks), page)
	}
	shown := map[string]pageDisk{}
	for _, p := range page {
		shown[p.Name] = p
	}
	for _, d := range list.Disks {
		p, ok := shown[d.Name]
		if !ok {
			t.Errorf("disk %s is not on the page", d.Name)
			continue
		}
		want := pageDisk{Name: d.Name, Kind: map[bool]string{true: "snapshot", false: "writable"}[d.ReadOnly],
			Size: size.Format(mustUint(t, d.Size)), Allocated: size.Format(mustUint(t, d.Allocated)),
			Exclusive: size.Format(mustUint(t, d.Exclusive)), Shared: size.Format(mustUint(t, d.Shared)), Path: p.Path}
		if fmt.Sprint(p) != fmt.Sprint(want) {
			t.Errorf("page shows %+v, the CLI says %+v", p, want)
		}
	}
	for name, path := range map[string]string{"vm1": "", "vm1@gold": "vm1", "vm1-clone": "vm1/vm1@gold", "db": ""} {
		if got := strings.Join(shown[name].Path, "/"); got != path {
			t.Errorf("%s sits under %q on the page, want %q", name, got, path)
		}
	}
	if p := shown["vm1"]; p.Size != "256M" || p.Allocated != "24M" || p.Exclusive != "8M" || p.Shared != "16M" {
		t.Errorf("vm1 on the page: %+v, want 256M, 24M allocated, 8M exclusive, 16M shared", p)
	}

	// The pool, the containers and the agent are there too.
	type rowCounts struct {
		Pools      int `json:"pools"`
		Containers int `json:"containers"`
		Agents     int `json:"agents"`
	}
	counts, err := chromedp.Run(tctx, chromedp.Evaluate[rowCounts](`({pools: document.querySelectorAll("#pools tbody tr").length,
		containers: document.querySelectorAll("#containers tbody tr").length,
		agents: document.querySelectorAll("#agents tbody tr[data-agent]").length})`))
	if err != nil {
		t.Fatal(err)
	}
	if counts.Pools != 2 || counts.Containers < 2 || counts.Agents < 1 {
		t.Errorf("pools %d (want 2: 1M and 4M slots), containers %d, agent rows %d", counts.Pools, counts.Containers, counts.Agents)
	}
	ops, err := chromedp.Run(tctx, chromedp.Evaluate[[]string](`Array.from(document.querySelectorAll("#operations tbody tr")).map((tr) =>
		tr.dataset.state + " " + Array.from(tr.cells).map((td) => td.textContent).join("|"))`))
	if err != nil {
		t.Fatal(err)
	}
	if len(ops) != 1 || !strings.HasPrefix(ops[0], "done ") || !strings.Contains(ops[0], "|export|") || !strings.Contains(ops[0], "vm1@gold") {
		t.Errorf("operations on the page: %q; want the export of vm1@gold, done", ops)
	}

	graphsMove(t, tctx, u)
	screenshot(t, tctx)

	// Snapshot vm1 from the page.
	if err := chromedp.Do(tctx,
		chromedp.Click(chromedp.CSS(`li[data-disk="vm1"] > .row button[data-action="snapshot"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#snapshot-dialog[open] #snapshot-name`)),
		chromedp.SetValue(chromedp.CSS(`#snapshot-name`), "vm1@page"),
		chromedp.Click(chromedp.CSS(`#snapshot-submit`)),
		chromedp.WaitVisible(chromedp.CSS(`li[data-disk="vm1"] > ul > li[data-disk="vm1@page"]`)),
	); err != nil {
		t.Fatalf("snapshot from the page: %v", err)
	}
	var snap diskInfo
	u.cliJSON(&snap, "disk", "info", "vm1@page")
	if !snap.ReadOnly || snap.Origin != "vm1" {
		t.Errorf("vm1@page: %+v, want a read-only snapshot of vm1", snap)
	}

	// Create a disk from the page; then one whose name is taken: the
	// admin API's refusal shows.
	if err := chromedp.Do(tctx,
		chromedp.SetValue(chromedp.CSS(`#create-name`), "web"),
		chromedp.SetValue(chromedp.CSS(`#create-size`), "2G"),
		chromedp.Click(chromedp.CSS(`#create-submit`)),
		chromedp.WaitVisible(chromedp.CSS(`li[data-disk="web"]`)),
		chromedp.SetValue(chromedp.CSS(`#create-name`), "db"),
		chromedp.SetValue(chromedp.CSS(`#create-size`), "1G"),
		chromedp.Click(chromedp.CSS(`#create-submit`)),
		chromedp.WaitVisible(chromedp.CSS(`#error`)),
	); err != nil {
		t.Fatalf("create from the page: %v", err)
	}
	errText, err := chromedp.Run(tctx, chromedp.Text(chromedp.CSS(`#error-text`)))
	if err != nil {
		t.Fatal(err)
	}
	var web diskInfo
	u.cliJSON(&web, "disk", "info", "web")
	if mustUint(t, web.Size) != 2<<30 {
		t.Errorf("web: size %s, want 2 GiB", web.Size)
	}
	if !strings.Contains(errText, "db") || !strings.Contains(errText, "exist") {
		t.Errorf("creating db again shows %q, want the admin API's 'exists'", errText)
	}

	// Delete the snapshot from the page, through the confirmation.
	if err := chromedp.Do(tctx,
		chromedp.Click(chromedp.CSS(`li[data-disk="vm1@page"] > .row button[data-action="delete"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#delete-dialog[open] #delete-confirm`)),
	); err != nil {
		t.Fatalf("delete from the page: %v", err)
	}
	frees, err := chromedp.Run(tctx, chromedp.Poll[string](`document.getElementById("delete-frees").textContent`, chromedp.WithPollingTimeout(5*time.Second)))
	if err != nil {
		t.Fatalf("the confirmation's preview: %v", err)
	}
	if err := chromedp.Do(tctx,
		chromedp.Click(chromedp.CSS(`#delete-confirm`)),
		chromedp.WaitNotPresent(chromedp.CSS(`li[data-disk="vm1@page"]`)),
	); err != nil {
		t.Fatalf("delete from the page: %v", err)
	}
	if !strings.Contains(frees, "frees") {
		t.Errorf("the confirmation says %q, want what the delete frees", frees)
	}
	if out, errOut, code := u.cliResult("disk", "info", "vm1@page"); code == 0 || !strings.Contains(errOut, "not found") {
		t.Errorf("vm1@page after the delete: exit %d %s%s", code, out, errOut)
	}
	// Writable disks get no delete button.
	deletable, err := chromedp.Run(tctx, chromedp.Evaluate[int](`document.querySelectorAll("li.writable > .row button[data-action=delete]").length`))
	if err != nil {
		t.Fatal(err)
	}
	if deletable != 0 {
		t.Errorf("%d writable disks have a delete button", deletable)
	}

	// A cross-site POST: refused, nothing made.
	before := u.cli("disk", "list")
	for _, rq := range []struct{ method, path, body string }{
		{http.MethodPost, "api/snapshots", `{"disk":"vm1","name":"evil"}`},
		{http.MethodPost, "api/disks", `{"name":"evil","size":"1G"}`},
		{http.MethodDelete, "api/snapshots/vm1@gold", ""},
	} {
		req, err := http.NewRequest(rq.method, u.http+rq.path, strings.NewReader(rq.body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Origin", "http://evil.example")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("cross-site %s /%s: %d %s, want 403", rq.method, rq.path, resp.StatusCode, b)
		}
	}
	if after := u.cli("disk", "list"); after != before {
		t.Errorf("cross-site requests changed the disks:\n%s\nthen\n%s", before, after)
	}
}

// newBrowser starts headless Chromium with a profile of its own and
// returns a tab's context; both end with the test.
func newBrowser(t *testing.T) context.Context {
	t.Helper()
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath("/usr/bin/chromium"),
		chromedp.Flag("headless", true),
		chromedp.Flag("no-sandbox", true), // root, in a container
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("no-first-run", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1400, 900),
	}
	// The browser lives as long as the context of the first action: a
	// bound on the whole test, not on the start.
	bctx, bcancel := context.WithTimeout(context.Background(), 90*time.Second)
	t.Cleanup(bcancel)
	actx, acancel := chromedp.NewExecAllocator(bctx, opts...)
	t.Cleanup(acancel) // after the tab's: waits for the browser to exit
	ctx, cancel := chromedp.NewContext(actx, chromedp.WithErrorf(t.Logf))
	t.Cleanup(cancel)
	if err := chromedp.Do(ctx); err != nil { // starts the browser
		t.Fatalf("start chromium: %v", err)
	}
	return ctx
}

// graphsMove runs I/O until the graphs have a few samples over it, and
// has the page draw them. Once the agent exports its request counter, the
// IOPS graph must show it.
func graphsMove(t *testing.T, ctx context.Context, u *up) {
	t.Helper()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := runErr(10*time.Second, "qemu-io", "-f", "raw", u.uri("vm1-clone"), "-c", "write -P 5 0 4M", "-c", "read -P 5 0 4M"); err != nil {
				t.Errorf("qemu-io: %v", err)
				return
			}
		}
	}()
	defer func() { close(stop); wg.Wait() }()

	metrics := httpGet(t, u.http+"metrics")
	counted := strings.Contains(metrics, "segmap_agent_requests_total")
	deadline := time.Now().Add(12 * time.Second)
	for {
		var series struct {
			Samples []struct {
				IOPS float64 `json:"iops"`
			} `json:"samples"`
		}
		if err := json.Unmarshal([]byte(httpGet(t, u.http+"api/series")), &series); err != nil {
			t.Fatal(err)
		}
		n, busy := len(series.Samples), 0
		for _, s := range series.Samples {
			if s.IOPS > 0 {
				busy++
			}
		}
		if n >= 3 && (!counted || busy >= 2) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 12 s of I/O: %d samples, %d with IOPS (the agent exports its requests: %v)", n, busy, counted)
		}
		time.Sleep(500 * time.Millisecond)
	}
	drawn, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`refreshSeries().then(() => true)`, chromedp.EvalAwaitPromise))
	if err != nil || !drawn {
		t.Fatalf("draw the graphs: %v", err)
	}
}

var updateScreenshot = flag.Bool("update-screenshot", false, "write the dashboard's screenshot to docs/dashboard.png")

// screenshot takes the whole page as a PNG and, with -update-screenshot,
// writes it to docs/dashboard.png, the picture the README shows: a test
// run leaves the source tree as it found it.
func screenshot(t *testing.T, ctx context.Context) {
	t.Helper()
	b, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	cfg, err := png.DecodeConfig(bytes.NewReader(b))
	if err != nil || cfg.Width < 800 || cfg.Height < 600 {
		t.Fatalf("screenshot: %dx%d PNG (%v), want a whole page", cfg.Width, cfg.Height, err)
	}
	if !*updateScreenshot {
		return
	}
	_, file, _, _ := runtime.Caller(0)
	out := filepath.Join(filepath.Dir(file), "..", "..", "docs", "dashboard.png")
	if err := os.WriteFile(out, b, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s (%d bytes)", out, len(b))
}

func httpGet(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %v", url, resp.StatusCode, err)
	}
	return string(b)
}
