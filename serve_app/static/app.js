/* Troupe playground: models, chat over /ws (streamed, cancellable), live usage.
   Plain JS, no dependencies. The API key lives in sessionStorage only. */
(function () {
  "use strict";

  const KEY_STORAGE = "troupe.apiKey";
  const USAGE_EVERY_MS = 5000;
  const CHART_POINTS = 24;  // two minutes of 5 s refreshes
  const MODALITY_SECTIONS = [
    // [title, capability names that put a model in the section, empty-state line]
    ["Text / chat", ["chat", "text-generation", "completions"], "no text model configured"],
    ["Speech", ["speech", "text-to-speech", "tts"], "no speech model configured"],
    ["Transcription", ["transcription", "speech-to-text", "asr"], "no transcription model configured"],
    ["Images", ["images", "image-generation", "text-to-image"], "no image model configured"],
  ];

  // Every URL is relative to the page's folder, so the playground also works when the
  // gateway is mounted under a prefix (Serve route_prefix, a reverse proxy's subpath).
  const BASE = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
  const api = (path) => BASE + path.replace(/^\//, "");

  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  };

  const state = {
    key: sessionStorage.getItem(KEY_STORAGE) || "",
    conversation: [],          // [{role, content}] sent with every request
    replies: new Map(),        // id -> reply record (in flight only)
    ws: null,
    wsReady: false,
    outbox: [],
    backoffMs: 500,
    reconnectTimer: null,
    usageHistory: [],
    bannerSource: null,
    bannerLevel: null,
  };

  // ---------------------------------------------------------------- banner / status
  // A wrong key outranks an unreachable server, which outranks a rate limit: a less
  // important message never hides a more important one that is still current.
  const BANNER_RANK = { auth: 3, error: 2, warn: 1 };
  function showBanner(text, source, level) {
    const b = $("banner");
    level = level || "error";
    if (!b.hidden && state.bannerSource !== source && BANNER_RANK[level] < BANNER_RANK[state.bannerLevel]) return;
    b.textContent = text;
    b.className = "banner" + (level === "warn" ? " warn" : "");
    b.hidden = false;
    state.bannerSource = source;
    state.bannerLevel = level;
  }
  function clearBanner(source) {
    if (source && state.bannerSource !== source) return;
    $("banner").hidden = true;
    state.bannerSource = null;
    state.bannerLevel = null;
  }
  function setConn(kind, text) {
    $("conn").className = "conn " + kind;
    $("conn-text").textContent = text;
  }
  function retryText(seconds) {
    if (seconds === undefined || seconds === null || isNaN(seconds)) return "Try again shortly.";
    const s = Math.max(1, Math.ceil(Number(seconds)));
    const at = new Date(Date.now() + s * 1000).toLocaleTimeString();
    return `Retry in ${s} s (at ${at}).`;
  }

  // ---------------------------------------------------------------- HTTP
  function authHeaders() {
    return state.key ? { Authorization: "Bearer " + state.key } : {};
  }
  function unauthorizedText() {
    return state.key
      ? "The API key was rejected (HTTP 401). Check the key and press “Use key”."
      : "This gateway needs an API key (HTTP 401). Enter one above and press “Use key”.";
  }
  class HttpProblem extends Error {
    constructor(message, kind) { super(message); this.kind = kind; }
  }
  async function getJSON(path) {
    let resp;
    try {
      resp = await fetch(api(path), { headers: authHeaders(), cache: "no-store" });
    } catch (e) {
      throw new HttpProblem("The Troupe server is unreachable (" + location.host + "). Is it running?", "unreachable");
    }
    if (resp.status === 401 || resp.status === 403) {
      throw new HttpProblem(resp.status === 401 ? unauthorizedText() :
        "This API key may not use this (HTTP 403). Use a key with access.", "auth");
    }
    if (resp.status === 429) {
      throw new HttpProblem("Rate limit reached. " + retryText(parseFloat(resp.headers.get("Retry-After"))), "rate");
    }
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) {
      const err = body && body.error;
      const msg = (err && (err.message || err.code)) || resp.statusText;
      throw new HttpProblem(`${path} answered HTTP ${resp.status}: ${msg}`, "http");
    }
    return body;
  }
  function reportHttp(problem, source) {
    showBanner(problem.message, source, problem.kind === "rate" ? "warn" : problem.kind === "auth" ? "auth" : "error");
  }

  // ---------------------------------------------------------------- models
  async function loadModels() {
    let openai, native;
    try {
      [openai, native] = await Promise.all([getJSON("/v1/models"), getJSON("/models")]);
    } catch (e) {
      if (e instanceof HttpProblem) { reportHttp(e, "models"); } else { throw e; }
      $("model-groups").replaceChildren(el("p", "muted", "Models unavailable."));
      return false;
    }
    clearBanner("models");
    const details = new Map((native.models || []).map((m) => [m.id, m]));
    const ids = (openai.data || []).map((m) => m.id);
    for (const id of details.keys()) if (!ids.includes(id)) ids.push(id);
    const models = ids.map((id) => details.get(id) || { id, capabilities: ["chat"], loaded: true });
    renderModels(models);
    return true;
  }

  function renderModels(models) {
    const box = $("model-groups");
    box.replaceChildren();
    for (const [title, caps, emptyLine] of MODALITY_SECTIONS) {
      const members = models.filter((m) => (m.capabilities || []).some((c) => caps.includes(c)));
      const heading = el("h3", null, title);
      box.append(heading);
      if (!members.length) { box.append(el("p", "muted small", emptyLine)); continue; }
      const ul = el("ul");
      for (const m of members) {
        const li = el("li");
        li.append(el("span", "mid", m.id));
        if (m.loaded === false) li.append(el("span", "badge off", "not loaded"));
        if (m.engine) li.append(el("span", "badge", m.engine));
        const bits = [];
        if (m.context_length) bits.push(`ctx ${m.context_length}`);
        if (m.capabilities) bits.push(m.capabilities.join(", "));
        li.append(el("span", "caps", bits.join(" · ")));
        ul.append(li);
      }
      box.append(ul);
    }
    const inSection = (i) => models.filter((m) => (m.capabilities || []).some((c) => MODALITY_SECTIONS[i][1].includes(c)));
    fillSelect("model", inSection(0));
    fillSelect("tts-model", inSection(1));
    fillSelect("asr-model", inSection(2));
    fillSelect("img-model", inSection(3));
    state.models = new Map(models.map((m) => [m.id, m]));
    updateImageSizes();
  }

  function fillSelect(id, members) {
    const select = $(id);
    const previous = select.value;
    select.replaceChildren();
    for (const m of members) {
      const opt = el("option", null, m.id + (m.loaded === false ? " (not loaded)" : ""));
      opt.value = m.id;
      select.append(opt);
    }
    if (members.some((m) => m.id === previous)) select.value = previous;
    const go = { "tts-model": "tts-go", "asr-model": "asr-go", "img-model": "img-go" }[id];
    if (go) $(go).disabled = members.length === 0;
    if (id === "asr-model") $("asr-record").disabled = members.length === 0;
  }

  // The sizes an image model offers, when /models lists them.
  function updateImageSizes() {
    const m = state.models && state.models.get($("img-model").value);
    const sizes = m && (m.sizes || m.image_sizes || (m.image && m.image.sizes));
    if (!Array.isArray(sizes) || !sizes.length) return;
    const select = $("img-size");
    const previous = select.value;
    select.replaceChildren(...sizes.map((s) => el("option", null, String(s))));
    if (sizes.map(String).includes(previous)) select.value = previous;
  }

  // ---------------------------------------------------------------- WebSocket
  function wsUrl() {
    return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + api("/ws");
  }
  function connect() {
    clearTimeout(state.reconnectTimer);
    setConn("", "connecting…");
    let ws;
    try { ws = new WebSocket(wsUrl()); } catch (e) { scheduleReconnect(); return; }
    state.ws = ws;
    ws.onopen = () => {
      state.backoffMs = 500;
      if (state.key) ws.send(JSON.stringify({ type: "auth", token: state.key }));
      state.wsReady = true;
      setConn("up", "connected");
      clearBanner("ws");
      const queued = state.outbox.splice(0);
      for (const msg of queued) ws.send(msg);
    };
    ws.onmessage = (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch (e) { return; }
      onServerMessage(msg);
    };
    ws.onclose = () => {
      if (state.ws !== ws) return;
      state.wsReady = false;
      state.ws = null;
      for (const reply of [...state.replies.values()]) {
        finishWithError(reply, "Connection lost before the reply finished. It was not completed; send again when reconnected.");
      }
      setConn("down", "disconnected — reconnecting");
      showBanner("Lost the connection to the server. Reconnecting…", "ws", "warn");
      scheduleReconnect();
    };
    ws.onerror = () => { /* onclose follows and handles it */ };
  }
  function scheduleReconnect() {
    const delay = state.backoffMs;
    state.backoffMs = Math.min(state.backoffMs * 2, 10000);
    setConn("down", `disconnected — retrying in ${Math.round(delay / 100) / 10} s`);
    state.reconnectTimer = setTimeout(connect, delay);
  }
  function wsSend(obj) {
    const text = JSON.stringify(obj);
    if (state.ws && state.wsReady && state.ws.readyState === WebSocket.OPEN) state.ws.send(text);
    else state.outbox.push(text);
  }

  function onServerMessage(msg) {
    const reply = msg.id !== undefined ? state.replies.get(msg.id) : undefined;
    switch (msg.type) {
      case "token":
        if (reply && !reply.stopped) appendToken(reply, msg.token);
        break;
      case "tool_call":
        if (reply && !reply.stopped && agent()) agent().onToolCall(reply, msg);
        break;
      case "complete":
        if (reply) complete(reply, msg);
        break;
      case "error":
        handleError(reply, msg.error || {});
        break;
      case "auth.ok":
      case "pong":
        break;
      default:
        break;
    }
  }

  function handleError(reply, err) {
    const code = err.code || "ERROR";
    const retry = err.retry_after_s ?? (err.details && err.details.retry_after_s);
    let text;
    if (code === "AUTHENTICATION_FAILED" || code === "AUTHORIZATION_FAILED") {
      text = code === "AUTHENTICATION_FAILED"
        ? "The API key was rejected (AUTHENTICATION_FAILED). Enter a valid key above and press “Use key”."
        : "This API key may not use that model (AUTHORIZATION_FAILED).";
      showBanner(text, "auth", "auth");
    } else if (code === "RATE_LIMIT_EXCEEDED" || code === "OVERLOADED") {
      text = (code === "OVERLOADED" ? "The model is busy (OVERLOADED). " : "Rate limit reached. ") + retryText(retry);
      showBanner(text, "rate", "warn");
    } else {
      text = `${code}: ${err.message || "the request failed"}`;
    }
    if (reply) finishWithError(reply, text);
    else if (!state.bannerSource) showBanner(text, "ws-error");
  }

  // ---------------------------------------------------------------- chat
  function newId() {
    if (window.crypto && crypto.randomUUID) return "pg-" + crypto.randomUUID();
    return "pg-" + Date.now().toString(36) + Math.random().toString(36).slice(2);
  }
  function addMessage(role, text) {
    $("empty")?.remove();
    const box = el("div", "msg " + role);
    box.append(el("div", "who", role === "user" ? "You" : "Assistant"));
    const body = el("div", "text", text);
    box.append(body);
    $("log").append(box);
    $("log").scrollTop = $("log").scrollHeight;
    return { box, body };
  }
  function updateStop() {
    $("stop").disabled = state.replies.size === 0;
  }

  // The tools / JSON-schema panel (agent.js) adds request fields and shows tool calls.
  const agent = () => window.troupePlayground.agent || null;

  function send() {
    const prompt = $("prompt").value;
    const model = $("model").value;
    if (!prompt.trim()) return;
    if (!model) { showBanner("No chat model is available to send to.", "send"); return; }
    const fields = agent() ? agent().requestFields(false) : {};
    if (fields === null) return;  // the panel says what to fix
    const userTurn = { role: "user", content: prompt };
    state.conversation.push(userTurn);
    addMessage("user", prompt);
    $("prompt").value = "";
    startReply(model, userTurn, fields);
  }

  // Sends the conversation as it stands (plus ``fields``) and streams the answer into a new reply.
  function startReply(model, userTurn, fields) {
    const temperature = parseFloat($("temperature").value);
    const maxTokens = parseInt($("max-tokens").value, 10);
    const { box, body } = addMessage("assistant", "");
    box.classList.add("streaming");
    box.setAttribute("aria-busy", "true");
    const id = newId();
    box.dataset.id = id;
    const reply = { id, box, body, text: "", userTurn, stopped: false, model, sentAt: performance.now(),
                    json: Boolean(fields.response_format), calls: [] };
    state.replies.set(id, reply);
    updateStop();
    const request = { type: "inference", id, model, messages: state.conversation.slice(), ...fields };
    if (!isNaN(temperature)) request.temperature = temperature;
    if (!isNaN(maxTokens) && maxTokens > 0) request.max_tokens = maxTokens;
    wsSend(request);
  }

  function appendToken(reply, token) {
    reply.text += token;
    reply.body.textContent = reply.text;
    const log = $("log");
    if (log.scrollHeight - log.scrollTop - log.clientHeight < 80) log.scrollTop = log.scrollHeight;
  }

  function endReply(reply) {
    state.replies.delete(reply.id);
    reply.box.classList.remove("streaming");
    reply.box.removeAttribute("aria-busy");
    updateStop();
  }
  function note(reply, cls, text) {
    const n = el("div", "note " + cls, text);
    reply.box.append(n);
    return n;
  }

  function stop() {
    for (const reply of state.replies.values()) {
      if (reply.stopped) continue;
      reply.stopped = true;
      wsSend({ type: "cancel", id: reply.id });
      reply.box.classList.remove("streaming");
      reply.stopNote = note(reply, "stopped", "(stopped)");
    }
    $("stop").disabled = true;
  }

  function fmt(n, digits) {
    return n === null || n === undefined || isNaN(n) ? "–" : Number(n).toFixed(digits);
  }
  function usd(n) {
    if (n === null || n === undefined || isNaN(n)) return "–";
    if (n === 0) return "$0";
    return n < 0.01 ? "$" + Number(n).toPrecision(2) : "$" + Number(n).toFixed(4);
  }

  function complete(reply, msg) {
    endReply(reply);
    const calls = msg.tool_calls || [];
    if (calls.length) {
      state.conversation.push({ role: "assistant", content: reply.text || null, tool_calls: calls.map((c) => (
        { id: c.id, type: "function", function: { name: c.name, arguments: c.arguments } })) });
    } else if (reply.text) {
      state.conversation.push({ role: "assistant", content: reply.text });
    }
    if (msg.finish_reason === "cancelled" && !reply.stopNote) note(reply, "stopped", "(stopped)");
    const usage = msg.usage || {};
    const lat = msg.latency_ms || {};
    const completion = usage.completion_tokens;
    const genMs = lat.total != null && lat.ttft != null ? lat.total - lat.ttft : null;
    let tps = null;
    if (completion > 1 && genMs > 0) tps = (completion - 1) / (genMs / 1000);
    else if (completion > 0 && lat.total > 0) tps = completion / (lat.total / 1000);
    const stats = el("div", "stats");
    stats.setAttribute("aria-label", "Reply metrics");
    const add = (label, value, name) => {
      const s = el("span", null, `${label} ${value}`);
      s.dataset.metric = name;
      stats.append(s);
    };
    add("TTFT", lat.ttft != null ? fmt(lat.ttft, 0) + " ms" : "–", "ttft");
    add("", (tps != null ? fmt(tps, 1) : "–") + " tok/s", "tps");
    add("tokens", `${usage.prompt_tokens ?? "–"} in / ${completion ?? "–"} out`, "tokens");
    add("cost", usd(msg.cost_usd), "cost");
    add("finish", msg.finish_reason || "–", "finish");
    reply.box.append(stats);
    if (agent()) agent().onComplete(reply, msg);
    setTimeout(refreshUsage, 400);
  }

  function finishWithError(reply, text) {
    if (!state.replies.has(reply.id)) return;
    endReply(reply);
    // The failed turn is dropped from the history so the next request stays well-formed.
    const i = state.conversation.lastIndexOf(reply.userTurn);
    if (i >= 0 && i === state.conversation.length - 1) state.conversation.splice(i, 1);
    if (reply.stopNote) { reply.stopNote.remove(); reply.stopNote = null; }
    note(reply, "error", "Error — " + text);
  }

  // ---------------------------------------------------------------- speech, transcription, images
  // POST with the key; an error answer becomes an HttpProblem with a message a person can act on.
  async function postFor(path, init) {
    let resp;
    try {
      resp = await fetch(api(path), { method: "POST", ...init, headers: { ...authHeaders(), ...(init.headers || {}) } });
    } catch (e) {
      throw new HttpProblem("The Troupe server is unreachable (" + location.host + "). Is it running?", "unreachable");
    }
    if (resp.ok) return resp;
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    const err = (body && body.error) || {};
    const msg = err.message || resp.statusText;
    if (resp.status === 401) throw new HttpProblem(unauthorizedText(), "auth");
    if (resp.status === 403) throw new HttpProblem("This API key may not use this (HTTP 403): " + msg, "auth");
    if (resp.status === 429) {
      throw new HttpProblem((err.code === "OVERLOADED" ? "The model is busy. " : "Rate limit reached. ")
        + retryText(parseFloat(resp.headers.get("Retry-After"))), "rate");
    }
    throw new HttpProblem(`HTTP ${resp.status}: ${msg}`, "http");
  }
  async function runTask(prefix, work) {
    const status = $(prefix + "-status");
    const go = $(prefix + "-go");
    go.disabled = true;
    status.textContent = "Working…";
    const started = performance.now();
    try {
      const detail = await work();
      status.textContent = `Done in ${fmt(performance.now() - started, 0)} ms` + (detail ? " · " + detail : "");
    } catch (e) {
      if (!(e instanceof HttpProblem)) throw e;
      status.textContent = "Error — " + e.message;
      if (e.kind !== "http") reportHttp(e, prefix);
    } finally {
      go.disabled = false;
    }
  }

  function speak() {
    return runTask("tts", async () => {
      const body = { model: $("tts-model").value, voice: $("tts-voice").value,
        input: $("tts-text").value, response_format: "wav" };
      const resp = await postFor("/v1/audio/speech", { headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      const blob = await resp.blob();
      const audio = $("tts-audio");
      if (audio.src) URL.revokeObjectURL(audio.src);
      audio.src = URL.createObjectURL(blob);
      audio.play().catch(() => { /* autoplay may be refused; the controls remain */ });
      clearBanner("tts");
      return `${Math.round(blob.size / 1024)} KiB audio`;
    });
  }

  function transcribe(blob, filename) {
    return runTask("asr", async () => {
      const form = new FormData();
      form.append("file", blob, filename);
      form.append("model", $("asr-model").value);
      form.append("response_format", "json");
      const resp = await postFor("/v1/audio/transcriptions", { body: form });
      const out = await resp.json();
      $("asr-text").textContent = out.text || "(no speech recognised)";
      clearBanner("asr");
      return `${Math.round(blob.size / 1024)} KiB in`;
    });
  }
  function transcribeFile() {
    const file = $("asr-file").files[0];
    if (!file) { $("asr-status").textContent = "Choose an audio file first, or record."; return; }
    transcribe(file, file.name);
  }
  async function toggleRecording() {
    const button = $("asr-record");
    if (state.recorder) { state.recorder.stop(); return; }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (e) {
      $("asr-status").textContent = "No microphone access: " + (e.message || e.name);
      return;
    }
    const recorder = new MediaRecorder(stream);
    const parts = [];
    recorder.ondataavailable = (ev) => { if (ev.data && ev.data.size) parts.push(ev.data); };
    recorder.onstop = () => {
      stream.getTracks().forEach((t) => t.stop());
      state.recorder = null;
      button.textContent = "Record microphone";
      button.setAttribute("aria-pressed", "false");
      const type = recorder.mimeType || "audio/webm";
      transcribe(new Blob(parts, { type }), type.includes("ogg") ? "recording.ogg" : "recording.webm");
    };
    state.recorder = recorder;
    recorder.start();
    button.textContent = "Stop and transcribe";
    button.setAttribute("aria-pressed", "true");
    $("asr-status").textContent = "Recording…";
  }

  function generateImage() {
    return runTask("img", async () => {
      const body = { model: $("img-model").value, prompt: $("img-prompt").value,
        size: $("img-size").value, n: 1, response_format: "b64_json" };
      const resp = await postFor("/v1/images/generations", { headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      const out = await resp.json();
      const b64 = out.data && out.data[0] && out.data[0].b64_json;
      if (!b64) throw new HttpProblem("The server returned no image.", "http");
      const img = $("img-out");
      img.src = "data:image/png;base64," + b64;
      img.alt = "Generated from: " + body.prompt;
      img.hidden = false;
      clearBanner("img");
      return body.size;
    });
  }

  // ---------------------------------------------------------------- usage
  async function refreshUsage() {
    let body;
    try {
      body = await getJSON("/v1/usage?group_by=model&window_s=3600");
    } catch (e) {
      if (e instanceof HttpProblem) {
        $("usage-status").textContent = "Usage unavailable: " + e.message;
        if (e.kind !== "http") reportHttp(e, "usage");
        return;
      }
      throw e;
    }
    clearBanner("usage");
    $("usage-status").textContent = "Updated " + new Date().toLocaleTimeString();
    const totals = body.totals || {};
    const boxes = [
      [totals.requests ?? 0, "requests"],
      [usd(totals.cost_usd ?? 0), "spend"],
      [totals.latency_ms && totals.latency_ms.e2e && totals.latency_ms.e2e.p50 != null
        ? fmt(totals.latency_ms.e2e.p50, 0) + " ms" : "–", "p50 e2e"],
    ];
    $("usage-totals").replaceChildren(...boxes.map(([v, label]) => {
      const d = el("div"); d.append(el("b", null, String(v)), el("span", null, label)); return d;
    }));
    const tbody = $("usage-table").tBodies[0];
    const rows = (body.groups || []).map((g) => {
      const tr = el("tr");
      tr.dataset.model = g.group;
      const p50 = g.latency_ms && g.latency_ms.e2e ? g.latency_ms.e2e.p50 : null;
      tr.append(el("td", null, g.group), el("td", "num", String(g.requests)),
        el("td", "num", p50 != null ? fmt(p50, 0) + " ms" : "–"), el("td", "num", usd(g.cost_usd)));
      return tr;
    });
    if (!rows.length) {
      const tr = el("tr"); const td = el("td", "muted", "No requests in the last hour.");
      td.colSpan = 4; tr.append(td); rows.push(tr);
    }
    tbody.replaceChildren(...rows);
    state.usageHistory.push({ t: Date.now(), requests: totals.requests || 0, cost: totals.cost_usd || 0 });
    if (state.usageHistory.length > CHART_POINTS) state.usageHistory.shift();
    drawChart();
  }

  // Each refresh adds one point: the requests and spend that arrived since the previous
  // refresh (the window totals' increase), so the chart reads as live traffic.
  function drawChart() {
    const svg = $("usage-chart");
    const W = 300, H = 120, top = 10, bottom = 6;
    const hist = state.usageHistory;
    const pts = hist.map((p, i) => i === 0 ? { requests: 0, cost: 0 } : {
      requests: Math.max(0, p.requests - hist[i - 1].requests),
      cost: Math.max(0, p.cost - hist[i - 1].cost),
    });
    const ns = "http://www.w3.org/2000/svg";
    const mk = (tag, attrs) => {
      const n = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
      return n;
    };
    svg.replaceChildren();
    for (let i = 0; i <= 4; i++) {
      const y = top + ((H - top - bottom) * i) / 4;
      svg.append(mk("line", { x1: 0, x2: W, y1: y, y2: y, stroke: "#e4e7ec", "stroke-width": 1 }));
    }
    const step = W / CHART_POINTS;
    const x = (i) => W - step * (pts.length - i);
    const y = (v, max) => H - bottom - (max > 0 ? v / max : 0) * (H - top - bottom);
    const maxReq = Math.max(0, ...pts.map((p) => p.requests));
    const maxCost = Math.max(0, ...pts.map((p) => p.cost));
    pts.forEach((p, i) => {
      if (!p.requests) return;
      const h = H - bottom - y(p.requests, maxReq);
      svg.append(mk("rect", { x: (x(i) + 1).toFixed(1), y: y(p.requests, maxReq).toFixed(1),
        width: Math.max(step - 2, 1).toFixed(1), height: h.toFixed(1), fill: "#2f5bd3", opacity: 0.8 }));
    });
    if (pts.length > 1) {
      const coords = pts.map((p, i) => `${(x(i) + step / 2).toFixed(1)},${y(p.cost, maxCost).toFixed(1)}`);
      svg.append(mk("polyline", { points: coords.join(" "), fill: "none", stroke: "#c2410c",
        "stroke-width": 2, "stroke-linejoin": "round" }));
      pts.forEach((p, i) => {
        if (p.cost > 0) svg.append(mk("circle", { cx: (x(i) + step / 2).toFixed(1), cy: y(p.cost, maxCost).toFixed(1), r: 2.5, fill: "#c2410c" }));
      });
    }
    $("chart-peak").textContent = `per refresh, last ${Math.round((CHART_POINTS * USAGE_EVERY_MS) / 60000)} min · peak ${maxReq} req, ${usd(maxCost)}`;
  }

  // ---------------------------------------------------------------- wiring
  function init() {
    $("api-key").value = state.key;
    $("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      state.key = $("api-key").value.trim();
      if (state.key) sessionStorage.setItem(KEY_STORAGE, state.key);
      else sessionStorage.removeItem(KEY_STORAGE);
      clearBanner();  // the user acted on it; fresh answers will say what is still wrong
      // A fresh socket authenticates with the new key.
      if (state.ws) { const old = state.ws; state.ws = null; state.wsReady = false; old.close(); }
      for (const reply of [...state.replies.values()]) finishWithError(reply, "The socket was reopened with a new key.");
      connect();
      loadModels();
      refreshUsage();
    });
    $("composer").addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
    $("prompt").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); send(); }
    });
    $("stop").addEventListener("click", stop);
    $("tts-form").addEventListener("submit", (ev) => { ev.preventDefault(); speak(); });
    $("asr-form").addEventListener("submit", (ev) => { ev.preventDefault(); transcribeFile(); });
    $("asr-record").addEventListener("click", toggleRecording);
    $("img-form").addEventListener("submit", (ev) => { ev.preventDefault(); generateImage(); });
    $("img-model").addEventListener("change", updateImageSizes);
    $("clear").addEventListener("click", () => {
      stop();
      state.conversation = [];
      $("log").replaceChildren(el("p", "empty muted", "New conversation."));
      $("log").lastChild.id = "empty";
    });
    connect();
    loadModels().then((ok) => { if (!ok) setTimeout(function retry() { loadModels().then((again) => { if (!again) setTimeout(retry, 5000); }); }, 5000); });
    refreshUsage();
    setInterval(refreshUsage, USAGE_EVERY_MS);
    setInterval(() => { if (state.wsReady) wsSend({ type: "ping" }); }, 25000);
  }

  window.troupePlayground = { state, startReply, el };
  init();
})();
