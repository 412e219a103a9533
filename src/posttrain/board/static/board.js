// posttrain board: polls /api/runs, draws the ticked runs' curves with uPlot, shows rollouts, configs, chat.
"use strict";

const params = new URLSearchParams(location.search);
const POLL_MS = Number(params.get("poll")) || 2000;
const COLORS = ["#2a7de1", "#e1572a", "#2e9e5b", "#9b4dca", "#d4a017", "#17a2b8", "#c2185b", "#607d8b"];
// Curves worth seeing first; every other numeric metric follows, alphabetically.
const ORDER = ["loss", "eval_loss", "reward_mean", "eval_reward", "rewards/", "kl", "entropy", "clip_fraction",
  "response_length", "truncated", "lr", "actor_lr", "grad_norm", "actor_grad_norm", "tokens_per_s"];
// Facts about the run, not curves (logged once, at step 0 or at the end).
const NOT_CURVES = new Set(["step", "epoch", "wall_time_s", "trainable_params", "total_params", "trainable_percent",
  "output_weights_bytes"]);
// Panels that overlay several metrics of one run (preference runs: chosen vs rejected).
const COMBINED = [{title: "rewards/chosen vs rewards/rejected", keys: ["rewards/chosen", "rewards/rejected"]},
  {title: "eval_rewards/chosen vs eval_rewards/rejected", keys: ["eval_rewards/chosen", "eval_rewards/rejected"]}];

const state = {
  runs: [], selected: new Set(params.getAll("run")), sort: {key: "updated", dir: -1}, tab: params.get("tab") || "curves",
  metrics: {}, updated: {}, charts: [], rollouts: null, rolloutSort: {key: null, dir: 1}, chat: {},
  stepsSeen: [],
};

const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const fmt = (v) => typeof v === "number" ? (Number.isInteger(v) ? String(v) : Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3 && v !== 0 ? v.toExponential(3) : v.toFixed(4)) : esc(v);
const dur = (s) => s == null ? "" : s < 60 ? `${s.toFixed(0)}s` : s < 3600 ? `${(s / 60).toFixed(1)}m` : `${(s / 3600).toFixed(2)}h`;
const focus = () => [...state.selected][0];

async function api(path, options) {
  const r = await fetch(path, {credentials: "same-origin", ...options});
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.detail || body.error || r.statusText);
  return body;
}

// ---- runs list -------------------------------------------------------------------------------
function sortValue(run, key) {
  if (key === "headline") return run.headline ? run.headline.value : -Infinity;
  if (key === "alarms") return run.alarms.length;
  return run[key] ?? "";
}

function renderRuns() {
  const q = $("#filter").value.toLowerCase();
  const {key, dir} = state.sort;
  const rows = state.runs.filter((r) => !q || [r.name, r.stage, r.model, r.status].join(" ").toLowerCase().includes(q))
    .sort((a, b) => { const x = sortValue(a, key), y = sortValue(b, key); return (x > y ? 1 : x < y ? -1 : 0) * dir; });
  $("#runs tbody").innerHTML = rows.map((r) => `
    <tr data-run="${esc(r.name)}" class="${state.selected.has(r.name) ? "sel" : ""}">
      <td><input type="checkbox" ${state.selected.has(r.name) ? "checked" : ""}></td>
      <td class="name" title="${esc(r.path)}">${esc(r.name)}</td><td>${esc(r.stage)}</td>
      <td title="${esc(r.model)}">${esc(String(r.model || "").split("/").pop())}</td>
      <td><span class="status ${esc(r.status)}" title="${esc(r.reason || "")}">${esc(r.status)}</span></td>
      <td>${r.step}${r.max_steps ? " / " + r.max_steps : ""}</td><td>${dur(r.duration_s)}</td>
      <td>${r.headline ? `${esc(r.headline.name)} ${fmt(r.headline.value)}` : ""}</td>
      <td class="alarm">${r.alarms.length ? "⚠ " + r.alarms.map(esc).join(", ") : ""}</td>
    </tr>`).join("");
  document.querySelectorAll("#runs th[data-sort]").forEach((th) => {
    th.className = th.dataset.sort === key ? (dir > 0 ? "asc" : "desc") : "";
  });
  $("#no-runs").hidden = state.runs.length > 0;
  $("#focus").textContent = state.selected.size ? [...state.selected].join("  vs  ") : "";
}

