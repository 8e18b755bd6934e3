// segmap dashboard: plain JavaScript, no framework, nothing fetched but
// this server's /api/. The page polls /api/state (disks, pools, agents)
// and /api/series (the graphs); the actions send the page's token back
// in X-Segmap-Token (see docs/dashboard.md).
"use strict";

const token = document.querySelector('meta[name="segmap-token"]').content;
const $ = (id) => document.getElementById(id);

// api calls the dashboard's API and returns the decoded JSON; an answer
// other than 2xx throws an Error with the server's message.
async function api(method, path, body) {
  const opts = { method, headers: { "Accept": "application/json" }, credentials: "same-origin" };
  if (method !== "GET") {
    opts.headers["X-Segmap-Token"] = token;
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body || {});
  }
  let resp;
  try {
    resp = await fetch(path, opts);
  } catch (e) {
    throw new Error("the server does not answer (" + e.message + ")");
  }
  let data = null;
  try { data = await resp.json(); } catch (e) { /* not JSON */ }
  if (!resp.ok) {
    throw new Error((data && data.error) || (resp.status + " " + resp.statusText));
  }
  return data;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) {
    if (c !== null && c !== undefined) e.append(c);
  }
  return e;
}

function bar(used, total, cls) {
  const frac = total > 0 ? Math.min(used / total, 1) : 0;
  const inner = el("div");
  inner.style.width = (frac * 100).toFixed(1) + "%";
  const b = el("div", { class: "bar" + (cls ? " " + cls : "") + (frac >= 0.95 ? " full" : frac >= 0.8 ? " high" : ""), title: (frac * 100).toFixed(1) + "% full" }, inner);
  b.setAttribute("role", "meter");
  b.setAttribute("aria-valuenow", (frac * 100).toFixed(1));
  return b;
}

// showError shows msg in the banner; source "refresh" marks an error that
// the next successful refresh takes away.
function showError(msg, source) {
  $("error-text").textContent = msg;
  $("error").dataset.source = source || "action";
  $("error").hidden = false;
}
$("error-close").addEventListener("click", () => { $("error").hidden = true; });

// ---- state: disks, pools, containers, agents ----

function diskItem(d) {
  const kind = d.read_only ? "snapshot" : "writable";
  const actions = el("span", { class: "actions" },
    el("button", { type: "button", class: "small", text: "snapshot", "data-action": "snapshot", "data-disk": d.name }));
  if (d.read_only) {
    actions.append(el("button", { type: "button", class: "small", text: "delete", "data-action": "delete", "data-disk": d.name }));
  }
  const alloc = el("span", { class: "num alloc" }, d.allocated_text, bar(d.allocated, d.size, "minibar"));
  const row = el("div", { class: "row", title: "created " + d.created + (d.origin ? ", from " + d.origin : "") },
    el("span", { class: "name", text: d.name }),
    el("span", { class: "kind", text: kind }),
    el("span", { class: "num size", text: d.size_text }),
    alloc,
    el("span", { class: "num exclusive", text: d.exclusive_text }),
    el("span", { class: "num shared", text: d.shared_text }),
    el("span", { class: "num held", text: d.read_only ? "-" : d.snapshots_hold_text }),
    actions);
  const li = el("li", { class: "disk " + kind, "data-disk": d.name, "data-size": String(d.size) }, row);
  if (d.children && d.children.length) {
    li.append(el("ul", {}, ...d.children.map(diskItem)));
  }
  return li;
}

