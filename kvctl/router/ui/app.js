"use strict";
// The kvctl dashboard (SPEC §12). Everything it shows comes from the router's own routes:
// /models, /traffic/stats and /sleep/status polled every 2 s while the tab is visible,
// /traffic/history for the charts, and GET /events followed live. The API key and admin
// token the user types are kept in sessionStorage (this tab only) and sent to this router only.

const BASE = location.pathname.replace(/\/ui\/?$/, "");  // the router may sit under a path prefix
const POLL_MS = 2000;
const HISTORY_MS = 5000;
const STATS_WINDOW = 30;  // seconds behind req/s and the percentiles on the cards
const MAX_EVENTS = 100;
const HOLDS_MEMORY = new Set(["awake", "draining", "waking"]);  // what the router's memory budget counts
const PALETTE = ["#4f9cf9", "#f0a030", "#3ecf8e", "#e5659b", "#a78bfa", "#2ec4d6", "#d4c64a", "#ff8a65"];
const SVG = "http://www.w3.org/2000/svg";

const S = {
  key: sessionStorage.getItem("kvctl.key") || "",
  admin: sessionStorage.getItem("kvctl.admin") || "",
  needKey: false,
  order: [],            // model names, in config order
  models: {},           // GET /models
  stats: {},            // GET /traffic/stats
  sleep: null,          // GET /sleep/status
  fetchedAt: 0,         // when /models was read (ms, local clock)
  history: null,        // GET /traffic/history, merged
  skew: 0,              // router clock minus ours (s), from /traffic/history
  events: [],           // the last MAX_EVENTS state changes
  lastSleep: {},        // model -> the event that last put one of its instances to sleep
  cards: new Map(),     // model -> its card's elements
  pending: null,        // the action waiting for an admin token
  pollOk: false,
  eventsOk: false,
};

// ------------------------------------------------------------------ small helpers

const $ = (id) => document.getElementById(id);

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children) if (child != null) el.append(child);
  return el;
}

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) if (v != null) el.setAttribute(k, v);
  if (text != null) el.textContent = text;
  return el;
}

const now = () => Date.now() / 1000 + S.skew;  // the router's clock
const pad2 = (n) => String(n).padStart(2, "0");

function clock(t) {
  const d = new Date((t - S.skew) * 1000);
  return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
}

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return s % 60 ? `${Math.floor(s / 60)}m ${pad2(s % 60)}s` : `${s / 60}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${pad2(Math.floor(s / 60) % 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor(s / 3600) % 24}h`;
}

function number(v) {
  if (v == null || !isFinite(v)) return "–";
  const a = Math.abs(v);
  return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(2);
}

function pair(a, b) {
  // Two durations (seconds) with one unit: "51.6 / 54.5 ms", "1.20 / 3.45 s".
  if (a == null && b == null) return "–";
  const top = Math.max(a || 0, b || 0);
  const [scale, unit] = top >= 1 ? [1, "s"] : [1000, "ms"];
  const f = (v) => (v == null ? "–" : number(v * scale));
  return `${f(a)} / ${f(b)} ${unit}`;
}

const gb = (v) => (v == null ? "–" : Number.isInteger(v) ? String(v) : v.toFixed(1));
const gib = (bytes) => (bytes / 2 ** 30).toFixed(1);
function modelNames() {  // config order, from whichever answer came first
  return S.order.length ? S.order : Object.keys((S.history && S.history.models) || {});
}
const colour = (model) => PALETTE[Math.max(0, modelNames().indexOf(model)) % PALETTE.length];

// ------------------------------------------------------------------ the router's API

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function authHeaders(admin) {
  const token = admin ? S.admin || S.key : S.key || S.admin;
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, { method = "GET", admin = false } = {}) {
  let res;
  try {
    res = await fetch(BASE + path, { method, headers: authHeaders(admin), cache: "no-store" });
  } catch (err) {
    throw new ApiError(0, "the router is unreachable");
  }
  const body = await res.json().catch(() => null);
  if (!res.ok || (body && body.success === false)) {
    // OpenAI-shaped errors carry error.message; sleep/wake results carry message.
    const message = (body && ((body.error && body.error.message) || body.message)) || `HTTP ${res.status}`;
    throw new ApiError(res.status, message);
  }
  return body;
}

