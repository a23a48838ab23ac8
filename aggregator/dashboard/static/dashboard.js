// fed-unimiss dashboard: polls the JSON API and redraws. No framework; uPlot draws the plots.
"use strict";
const DASH = "\u2014";  // what a missing value shows
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04",
                "#db2777", "#4b5563", "#65a30d"];
const plots = {};
let lastKey = "";

function num(v, digits) { return (typeof v === "number" && isFinite(v)) ? v.toFixed(digits) : DASH; }
function int(v) { return (typeof v === "number" && isFinite(v)) ? Math.round(v).toLocaleString("en") : DASH; }
function dur(s) {
  if (typeof s !== "number" || !isFinite(s)) return DASH;
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  const h = Math.floor(s / 3600);
  if (h < 48) return h + " h " + Math.round((s % 3600) / 60) + " min";
  return Math.floor(h / 24) + " d " + (h % 24) + " h";
}
function ago(t, now) {
  if (typeof t !== "number") return DASH;
  const d = new Date(t * 1000);
  const hhmm = d.toISOString().slice(11, 16) + " UTC";
  return hhmm + " (" + dur(Math.max(0, now - t)) + " ago)";
}
function text(id, v) { document.getElementById(id).textContent = v; }
function el(tag, cls, content) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (content !== undefined) e.textContent = content;
  return e;
}

