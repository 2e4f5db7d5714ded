/* Troupe playground: the "Talk" card. The microphone streams to /v1/realtime (OpenAI's
   Realtime protocol) as 24 kHz PCM16; the server's VAD ends each turn, the spoken answer
   plays as it arrives, and speaking over it stops it (the server cancels the answer too).
   Plain JS, no dependencies; the API key (if any) goes as the subprotocol token. */
(() => {
  "use strict";
  const RATE = 24000;
  const $ = (id) => document.getElementById(id);
  const BASE = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
  const t = { ws: null, ctx: null, stream: null, node: null, playAt: 0, playing: [] };

  function say(text) { $("talk-status").textContent = text; }
  function line(who, text) {
    const p = document.createElement("p");
    p.className = "talk-line talk-" + who;
    p.textContent = (who === "you" ? "You: " : "Assistant: ") + text;
    $("talk-log").append(p);
    p.scrollIntoView({ block: "nearest" });
  }
  function b64(int16) {
    const bytes = new Uint8Array(int16.buffer);
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(s);
  }
  function play(delta) {
    const raw = atob(delta);
    const pcm = new Int16Array(raw.length >> 1);
    for (let i = 0; i < pcm.length; i++) pcm[i] = raw.charCodeAt(2 * i) | (raw.charCodeAt(2 * i + 1) << 8);
    const buf = t.ctx.createBuffer(1, pcm.length, RATE);
    const ch = buf.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
    const src = t.ctx.createBufferSource();
    src.buffer = buf;
    src.connect(t.ctx.destination);
    t.playAt = Math.max(t.playAt, t.ctx.currentTime);
    src.start(t.playAt);
    t.playAt += buf.duration;
    t.playing.push(src);
    src.onended = () => { t.playing = t.playing.filter((s) => s !== src); };
  }
  function hush() {  // barge-in: stop what is still queued to play
    t.playing.forEach((s) => { try { s.stop(); } catch (e) { /* already stopped */ } });
    t.playing = [];
    t.playAt = 0;
  }
  function onEvent(ev) {
    switch (ev.type) {
      case "session.created":
        t.ws.send(JSON.stringify({ type: "session.update", session: { type: "realtime",
          output_modalities: ["audio"], audio: { input: { turn_detection: { type: "server_vad" } } } } }));
        break;
      case "session.updated": say("Listening… speak, then pause."); break;
      case "input_audio_buffer.speech_started": hush(); say("Hearing you…"); break;
      case "input_audio_buffer.speech_stopped": say("Thinking…"); break;
      case "conversation.item.input_audio_transcription.completed": line("you", ev.transcript || "(nothing heard)"); break;
      case "response.output_audio.delta": play(ev.delta); say("Speaking… (talk to interrupt)"); break;
      case "response.output_audio_transcript.done":
      case "response.output_text.done": line("assistant", ev.transcript || ev.text || ""); break;
      case "response.done": {
        const x = (ev.response && ev.response.troupe) || {};
        $("talk-ttfa").textContent = x.ttfa_ms != null ? `first audio ${Math.round(x.ttfa_ms)} ms after you stopped` : "";
        if (ev.response.status === "cancelled") say("Interrupted. Listening…");
        else say("Listening…");
        break;
      }
      case "error": say("Error: " + ((ev.error && ev.error.message) || "unknown")); break;
      default: break;
    }
  }
  async function start() {
    const key = sessionStorage.getItem("troupe.apiKey") || "";
    const model = $("model") && $("model").value;
    try {
      t.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
    } catch (e) { say("No microphone access: " + (e.message || e.name)); return; }
    t.ctx = new AudioContext({ sampleRate: RATE });
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + BASE
      + "v1/realtime" + (model ? "?model=" + encodeURIComponent(model) : "");
    t.ws = new WebSocket(url, key ? ["realtime", "openai-insecure-api-key." + key] : ["realtime"]);
    t.ws.onmessage = (m) => onEvent(JSON.parse(m.data));
    t.ws.onclose = () => { if (t.ws) stop("Disconnected."); };
    t.ws.onopen = () => {
      const source = t.ctx.createMediaStreamSource(t.stream);
      // ScriptProcessor: deprecated but needs no extra module file; 2048 frames = 85 ms.
      t.node = t.ctx.createScriptProcessor(2048, 1, 1);
      t.node.onaudioprocess = (e) => {
        if (!t.ws || t.ws.readyState !== WebSocket.OPEN) return;
        const f = e.inputBuffer.getChannelData(0);
        const pcm = new Int16Array(f.length);
        for (let i = 0; i < f.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, f[i] * 32768));
        t.ws.send(JSON.stringify({ type: "input_audio_buffer.append", audio: b64(pcm) }));
      };
      source.connect(t.node);
      t.node.connect(t.ctx.destination);
    };
    $("talk-go").textContent = "Stop talking";
    $("talk-go").setAttribute("aria-pressed", "true");
    say("Connecting…");
  }
  function stop(why) {
    const ws = t.ws;
    t.ws = null;
    if (ws) ws.close();
    hush();
    if (t.node) t.node.disconnect();
    if (t.stream) t.stream.getTracks().forEach((tr) => tr.stop());
    if (t.ctx) t.ctx.close();
    Object.assign(t, { ctx: null, stream: null, node: null });
    $("talk-go").textContent = "Start talking";
    $("talk-go").setAttribute("aria-pressed", "false");
    say(why || "Stopped.");
  }
  document.addEventListener("DOMContentLoaded", () => {
    const go = $("talk-go");
    if (!go) return;
    go.addEventListener("click", () => (t.ws ? stop() : start()));
  });
})();