$("#runs tbody").addEventListener("click", (e) => {
  const tr = e.target.closest("tr[data-run]");
  if (!tr) return;
  const name = tr.dataset.run;
  if (e.target.type === "checkbox") {
    e.target.checked ? state.selected.add(name) : state.selected.delete(name);
  } else {
    state.selected = new Set([name]);
  }
  renderRuns();
  refreshTab(true);
});
document.querySelectorAll("#runs th[data-sort]").forEach((th) => th.addEventListener("click", () => {
  const key = th.dataset.sort;
  state.sort = {key, dir: state.sort.key === key ? -state.sort.dir : 1};
  renderRuns();
}));
$("#filter").addEventListener("input", renderRuns);

// ---- curves ----------------------------------------------------------------------------------
function smooth(values, weight) {  // TensorBoard's debiased exponential moving average, gaps kept
  if (!weight) return values;
  let last = 0, n = 0;
  return values.map((v) => {
    if (v == null) return null;
    last = last * weight + (1 - weight) * v; n++;
    return last / (1 - Math.pow(weight, n));
  });
}

function metricKeys(names) {
  const keys = new Set();
  for (const n of names) for (const r of state.metrics[n] || []) for (const [k, v] of Object.entries(r)) {
    if (typeof v === "number" && !NOT_CURVES.has(k) && !k.startsWith("alarm/")) keys.add(k);
  }
  const rank = (k) => { const i = ORDER.findIndex((o) => o.endsWith("/") ? k.startsWith(o) : k === o); return i < 0 ? ORDER.length : i; };
  return [...keys].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

function seriesData(names, keys) {
  // One x array shared by every series (uPlot's model): the union of the runs' steps (or elapsed seconds).
  const byTime = $("#xaxis").value === "time";
  const points = [];
  for (const n of names) {
    const recs = state.metrics[n] || [];
    const t0 = recs.find((r) => typeof r.wall_time_s === "number")?.wall_time_s;
    for (const k of keys) {
      const pts = recs.filter((r) => typeof r[k] === "number" && (!byTime || typeof r.wall_time_s === "number"))
        .map((r) => [byTime ? r.wall_time_s - t0 : r.step, r[k]]);
      if (pts.length) points.push({label: names.length > 1 ? (keys.length > 1 ? `${n} ${k}` : n) : k, pts});
    }
  }
  const xs = [...new Set(points.flatMap((s) => s.pts.map((p) => p[0])))].sort((a, b) => a - b);
  const w = Number($("#smooth").value);
  const ys = points.map((s) => {
    const m = new Map(s.pts);
    return smooth(xs.map((x) => m.has(x) ? m.get(x) : null), w);
  });
  return {labels: points.map((s) => s.label), data: [xs, ...ys], count: points.reduce((a, s) => a + s.pts.length, 0)};
}

function drawCharts() {
  state.charts.forEach((c) => c.destroy());
  state.charts = [];
  const box = $("#charts");
  const names = [...state.selected].filter((n) => state.metrics[n]);
  if (!names.length) { box.innerHTML = '<p class="hint">Tick a run above to see its curves.</p>'; return; }
  const q = $("#metric-filter").value.toLowerCase();
  const keys = metricKeys(names);
  const panels = COMBINED.filter((p) => p.keys.every((k) => keys.includes(k)))
    .concat(keys.map((k) => ({title: k, keys: [k]}))).filter((p) => !q || p.title.toLowerCase().includes(q));
  box.innerHTML = "";
  for (const p of panels) {
    const {labels, data, count} = seriesData(names, p.keys);
    if (!count) continue;
    const div = document.createElement("div");
    div.className = "chart";
    div.dataset.metric = p.title;
    div.dataset.points = count;
    div.dataset.lastX = data[0][data[0].length - 1];
    div.innerHTML = `<h3>${esc(p.title)}</h3>`;
    box.appendChild(div);
    const axisValues = (u, vals) => vals.map((v) => v == null ? "" : Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-2 && v !== 0) ? v.toExponential(1) : +v.toPrecision(4));
    const opts = {
      width: Math.max(300, div.clientWidth - 12), height: 220, scales: {x: {time: false}},
      axes: [{label: $("#xaxis").value === "time" ? "seconds" : "step"}, {size: 60, values: axisValues}],
      series: [{label: $("#xaxis").value}, ...labels.map((label, i) => ({
        label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true, points: {show: data[0].length < 40}}))],
    };
    state.charts.push(new uPlot(opts, data, div));
  }
  const steps = names.flatMap((n) => (state.metrics[n] || []).map((r) => r.step || 0));
  const last = steps.length ? Math.max(...steps) : 0;
  if (state.stepsSeen[state.stepsSeen.length - 1] !== last) state.stepsSeen.push(last);
  box.dataset.stepsSeen = state.stepsSeen.join(",");  // what the page has drawn so far (tests read it)
  drawAlarms(names);
}

