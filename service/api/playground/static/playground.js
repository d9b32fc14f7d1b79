// The charstream playground: generate on the server (WebSocket /v1/stream) or in this browser
// (onnxruntime-web), keep sessions, colour the text by one unit of the model, show the model's
// next-character candidates under the pointer.

import { BrowserModel, loadOrt, makeRng, sample, topCandidates } from "./browser-model.js";

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), model: $("model"), mode: $("mode"), variant: $("variant"),
  temperature: $("temperature"), topK: $("top-k"), topP: $("top-p"), seed: $("seed"), length: $("length"),
  stopAt: $("stop-at"), browserNote: $("browser-note"), prompt: $("prompt"), generate: $("generate"),
  continue: $("continue"), stop: $("stop"), fork: $("fork"), reset: $("reset"), newSession: $("new-session"),
  sessions: $("sessions"), unit: $("unit"), unitLayer: $("unit-layer"), unitState: $("unit-state"),
  unitIndex: $("unit-index"), unitApply: $("unit-apply"), unitNote: $("unit-note"), output: $("output"),
  candidates: $("candidates"), speed: $("speed"), keyDialog: $("key-dialog"), apiKey: $("api-key"),
  surprisal: $("surprisal"), score: $("score"), steerValue: $("steer-value"), steerShown: $("steer-shown"),
  steerOn: $("steer-on"),
};

const TOP_LOGPROBS = 8;
const SURPRISAL_RED = 8; // bits of surprisal coloured full red
const MAX_UNITS = 32; // the most units one request may ask for
const KEY_STORE = "charstream-api-key";

const app = {
  config: { api_key_required: false, ort_web: null },
  apiKey: sessionStorage.getItem(KEY_STORE) || "",
  models: [],
  cells: null, // the cell finder's report for the chosen model, or null
  serverExtras: true, // false once the server refuses activations / top_logprobs
  sessions: [],
  current: null,
  running: null, // the running generation: { cancel() }
  unit: null, // { layer, state, unit }
  surprisal: false, // colour by each character's surprisal (POST /v1/score) instead of a unit
  browserModels: new Map(),
  socket: null,
  pointer: -1,
  lastRun: null,
};
window.playground = app; // for people poking around in the console, and for the tests' benchmark

// ---- small helpers ------------------------------------------------------------------------------

function setStatus(text, error = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle("error", error);
}

function params() {
  const num = (el, fallback) => (el.value === "" ? fallback : Number(el.value));
  const stop = ui.stopAt.value
    ? ui.stopAt.value.split(",").map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t")).filter((s) => s)
    : [];
  return {
    temperature: num(ui.temperature, 1),
    topK: Math.max(0, Math.floor(num(ui.topK, 0))),
    topP: num(ui.topP, 1),
    seed: ui.seed.value === "" ? null : Math.floor(Number(ui.seed.value)),
    length: Math.max(1, Math.floor(num(ui.length, 300))),
    stop,
  };
}

function headers(extra = {}) {
  return app.apiKey ? { ...extra, "X-API-Key": app.apiKey } : extra;
}

function askKey() {
  return new Promise((resolve) => {
    ui.apiKey.value = app.apiKey;
    ui.keyDialog.addEventListener(
      "close",
      () => {
        app.apiKey = ui.apiKey.value.trim();
        sessionStorage.setItem(KEY_STORE, app.apiKey);
        resolve();
      },
      { once: true },
    );
    ui.keyDialog.showModal();
  });
}

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code;
    this.field = err.field;
  }
}

/** fetch under /v1 with the API key; asks for the key on 401 and tries again. */
async function api(path, options = {}) {
  for (let attempt = 0; ; attempt++) {
    const res = await fetch(path, { ...options, headers: headers(options.headers || {}) });
    if (res.status === 401 && attempt < 3) {
      await askKey();
      continue;
    }
    if (!res.ok) {
      let body = null;
      try { body = await res.json(); } catch { /* not JSON */ }
      throw new ApiError(res.status, body);
    }
    return res;
  }
}