function failed(err) {
  if (err.status === 401) {
    S.needKey = true;
    askKey(err.message);
  }
  S.pollOk = false;
  connection(err.status === 401 ? "API key needed" : err.message);
}

// ------------------------------------------------------------------ keys

function showAuth() {
  $("auth").hidden = $("key-form").hidden && $("admin-form").hidden;
}

function askKey(message) {
  $("key-why").textContent = `This router needs an API key for its data. The router says: ${message}`;
  if ($("key-form").hidden) {
    $("key-form").hidden = false;
    showAuth();
    $("key-input").focus();
  }
}

function askAdmin(message) {
  $("admin-why").textContent = `The router refused: ${message}`;
  $("admin-form").hidden = false;
  showAuth();
  $("admin-input").focus();
}

// Both secrets are typed into a form, kept for this tab only, and the form put away.
function takeSecret(event, name) {
  event.preventDefault();
  const value = $(`${name}-input`).value.trim();
  sessionStorage.setItem(`kvctl.${name}`, value);
  $(`${name}-input`).value = "";
  $(`${name}-form`).hidden = true;
  return value;
}

function useKey(event) {
  S.key = takeSecret(event, "key");
  showAuth();
  S.needKey = false;
  poll();
  pollHistory(true);
  followEvents();
}

function useAdmin(event) {
  S.admin = takeSecret(event, "admin");
  showAuth();
  const pending = S.pending;
  S.pending = null;
  if (pending) act(pending.model, pending.action);
}

// ------------------------------------------------------------------ polling

let polling = false;

async function poll() {
  if (document.hidden || polling || S.needKey) return;
  polling = true;
  try {
    const [models, stats, sleep] = await Promise.all([
      api("/models"), api(`/traffic/stats?window=${STATS_WINDOW}`), api("/sleep/status"),
    ]);
    setModels(models.models);
    S.stats = stats.traffic_stats;
    S.sleep = sleep;
    S.pollOk = true;
    connection();
    render();
  } catch (err) {
    failed(err);
  } finally {
    polling = false;
  }
}

function setModels(models) {
  const before = S.order.join("\n");
  S.fetchedAt = Date.now();
  S.models = models;
  S.order = Object.keys(models);
  if (S.order.join("\n") !== before) drawCharts();  // colours and series follow the models
}

// A state change arrived: read the states again soon (once for a burst of events).
let modelsTimer = null;
function refreshModels() {
  if (modelsTimer) return;
  modelsTimer = setTimeout(async () => {
    modelsTimer = null;
    try {
      const [models, sleep] = await Promise.all([api("/models"), api("/sleep/status")]);
      setModels(models.models);
      S.sleep = sleep;
      render();
    } catch (err) {
      failed(err);
    }
  }, 150);
}

async function pollHistory(reset = false) {
  if ((document.hidden && !reset) || S.needKey) return;
  const old = reset ? null : S.history;
  const since = old && old.time.length ? old.time[old.time.length - 1] : 0;
  try {
    const fresh = await api(`/traffic/history?since=${since}`);
    S.skew = fresh.now - Date.now() / 1000;
    S.history = old ? merge(old, fresh) : fresh;
    drawCharts();
    if (!old) render();  // the memory budget comes with the history
  } catch (err) {
    failed(err);
  }
}

function merge(old, fresh) {
  const keep = old.time.findIndex((t) => t > fresh.now - fresh.span_seconds);
  const from = keep < 0 ? old.time.length : keep;
  const merged = { ...fresh, time: old.time.slice(from).concat(fresh.time), models: {} };
  const gap = old.time.length - from;
  for (const [model, columns] of Object.entries(fresh.models)) {
    const before = old.models[model];
    merged.models[model] = {};
    for (const [name, values] of Object.entries(columns)) {
      const head = before ? before[name].slice(from) : new Array(gap).fill(null);
      merged.models[model][name] = head.concat(values);
    }
  }
  return merged;
}