function drawAlarms(names) {
  const lines = [];
  for (const n of names) {
    const seen = {};
    for (const r of state.metrics[n] || []) for (const k of Object.keys(r)) if (k.startsWith("alarm/")) {
      const a = (seen[k] = seen[k] || {first: r.step, last: r.step, value: null});
      a.last = r.step;
    }
    for (const [k, a] of Object.entries(seen)) {
      const name = k.slice(6), metric = {entropy_drop: "entropy", length_ratio: "response_length"}[name] || name;
      const latest = [...(state.metrics[n] || [])].reverse().find((r) => typeof r[metric] === "number");
      lines.push(`<div class="box alarm-line" data-alarm="${esc(name)}">⚠ <b>${esc(n)}</b>: ${esc(name)} alarm from step ${a.first}` +
        ` to ${a.last}${latest ? ` (${esc(metric)} now ${fmt(latest[metric])})` : ""}</div>`);
    }
  }
  $("#alarms").innerHTML = lines.join("");
}

["#smooth", "#xaxis", "#metric-filter"].forEach((s) => $(s).addEventListener("input", () => {
  $("#smooth-v").textContent = $("#smooth").value;
  drawCharts();
}));

async function loadMetrics(force) {
  let changed = false;
  for (const n of state.selected) {
    const run = state.runs.find((r) => r.name === n);
    if (!run) continue;
    const version = `${run.updated}/${run.step}`;  // metrics.jsonl changed since the page read it
    if (force || state.updated[n] !== version || !state.metrics[n]) {
      state.metrics[n] = (await api(`api/metrics?run=${encodeURIComponent(n)}`)).records;
      state.updated[n] = version;
      changed = true;
    }
  }
  return changed;
}

// ---- rollouts --------------------------------------------------------------------------------
async function loadRollouts() {
  const n = focus();
  if (!n) return;
  const follow = $("#rollout-follow").checked;
  const step = follow ? "" : $("#rollout-step").value;
  state.rollouts = await api(`api/rollouts?run=${encodeURIComponent(n)}${step ? "&step=" + step : ""}`);
  drawRollouts();
}

function drawRollouts() {
  const data = state.rollouts;
  const none = !data || !data.steps.length;
  $("#rollouts-none").hidden = !none;
  $("#rollouts").hidden = none;
  if (none) return;
  $("#rollout-step").innerHTML = data.steps.map((s) => `<option ${s === data.step ? "selected" : ""}>${s}</option>`).join("");
  const rewardNames = [...new Set(data.rows.flatMap((r) => Object.keys(r.rewards || {})))];
  const cols = [["prompt", "prompt"], ["completion", "completion"], ...rewardNames.map((k) => [`rewards.${k}`, k]),
    ["reward", "total"], ["advantage", "advantage"], ["length", "length"], ["truncated", "truncated"]];
  const get = (r, key) => key.startsWith("rewards.") ? (r.rewards || {})[key.slice(8)] : r[key];
  const q = $("#rollout-search").value.toLowerCase();
  let rows = data.rows.filter((r) => !q || (r.prompt + "\n" + r.completion).toLowerCase().includes(q));
  const {key, dir} = state.rolloutSort;
  if (key) rows = [...rows].sort((a, b) => { const x = get(a, key), y = get(b, key); return (x > y ? 1 : x < y ? -1 : 0) * dir; });
  $("#rollouts thead").innerHTML = "<tr>" + cols.map(([k, label]) =>
    `<th data-key="${esc(k)}" class="${k === key ? (dir > 0 ? "asc" : "desc") : ""}">${esc(label)}</th>`).join("") + "</tr>";
  $("#rollouts tbody").innerHTML = rows.map((r) => `<tr class="${r.truncated ? "trunc" : ""}">` + cols.map(([k]) => {
    const v = get(r, k);
    if (k === "prompt" || k === "completion") return `<td class="text">${esc(v)}</td>`;
    if (k === "truncated") return `<td>${v ? "yes" : ""}</td>`;
    return `<td class="num ${k === "length" ? "len" : ""}">${fmt(v)}</td>`;
  }).join("") + "</tr>").join("");
  $("#rollout-count").textContent = `${rows.length} of ${data.rows.length} completions at step ${data.step}`;
}