function renderState(s) {
  const role = $("role");
  role.textContent = "controller: " + s.role;
  role.className = "badge " + s.role;
  $("version").textContent = "segmap " + s.version + (s.nbd_address ? " · NBD on " + s.nbd_address : "");
  $("space").textContent = s.space.used_text + " used of " + s.space.total_text + " · " + s.space.snapshots_hold_text + " held by snapshots";
  $("disk-count").textContent = "(" + s.disk_count + ")";

  $("disks").replaceChildren(...s.disks.map(diskItem));
  $("no-disks").hidden = s.disk_count > 0;

  $("pools").tBodies[0].replaceChildren(...s.pools.map((p) => el("tr", { "data-slot-size": String(p.slot_size) },
    el("td", { text: p.slot_size_text }),
    el("td", { text: String(p.containers) }),
    el("td", {}, bar(p.used_slots, p.slots)),
    el("td", { class: "num", text: p.used_text }),
    el("td", { class: "num", text: p.size_text }))));

  $("containers").tBodies[0].replaceChildren(...s.containers.map((c) => el("tr", { "data-container": String(c.id) },
    el("td", { text: String(c.id) }),
    el("td", { class: "uri", text: c.uri + (c.replicas.length ? ": " + c.replicas.join(", ") : "") }),
    el("td", { class: "state-" + c.state, text: c.state }),
    el("td", { text: c.slot_size_text }),
    el("td", {}, bar(c.used_slots, c.slots)),
    el("td", { class: "num", text: c.used_text }),
    el("td", { class: "num", text: c.size_text }))));

  const rows = [];
  for (const a of s.agents) {
    if (a.mapped.length === 0) {
      rows.push(el("tr", { "data-agent": a.name }, el("td", { text: a.name }), el("td", { class: "muted", text: "no disks mapped", colSpan: 5 })));
      continue;
    }
    a.mapped.forEach((m, i) => rows.push(el("tr", { "data-agent": a.name, "data-disk": m.disk },
      el("td", { text: i === 0 ? a.name : "" }),
      el("td", { text: m.disk }),
      el("td", { text: m.lease }),
      el("td", { class: "state-" + m.state, text: m.state }),
      el("td", { class: "num", text: m.loaded + "/" + m.segments }),
      el("td", { class: "num", text: String(m.in_flight) }))));
  }
  $("agents").tBodies[0].replaceChildren(...rows);

  const ops = s.operations || [];
  $("operations").tBodies[0].replaceChildren(...ops.map((o) => el("tr", { "data-operation": String(o.id), "data-state": o.state },
    el("td", { text: String(o.id) }),
    el("td", { text: o.kind }),
    el("td", { text: o.target }),
    el("td", {}, o.total > 0 ? bar(o.done, o.total) : el("span", { class: "muted", text: "-" })),
    el("td", { class: "num", text: o.done_text }),
    el("td", { class: "state-" + o.state, text: o.state + (o.error ? ": " + o.error : "") }))));
  $("no-operations").hidden = ops.length > 0;
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

let refreshing = null, again = false;
// refresh loads /api/state and redraws. A call while a load is under way
// (which may have begun before an action changed something) loads again
// once it ends.
function refresh() {
  if (refreshing) {
    again = true;
    return;
  }
  refreshing = api("GET", "/api/state").then((s) => {
    renderState(s);
    document.body.dataset.loaded = "true";
    if ($("error").dataset.source === "refresh") $("error").hidden = true;
  }).catch((e) => showError("refresh: " + e.message, "refresh")).finally(() => {
    refreshing = null;
    if (again) {
      again = false;
      refresh();
    }
  });
}

// ---- graphs ----

const fmtNum = (v) => v >= 1e6 ? (v / 1e6).toFixed(1) + "M" : v >= 1e3 ? (v / 1e3).toFixed(1) + "k" : v >= 10 ? v.toFixed(0) : v.toFixed(1);
function fmtBytes(v) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return (v >= 10 || i === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + u[i] + "/s";
}
function fmtSeconds(v) {
  if (v === 0) return "0";
  if (v < 1e-3) return (v * 1e6).toFixed(0) + " µs";
  if (v < 1) return (v * 1e3).toFixed(v < 1e-2 ? 2 : 1) + " ms";
  return v.toFixed(2) + " s";
}
const graphs = [
  { key: "iops", fmt: fmtNum, color: "#2f6fdb" },
  { key: "throughput", fmt: fmtBytes, color: "#3d8b5a" },
  { key: "latency", fmt: fmtSeconds, color: "#c98a14" },
  { key: "faults", fmt: fmtNum, color: "#c23b32" },
];

// drawGraph draws samples' key as a line over the last window ms.
function drawGraph(canvas, samples, g, windowMs) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const pad = { l: 4, r: 4, t: 14, b: 4 };
  const end = samples.length ? samples[samples.length - 1].t : Date.now();
  const start = end - windowMs;
  let peak = 0;
  for (const s of samples) peak = Math.max(peak, s[g.key]);
  const top = peak > 0 ? peak * 1.15 : 1;
  const x = (t) => pad.l + (w - pad.l - pad.r) * (t - start) / windowMs;
  const y = (v) => h - pad.b - (h - pad.t - pad.b) * v / top;
  ctx.strokeStyle = "#e3e7ee";
  ctx.lineWidth = 1;
  for (let i = 1; i <= 3; i++) {
    const yy = Math.round(pad.t + (h - pad.t - pad.b) * i / 4) + 0.5;
    ctx.beginPath(); ctx.moveTo(pad.l, yy); ctx.lineTo(w - pad.r, yy); ctx.stroke();
  }
  ctx.fillStyle = "#6b7385";
  ctx.font = "10px system-ui, sans-serif";
  ctx.textAlign = "left";
  ctx.fillText(peak > 0 ? "peak " + g.fmt(peak) : "idle", pad.l + 2, 10);
  ctx.textAlign = "right";
  ctx.fillText(Math.round(windowMs / 60000) + " min", w - pad.r - 2, 10);
  if (samples.length < 2) return;
  ctx.beginPath();
  samples.forEach((s, i) => { const X = x(s.t), Y = y(s[g.key]); if (i === 0) ctx.moveTo(X, Y); else ctx.lineTo(X, Y); });
  ctx.strokeStyle = g.color;
  ctx.lineWidth = 1.5;
  ctx.stroke();
  ctx.lineTo(x(samples[samples.length - 1].t), h - pad.b);
  ctx.lineTo(x(samples[0].t), h - pad.b);
  ctx.closePath();
  ctx.globalAlpha = 0.12;
  ctx.fillStyle = g.color;
  ctx.fill();
  ctx.globalAlpha = 1;
}