// ------------------------------------------------------------------ events

let eventsAbort = null;

async function followEvents() {
  if (eventsAbort) eventsAbort.abort();
  const ctrl = (eventsAbort = new AbortController());
  while (!ctrl.signal.aborted) {
    try {
      const res = await fetch(BASE + "/events", { headers: authHeaders(false), signal: ctrl.signal, cache: "no-store" });
      if (res.status === 401) {
        S.needKey = true;
        askKey(((await res.json().catch(() => null)) || {}).error?.message || "401");
        return;  // entering a key starts it again
      }
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      S.events = [];  // the stream starts with the router's recent history
      S.lastSleep = {};
      S.eventsOk = true;
      connection();
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          for (const line of block.split("\n")) if (line.startsWith("data: ")) onEvent(JSON.parse(line.slice(6)));
        }
        renderEvents();
      }
    } catch (err) {
      if (ctrl.signal.aborted) return;
    }
    S.eventsOk = false;
    connection();
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

function onEvent(event) {
  S.events.push(event);
  if (S.events.length > MAX_EVENTS) S.events.shift();
  if (event.to === "asleep") S.lastSleep[event.model] = event;
  const model = S.models[event.model];
  const inst = model && model.instances.find((i) => i.name === event.instance);
  if (inst && event.time >= (inst.state_since || 0)) {  // at once, before /models is read again (the replayed history is older)
    inst.state = event.to;
    inst.state_since = event.time;
  }
  refreshModels();
}

// ------------------------------------------------------------------ rendering

function connection(problem) {
  const el = $("conn");
  const ok = S.pollOk && !problem;
  el.dataset.ok = ok ? (S.eventsOk ? "true" : "partial") : "false";
  $("conn-text").textContent = problem || (S.eventsOk ? "live" : "polling (events reconnecting)");
}

function heldMemory(instances) {
  return instances.reduce((sum, i) => sum + (HOLDS_MEMORY.has(i.state) ? i.memory_gb || 0 : 0), 0);
}

function kvOf(model) {
  // KV cache figures (SPEC §13), when the router reports them: instance.kv = {used_bytes, limit_bytes}.
  let used = 0, limit = 0, known = false;
  for (const inst of model.instances) {
    const kv = inst.kv;
    if (kv && kv.limit_bytes != null) {
      known = true;
      used += kv.used_bytes || 0;
      limit += kv.limit_bytes;
    }
  }
  return known ? { used, limit } : null;
}

function render() {
  renderSummary();
  for (const [model, card] of S.cards) {
    if (!(model in S.models)) {
      card.root.remove();
      S.cards.delete(model);
    }
  }
  const container = $("cards");
  S.order.forEach((model, index) => {
    let card = S.cards.get(model);
    if (!card) {
      card = makeCard(model);
      S.cards.set(model, card);
    }
    if (container.children[index] !== card.root) container.insertBefore(card.root, container.children[index] || null);
    updateCard(card, S.models[model], S.stats[model] || {});
  });
}

function renderSummary() {
  const all = Object.values(S.models);
  const awake = all.filter((m) => m.state === "awake").length;
  const held = all.reduce((sum, m) => sum + heldMemory(m.instances), 0);
  const rate = Object.values(S.stats).reduce((sum, s) => sum + (s.request_rate || 0), 0);
  const budget = S.history ? S.history.memory_budget_gb : null;
  const sleep = S.sleep;
  const parts = [
    [`${all.length}`, " models"],
    [`${awake}`, " awake"],
    [budget != null ? `${gb(held)} / ${gb(budget)} GB` : `${gb(held)} GB`, " held"],
    [number(rate), " req/s"],
    [sleep && sleep.auto_sleep_enabled ? duration(sleep.idle_threshold_seconds) : "off", sleep && sleep.auto_sleep_enabled ? " idle → sleep" : " auto-sleep"],
  ];
  $("summary").replaceChildren(...parts.map(([value, label]) => h("span", { class: "sum" }, h("b", { text: value }), label)));
}