$("#rollouts thead").addEventListener("click", (e) => {
  const key = e.target.dataset.key;
  if (!key) return;
  state.rolloutSort = {key, dir: state.rolloutSort.key === key ? -state.rolloutSort.dir : -1};
  drawRollouts();
});
$("#rollout-search").addEventListener("input", drawRollouts);
$("#rollout-step").addEventListener("change", () => { $("#rollout-follow").checked = false; loadRollouts(); });
$("#rollout-follow").addEventListener("change", loadRollouts);

// ---- samples, config -------------------------------------------------------------------------
async function loadSamples() {
  const n = focus();
  if (!n) return;
  const box = $("#samples");
  box.innerHTML = '<p class="hint">rendering…</p>';
  const {samples} = await api(`api/samples?run=${encodeURIComponent(n)}`);
  if (!Array.isArray(samples)) { box.innerHTML = `<p class="hint">${esc(samples.error)}</p>`; return; }
  box.innerHTML = samples.map((s) => `<div class="sample"><div class="hint">${esc(s.source)}: ${s.tokens} tokens, ` +
    `${s.trained} trained (highlighted)</div><pre>${esc(s.text).replace(/\[\[([\s\S]*?)\]\]/g, "<mark>$1</mark>")}</pre></div>`).join("");
}

async function loadConfig() {
  const names = [...state.selected];
  if (!names.length) return;
  const {configs, diff} = await api("api/config?" + names.map((n) => "run=" + encodeURIComponent(n)).join("&"));
  const rows = names.length > 1 ? diff : Object.entries(configs[names[0]]).map(([key, v]) => ({key, values: {[names[0]]: v}}));
  $("#config thead").innerHTML = `<tr><th>${names.length > 1 ? "key (differing only)" : "key"}</th>` +
    names.map((n) => `<th>${esc(n)}</th>`).join("") + "</tr>";
  $("#config tbody").innerHTML = rows.map((d) => `<tr><td>${esc(d.key)}</td>` +
    names.map((n) => `<td>${esc(JSON.stringify(d.values[n]))}</td>`).join("") + "</tr>").join("") ||
    `<tr><td colspan="${names.length + 1}">the configs are the same</td></tr>`;
}

// ---- chat ------------------------------------------------------------------------------------
function chatTargets() {
  return [...state.selected].flatMap((n) => [{id: n, run: n, base: false}, {id: n + " (base)", run: n, base: true}]);
}

function drawChat() {
  const targets = chatTargets();
  $("#chat-targets").innerHTML = targets.length ? targets.map((t) => `<label><input type="checkbox" data-id="${esc(t.id)}" ` +
    `${state.chat[t.id]?.on ?? !t.base ? "checked" : ""}> ${esc(t.id)}</label>`).join("") : '<span class="hint">Tick runs to chat with them.</span>';
  $("#chat-columns").innerHTML = targets.filter((t) => state.chat[t.id]?.on ?? !t.base).map((t) =>
    `<div class="chatcol"><h3>${esc(t.id)}</h3>` + (state.chat[t.id]?.history || []).map((m) =>
      `<div class="msg ${esc(m.role)}">${esc(m.content)}</div>`).join("") + "</div>").join("");
}

$("#chat-targets").addEventListener("change", (e) => {
  const id = e.target.dataset.id;
  state.chat[id] = {...(state.chat[id] || {history: []}), on: e.target.checked};
  drawChat();
});

