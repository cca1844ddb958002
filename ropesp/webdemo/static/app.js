// ropesp demo page: one WebSocket; JSON messages for control and figures, binary messages for frames
// (12-byte header: uint32 stream id, chunk index, frame index, little-endian; then a JPEG).
// Frames are painted on the video's own clock (16 FPS by their frame index); a stream slower than that
// is shown as its frames arrive (the clock restarts at a late frame).
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const ui = {
  canvas: $("screen"), status: $("status"), prompt: $("prompt"), seed: $("seed"),
  start: $("start"), apply: $("apply"), stop: $("stop"), ttff: $("ttff"), fps: $("fps"),
  genfps: $("genfps"), chunk: $("chunk"), frame: $("frame"), active: $("active-prompt"), model: $("model"),
};
const ctx = ui.canvas.getContext("2d");
const FPS_WINDOW_MS = 4000;

let ws = null;
let fps = 16;
let streamId = null; // the stream whose frames this page shows
let running = false;
let autostarted = false;
let queue = []; // decoded frames waiting for their time: {frame, chunk, bitmap}
let decoding = Promise.resolve(); // decodes in arrival order
let chunkPrompt = new Map(); // chunk index -> prompt it was generated with
let startClick = null; // performance.now() of the start request
let anchor = null; // {t, frame}: the video clock
let paints = []; // paint times in the last FPS_WINDOW_MS
let shownPrompt = null;

// Figures the page shows, also kept as numbers (read by the browser test).
const stats = (window.demoStats = {
  ttffMs: null, onScreenFps: null, meanOnScreenFps: null, genFps: null, painted: 0, dropped: 0,
  chunk: null, frame: null, promptSwitches: [], firstPaint: null, lastPaint: null, busy: false, state: "connecting",
});

function setStatus(text, kind = "") {
  ui.status.textContent = text;
  ui.status.className = "status " + kind;
  stats.state = kind || text;
}

function setRunning(on) {
  running = on;
  ui.start.disabled = on;
  ui.stop.disabled = !on;
  ui.apply.disabled = !on;
}

function send(message) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
}

function start() {
  const seed = Number.parseInt(ui.seed.value || "0", 10);
  resetView();
  startClick = performance.now();
  send({ type: "start", prompt: ui.prompt.value, seed: Number.isFinite(seed) ? seed : 0 });
  setStatus("starting…");
}

function resetView() {
  for (const f of queue) f.bitmap.close();
  queue = [];
  chunkPrompt = new Map();
  anchor = null;
  paints = [];
  shownPrompt = null;
  Object.assign(stats, {
    ttffMs: null, onScreenFps: null, meanOnScreenFps: null, genFps: null, painted: 0, dropped: 0,
    chunk: null, frame: null, promptSwitches: [], firstPaint: null, lastPaint: null,
  });
  for (const el of [ui.ttff, ui.fps, ui.genfps, ui.chunk, ui.frame]) el.textContent = "–";
}

function onJson(m) {
  switch (m.type) {
    case "hello":
      fps = m.fps;
      document.title = m.title;
      $("title").textContent = m.title;
      ui.model.textContent = m.model;
      $("prompt-note").textContent = m.prompts;
      if (!ui.prompt.value) ui.prompt.value = params.get("prompt") || m.default_prompt;
      if (params.has("seed")) ui.seed.value = params.get("seed");
      showExamples(m.examples || []);
      if (m.busy) busy(`busy: ${m.streams} of ${m.max_streams} streams running; this page is told when one ends`);
      else setStatus("ready");
      if (params.get("autostart") === "1" && !autostarted) {
        autostarted = true;
        start();
      }
      break;
    case "started":
      streamId = m.stream;
      stats.busy = false;
      setRunning(true);
      setStatus(`streaming (seed ${m.seed})`);
      break;
    case "chunk":
      if (m.stream !== streamId) break;
      chunkPrompt.set(m.index, m.prompt);
      stats.genFps = m.gen_fps;
      if (m.gen_fps) ui.genfps.textContent = `${m.gen_fps.toFixed(1)} (chunk ${m.index}: ${m.gen_ms.toFixed(0)} ms)`;
      break;
    case "prompt_queued":
      setStatus(`prompt change queued: “${m.prompt}” (next chunk)`);
      break;
    case "busy":
      busy(m.message);
      break;
    case "free":
      stats.busy = false;
      if (!running) setStatus("ready (a stream ended: press Start)");
      break;
    case "stopped":
      if (m.stream !== streamId) break;
      setRunning(false);
      if (m.reason !== "error" && m.reason !== "busy") { // an error's or a refusal's message stays on screen
        setStatus(`${m.reason}: ${m.frames} frames` + (m.gen_fps ? `, generated at ${m.gen_fps.toFixed(1)} FPS` : ""));
      }
      stats.state = m.reason;
      break;
    case "error":
      setStatus(`error: ${m.message}`, "error");
      break;
  }
}