function makeCard(model) {
  const el = {};
  const figure = (name, label) => h("div", { class: "fig" }, h("dt", { text: label }), (el[name] = h("dd", { class: `f-${name}` })));
  el.swatch = h("span", { class: "swatch" });
  el.state = h("span", { class: "state" });
  el.replicas = h("ul", { class: "replicas" });
  el.memText = h("span", { class: "meter-value" });
  el.memBar = h("span", { class: "meter-fill" });
  el.kvText = h("span", { class: "meter-value" });
  el.kvBar = h("span", { class: "meter-fill" });
  el.timer = h("p", { class: "timer" });
  el.lastSleep = h("p", { class: "last-sleep" });
  el.msg = h("span", { class: "msg", role: "status" });
  el.sleepBtn = h("button", { type: "button", class: "btn-sleep", text: "Sleep", onclick: () => act(model, "sleep") });
  el.wakeBtn = h("button", { type: "button", class: "btn-wake", text: "Wake", onclick: () => act(model, "wake") });
  el.stopBtn = h("button", { type: "button", class: "btn-stop ghost", text: "Stop", title: "Stop the engine's process (a request or Start starts it again)",
    onclick: () => act(model, "stop") });
  el.kv = h("div", { class: "meter kv", hidden: true },
    h("div", { class: "meter-label" }, h("span", { text: "KV cache" }), el.kvText), h("div", { class: "meter-track" }, el.kvBar));
  el.root = h("article", { class: "card", "data-model": model },
    h("header", { class: "card-head" }, el.swatch, h("h3", { class: "model-name", text: model, title: model }), el.state),
    el.replicas,
    h("dl", { class: "figures" },
      figure("rate", "req/s"), figure("inflight", "in flight"), figure("queued", "queued"),
      figure("ttft", "TTFT p50 / p95"), figure("latency", "latency p50 / p95"), figure("last", "last request")),
    h("div", { class: "meter mem" },
      h("div", { class: "meter-label" }, h("span", { text: "memory held" }), el.memText), h("div", { class: "meter-track" }, el.memBar)),
    el.kv,
    h("div", { class: "notes" }, el.timer, el.lastSleep),
    h("footer", { class: "actions" }, el.sleepBtn, el.wakeBtn, el.stopBtn, el.msg));
  el.busy = false;
  return el;
}

function updateCard(card, model, stats) {
  const name = card.root.dataset.model;
  const state = model.state;
  card.root.dataset.state = state;
  card.swatch.style.background = colour(name);
  card.state.className = `state st-${state}`;
  card.state.textContent = state;

  card.replicas.replaceChildren(...model.instances.map((inst) => {
    const since = inst.state_since ? ` for ${duration(now() - inst.state_since)}` : "";
    const cause = inst.state === "asleep" && inst.cause ? h("span", { class: "cause", text: inst.cause }) : null;
    const failure = inst.failure ? h("span", { class: "failure", text: inst.failure, title: inst.failure }) : null;
    return h("li", { class: "replica", "data-instance": inst.name, title: inst.url },
      h("span", { class: `dot st-${inst.state}` }), h("span", { class: "inst-name", text: inst.name }),
      h("span", { class: `inst-state st-${inst.state}`, text: inst.state }), h("span", { class: "since", text: since }), cause, failure);
  }));

  const inFlight = stats.in_flight ?? 0;
  const queued = stats.queued ?? 0;
  card.rate.textContent = number(stats.request_rate);
  card.inflight.textContent = String(inFlight);
  card.queued.textContent = String(queued);
  card.queued.classList.toggle("warn", queued > 0);
  card.ttft.textContent = pair(stats.p50_ttft, stats.p95_ttft);
  card.latency.textContent = pair(stats.p50_latency, stats.p95_latency);
  card.last.textContent = stats.last_activity_time ? `${duration(now() - stats.last_activity_time)} ago` : "never";

  const held = heldMemory(model.instances);
  const configured = model.instances.reduce((sum, i) => sum + (i.memory_gb || 0), 0);
  const budget = S.history ? S.history.memory_budget_gb : null;
  const scale = budget || configured;
  card.memText.textContent = configured === 0 ? "memory_gb not set"
    : budget != null ? `${gb(held)} / ${gb(budget)} GB budget` : `${gb(held)} / ${gb(configured)} GB`;
  card.memBar.style.width = scale ? `${Math.min(100, (100 * held) / scale)}%` : "0%";
  card.memBar.style.background = colour(name);

  const kv = kvOf(model);
  card.kv.hidden = kv === null;
  if (kv) {
    card.kvText.textContent = `${gib(kv.used)} / ${gib(kv.limit)} GiB`;
    card.kvBar.style.width = kv.limit ? `${Math.min(100, (100 * kv.used) / kv.limit)}%` : "0%";
  }

  card.timer.textContent = timerText(name, model);
  card.lastSleep.textContent = lastSleepText(name);

  card.sleepBtn.disabled = card.busy || state === "asleep" || state === "stopped";
  card.wakeBtn.disabled = card.busy || state === "awake";
  card.wakeBtn.textContent = state === "stopped" ? "Start" : "Wake";  // a wake starts a stopped engine
  card.stopBtn.disabled = card.busy || state === "stopped";
}