$("#chat-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("#chat-input").value.trim();
  if (!text) return;
  $("#chat-input").value = "";
  const targets = chatTargets().filter((t) => state.chat[t.id]?.on ?? !t.base);
  await Promise.all(targets.map(async (t) => {
    const c = (state.chat[t.id] = {on: true, history: [], ...state.chat[t.id]});
    c.history.push({role: "user", content: text});
    drawChat();
    try {
      const r = await api("api/chat", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({run: t.run, base: t.base, max_new_tokens: Number($("#chat-max").value),
          messages: c.history.filter((m) => m.role !== "error")})});
      c.history.push({role: "assistant", content: r.text});
    } catch (err) {
      c.history.push({role: "error", content: String(err.message)});
    }
    drawChat();
  }));
});
$("#chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); }
});
$("#chat-reset").addEventListener("click", () => { Object.values(state.chat).forEach((c) => (c.history = [])); drawChat(); });

// ---- launch (only when the board was started with --allow-launch) ----------------------------
async function setupLaunch() {
  const info = await api("api/launch").catch(() => ({allowed: false}));
  if (!info.allowed) return;
  document.querySelector('#tabs button[data-tab="launch"]').hidden = false;
  $("#launch-stage").innerHTML = info.stages.map((s) => `<option>${esc(s)}</option>`).join("");
}

$("#launch-copy").addEventListener("click", async () => {
  const n = focus();
  if (!n) return;
  const {configs} = await api("api/config?run=" + encodeURIComponent(n));
  const config = {...configs[n]};
  if (config.stage) $("#launch-stage").value = config.stage;
  const lines = Object.entries(config).filter(([k]) => !["stage", "output_dir"].includes(k))
    .map(([k, v]) => `${k}: ${JSON.stringify(v)}`);  // JSON values are YAML too
  $("#launch-config").value = lines.join("\n");
  $("#launch-name").value = n.split("/").pop() + "-2";
});

$("#launch-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const out = $("#launch-result");
  try {
    const r = await api("api/launch", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({stage: $("#launch-stage").value, name: $("#launch-name").value, config: $("#launch-config").value})});
    out.className = "hint";
    out.textContent = `started ${r.name} (pid ${r.pid}); it appears in the list once it logs; output in ${r.log}`;
  } catch (err) {
    out.className = "hint error";
    out.textContent = err.message;
  }
});

// ---- tabs and the poll -----------------------------------------------------------------------
document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => {
  state.tab = b.dataset.tab;
  refreshTab(true);
}));

async function refreshTab(force) {
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("on", b.dataset.tab === state.tab));
  document.querySelectorAll(".tab").forEach((s) => (s.hidden = s.id !== "tab-" + state.tab));
  try {
    if (state.tab === "curves") { if ((await loadMetrics(false)) || force) drawCharts(); }
    else if (state.tab === "rollouts") {
      const run = state.runs.find((r) => r.name === focus());
      const version = run ? `${run.name}/${run.updated}` : "";  // redraw only when the run wrote more
      if (force || version !== state.rolloutVersion) { state.rolloutVersion = version; await loadRollouts(); }
    }
    else if (state.tab === "samples" && force) await loadSamples();
    else if (state.tab === "config" && force) await loadConfig();
    else if (state.tab === "chat" && force) drawChat();
  } catch (err) {
    console.error(err);
  }
}

async function poll() {
  try {
    const body = await api("api/runs");
    $("#root").textContent = body.root;
    state.runs = body.runs;
    if (!state.selected.size && state.runs.length) {  // first visit: the most recently written run
      state.selected.add([...state.runs].sort((a, b) => b.updated - a.updated)[0].name);
    }
    renderRuns();
    await refreshTab(false);
    $("#live").className = "";
    $("#live").textContent = "live · " + new Date().toLocaleTimeString();
    document.body.dataset.polls = Number(document.body.dataset.polls || 0) + 1;
  } catch (err) {
    $("#live").className = "stale";
    $("#live").textContent = "not reachable: " + err.message;
  }
  setTimeout(poll, POLL_MS);
}

// A link can carry the view: ?run=A&run=B&tab=rollouts&smooth=0.6&x=time
if (params.get("smooth")) $("#smooth").value = $("#smooth-v").textContent = params.get("smooth");
if (params.get("x")) $("#xaxis").value = params.get("x");
refreshTab(true);
setupLaunch();
poll();
