// The fleet dashboard: one snapshot from /api/v1/snapshot, then live ones from /api/v1/events.
// Every value from the fleet (device ids, tags, reasons: what devices sent) goes into the page
// as text, never as HTML. The token comes from the URL fragment (#token=...) or the form, and
// stays in this tab's sessionStorage; the event stream takes it as ?token= (EventSource cannot
// send headers).
"use strict";

const TOKEN_KEY = "edgesdk-fleet-token";
const ROLLOUT_STATES = ["SUCCEEDED", "IN_PROGRESS", "QUEUED", "FAILED", "TIMED_OUT", "ROLLED_BACK", "CANCELED"];
const COLORS = { SUCCEEDED: "#2e9e5b", IN_PROGRESS: "#2f6fd6", QUEUED: "#b7bdc9", FAILED: "#d0453a",
                 TIMED_OUT: "#a3352c", ROLLED_BACK: "#d98a1c", CANCELED: "#c9a15a" };
let source = null;
let selectedJob = null;
let last = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function ago(at, ts) {
  if (!ts) return "-";
  const s = Math.max(0, at - ts);
  return s < 120 ? `${s.toFixed(0)}s` : s < 7200 ? `${(s / 60).toFixed(0)}m` : `${(s / 3600).toFixed(0)}h`;
}

function fmt(n, digits) {
  return typeof n !== "number" || !isFinite(n) ? "-" : n.toLocaleString(undefined, { maximumFractionDigits: digits || 0 });
}

function badge(state) { return el("span", { class: `badge state s-${state}` }, state); }

// --- devices ----------------------------------------------------------------------------------
function renderDevices(snap) {
  const body = document.querySelector("#devices tbody");
  body.replaceChildren(...snap.devices.map(d => {
    const beats = Object.values(d.heartbeat || {});
    const p50 = beats.filter(h => h.count).map(h => fmt(h.p50_ms, 3)).join(", ") || "-";
    const sum = key => beats.length ? beats.reduce((a, h) => a + (h[key] || 0), 0) : "-";
    const models = Object.entries(d.models || {}).sort().map(([m, v]) => `${m}@${v}`).join(", ") || "-";
    const tags = Object.entries(d.tags || {}).sort().map(([k, v]) => `${k}=${v}`).join(", ");
    const runtime = d.runtime && d.runtime.name ? `${d.runtime.name} ${d.runtime.version || ""}` : "-";
    return el("tr", { "data-device": d.id, class: d.online ? "online" : "offline" },
      el("td", { class: "id" }, d.id),
      el("td", { class: "presence" }, el("span", { class: "dot" }), d.online ? "online" : "offline",
         el("span", { class: "empty" }, ` ${ago(snap.at, d.since)}`)),
      el("td", {}, d.agent_version || "-"), el("td", {}, runtime), el("td", { class: "models" }, models),
      el("td", { class: "num p50" }, p50), el("td", { class: "num" }, fmt(sum("requests"))),
      el("td", { class: "num errors" }, fmt(sum("errors"))), el("td", {}, tags),
      el("td", { class: `config c-${d.config_state}`, title: configDetail(d) }, d.config_state || "-"));
  }));
  document.getElementById("devices-empty").hidden = snap.devices.length > 0;
}

// where what a device reports differs from the desired configuration (shown on hover)
function configDetail(d) {
  const drift = Object.entries(d.drift || {}).sort()
    .map(([k, v]) => `${k}: ${JSON.stringify(v.reported)} (desired ${JSON.stringify(v.desired)})`);
  if (d.config_note) drift.push(d.config_note);
  return drift.join("; ") || (d.desired_revision ? `revision ${d.desired_revision}` : "nothing desired");
}

// --- rollouts ---------------------------------------------------------------------------------
function renderRollouts(snap) {
  const box = document.getElementById("rollouts");
  box.replaceChildren(...snap.rollouts.map(r => {
    const total = Object.values(r.counts).reduce((a, b) => a + b, 0) || 1;
    const bar = el("div", { class: "bar" }, ...ROLLOUT_STATES.filter(s => r.counts[s]).map(s =>
      el("span", { class: `seg-${s}`, title: `${s}: ${r.counts[s]}`,
                   style: `width:${(100 * r.counts[s] / total).toFixed(2)}%;background:${COLORS[s]}` })));
    const counts = el("div", { class: "counts" }, ...ROLLOUT_STATES.filter(s => r.counts[s]).map(s =>
      el("span", { class: `count count-${s}`, "data-state": s }, `${s} ${r.counts[s]}/${total}`)));
    const stages = el("div", { class: "stages" }, ...r.stages.map(st => {
      const finished = st.devices - (st.counts.QUEUED || 0) - (st.counts.IN_PROGRESS || 0);
      return el("span", { class: "stage" }, el("b", {}, st.stage === 0 ? "canary" : `stage ${st.stage}`),
                ` ${finished}/${st.devices} finished`);
    }));
    const chips = el("div", { class: "chips" }, ...r.devices.map(d =>
      el("span", { class: `chip s-${d.state}`, title: `${d.device}: ${d.state} ${d.reason || ""}`,
                   "data-device": d.device }, d.device)));
    return el("div", { class: "rollout", "data-rollout": r.id },
      el("div", { class: "head" }, el("span", { class: "id" }, r.id), el("b", {}, `${r.model}@${r.version}`),
         badge(r.state), el("span", { class: "reason" }, r.reason || "")),
      bar, counts, stages, chips);
  }));
  document.getElementById("rollouts-empty").hidden = snap.rollouts.length > 0;
}