async function refreshSeries() {
  let r;
  try {
    r = await api("GET", "/api/series");
  } catch (e) {
    return; // refresh() reports a server that does not answer
  }
  const last = r.samples.length ? r.samples[r.samples.length - 1] : null;
  for (const g of graphs) {
    drawGraph($("g-" + g.key), r.samples, g, 10 * 60 * 1000);
    $("now-" + g.key).textContent = last ? g.fmt(last[g.key]) : "";
  }
}

// ---- actions ----

$("create-disk").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const name = $("create-name").value.trim(), size = $("create-size").value.trim();
  try {
    await api("POST", "/api/disks", { name, size });
    $("create-name").value = "";
    $("create-size").value = "";
    $("error").hidden = true;
  } catch (e) {
    showError(e.message);
  }
  refresh();
});

let target = "";

$("disks").addEventListener("click", async (ev) => {
  const b = ev.target.closest("button[data-action]");
  if (!b) return;
  target = b.dataset.disk;
  if (b.dataset.action === "snapshot") {
    $("snapshot-disk").textContent = target;
    $("snapshot-name").value = "";
    $("snapshot-error").textContent = "";
    $("snapshot-dialog").showModal();
    $("snapshot-name").focus();
  } else if (b.dataset.action === "delete") {
    $("delete-name").textContent = target;
    $("delete-frees").textContent = "";
    $("delete-error").textContent = "";
    $("delete-dialog").showModal();
    try {
      const p = await api("GET", "/api/disks/" + encodeURIComponent(target) + "/delete-preview");
      $("delete-frees").textContent = "Deleting it frees " + p.freed_text + ".";
    } catch (e) {
      $("delete-error").textContent = e.message;
    }
  }
});

$("snapshot-cancel").addEventListener("click", () => $("snapshot-dialog").close());
$("snapshot-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    await api("POST", "/api/snapshots", { disk: target, name: $("snapshot-name").value.trim() });
    $("snapshot-dialog").close();
  } catch (e) {
    $("snapshot-error").textContent = e.message;
  }
  refresh();
});

$("delete-cancel").addEventListener("click", () => $("delete-dialog").close());
$("delete-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    await api("DELETE", "/api/snapshots/" + encodeURIComponent(target));
    $("delete-dialog").close();
  } catch (e) {
    $("delete-error").textContent = e.message;
  }
  refresh();
});

refresh();
refreshSeries();
setInterval(refresh, 5000);
setInterval(refreshSeries, 2000);