function soonest(instances, field) {
  // The router's countdown (seconds when /models was read), run on to now.
  const values = instances.map((i) => i[field]).filter((v) => v != null);
  return values.length ? Math.max(0, Math.min(...values) - (Date.now() - S.fetchedAt) / 1000) : null;
}

function timerText(name, model) {
  const parts = [];
  if (model.state === "asleep") {
    const info = S.sleep && S.sleep.sleeping_models[name];
    parts.push(info ? `asleep for ${duration(info.sleep_duration)}${info.cause ? ` · ${info.cause}` : ""}` : "asleep");
  }
  const sleeps = soonest(model.instances, "sleeps_in");
  const stops = soonest(model.instances, "stops_in");
  if (sleeps != null) parts.push(sleeps > 0 ? `sleeps in ${duration(sleeps)}` : "sleep due");
  else if (model.state === "awake" && model.instances.every((i) => i.policy && i.policy.idle_seconds == null)) parts.push("no auto-sleep");
  if (stops != null) parts.push(stops > 0 ? `stops in ${duration(stops)}` : "stop due");
  return parts.join(" · ");
}

function lastSleepText(model) {
  const last = S.lastSleep[model];
  return last ? `last sleep ${clock(last.time)} · ${last.cause}` : "";
}

function renderLegend() {
  $("legend").replaceChildren(...modelNames().map((model) =>
    h("span", { class: "legend-item" }, h("span", { class: "legend-swatch", "data-colour": colour(model) }), model)));
  for (const swatch of $("legend").querySelectorAll(".legend-swatch")) swatch.style.background = swatch.dataset.colour;
}

function renderEvents() {
  const list = $("events");
  if (!S.events.length) return;
  list.replaceChildren(...S.events.slice().reverse().map((e) =>
    h("li", { class: "event", title: e.model },
      h("time", { text: clock(e.time) }),
      h("span", { class: "ev-inst", text: e.instance }),
      h("span", { class: "ev-change" }, h("span", { class: `st st-${e.from}`, text: e.from }), " → ", h("span", { class: `st st-${e.to}`, text: e.to })),
      h("span", { class: "ev-cause", text: e.cause }),
      h("span", { class: "ev-dur", text: e.duration_seconds != null ? `${e.duration_seconds.toFixed(2)} s` : "" }))));
  for (const [model, card] of S.cards) card.lastSleep.textContent = lastSleepText(model);
}

// ------------------------------------------------------------------ actions

async function act(model, action) {
  const card = S.cards.get(model);
  card.busy = true;
  card.sleepBtn.disabled = card.wakeBtn.disabled = card.stopBtn.disabled = true;
  card.msg.className = "msg busy";
  card.msg.textContent = { sleep: "putting to sleep…", wake: "waking…", stop: "stopping…" }[action];
  try {
    const result = await api(`/models/${encodeURIComponent(model)}/${action}`, { method: "POST", admin: true });
    card.msg.className = "msg ok";
    card.msg.textContent = result.message;
  } catch (err) {
    card.msg.className = "msg error";
    card.msg.textContent = err.message;
    if (err.status === 401) {
      S.pending = { model, action };
      askAdmin(err.message);
    }
  } finally {
    card.busy = false;
    refreshModels();
  }
}

