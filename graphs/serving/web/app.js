// The decision page: a streamed chat, and beside each assistant turn the decision behind it.
// Plain JS, no dependencies (works offline). Every number drawn carries its exact value in data-value.
"use strict";

const BASE = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const STORE_SESSIONS = "coact.sessions";
const STORE_TURNS = "coact.turns.";
const MAX_SESSIONS = 20;
const EU_SHOWN = 6; // the best few; the rest stay in the DOM, folded

const state = { sessionId: null, turns: [], busy: false };
window.coact = state; // what a test (or a curious operator in the console) reads

const $ = (sel) => document.querySelector(sel);
const STORE_KEY = "coact.apiKey"; // sessionStorage: the key lives as long as this tab

// Every API call: with the API key when one is given (servers with keys answer 401 without).
async function api(path, options = {}) {
  const key = sessionStorage.getItem(STORE_KEY);
  const headers = { ...(options.headers || {}), ...(key ? { authorization: `Bearer ${key}` } : {}) };
  const r = await fetch(`${BASE}${path}`, { ...options, headers });
  if (r.status === 401) setStatus("this server needs an API key: paste yours in the box at the top");
  return r;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

// A number as text, with its exact value kept for comparison.
function num(x, digits = 3, cls = "num") {
  return el("span", { class: cls, "data-value": x === null || x === undefined ? "" : String(x), text: fmt(x, digits) });
}

// ------------------------------------------------------------------ sessions kept in this browser

function loadJSON(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
}

function saveJSON(key, value) {
  try { localStorage.setItem(key, JSON.stringify(value)); } catch { /* storage full or off: the page still works */ }
}

function rememberSession(id, title) {
  const list = loadJSON(STORE_SESSIONS, []).filter((s) => s.id !== id);
  const old = loadJSON(STORE_SESSIONS, []).find((s) => s.id === id);
  list.unshift({ id, title: old ? old.title : title, at: Date.now() });
  for (const gone of list.splice(MAX_SESSIONS)) localStorage.removeItem(STORE_TURNS + gone.id);
  saveJSON(STORE_SESSIONS, list);
  renderSessions();
}

function forgetSession(id) {
  saveJSON(STORE_SESSIONS, loadJSON(STORE_SESSIONS, []).filter((s) => s.id !== id));
  localStorage.removeItem(STORE_TURNS + id);
  renderSessions();
}

function renderSessions() {
  const ul = $("#sessions");
  ul.replaceChildren();
  for (const s of loadJSON(STORE_SESSIONS, [])) {
    const a = el("a", { href: "#", "data-session": s.id, title: s.id, text: s.title || s.id });
    a.addEventListener("click", (e) => { e.preventDefault(); openSession(s.id); });
    ul.append(el("li", { class: s.id === state.sessionId ? "current" : "" }, a));
  }
}

async function openSession(id) {
  if (state.busy) return;
  const r = await api(`v1/sessions/${encodeURIComponent(id)}`);
  if (r.status === 404) { forgetSession(id); setStatus(`session ${id} expired`); return; }
  if (!r.ok) { setStatus(`could not load session: ${(await r.json()).error}`); return; }
  const view = await r.json();
  clearChat();
  state.sessionId = id;
  $("#chat").dataset.session = id;
  const kept = loadJSON(STORE_TURNS + id, []);
  const hist = view.session.history;
  for (let i = 0; i + 1 < hist.length; i += 2) {
    const turn = addTurn(hist[i].text);
    const done = kept.find((d) => d.reply === hist[i + 1].text && d.message === hist[i].text);
    turn.bubble.textContent = hist[i + 1].text;
    if (done) { finishTurn(turn, done); } else {
      turn.node.dataset.state = "done";
      turn.panel.replaceChildren(el("p", { class: "muted", text: "decision not kept in this browser" }));
    }
  }
  renderSessions();
  setStatus(`session ${id}: ${view.session.turns} turns`);
}

// ------------------------------------------------------------------ the chat

function setStatus(text) { $("#status").textContent = text; }

function clearChat() {
  state.turns = [];
  $("#chat").replaceChildren();
  $("#chat").dataset.state = "idle";
}

function startOver() {
  if (state.busy) return;
  state.sessionId = null;
  clearChat();
  $("#chat").dataset.session = "";
  renderSessions();
  setStatus("new session: it starts with your first message");
  $("#message").focus();
}

function addTurn(message) {
  const index = state.turns.length;
  const explain = el("a", { href: "#", class: "explain", text: "explain" });
  const attributions = el("div", { class: "attributions" });
  const user = el("div", { class: "bubble user" }, el("span", { class: "text", text: message }), " ", explain);
  const bubble = el("span", { class: "text" });
  const assistant = el("div", { class: "bubble assistant" }, bubble);
  const panel = el("section", { class: "panel" }, el("p", { class: "muted", text: "deciding…" }));
  const node = el("div", { class: "turn", "data-turn": String(index), "data-state": "deciding" },
    el("div", { class: "talk" }, user, attributions, assistant), panel);
  explain.addEventListener("click", (e) => { e.preventDefault(); explainMessage(message, attributions); });
  $("#chat").append(node);
  const turn = { index, message, node, bubble, assistant, panel, done: null, decision: null };
  state.turns.push(turn);
  node.scrollIntoView({ block: "end" });
  return turn;
}

function finishTurn(turn, done) {
  turn.done = done;
  turn.bubble.textContent = done.reply;
  turn.node.dataset.state = "done";
  turn.assistant.append(el("span", { class: "done-marker", title: "turn finished", text: " ✓" }));
  renderPanel(turn.panel, done, true);
}

// SSE over a POST: fetch + a stream reader (EventSource can only GET).
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const ev = { event: "message", id: null, data: "" };
      for (const line of block.split("\n")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") ev.event = val;
        else if (field === "id") ev.id = val;
        else if (field === "data") ev.data += (ev.data ? "\n" : "") + val;
      }
      if (ev.data) yield { ...ev, data: JSON.parse(ev.data) };
    }
  }
}