function showExamples(examples) {
  const list = $("examples");
  list.replaceChildren();
  for (const text of examples) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "example";
    b.textContent = text;
    b.title = running ? "switch the running stream to this prompt" : "use this prompt";
    b.addEventListener("click", () => {
      ui.prompt.value = text;
      if (running) send({ type: "prompt", prompt: text });
    });
    list.append(b);
  }
  $("examples-box").hidden = examples.length === 0;
}

function busy(message) {
  stats.busy = true;
  if (!running) setRunning(false);
  setStatus(message, "busy");
}

function onFrame(buffer) {
  const view = new DataView(buffer);
  const sid = view.getUint32(0, true);
  if (sid !== streamId) return;
  const chunk = view.getUint32(4, true);
  const frame = view.getUint32(8, true);
  if (document.hidden) {
    stats.dropped += 1; // a hidden page paints nothing: do not decode or queue what it cannot show
    return;
  }
  const blob = new Blob([new Uint8Array(buffer, 12)], { type: "image/jpeg" });
  decoding = decoding
    .then(() => createImageBitmap(blob))
    .then((bitmap) => {
      if (sid === streamId) queue.push({ frame, chunk, bitmap });
      else bitmap.close();
    })
    .catch((err) => setStatus(`error: cannot decode frame ${frame}: ${err}`, "error"));
}

function dueAt(frame) {
  return anchor.t + ((frame - anchor.frame) * 1000) / fps;
}

function paint(f, now) {
  if (ui.canvas.width !== f.bitmap.width || ui.canvas.height !== f.bitmap.height) {
    ui.canvas.width = f.bitmap.width;
    ui.canvas.height = f.bitmap.height;
    ui.canvas.style.aspectRatio = `${f.bitmap.width} / ${f.bitmap.height}`;
  }
  ctx.drawImage(f.bitmap, 0, 0);
  f.bitmap.close();
  stats.painted += 1;
  stats.chunk = f.chunk;
  stats.frame = f.frame;
  if (stats.firstPaint === null) {
    stats.firstPaint = now;
    stats.ttffMs = now - startClick;
    ui.ttff.textContent = `${stats.ttffMs.toFixed(0)} ms`;
  }
  stats.lastPaint = now;
  paints.push(now);
  while (paints.length && paints[0] < now - FPS_WINDOW_MS) paints.shift();
  const span = (paints[paints.length - 1] - paints[0]) / 1000;
  if (span > 0.5) {
    stats.onScreenFps = (paints.length - 1) / span;
    ui.fps.textContent = stats.onScreenFps.toFixed(1);
  }
  const total = (now - stats.firstPaint) / 1000;
  if (total > 0) stats.meanOnScreenFps = (stats.painted - 1) / total;
  ui.chunk.textContent = String(f.chunk);
  ui.frame.textContent = String(f.frame);
  const prompt = chunkPrompt.get(f.chunk);
  if (prompt !== undefined && prompt !== shownPrompt) {
    if (shownPrompt !== null) {
      stats.promptSwitches.push({ prompt, chunk: f.chunk, frame: f.frame });
      setStatus(`streaming: prompt switched at chunk ${f.chunk}`);
    }
    shownPrompt = prompt;
    ui.active.textContent = `${prompt} (since chunk ${f.chunk})`;
  }
}

function tick(now) {
  requestAnimationFrame(tick);
  if (!queue.length) return;
  const period = 1000 / fps;
  if (anchor === null || dueAt(queue[0].frame) < now - period) {
    anchor = { t: now, frame: queue[0].frame }; // first frame, or late: the stream is slower than 16 FPS
  }
  if (dueAt(queue[0].frame) > now) return;
  let f = queue.shift();
  while (queue.length && dueAt(queue[0].frame) <= now) {
    f.bitmap.close(); // several due at once (a throttled tab): show the newest
    stats.dropped += 1;
    f = queue.shift();
  }
  paint(f, now);
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  ws = new WebSocket(scheme + location.host + "/ws");
  ws.binaryType = "arraybuffer";
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onJson(JSON.parse(ev.data)) : onFrame(ev.data));
  ws.onclose = () => {
    setRunning(false);
    ui.start.disabled = true;
    setStatus("disconnected from the server (reload the page to reconnect)", "error");
  };
}

ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", () => send({ type: "stop" }));
ui.apply.addEventListener("click", () => send({ type: "prompt", prompt: ui.prompt.value }));
ui.prompt.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    if (running) send({ type: "prompt", prompt: ui.prompt.value });
    else start();
  }
});
document.addEventListener("visibilitychange", () => {
  anchor = null; // shown again: the video clock restarts at the next frame
});
requestAnimationFrame(tick);
connect();