async function getJSON(path) {
  const r = await fetch(path, {cache: "no-store", credentials: "same-origin"});
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function renderRun(run, rounds) {
  text("run-name", run.name);
  text("run-kind", run.kind + (run.run_id ? " \u00b7 run " + run.run_id : ""));
  const badge = document.getElementById("state");
  badge.textContent = run.state;
  badge.className = "badge " + run.state;
  const target = run.rounds_target;
  text("round-of", run.rounds_done + " of " + (target || DASH));
  document.getElementById("progress").style.width =
    target ? Math.min(100, 100 * run.rounds_done / target) + "%" : "0";
  text("per-round", dur(run.seconds_per_round));
  text("last-round", "last round ended " + ago(run.last_round_at, run.now));
  text("eta", run.state === "finished" ? "done" : dur(run.eta_s));
  text("eta-sub", run.eta_s != null ? "at " + new Date((run.now + run.eta_s) * 1000).toISOString().slice(11, 16) + " UTC" :
       (run.state === "running" ? "after the first round" : ""));
  text("last-loss", num(run.last_loss, 4));
  text("sites-count", run.sites + " site(s) seen" + (run.min_sites ? ", min " + run.min_sites + " per round" : ""));
  text("online", onlineText(run));
  // "now" (online or not) exists only where a SuperLink does: not for simulate runs
  document.getElementById("sites").classList.toggle("no-online", !(run.sites_registered || []).length);
  const why = document.getElementById("why");
  why.hidden = !run.why;
  why.textContent = run.why || "";
  text("refresh", run.refresh_s);
  text("updated", new Date(run.now * 1000).toISOString().slice(11, 19) + " UTC");
}

// Who the SuperLink sees online now, of the registered sites (aggregator start only).
function onlineText(run) {
  const reg = run.sites_registered || [];
  if (!reg.length) return "";
  if (run.sites_online == null) return "online now: unknown (the aggregator is not running)";
  return "online now: " + run.sites_online.length + " of " + reg.length + " registered" +
    (run.sites_online.length ? " (" + run.sites_online.join(", ") + ")" : "");
}

function renderSites(sites, now) {
  const body = document.querySelector("#sites tbody");
  body.replaceChildren();
  if (!sites.length) {
    const tr = el("tr"); const td = el("td", "muted", "no site registered or seen in a round yet");
    td.colSpan = 9; tr.append(td); body.append(tr); return;
  }
  for (const s of sites) {
    const tr = el("tr");
    tr.dataset.site = s.site;
    tr.append(el("td", "site", s.site));
    tr.append(el("td", "now" + (s.online ? " online" : " muted"), s.online == null ? DASH : (s.online ? "online" : "offline")));
    tr.append(el("td", "", s.last_seen_round ? "round " + s.last_seen_round + ", " + ago(s.last_seen_at, now) : DASH));
    tr.append(el("td", "num", int(s.rounds_joined)));
    const rej = el("td", "");
    rej.append(document.createTextNode(String(s.rejections)));
    for (const r of s.rejection_reasons) { rej.append(el("div", "reason", r)); }
    tr.append(rej);
    tr.append(el("td", "num", int(s.samples_2d)));
    tr.append(el("td", "num", int(s.samples_3d)));
    tr.append(el("td", "num", num(s.last_loss, 4)));
    let eps = DASH;
    if (s.dp || s.epsilon != null) {
      eps = num(s.epsilon, 3) + " / " + num(s.epsilon_budget, 2);
    } else { eps = "no DP"; }
    const td = el("td", "num" + (s.epsilon != null && s.epsilon_budget != null && s.epsilon >= s.epsilon_budget ? " eps-over" : ""), eps);
    tr.append(td);
    body.append(tr);
  }
}

// One plot: series = [{label, values}], x = round numbers. Missing values are null (gaps).
function drawPlot(id, xs, series, opts) {
  const fig = document.getElementById(id);
  if (plots[id]) { plots[id].destroy(); delete plots[id]; }
  fig.replaceChildren(el("div", "ptitle", fig.dataset.title));
  const shown = series.filter(s => s.values.some(v => v != null));
  if (!xs.length || !shown.length) {
    fig.append(el("div", "empty", "no data yet"));
    fig.dataset.state = "empty";
    return;
  }
  const width = Math.max(300, fig.clientWidth - 16);
  const uopts = {
    width: width, height: 220,
    scales: {x: {time: false}},
    axes: [{label: "round", values: (u, vals) => vals.map(v => Number.isInteger(v) ? v : "")},
           {size: 60}],
    series: [{label: "round"}].concat(shown.map((s, i) => Object.assign({
      label: s.label, stroke: s.color || COLORS[i % COLORS.length], width: s.width || 1.5,
      points: {show: xs.length < 40}, spanGaps: false,
    }, s.extra || {}))),
    legend: {live: true},
  };
  if (opts && opts.bars) {
    // Whole bars: half a round of room at both ends, seconds from zero.
    uopts.scales = {x: {time: false, range: (u, lo, hi) => [lo - 0.5, hi + 0.5]},
                    y: {range: (u, lo, hi) => [0, (hi > 0 ? hi : 1) * 1.1]}};
    const bars = uPlot.paths.bars({size: [0.6, 60]});
    uopts.series.slice(1).forEach((s, i) => { s.paths = bars; s.fill = shown[i].fill; s.points = {show: false}; });
  }
  plots[id] = new uPlot(uopts, [xs].concat(shown.map(s => s.values)), fig);
  fig.dataset.state = "rendered";
  fig.dataset.rounds = String(xs.length);
}

function renderPlots(rounds, sites) {
  const xs = rounds.map(r => r.round);
  const names = sites.map(s => s.site);
  const color = name => COLORS[(2 + names.indexOf(name)) % COLORS.length];
  const perSite = key => names.map(name => ({
    label: name, color: color(name), extra: {dash: [4, 3]},
    values: rounds.map(r => (r.per_site[name] || {})[key] ?? null)}));
  drawPlot("plot-loss", xs, [
    {label: "global train", color: "#111827", width: 2.5, values: rounds.map(r => r.loss)},
    {label: "global eval", color: "#6b7280", width: 2, values: rounds.map(r => r.eval_loss)},
  ].concat(perSite("loss")));
  drawPlot("plot-entropy", xs, [
    {label: "global", color: "#111827", width: 2.5, values: rounds.map(r => r.teacher_entropy)},
  ].concat(perSite("teacher_entropy")));
  // The probe of the global model: the deepest stage's k-NN balanced accuracy of the teacher,
  // weighted over the probing sites and per site; the student's weighted value for comparison.
  const probe = (r, site, net, kind) => {
    const p = r.probe && (site ? (r.probe.per_site[site] || {}) : r.probe.weighted);
    const stages = p && p[net] ? Object.keys(p[net]).sort() : [];
    return stages.length ? p[net][stages[stages.length - 1]][kind] : null;
  };
  const probed = names.filter(name => rounds.some(r => probe(r, name, "teacher", "knn") != null));
  drawPlot("plot-probe", xs, [
    {label: "teacher k-NN (weighted)", color: "#111827", width: 2.5, values: rounds.map(r => probe(r, null, "teacher", "knn"))},
    {label: "teacher linear (weighted)", color: "#6b7280", width: 2, values: rounds.map(r => probe(r, null, "teacher", "linear"))},
    {label: "student k-NN (weighted)", color: "#0891b2", width: 2, values: rounds.map(r => probe(r, null, "student", "knn"))},
  ].concat(probed.map(name => ({label: name + " teacher k-NN", color: color(name), extra: {dash: [4, 3]},
                                values: rounds.map(r => probe(r, name, "teacher", "knn"))}))));
  const mb = v => v == null ? null : v / 1e6;
  drawPlot("plot-bytes", xs, [
    // drawn wide underneath: equal to "sent" whenever every site's reply was folded in
    {label: "received from sites", color: "#93c5fd", width: 6, values: rounds.map(r => mb(r.bytes_in))},
    {label: "sent to sites", color: "#ea580c", values: rounds.map(r => mb(r.bytes_out))},
  ]);
  // Stacked bars: the total is drawn behind the site-compute part.
  drawPlot("plot-duration", xs, [
    {label: "coordination (stacked)", color: "#f59e0b", fill: "#fcd34d",
     values: rounds.map(r => r.coordination_s == null ? null : r.seconds)},
    {label: "site compute", color: "#2563eb", fill: "#93c5fd", values: rounds.map(r => r.site_compute_s)},
    {label: "round total", color: "#6b7280", fill: "#e5e7eb",
     values: rounds.map(r => r.coordination_s == null ? r.seconds : null)},
  ], {bars: true});
}

function render(run, rounds, sites) {
  renderRun(run, rounds);
  renderSites(sites, run.now);
  const key = JSON.stringify([rounds.length, rounds.length ? rounds[rounds.length - 1].round : 0, sites.map(s => s.site)]);
  if (key !== lastKey) { renderPlots(rounds, sites); lastKey = key; }
  document.body.dataset.rounds = String(rounds.length);
}

async function refresh() {
  let run;
  try {
    const [r, rounds, sites] = await Promise.all([getJSON("api/run"), getJSON("api/rounds"), getJSON("api/sites")]);
    run = r;
    render(run, rounds, sites);
  } catch (e) {
    const badge = document.getElementById("state");
    badge.textContent = "no connection"; badge.className = "badge failed";
  }
  setTimeout(refresh, 1000 * ((run && run.refresh_s) || 3));
}

// The page arrives with the data of the moment it was served (a JSON block, not a script): it
// is drawn before the load event, so that a screenshot or a slow link never shows "loading".
function renderInitial() {
  const block = document.getElementById("initial-data");
  if (!block || !block.textContent.trim()) return null;
  try {
    const data = JSON.parse(block.textContent);
    render(data.run, data.rounds, data.sites);
    return data.run;
  } catch (e) {
    return null;
  }
}

// Drop the token from the address bar once the server has set its cookie.
if (location.search.includes("token=")) { history.replaceState(null, "", location.pathname); }
window.addEventListener("resize", () => { lastKey = ""; });
const initialRun = renderInitial();
if (initialRun) { setTimeout(refresh, 1000 * (initialRun.refresh_s || 3)); } else { refresh(); }