async function send(message) {
  state.busy = true;
  $("#chat").dataset.state = "streaming";
  $("#send").disabled = true;
  const turn = addTurn(message);
  const body = { message, stream: true, ...(state.sessionId ? { session_id: state.sessionId } : {}) };
  try {
    const r = await api("v1/chat", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
      throw new Error(err.error || `HTTP ${r.status}`);
    }
    for await (const ev of sseEvents(r)) {
      if (ev.event === "decision") {
        turn.decision = ev.data;
        if (!state.sessionId) {
          state.sessionId = ev.data.session_id;
          $("#chat").dataset.session = state.sessionId;
          rememberSession(state.sessionId, message.slice(0, 60));
        }
        turn.node.dataset.state = "streaming";
        renderPanel(turn.panel, ev.data, false);
      } else if (ev.event === "token") {
        if (!turn.node.dataset.firstTokenAt) turn.node.dataset.firstTokenAt = String(Date.now() / 1000);
        turn.bubble.textContent += ev.data.text;
        turn.node.dataset.tokens = String(Number(turn.node.dataset.tokens || 0) + 1);
      } else if (ev.event === "replace") {
        turn.bubble.textContent = ev.data.reply;
        turn.assistant.classList.add("replaced");
        turn.assistant.title = `the guard withdrew the streamed text: ${ev.data.guard}`;
      } else if (ev.event === "done") {
        turn.node.dataset.doneSentAt = ev.id || "";
        finishTurn(turn, ev.data);
        const kept = loadJSON(STORE_TURNS + state.sessionId, []);
        kept.push({ ...ev.data, message });
        saveJSON(STORE_TURNS + state.sessionId, kept);
        rememberSession(state.sessionId, message.slice(0, 60));
        setStatus(`${ev.data.action.kind}: ${ev.data.action.name} · ${fmt(ev.data.trace.total_ms, 2)} ms`);
      } else if (ev.event === "error") {
        throw new Error(ev.data.error);
      }
    }
    if (!turn.done) throw new Error("the stream ended before the turn was done");
  } catch (e) {
    turn.node.dataset.state = "error";
    turn.assistant.classList.add("error");
    turn.bubble.textContent = `error: ${e.message}`;
    setStatus(`error: ${e.message}`);
  } finally {
    state.busy = false;
    $("#chat").dataset.state = "idle";
    $("#send").disabled = false;
  }
}