// --- jobs -------------------------------------------------------------------------------------
function renderJobs(snap) {
  const body = document.querySelector("#jobs tbody");
  if (!snap.jobs.some(j => j.id === selectedJob)) selectedJob = snap.jobs.length ? snap.jobs[0].id : null;
  body.replaceChildren(...snap.jobs.map(j => {
    const pct = j.samples ? 100 * j.samples_done / j.samples : 0;
    const c = j.counts || {};
    return el("tr", { "data-job": j.id, class: j.id === selectedJob ? "selected" : "",
                      onclick: () => { selectedJob = j.id; render(last); } },
      el("td", { class: "id" }, j.id), el("td", {}, j.model), el("td", {}, badge(j.state)),
      el("td", {}, el("div", { class: "progress" },
        el("div", { class: "track" }, el("div", { class: `fill s-${j.state}`, style: `width:${pct.toFixed(1)}%` })),
        el("span", { class: "progress-text" }, `${fmt(j.samples_done)}/${fmt(j.samples)} (${pct.toFixed(0)}%)`))),
      el("td", { class: "num rate" }, fmt(j.samples_per_s)),
      el("td", { class: "tasks" }, `${c.PENDING || 0} / ${c.LEASED || 0} / ${c.DONE || 0} / ${c.FAILED || 0}`),
      el("td", {}, Object.keys(j.devices || {}).join(", ") || "-"));
  }));
  document.getElementById("jobs-empty").hidden = snap.jobs.length > 0;
  renderChart(snap.jobs.find(j => j.id === selectedJob));
}

function renderChart(job) {
  const figure = document.getElementById("chart");
  const series = job && job.throughput;
  figure.hidden = !series || series.length === 0;
  if (figure.hidden) return;
  const W = 640, H = 200, L = 56, R = 12, T = 12, B = 28;
  const maxT = Math.max(...series.map(p => p[0]), 0.001);
  const maxY = Math.max(...series.map(p => p[1]), 1);
  const x = t => L + (W - L - R) * t / maxT;
  const y = v => H - B - (H - T - B) * v / maxY;
  const points = [[0, 0], ...series].map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  const chart = document.getElementById("throughput");
  chart.replaceChildren(
    svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    svg("polygon", { class: "area", points: `${x(0)},${y(0)} ${points} ${x(maxT)},${y(0)}` }),
    svg("polyline", { class: "line", points, "data-points": series.length }));
  for (const [text, tx, ty, anchor] of [[fmt(maxY), L - 6, T + 8, "end"], ["0", L - 6, H - B, "end"],
                                        ["0 s", L, H - 8, "start"], [`${maxT.toFixed(1)} s`, W - R, H - 8, "end"]]) {
    const label = svg("text", { x: tx, y: ty, "text-anchor": anchor });
    label.textContent = text;
    chart.append(label);
  }
  document.getElementById("chart-title").textContent =
    `job ${job.id} (${job.model}): samples/s over time, ${fmt(job.samples_per_s)} samples/s overall`;
}

// --- the whole page -----------------------------------------------------------------------------
function render(snap) {
  if (!snap) return;
  last = snap;
  const t = snap.totals;
  document.getElementById("totals").replaceChildren(
    el("b", {}, `${t.online}/${t.devices}`), " devices online · ", el("b", {}, String(t.rollouts_active)),
    " rollouts running · ", el("b", {}, String(t.jobs_running)), " jobs running");
  renderDevices(snap);
  renderRollouts(snap);
  renderJobs(snap);
  document.getElementById("main").hidden = false;
}

function live(on, text) {
  const badgeNode = document.getElementById("live");
  badgeNode.className = `live ${on ? "on" : "off"}`;
  badgeNode.textContent = text;
}

function askToken(message) {
  if (source) source.close();
  live(false, "no access");
  document.getElementById("main").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
}

async function connect() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  let response;
  try {
    response = await fetch("/api/v1/snapshot", { headers, cache: "no-store" });
  } catch (err) {
    live(false, "fleet unreachable, retrying");
    setTimeout(connect, 2000);
    return;
  }
  if (response.status === 401) {
    const body = await response.json().catch(() => ({}));
    askToken(token ? body.message : "");
    return;
  }
  if (!response.ok) {
    live(false, `error ${response.status}, retrying`);
    setTimeout(connect, 2000);
    return;
  }
  document.getElementById("login").hidden = true;
  render(await response.json());
  if (source) source.close();
  source = new EventSource("/api/v1/events" + (token ? `?token=${encodeURIComponent(token)}` : ""));
  source.addEventListener("open", () => live(true, "live"));
  source.addEventListener("snapshot", e => { live(true, "live"); render(JSON.parse(e.data)); });
  source.addEventListener("failure", e => live(false, JSON.parse(e.data).message));
  source.addEventListener("error", () => {
    live(false, "reconnecting…");
    if (source.readyState === EventSource.CLOSED) setTimeout(connect, 2000);  // refused: check the token again
  });
}

function start() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("token")) {
    sessionStorage.setItem(TOKEN_KEY, fragment.get("token"));
    history.replaceState(null, "", location.pathname + location.search);
  }
  document.getElementById("login").addEventListener("submit", e => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token-input").value.trim());
    connect();
  });
  connect();
}

start();