async function postJson(path, body) {
  const res = await api(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  return res.status === 204 ? null : res.json();
}

const isExtrasError = (err) => err && err.code === "invalid_input" && /^(activations|top_logprobs)/.test(err.field || "");

// ---- colours ----------------------------------------------------------------------------------

const NEG = [33, 102, 172];
const POS = [178, 24, 43];

/** -1 blue, 0 white, +1 red; h as it is, c as tanh(c - center), center being where the unit
 * usually sits (its median in the cell report; 0 for a unit picked by number). */
function colourOf(value, unit) {
  let v = unit.state === "c" ? Math.tanh(value - (unit.center || 0)) : value;
  v = Math.max(-1, Math.min(1, v));
  const end = v >= 0 ? POS : NEG;
  const a = Math.abs(v);
  const mix = (i) => Math.round(255 + (end[i] - 255) * a);
  return `rgb(${mix(0)},${mix(1)},${mix(2)})`;
}

// ---- sessions ------------------------------------------------------------------------------

let sessionCount = 0;

class Session {
  constructor(mode, model, variant) {
    this.n = ++sessionCount;
    this.mode = mode; // "server" or "browser"
    this.model = model;
    this.variant = variant;
    this.id = null; // the server's session id
    this.chars = []; // every character shown
    this.prompt = []; // true where the character was typed, not generated
    this.cands = []; // per character: {char: logprob} the model had before it, or null
    // server: per character, the requested units' values; actUnits says which units they are
    this.acts = [];
    this.actUnits = null; // { layer, state, units: [...] }
    // browser: per character, the whole state after reading it (or undefined until computed)
    this.states = [];
    this.state = null;
    this.logits = null;
    this.hidden = ""; // what the browser state read that is not shown (a line break before an empty prompt)
    this.rng = null;
  }

  get text() { return this.chars.join(""); }

  label() {
    const where = this.mode === "server" ? "server" : `browser ${this.variant}`;
    return `#${this.n} ${this.model} · ${where} · ${this.chars.length} chars`;
  }

  copy() {
    const s = new Session(this.mode, this.model, this.variant);
    s.chars = [...this.chars];
    s.prompt = [...this.prompt];
    s.cands = [...this.cands];
    s.acts = [...this.acts];
    s.actUnits = this.actUnits;
    s.states = [...this.states];
    s.state = this.state;
    s.logits = this.logits;
    s.hidden = this.hidden;
    s.hiddenSize = this.hiddenSize;
    return s;
  }

  clear() {
    for (const k of ["chars", "prompt", "cands", "acts", "states"]) this[k] = [];
    this.state = null;
    this.logits = null;
    this.hidden = "";
  }

  push(ch, { typed = false, cand = null, act = null, state = undefined } = {}) {
    this.chars.push(ch);
    this.prompt.push(typed);
    this.cands.push(cand);
    this.acts.push(act);
    this.states.push(state);
  }
}

function renderSessions() {
  ui.sessions.replaceChildren(
    ...app.sessions.map((s) => {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = s.label();
      b.setAttribute("data-testid", "session");
      b.setAttribute("aria-current", String(s === app.current));
      b.addEventListener("click", () => {
        if (app.running) return;
        app.current = s;
        renderSessions();
        renderOutput();
        colourFor(s).catch(showError);
      });
      li.append(b);
      return li;
    }),
  );
  updateButtons();
}

function addSession(s) {
  app.sessions.push(s);
  app.current = s;
  renderSessions();
}

function updateButtons() {
  const busy = Boolean(app.running);
  const has = Boolean(app.current);
  ui.generate.disabled = busy;
  ui.continue.disabled = busy || !has;
  ui.stop.disabled = !busy;
  ui.fork.disabled = busy || !has;
  ui.reset.disabled = busy || !has;
  ui.newSession.disabled = busy;
}

// ---- the text --------------------------------------------------------------------------------

/** The chosen unit's value at character i of session s, or null when it is not known. */
function valueAt(s, i) {
  if (app.surprisal) return s.bits && s.bits.length === s.chars.length ? s.bits[i] : null;
  const u = app.unit;
  if (!u) return null;
  if (s.mode === "browser") {
    const st = s.states[i];
    return st ? st[u.state][u.layer * s.hiddenSize + u.unit] : null;
  }
  const a = s.actUnits;
  if (!a || a.layer !== u.layer || a.state !== u.state || !s.acts[i]) return null;
  const k = a.units.indexOf(u.unit);
  return k < 0 ? null : s.acts[i][k];
}

function spanFor(s, i) {
  const span = document.createElement("span");
  span.textContent = s.chars[i];
  span.dataset.i = String(i);
  if (s.prompt[i]) span.className = "prompt";
  const v = valueAt(s, i);
  if (v !== null && v !== undefined && app.surprisal) {
    span.style.backgroundColor = colourOf(Math.min(1, v / SURPRISAL_RED), { state: "h" });
    span.title = `${v.toFixed(2)} bits`;
  } else if (v !== null && v !== undefined) {
    span.style.backgroundColor = colourOf(v, app.unit);
    span.title = `${v.toFixed(3)}`;
  }
  return span;
}

function renderOutput() {
  const s = app.current;
  ui.output.replaceChildren();
  if (!s) return;
  const frag = document.createDocumentFragment();
  for (let i = 0; i < s.chars.length; i++) frag.append(spanFor(s, i));
  ui.output.append(frag);
  ui.output.dataset.chars = String(s.chars.length);
}

let paintQueued = false;

/** Draw the current session's characters that are not on the page yet, at the next frame at most
 * once: a fast stream arrives in many frames, and drawing each at once would keep the page busy. */
function appendOutput(s) {
  if (s !== app.current || paintQueued) return;
  paintQueued = true;
  requestAnimationFrame(flushOutput);
}

function flushOutput() {
  paintQueued = false;
  const s = app.current;
  if (!s) return;
  const from = ui.output.children.length;
  if (from >= s.chars.length) return;
  const frag = document.createDocumentFragment();
  for (let i = from; i < s.chars.length; i++) frag.append(spanFor(s, i));
  ui.output.append(frag);
  ui.output.dataset.chars = String(s.chars.length);
  ui.output.scrollTop = ui.output.scrollHeight;
}

function showCandidates(i) {
  const s = app.current;
  for (const el of ui.output.querySelectorAll("span.pointer")) el.classList.remove("pointer");
  if (!s || i < 0 || i >= s.chars.length) return;
  app.pointer = i;
  const span = ui.output.children[i];
  if (span) span.classList.add("pointer");
  const cand = s.cands[i];
  const shown = (ch) => (ch === "\n" ? "↵" : ch === " " ? "·" : ch);
  const named = (ch) => (ch === "\n" ? "a line break" : ch === " " ? "a space" : `“${ch}”`);
  const head = document.createElement("p");
  head.textContent = `character ${i}: ${named(s.chars[i])}`;
  const parts = [head];
  if (!cand) {
    const p = document.createElement("p");
    p.className = "note";
    p.textContent = s.mode === "server" && !app.serverExtras
      ? "this server does not return candidates"
      : "no candidates for this character (the first one read, or text the server was given)";
    parts.push(p);
  } else {
    const table = document.createElement("table");
    const entries = Object.entries(cand).sort((a, b) => b[1] - a[1]);
    for (const [ch, lp] of entries) {
      const tr = document.createElement("tr");
      if (ch === s.chars[i]) tr.className = "chosen";
      const p = Math.exp(lp);
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.max(1, Math.round(p * 80))}px`;
      const cells = [shown(ch), `${(p * 100).toFixed(1)}%`];
      for (const [k, text] of cells.entries()) {
        const td = document.createElement("td");
        td.textContent = text;
        if (k === 0) td.className = "ch";
        tr.append(td);
      }
      const td = document.createElement("td");
      td.append(bar);
      tr.append(td);
      table.append(tr);
    }
    parts.push(table);
    const v = valueAt(s, i);
    if (v !== null) {
      const p = document.createElement("p");
      p.className = "note";
      p.textContent = `unit value ${v.toFixed(3)}`;
      parts.push(p);
    }
  }
  ui.candidates.replaceChildren(...parts);
}

// ---- units ---------------------------------------------------------------------------------

function unitKey(u) { return `${u.layer}:${u.state}:${u.unit}`; }

function parseUnit(value) {
  if (!value) return null;
  const [layer, state, unit] = value.split(":");
  const u = { layer: Number(layer), state, unit: Number(unit), center: 0 };
  for (const f of (app.cells && app.cells.features) || []) {
    const t = (f.top || []).find((t) => unitKey(t) === value);
    if (t && typeof t.center === "number") u.center = t.center;
  }
  return u;
}

function fillUnitPicker() {
  const keep = ui.unit.value;
  ui.unit.replaceChildren(new Option("none", ""));
  const report = app.cells;
  if (report) {
    for (const f of report.features) {
      if (!f.top) continue;
      const group = document.createElement("optgroup");
      group.label = `${f.name}: ${f.description}`;
      for (const t of f.top) {
        const score = f.metric === "auc" ? `AUC ${t.score.toFixed(3)}` : `r ${t.score >= 0 ? "+" : ""}${t.score.toFixed(3)}`;
        group.append(new Option(`${f.name}: layer ${t.layer} ${t.state} ${t.unit} (${score})`, unitKey(t)));
      }
      ui.unit.append(group);
    }
    ui.unitNote.textContent = `units found by the cell finder over ${report.text.chars.toLocaleString()} characters of ${report.text.source}`;
  } else {
    ui.unitNote.textContent = "no cell report for this model (make one with `charstream cells`); pick any unit by number";
  }
  if ([...ui.unit.options].some((o) => o.value === keep)) ui.unit.value = keep;
}

/** The units asked of the server with `u`: the picker's units of the same layer and state (at most 32). */
function unitsWith(u) {
  const units = [u.unit];
  for (const o of ui.unit.options) {
    const p = parseUnit(o.value);
    if (p && p.layer === u.layer && p.state === u.state && !units.includes(p.unit) && units.length < MAX_UNITS) units.push(p.unit);
  }
  return units;
}

function activationsRequest(withPrompt) {
  const u = app.unit;
  if (!u || !app.serverExtras) return undefined;
  return { layer: u.layer, state: u.state, units: unitsWith(u), prompt: withPrompt };
}

function modelInfo(id) { return app.models.find((m) => m.id === id); }

function checkUnit(u) {
  const m = modelInfo(ui.model.value);
  if (!m) return "no model";
  if (!(u.layer >= 0 && u.layer < m.num_layers)) return `layer must be 0..${m.num_layers - 1}`;
  if (!(u.unit >= 0 && u.unit < m.hidden_size)) return `unit must be 0..${m.hidden_size - 1}`;
  if (u.state === "c" && m.cell !== "lstm") return `a ${m.cell.toUpperCase()} has no c state`;
  return null;
}

async function chooseUnit(u) {
  if (u) {
    const problem = checkUnit(u);
    if (problem) {
      setStatus(problem, true);
      return;
    }
    ui.unitLayer.value = u.layer;
    ui.unitState.value = u.state;
    ui.unitIndex.value = u.unit;
  }
  app.unit = u;
  renderOutput();
  if (app.current) await colourFor(app.current);
}

/** Make sure session s has the chosen unit's values for every character, then redraw. */
async function colourFor(s) {
  if (app.surprisal) return surprisalFor(s);
  const u = app.unit;
  if (!u || !s.chars.length || app.running) return;
  if (s.mode === "browser") {
    if (s.states.some((st) => !st)) {
      setStatus("reading the text in the browser for its states…");
      await rereadInBrowser(s);
      setStatus("ready");
    }
  } else {
    const known = s.chars.every((_, i) => valueAt(s, i) !== null);
    if (!known) {
      if (!app.serverExtras) {
        ui.unitNote.textContent = "this server does not return unit values; run the model in this browser to colour the text";
        return;
      }
      // Read the session's text once more on a throwaway state: the values after each character.
      const units = unitsWith(u);
      try {
        const body = await postJson("v1/generate", {
          model: s.model, prompt: s.text, max_new_chars: 1, temperature: 0,
          activations: { layer: u.layer, state: u.state, units, prompt: true },
        });
        const rows = body.prompt_activations || [];
        if (rows.length === s.chars.length) {
          s.acts = rows;
          s.actUnits = { layer: u.layer, state: u.state, units };
        }
      } catch (err) {
        if (isExtrasError(err)) {
          app.serverExtras = false;
          ui.unitNote.textContent = "this server does not return unit values; run the model in this browser to colour the text";
          return;
        }
        throw err;
      }
    }
  }
  if (s === app.current) renderOutput();
}

// ---- the server: sessions over HTTP, generation over the WebSocket ----------------------------

/** Each character's surprisal in bits, from the server's batched scoring of the whole text. */
async function surprisalFor(s) {
  if (!s.chars.length || app.running) return;
  if (!(s.bits && s.bits.length === s.chars.length)) {
    const body = await postJson("v1/score", { model: s.model, texts: [s.text], logprobs: true });
    const score = body.scores[0];
    s.bits = score.logprobs.map((lp) => -lp / Math.LN2);
    ui.unitNote.textContent = `${score.bits_per_char.toFixed(2)} bits per character over ${score.chars} characters`;
  }
  if (s === app.current) renderOutput();
}

/** Show the prompt as a text of its own, coloured by surprisal: nothing is generated. */
async function scorePrompt() {
  if (app.running || !ui.prompt.value) return;
  const s = new Session("server", ui.model.value, ui.variant.value);
  for (const ch of ui.prompt.value) s.push(ch, { typed: true });
  s.scoredOnly = true;
  addSession(s);
  ui.surprisal.checked = true;
  app.surprisal = true;
  await surprisalFor(s);
  renderSessions();
}

function socketUrl() {
  const url = new URL("v1/stream", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

// A browser cannot set headers on a WebSocket: the key rides in a subprotocol, never in the URL
// (which proxies log). The server answers with the plain "charstream" subprotocol.
function socketProtocols() {
  return app.apiKey ? ["charstream", "charstream.key." + app.apiKey] : [];
}

function openSocket() {
  if (app.socket && app.socket.readyState === WebSocket.OPEN) return Promise.resolve(app.socket);
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(socketUrl(), socketProtocols());
    ws.onopen = () => {
      app.socket = ws;
      resolve(ws);
    };
    ws.onerror = () => reject(new Error("the WebSocket connection failed"));
    ws.onclose = (ev) => {
      if (app.socket === ws) app.socket = null;
      if (ws.onmessageHandler) ws.onmessageHandler({ type: "closed", code: ev.code, reason: ev.reason });
    };
    ws.onmessage = (ev) => {
      if (ws.onmessageHandler) ws.onmessageHandler(JSON.parse(ev.data));
    };
  });
}

async function serverGenerate(s, prompt, p) {
  if (!s.id) {
    const body = { model: s.model };
    if (p.seed !== null) body.seed = p.seed;
    const info = await postJson("v1/sessions", body);
    s.id = info.id;
  }
  for (;;) {
    try {
      return await serverStream(s, prompt, p);
    } catch (err) {
      if (isExtrasError(err) && app.serverExtras) {
        app.serverExtras = false; // an older server: go on without unit values and candidates
        ui.unitNote.textContent = "this server does not return unit values or candidates";
        continue;
      }
      throw err;
    }
  }
}

function serverStream(s, prompt, p) {
  return new Promise((resolve, reject) => {
    openSocket().then((ws) => {
      const start = s.chars.length;
      let promptAdded = false;
      const addPrompt = () => {
        if (promptAdded) return;
        promptAdded = true;
        for (const ch of prompt) s.push(ch, { typed: true });
        appendOutput(s);
      };
      const message = {
        type: "generate", session_id: s.id, prompt, max_new_chars: p.length, temperature: p.temperature,
        top_k: p.topK, top_p: p.topP, stop: p.stop,
      };
      if (ui.steerOn.checked && app.unit) {
        const u = app.unit;
        message.steer = [{ layer: u.layer, state: u.state, unit: u.unit, value: Number(ui.steerValue.value) }];
      }
      if (app.serverExtras) {
        message.top_logprobs = TOP_LOGPROBS;
        const act = activationsRequest(true);
        if (act) {
          message.activations = act;
          const same = s.actUnits && s.actUnits.layer === act.layer && s.actUnits.state === act.state
            && s.actUnits.units.join() === act.units.join();
          if (!same) {
            // Earlier rows hold other units: forget them (colourFor reads the text again if needed).
            s.actUnits = { layer: act.layer, state: act.state, units: act.units };
            s.acts = s.acts.map(() => null);
          }
        }
      }
      let generated = 0;
      ws.onmessageHandler = (m) => {
        if (m.type === "session") {
          if (m.replaces === s.id) s.id = m.id; // the server's session was gone: it started a new one
        } else if (m.type === "prompt") {
          addPrompt();
          if (m.activations) m.activations.forEach((row, k) => { s.acts[start + k] = row; });
          if (m.top_logprobs) m.top_logprobs.forEach((c, k) => { s.cands[start + k] = c; });
          renderRange(s, start);
        } else if (m.type === "text") {
          addPrompt();
          const from = s.chars.length;
          const chars = [...m.text];
          chars.forEach((ch, k) => s.push(ch, {
            cand: m.top_logprobs ? m.top_logprobs[k] : null,
            act: m.activations ? m.activations[k] : null,
          }));
          generated += chars.length;
          appendOutput(s);
        } else if (m.type === "done") {
          addPrompt();
          ws.onmessageHandler = null;
          resolve({ generated, finish: m.finish_reason });
        } else if (m.type === "error") {
          ws.onmessageHandler = null;
          reject(new ApiError(0, { error: m }));
        } else if (m.type === "closed") {
          reject(new Error(`the connection closed (${m.code}${m.reason ? ": " + m.reason : ""})`));
        }
      };
      app.running.cancel = () => ws.send(JSON.stringify({ type: "cancel" }));
      ws.send(JSON.stringify(message));
    }, reject);
  });
}

function renderRange(s, from) {
  if (s !== app.current) return;
  for (let i = from; i < s.chars.length; i++) {
    const old = ui.output.children[i];
    if (old) old.replaceWith(spanFor(s, i));
  }
}

// ---- this browser ------------------------------------------------------------------------------

async function browserModel(model, variant) {
  const key = `${model}:${variant}`;
  if (app.browserModels.has(key)) return app.browserModels.get(key);
  setStatus(`loading ${model} (${variant}) into this browser…`);
  const res = await api(`v1/models/${encodeURIComponent(model)}/onnx?variant=${variant}`);
  const bytes = await res.arrayBuffer();
  const m = await BrowserModel.load(bytes);
  app.browserModels.set(key, m);
  return m;
}

/** The model for a browser session; an int8 file that cannot run here falls back to fp32. */
async function modelFor(s) {
  try {
    return await browserModel(s.model, s.variant);
  } catch (err) {
    if (s.variant === "fp32") throw err;
    ui.browserNote.hidden = false;
    ui.browserNote.textContent = `the ${s.variant} file cannot run here (${err.message}); using fp32`;
    s.variant = "fp32";
    return browserModel(s.model, "fp32");
  }
}

const nextFrame = () => new Promise((r) => setTimeout(r, 0));

async function browserGenerate(s, prompt, p) {
  const m = await modelFor(s);
  s.hiddenSize = m.hidden;
  if (!s.rng) s.rng = makeRng(p.seed !== null ? p.seed : Math.floor(Math.random() * 2 ** 31));
  const vocab = m.vocab;
  if (!s.state) s.state = m.zeroState();
  if (prompt || !s.logits) {
    // Read the prompt in one call, as the server does; an empty history starts from a line break.
    const text = prompt || "\n";
    const ids = m.encode(text);
    const before = s.logits;
    const out = await m.read(ids, s.state);
    if (prompt) {
      [...prompt].forEach((ch, k) => {
        const prev = k === 0 ? before : m.row(out.logits, k - 1);
        s.push(ch, { typed: true, cand: prev ? topCandidates(prev, vocab, TOP_LOGPROBS) : null });
      });
      appendOutput(s);
    } else {
      s.hidden += text;
    }
    s.state = out.state;
    s.logits = m.row(out.logits, ids.length - 1);
  }
  let generated = 0;
  let finish = "length";
  let cancelled = false;
  app.running.cancel = () => { cancelled = true; };
  let lastPaint = performance.now();
  while (generated < p.length) {
    if (cancelled) { finish = "cancelled"; break; }
    const cand = topCandidates(s.logits, vocab, TOP_LOGPROBS);
    const id = sample(s.logits, p, s.rng);
    const out = await m.read([id], s.state);
    s.state = out.state;
    s.logits = out.logits;
    s.push(vocab[id], { cand, state: out.state });
    generated++;
    const tail = s.text.slice(-64);
    const hit = p.stop.find((stop) => tail.endsWith(stop));
    if (hit) {
      // As the server does: the stop sequence is read but not shown.
      for (let k = 0; k < hit.length; k++) {
        for (const key of ["chars", "prompt", "cands", "acts", "states"]) s[key].pop();
      }
      generated -= hit.length;
      finish = "stop";
      break;
    }
    if (performance.now() - lastPaint > 30) {
      appendOutput(s);
      await nextFrame();
      lastPaint = performance.now();
    }
  }
  if (finish === "stop") renderOutput();
  else appendOutput(s);
  return { generated, finish };
}

/** Step over a browser session's text from a zero state, keeping the state after every character. */
async function rereadInBrowser(s) {
  const m = await modelFor(s);
  s.hiddenSize = m.hidden;
  let state = m.zeroState();
  for (const ch of s.hidden) state = (await m.read(m.encode(ch), state)).state;
  for (let i = 0; i < s.chars.length; i++) {
    state = (await m.read(m.encode(s.chars[i]), state)).state;
    s.states[i] = state;
  }
}

// ---- actions ----------------------------------------------------------------------------------

function showError(err) {
  console.warn(err);
  setStatus(err.message || String(err), true);
}

async function run(s, prompt) {
  if (app.running) return;
  const p = params();
  app.running = { cancel() {} };
  updateButtons();
  try {
    if (s.mode === "browser") await modelFor(s); // loading the file is not part of the speed shown
    setStatus(s.mode === "server" ? "generating on the server…" : "generating in this browser…");
    const t0 = performance.now();
    const result = s.mode === "server" ? await serverGenerate(s, prompt, p) : await browserGenerate(s, prompt, p);
    const seconds = (performance.now() - t0) / 1000;
    const rate = result.generated / Math.max(seconds, 1e-6);
    app.lastRun = { mode: s.mode, variant: s.variant, generated: result.generated, seconds, charsPerSecond: rate, finish: result.finish };
    ui.speed.textContent = `${result.generated} characters in ${seconds.toFixed(2)} s: ${Math.round(rate).toLocaleString()} chars/s `
      + `(${s.mode === "server" ? "server" : `this browser, ${s.variant}`}; ${result.finish})`;
    setStatus(result.finish === "cancelled" ? "stopped" : "ready");
  } catch (err) {
    showError(err);
  } finally {
    app.running = null;
    flushOutput();
    ui.output.dataset.running = "false";
    renderSessions();
  }
  await colourFor(s).catch(showError);
}

async function generateNew() {
  const mode = ui.mode.value;
  const s = new Session(mode, ui.model.value, ui.variant.value);
  addSession(s);
  renderOutput();
  ui.output.dataset.running = "true";
  await run(s, ui.prompt.value);
}

async function continueCurrent() {
  if (!app.current || app.current.scoredOnly) return generateNew(); // a scored text has no server state
  ui.output.dataset.running = "true";
  await run(app.current, "");
}

async function forkCurrent() {
  const s = app.current;
  if (!s || app.running) return;
  const f = s.copy();
  if (s.mode === "server") {
    if (!s.id) return;
    const seed = ui.seed.value === "" ? Math.floor(Math.random() * 2 ** 31) : Number(ui.seed.value);
    const info = await postJson(`v1/sessions/${s.id}/fork`, { seed });
    f.id = info.id;
  } else {
    f.rng = makeRng(ui.seed.value === "" ? Math.floor(Math.random() * 2 ** 31) : Number(ui.seed.value));
  }
  addSession(f);
  renderOutput();
  setStatus(`forked #${s.n} into #${f.n}`);
}

async function resetCurrent() {
  const s = app.current;
  if (!s || app.running) return;
  if (s.mode === "server" && s.id) await postJson(`v1/sessions/${s.id}/reset`, {});
  s.clear();
  s.rng = null;
  renderSessions();
  renderOutput();
  setStatus(`session #${s.n} reset`);
}

function newSession() {
  if (app.running) return;
  app.current = null;
  renderSessions();
  renderOutput();
  ui.prompt.focus();
}

async function loadModel() {
  app.cells = null;
  try {
    app.cells = await (await api(`v1/models/${encodeURIComponent(ui.model.value)}/cells`)).json();
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 404)) throw err;
  }
  const m = modelInfo(ui.model.value);
  ui.unitState.replaceChildren(...(m && m.cell === "lstm" ? ["h", "c"] : ["h"]).map((x) => new Option(x, x)));
  if (m) {
    ui.unitLayer.max = m.num_layers - 1;
    ui.unitIndex.max = m.hidden_size - 1;
  }
  app.unit = null;
  fillUnitPicker();
  ui.unit.value = "";
  renderOutput();
}