// ------------------------------------------------------------------ token attributions (POST /v1/explain)

async function explainMessage(message, box) {
  box.replaceChildren(el("span", { class: "muted", text: "explaining…" }));
  let r;
  try {
    r = await api("v1/explain", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ message }),
    });
  } catch (e) {
    box.replaceChildren(el("span", { class: "muted unavailable", text: `attributions failed: ${e.message}` }));
    return;
  }
  if (r.status === 404) {
    box.replaceChildren(el("span", { class: "muted unavailable", text: "attributions unavailable" }));
    return;
  }
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    box.replaceChildren(el("span", { class: "muted unavailable", text: `attributions failed: ${data.error || r.status}` }));
    return;
  }
  const peak = Math.max(1e-12, ...data.attributions.map((a) => Math.abs(a)));
  const line = el("div", { class: "tokens", "data-target": data.target });
  data.tokens.forEach((tok, i) => {
    const a = data.attributions[i];
    const alpha = (Math.abs(a) / peak).toFixed(3);
    const colour = a >= 0 ? `rgba(214, 39, 40, ${alpha})` : `rgba(31, 119, 180, ${alpha})`;
    line.append(el("span", { class: "token", "data-value": String(a), title: `${tok}: ${fmt(a)}`,
      style: `background:${colour}`, text: tok }), " ");
  });
  box.replaceChildren(el("div", { class: "muted" }, `towards ${data.target}`,
    data.delta === undefined ? "" : " · Δ ", data.delta === undefined ? "" : num(data.delta)), line);
}

// ------------------------------------------------------------------ the decision panel

function stage(resp, name, last = false) {
  const all = resp.trace.stages.filter((s) => s.stage === name);
  return all.length ? all[last ? all.length - 1 : 0] : null;
}

function section(title, cls, ...children) {
  return el("div", { class: `block ${cls}` }, el("h3", { text: title }), ...children);
}

// One row: label | bar | value. Signed bars grow from the middle; `scale` is the largest |value|.
function barRow(cls, label, value, scale, attrs = {}, signed = false, digits = 3) {
  const frac = scale > 0 ? Math.min(1, Math.abs(value) / scale) : 0;
  const bar = el("span", { class: `bar ${value < 0 ? "neg" : "pos"}` });
  if (signed) {
    bar.style.width = `${(frac * 50).toFixed(2)}%`;
    bar.style.left = value < 0 ? `${(50 - frac * 50).toFixed(2)}%` : "50%";
  } else {
    bar.style.width = `${(frac * 100).toFixed(2)}%`;
  }
  return el("div", { class: `row ${cls}`, ...attrs },
    el("span", { class: "label", title: label, text: label }),
    el("span", { class: `track${signed ? " signed" : ""}` }, bar),
    num(value, digits));
}

// The conversation acts the message carries (P > 0.5) and, after a question, the answer it was read as.
function actsLine(out) {
  const acts = Object.entries(out.acts || {}).filter(([, p]) => p > 0.5);
  const parts = acts.map(([a, p]) => el("span", { class: "act", "data-act": a }, `${a} `, num(p)));
  if (out.answer && out.answer.state) {
    parts.push(el("span", { class: "answer", "data-state": out.answer.state }, `answer: ${out.answer.state}`));
  }
  return parts.length ? el("p", { class: "acts" }, ...parts) : null;
}