// ------------------------------------------------------------------ charts

function niceStep(value) {
  // The grid step for 4 rows up to `value`: 1, 2, 2.5 or 5 times a power of ten.
  if (!(value > 0)) return 0.25;
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 2.5, 5, 10].map((m) => m * power).find((step) => step >= value * (1 - 1e-9));
}

function drawCharts() {
  const H = S.history;
  if (!H) return;
  const end = now();
  const frame = { t0: end - H.span_seconds, t1: end, times: H.time };
  const series = (field, scale) => modelNames().filter((m) => H.models[m]).map((model) => ({
    model, colour: colour(model), values: H.models[model][field].map((v) => (v == null ? null : v * scale)),
  }));
  chart($("chart-rps"), frame, series("request_rate", 1), { format: number });
  chart($("chart-ttft"), frame, series("ttft_p50", 1000), { format: (v) => `${number(v)} ms` });
  chart($("chart-mem"), frame, series("memory_gb", 1), { format: (v) => `${gb(v)} GB`, stacked: true, budget: H.memory_budget_gb });
  renderLegend();
}

function chart(plot, frame, series, { format, stacked = false, budget = null }) {
  const width = Math.max(200, plot.clientWidth);
  const height = plot.clientHeight || 160;
  const pad = { left: 38, right: 8, top: 8, bottom: 20 };
  const { t0, t1, times } = frame;
  const tops = stacked
    ? times.map((_, i) => series.reduce((sum, s) => sum + (s.values[i] || 0), 0))
    : series.flatMap((s) => s.values.filter((v) => v != null));
  const step = niceStep((Math.max(0, ...tops, budget || 0) * 1.08) / 4);
  const ymax = 4 * step;
  const x = (t) => pad.left + ((t - t0) / (t1 - t0)) * (width - pad.left - pad.right);
  const y = (v) => height - pad.bottom - (v / ymax) * (height - pad.top - pad.bottom);
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });

  let decimals = 0;  // as many as the grid step needs (0.25 → 2, 10 → 0)
  while (decimals < 4 && Math.abs(Math.round(step * 10 ** decimals) - step * 10 ** decimals) > 1e-6) decimals++;
  for (let i = 0; i <= 4; i++) {
    const v = step * i;
    root.append(svg("line", { class: "grid", x1: pad.left, x2: width - pad.right, y1: y(v), y2: y(v) }));
    const label = step >= 1000 && v ? `${v / 1000}k` : v.toFixed(decimals);
    root.append(svg("text", { class: "tick", x: pad.left - 5, y: y(v) + 3.5, "text-anchor": "end" }, label));
  }
  const minutes = (t1 - t0) / 60;
  for (let m = 0; m <= minutes; m += 5) {
    const t = t1 - m * 60;
    root.append(svg("text", { class: "tick", x: x(t), y: height - 5, "text-anchor": m === 0 ? "end" : "middle" }, m === 0 ? "now" : `−${m}m`));
  }

  const visible = times.map((t) => t >= t0);
  if (stacked) {
    const base = times.map(() => 0);
    for (const s of series) {
      const top = base.map((b, i) => b + (s.values[i] || 0));
      let d = "";
      times.forEach((t, i) => {
        if (!visible[i]) return;
        const next = i + 1 < times.length ? times[i + 1] : t1;
        d += `${d ? "L" : "M"}${x(t).toFixed(1)},${y(top[i]).toFixed(1)}H${x(next).toFixed(1)}`;
      });
      for (let i = times.length - 1; i >= 0; i--) {
        if (!visible[i]) continue;
        const next = i + 1 < times.length ? times[i + 1] : t1;
        d += `L${x(next).toFixed(1)},${y(base[i]).toFixed(1)}H${x(times[i]).toFixed(1)}`;
      }
      if (d) {
        const area = svg("path", { class: "area", d: d + "Z", fill: s.colour, "data-model": s.model, "data-max": Math.max(0, ...s.values.map((v) => v || 0)) });
        area.append(svg("title", {}, s.model));
        root.append(area);
      }
      top.forEach((v, i) => (base[i] = v));
    }
    if (budget != null) {
      root.append(svg("line", { class: "budget", x1: pad.left, x2: width - pad.right, y1: y(budget), y2: y(budget) }));
      root.append(svg("text", { class: "budget-label", x: width - pad.right - 2, y: y(budget) - 4, "text-anchor": "end" }, `budget ${gb(budget)} GB`));
    }
  } else {
    for (const s of series) {
      let d = "";
      let pen = false;
      s.values.forEach((v, i) => {
        if (!visible[i] || v == null) {
          pen = false;
          return;
        }
        d += `${pen ? "L" : "M"}${x(times[i]).toFixed(1)},${y(v).toFixed(1)}`;
        pen = true;
      });
      const line = svg("path", { class: "line", d: d || "M0,0", stroke: s.colour, "data-model": s.model,
        "data-max": Math.max(0, ...s.values.map((v) => v || 0)) });
      line.append(svg("title", {}, s.model));
      root.append(line);
    }
  }
  if (!times.some((t, i) => visible[i])) {
    root.append(svg("text", { class: "empty", x: width / 2, y: height / 2, "text-anchor": "middle" }, "collecting… (a point every 5 s)"));
  }

  const cursor = svg("line", { class: "cursor", y1: pad.top, y2: height - pad.bottom, visibility: "hidden" });
  root.append(cursor);
  const tip = h("div", { class: "tip", hidden: true });
  root.addEventListener("pointermove", (event) => {
    if (!times.length) return;
    const box = root.getBoundingClientRect();
    const t = t0 + ((event.clientX - box.left - pad.left) / (width - pad.left - pad.right)) * (t1 - t0);
    let best = 0;
    times.forEach((ti, i) => { if (Math.abs(ti - t) < Math.abs(times[best] - t)) best = i; });
    if (!visible[best]) return;
    cursor.setAttribute("x1", x(times[best]));
    cursor.setAttribute("x2", x(times[best]));
    cursor.setAttribute("visibility", "visible");
    tip.replaceChildren(h("div", { class: "tip-time", text: clock(times[best]) }), ...series.map((s) => {
      const row = h("div", { class: "tip-row" }, h("span", { class: "legend-swatch" }), `${s.model}: ${s.values[best] == null ? "–" : format(s.values[best])}`);
      row.firstChild.style.background = s.colour;
      return row;
    }));
    tip.hidden = false;
    const left = x(times[best]);
    tip.style.left = `${Math.min(left + 10, width - 170)}px`;
  });
  root.addEventListener("pointerleave", () => {
    cursor.setAttribute("visibility", "hidden");
    tip.hidden = true;
  });
  plot.replaceChildren(root, tip);
}

// ------------------------------------------------------------------ start

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", useKey);
  $("admin-form").addEventListener("submit", useAdmin);
  $("admin-cancel").addEventListener("click", () => {
    S.pending = null;
    $("admin-form").hidden = true;
    showAuth();
  });
  $("keys-btn").addEventListener("click", () => {
    $("key-why").textContent = "API key for reading (any of the router's api_keys, or the admin token).";
    $("admin-why").textContent = "Admin token for sleep and wake (when the router sets admin_token).";
    const open = !$("auth").hidden;
    $("key-form").hidden = open;
    $("admin-form").hidden = open;
    showAuth();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) {
      poll();
      pollHistory();
    }
  });
  let resize = 0;
  window.addEventListener("resize", () => {
    cancelAnimationFrame(resize);
    resize = requestAnimationFrame(drawCharts);
  });
  poll();
  pollHistory();
  followEvents();
  setInterval(poll, POLL_MS);
  setInterval(pollHistory, HISTORY_MS);
});