// ---- wiring ---------------------------------------------------------------------------------

function wire() {
  const act = (fn) => () => fn().catch(showError);
  ui.generate.addEventListener("click", act(generateNew));
  ui.continue.addEventListener("click", act(continueCurrent));
  ui.stop.addEventListener("click", () => app.running && app.running.cancel());
  ui.fork.addEventListener("click", act(forkCurrent));
  ui.reset.addEventListener("click", act(resetCurrent));
  ui.newSession.addEventListener("click", newSession);
  ui.model.addEventListener("change", act(loadModel));
  ui.unit.addEventListener("change", act(() => chooseUnit(parseUnit(ui.unit.value))));
  ui.unitApply.addEventListener("click", act(() => chooseUnit({
    layer: Number(ui.unitLayer.value), state: ui.unitState.value, unit: Number(ui.unitIndex.value), center: 0,
  })));
  ui.prompt.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      act(generateNew)();
    }
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && app.running) app.running.cancel();
  });
  ui.output.addEventListener("mouseover", (ev) => {
    const i = ev.target && ev.target.dataset ? Number(ev.target.dataset.i) : NaN;
    if (!Number.isNaN(i)) showCandidates(i);
  });
  ui.output.addEventListener("keydown", (ev) => {
    const s = app.current;
    if (!s || !s.chars.length) return;
    const moves = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -40, ArrowDown: 40, Home: -Infinity, End: Infinity };
    if (!(ev.key in moves)) return;
    ev.preventDefault();
    const from = app.pointer < 0 ? 0 : app.pointer;
    showCandidates(Math.max(0, Math.min(s.chars.length - 1, from + moves[ev.key])));
    const span = ui.output.children[app.pointer];
    if (span) span.scrollIntoView({ block: "nearest" });
  });
  ui.mode.addEventListener("change", () => {
    if (ui.mode.value === "browser") loadOrt().catch(showError);
  });
  ui.surprisal.addEventListener("change", act(async () => {
    app.surprisal = ui.surprisal.checked;
    renderOutput();
    if (app.current) await colourFor(app.current);
  }));
  ui.score.addEventListener("click", act(scorePrompt));
  ui.steerValue.addEventListener("input", () => { ui.steerShown.textContent = ui.steerValue.value; });
}

async function start() {
  wire();
  updateButtons();
  app.config = await (await fetch("playground.json")).json();
  if (!app.config.ort_web) {
    ui.mode.querySelector('option[value="browser"]').disabled = true;
    ui.browserNote.hidden = false;
    ui.browserNote.className = "note warn";
    ui.browserNote.textContent = "Running in this browser is unavailable: onnxruntime-web is not installed on this server (run `make web`).";
  } else {
    ui.browserNote.hidden = false;
    ui.browserNote.textContent = `In this browser: onnxruntime-web ${app.config.ort_web}, WebAssembly, one thread.`;
  }
  if (app.config.api_key_required && !app.apiKey) await askKey();
  const models = await (await api("v1/models")).json();
  app.models = models.data;
  ui.model.replaceChildren(...app.models.map((m) => new Option(`${m.id} (${m.cell} ${m.num_layers}x${m.hidden_size})`, m.id)));
  if (app.models.some((m) => m.id === app.config.default_model)) ui.model.value = app.config.default_model;
  if (!app.models.length) {
    setStatus("the server has no model loaded", true);
    return;
  }
  await loadModel();
  setStatus("ready");
  document.body.dataset.ready = "true";
}

start().catch(showError);