function maxAbs(values) { return Math.max(0, ...values.map((v) => Math.abs(v))); }

function renderPanel(panel, resp, final) {
  const parts = [];
  const act = resp.action;
  const decision = stage(resp, "decision", true);
  const dec = decision ? decision.output : {};
  parts.push(el("div", { class: "head" },
    el("span", { class: `kind kind-${act.kind}`, text: act.kind }), " ",
    el("strong", { class: "action-name", "data-action": act.name, text: act.name }),
    dec.reason ? el("p", { class: "reason", text: dec.reason }) : null,
    dec.skipped ? el("p", { class: "reason", text: `no decision needed: ${dec.skipped}` }) : null));

  const intent = stage(resp, "intent");
  if (intent) {
    const top = intent.output.top || [];
    const rows = top.map((t) => barRow("intent-row", t.label, t.p, 1, { "data-label": t.label }));
    parts.push(section("intent (top-k)", "intent", ...rows,
      intent.output.out_of_scope ? el("p", { class: "warn", text: "out of scope" }) : null,
      actsLine(intent.output)));
  }

  const reasoner = stage(resp, "reasoner");
  if (reasoner) {
    const f = reasoner.output.findings || {};
    const prior = reasoner.output.finding_prior || {};
    parts.push(section("findings", "findings", ...Object.entries(f).map(([k, v]) =>
      barRow("finding-row", k, v, 1, { "data-finding": k, "data-prior": String(prior[k] ?? "") }))));
  }

  if (dec.posterior) {
    const blocks = Object.entries(dec.posterior).map(([variable, dist]) =>
      el("div", { class: "variable" }, el("div", { class: "var-name", text: variable }),
        ...Object.entries(dist).map(([s, p]) =>
          barRow("posterior-row", s, p, 1, { "data-variable": variable, "data-state": s }))));
    parts.push(section("posterior of the hidden variables", "posterior", ...blocks));
  }

  if (dec.expected_utility) {
    const entries = Object.entries(dec.expected_utility).sort((a, b) => b[1] - a[1]);
    const scale = maxAbs(entries.map((e) => e[1]));
    const row = ([name, v]) => barRow(`eu-row${name === dec.action ? " chosen" : ""}`, name, v, scale,
      { "data-action": name }, true);
    const shown = entries.slice(0, EU_SHOWN);
    const chosen = entries.findIndex((e) => e[0] === dec.action);
    if (chosen >= EU_SHOWN) shown.push(entries[chosen]);
    const rest = entries.filter((e, i) => i >= EU_SHOWN && i !== chosen);
    parts.push(section("expected utility (chosen highlighted)", "eu", ...shown.map(row),
      rest.length ? el("details", {}, el("summary", { text: `${rest.length} more` }), ...rest.map(row)) : null));
  }

  if (dec.value_of_information) {
    const entries = Object.entries(dec.value_of_information).sort((a, b) => b[1] - a[1]);
    const scale = maxAbs(entries.map((e) => e[1]));
    parts.push(section("value of information", "voi", ...entries.map(([q, v]) =>
      barRow(`voi-row${dec.target === q && act.kind === "ask" ? " chosen" : ""}`, q, v, scale, { "data-question": q }))));
  }

  if (final) {
    const verdict = el("dl", { class: "guard-verdict" },
      el("dt", { text: "source" }), el("dd", { class: "source", "data-value": resp.source ?? "", text: resp.source ?? "–" }),
      el("dt", { text: "guard" }), el("dd", { class: "guard-reason", "data-value": resp.guard ?? "",
        text: resp.guard ?? "passed" }),
      el("dt", { text: "replaced" }), el("dd", { class: "replaced", "data-value": String(!!resp.replaced),
        text: resp.replaced ? "yes: streamed text withdrawn" : "no" }),
      el("dt", { text: "first token" }), el("dd", {}, num(resp.first_token_ms, 2, "num first-token-ms"), " ms"),
      el("dt", { text: "responder" }), el("dd", {}, num(resp.responder_ms, 2, "num responder-ms"), " ms"));
    parts.push(section("guard", `guard${resp.guard ? " rejected" : ""}`, verdict));
  }
  if (dec.explanation && dec.explanation.length) {
    const scale = maxAbs(dec.explanation.map((x) => x.shift));
    parts.push(section("evidence influence (leave one out)", "influence", ...dec.explanation.map((x) => {
      const row = barRow("influence-row", x.label, x.shift, scale,
        { "data-variable": x.variable, "data-choice-without": x.choice_without }, true);
      const flip = x.choice_without !== dec.action ? `without it: ${x.choice_without}` : "";
      row.append(el("span", { class: "flip", title: flip, text: flip }));
      return row;
    })));
  }

  if (act.executed && act.executed.length) {
    parts.push(section("actions executed", "executed", ...act.executed.map((r) => el("div",
      { class: `row executed-row status-${r.status}`, "data-action": r.action, "data-status": r.status },
      el("span", { class: "label", text: `${r.action}: ${r.status}${r.reference ? ` (${r.reference})` : ""}` }),
      num(r.ms, 2)))));
  }

  parts.push(section("stage timings (ms)", "stages", waterfall(resp.trace)));

  panel.replaceChildren(...parts);
}

// Stages as a waterfall: intent and reasoner run side by side, the rest one after another.
function waterfall(trace) {
  const rows = [];
  let t = 0;
  let groupStart = 0;
  for (const s of trace.stages) {
    const start = s.stage === "reasoner" ? groupStart : t;
    if (s.stage === "intent") groupStart = t;
    rows.push({ ...s, start });
    t = Math.max(t, start + s.ms);
  }
  const total = Math.max(trace.total_ms, t, 1e-9);
  const W = 360, rowH = 18, labelW = 80, valueW = 64, plot = W - labelW - valueW;
  const chart = svg("svg", { class: "waterfall", viewBox: `0 0 ${W} ${rowH * (rows.length + 1)}`, width: "100%",
    role: "img", "aria-label": "stage timings" });
  rows.forEach((s, i) => {
    const y = i * rowH;
    const label = svg("text", { x: 0, y: y + 13, class: "wf-label" });
    label.textContent = s.stage;
    const x = labelW + (s.start / total) * plot;
    const rect = svg("rect", { x: x.toFixed(2), y: y + 3, height: rowH - 6,
      width: Math.max(1, (s.ms / total) * plot).toFixed(2), class: `wf-bar wf-${s.stage}` });
    const value = svg("text", { x: W, y: y + 13, "text-anchor": "end", class: "wf-value stage-ms",
      "data-stage": s.stage, "data-value": String(s.ms) });
    value.textContent = fmt(s.ms, 2);
    chart.append(label, rect, value);
  });
  const y = rows.length * rowH;
  const label = svg("text", { x: 0, y: y + 13, class: "wf-label wf-total" });
  label.textContent = "total";
  const value = svg("text", { x: W, y: y + 13, "text-anchor": "end", class: "wf-value total-ms",
    "data-value": String(trace.total_ms) });
  value.textContent = fmt(trace.total_ms, 2);
  chart.append(label, value);
  return chart;
}

// ------------------------------------------------------------------ wiring

$("#composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $("#message");
  const message = input.value.trim();
  if (!message || state.busy) return;
  input.value = "";
  send(message);
});
$("#start-over").addEventListener("click", startOver);
$("#api-key").value = sessionStorage.getItem(STORE_KEY) || "";
$("#api-key").addEventListener("change", (e) => {
  const key = e.target.value.trim();
  if (key) sessionStorage.setItem(STORE_KEY, key); else sessionStorage.removeItem(STORE_KEY);
});
renderSessions();
setStatus("new session: it starts with your first message");
