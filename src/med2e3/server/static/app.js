"use strict";
// Med-2E3 page: upload a volume, browse its slices, ask questions, see where TG-IS looked.
// Talks only to this server's /api; the token (if any) comes once from ?token= (or from the token form)
// and stays in sessionStorage, so a reload keeps working.

const $ = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";
const THUMB_HALF = 8; // half the range thumb's width: slice k sits at THUMB_HALF + k / (D - 1) * (width - 2 * THUMB_HALF)
const MAX_CACHED_SLICES = 256;

const state = {
  token: null,
  info: null,
  volume: null, // {id, name, shape, spacing, n_slices, intensity, warning}
  window: "abdomen",
  k: 0,
  answerLabel: "",
  answer: null, // the answer shown: {question, answer, slice_scores, slice_ranges, top_slices}
  history: [], // earlier answers on this volume, newest first
  seq: 0,
  busy: false,
  cache: new Map(), // "id/window/k" -> object URL
};

// ---- API -------------------------------------------------------------------------------------------

function takeToken() {
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {
    sessionStorage.setItem("med2e3-token", params.get("token"));
    history.replaceState(null, "", location.pathname); // keep the token out of the address bar
  }
  state.token = sessionStorage.getItem("med2e3-token");
}

function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", "Bearer " + state.token);
  return fetch(path, { ...options, headers });
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) {
    /* not JSON */
  }
  return `${response.status} ${response.statusText}`;
}

async function postJSON(path, body) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

// ---- messages --------------------------------------------------------------------------------------

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setBusy(text) {
  state.busy = Boolean(text);
  $("busy").textContent = text || "";
  const ready = Boolean(state.volume) && !state.busy;
  $("ask").disabled = !ready;
  $("report").disabled = !ready;
  $("file").disabled = state.busy;
}

// ---- start -----------------------------------------------------------------------------------------

async function start() {
  takeToken();
  const response = await api("/api/info");
  if (response.status === 401 || response.status === 403) {
    askToken(await errorText(response));
    return;
  }
  if (!response.ok) {
    showError(await errorText(response));
    $("server-status").textContent = "not connected";
    return;
  }
  state.info = await response.json();
  state.window = state.info.default_window;
  $("model").textContent = state.info.model;
  $("server-status").textContent = "connected";
  buildWindows();
  buildExamples();
  $("file").addEventListener("change", onFile);
  $("depth").addEventListener("input", () => showSlice(Number($("depth").value)));
  $("ask").addEventListener("click", () => ask(false));
  $("report").addEventListener("click", () => ask(true));
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) ask(false);
  });
  $("chart").addEventListener("click", onChartClick);
  window.addEventListener("resize", drawChart);
  drawChart();
}

function askToken(message) {
  $("server-status").textContent = "token needed";
  showError(message);
  const form = $("token-form");
  form.hidden = false;
  $("token").focus();
  form.onsubmit = (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    sessionStorage.setItem("med2e3-token", token);
    form.hidden = true;
    showError("");
    start().catch((err) => showError(`could not start: ${err}`));
  };
}

function buildWindows() {
  const group = $("windows");
  for (const name of state.info.windows) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = name;
    button.dataset.window = name;
    button.addEventListener("click", () => {
      state.window = name;
      markWindow();
      if (state.volume) showSlice(state.k);
    });
    group.appendChild(button);
  }
  markWindow();
}

function markWindow() {
  for (const button of $("windows").children) {
    button.classList.toggle("active", button.dataset.window === state.window);
  }
}

function buildExamples() {
  const box = $("examples");
  for (const [type, questions] of Object.entries(state.info.examples)) {
    let next = 0;
    const chip = document.createElement("button");
    chip.type = "button";
    chip.textContent = type;
    chip.dataset.type = type;
    chip.title = questions.join("\n");
    chip.addEventListener("click", () => {
      $("question").value = questions[next % questions.length];
      next += 1;
      $("question").focus();
    });
    box.appendChild(chip);
  }
}

// ---- upload ----------------------------------------------------------------------------------------

async function onFile(event) {
  const file = event.target.files[0];
  if (!file) return;
  showError("");
  if (file.size > state.info.max_upload_bytes) {
    showError(`${file.name}: ${(file.size / 2 ** 20).toFixed(1)} MB is more than the ${(state.info.max_upload_bytes / 2 ** 20).toFixed(0)} MB limit`);
    return;
  }
  setBusy(`Uploading and encoding ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await api("/api/volumes", { method: "POST", body: form });
    if (!response.ok) {
      showError(await errorText(response));
      return;
    }
    const previous = state.volume;
    setVolume(await response.json());
    if (previous) api(`/api/volumes/${previous.id}`, { method: "DELETE" });
  } catch (err) {
    showError(`upload failed: ${err}`);
  } finally {
    setBusy("");
    event.target.value = "";
  }
}

function setVolume(volume) {
  state.volume = volume;
  state.answer = null;
  state.history = [];
  drawHistory();
  const [d, h, w] = volume.shape;
  const [, sh, sw] = volume.spacing;
  $("volume-info").textContent =
    `${volume.name} — ${d} × ${h} × ${w} voxels, ${volume.spacing.map((s) => s.toFixed(2)).join(" × ")} mm` +
    (volume.intensity === "unit" ? " — values in [0, 1]: CT windows show them as stored" : "") +
    (volume.warning ? ` — warning: ${volume.warning}` : "");
  $("volume-info").dataset.id = volume.id;
  const slider = $("depth");
  slider.max = String(d - 1);
  slider.disabled = false;
  const img = $("slice");
  img.style.aspectRatio = `${w * sw} / ${h * sh}`;
  img.hidden = false;
  $("viewer-empty").hidden = true;
  $("answer-box").hidden = true;
  $("chart-hint").textContent = "TG-IS slice weights appear here after a question. Click a bar to view its slices.";
  showSlice(Math.floor(d / 2));
  drawChart();
}

// ---- slices ----------------------------------------------------------------------------------------

async function showSlice(k) {
  if (!state.volume) return;
  const d = state.volume.n_slices;
  k = Math.max(0, Math.min(d - 1, k));
  state.k = k;
  $("depth").value = String(k);
  $("depth-value").textContent = `slice ${k} / ${d - 1}`;
  drawMarker();
  const seq = ++state.seq;
  const key = `${state.volume.id}/${state.window}/${k}`;
  let url = state.cache.get(key);
  if (!url) {
    const response = await api(`/api/volumes/${state.volume.id}/slices/${k}.png?window=${encodeURIComponent(state.window)}`);
    if (!response.ok) {
      if (seq === state.seq) showError(await errorText(response));
      return;
    }
    url = URL.createObjectURL(await response.blob());
    remember(key, url);
  }
  if (seq !== state.seq) return; // a later slice was asked for meanwhile
  const img = $("slice");
  img.src = url;
  img.alt = `slice ${k}, window ${state.window}`;
  img.dataset.slice = String(k);
  img.dataset.window = state.window;
}

function remember(key, url) {
  state.cache.set(key, url);
  if (state.cache.size <= MAX_CACHED_SLICES) return;
  const [oldest, oldUrl] = state.cache.entries().next().value;
  if (oldUrl !== $("slice").src) {
    state.cache.delete(oldest);
    URL.revokeObjectURL(oldUrl);
  }
}

// ---- questions -------------------------------------------------------------------------------------

async function ask(report) {
  if (!state.volume || state.busy) return;
  const question = $("question").value.trim();
  if (!report && !question) {
    showError("Type a question, or pick an example above.");
    return;
  }
  showError("");
  const path = `/api/volumes/${state.volume.id}/${report ? "report" : "ask"}/stream`;
  const body = report ? {} : { question };
  $("answer-box").hidden = false;
  $("answer-question").textContent = report ? "Report" : `Q: ${question}`;
  const text = $("answer-text");
  text.textContent = "";
  text.classList.add("streaming");
  $("top-slices").textContent = "";
  $("answer-notes").hidden = true;
  setBusy(report ? "Writing the report…" : "Thinking…");
  try {
    const response = await postJSON(path, body);
    if (!response.ok) {
      showError(await errorText(response));
      $("answer-box").hidden = true;
      return;
    }
    await readEvents(response, (kind, data) => {
      if (kind === "piece") text.textContent += data.text;
      else if (kind === "answer") {
        if (state.answer) state.history.unshift({ ...state.answer, label: state.answerLabel });
        state.answerLabel = report ? "Report" : `Q: ${question}`;
        showAnswer(data);
        drawHistory();
      }
      else if (kind === "error") showError(data.error);
    });
  } catch (err) {
    showError(`request failed: ${err}`);
  } finally {
    text.classList.remove("streaming");
    setBusy("");
  }
}

async function readEvents(response, onEvent) {
  // Server-sent events over a POST response: blocks of "event: NAME\ndata: JSON" separated by a blank line.
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      onEvent(kind, JSON.parse(data || "null"));
    }
  }
}

function showAnswer(answer) {
  state.answer = answer;
  $("answer-text").textContent = answer.answer || "(empty answer)";
  const notes = answer.notes || [];
  $("answer-notes").textContent = notes.join(" ");
  $("answer-notes").hidden = notes.length === 0;
  const box = $("top-slices");
  box.textContent = "";
  if (!answer.slice_scores) {
    box.textContent = "This model does not weight slices (slice_aggregation = none).";
    drawChart();
    return;
  }
  const label = document.createElement("span");
  label.textContent = "TG-IS top slices:";
  box.appendChild(label);
  for (const j of answer.top_slices) {
    const [s, e] = answer.slice_ranges[j];
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = `#${j} · slices ${s}${e - 1 > s ? "–" + (e - 1) : ""} · ${answer.slice_scores[j].toFixed(3)}`;
    button.addEventListener("click", () => showSlice(s));
    box.appendChild(button);
  }
  $("chart-hint").textContent = "TG-IS weight of each of the model's slices over depth (orange: top 4, dashed: uniform). Click a bar to view its slices.";
  drawChart();
  showSlice(answer.slice_ranges[answer.top_slices[0]][0]);
}

function drawHistory() {
  const list = $("history");
  list.textContent = "";
  state.history.splice(20);
  $("history-box").hidden = state.history.length === 0;
  state.history.slice(0, 8).forEach((item, i) => {
    const button = document.createElement("button");
    button.type = "button";
    const label = document.createElement("b");
    label.textContent = item.label;
    button.append(label, ` — ${item.answer || "(empty answer)"}`);
    button.title = item.answer;
    button.addEventListener("click", () => {
      state.history.splice(i, 1);
      if (state.answer) state.history.unshift({ ...state.answer, label: state.answerLabel });
      state.answerLabel = item.label;
      $("answer-question").textContent = item.label;
      showAnswer(item);
      drawHistory();
    });
    const li = document.createElement("li");
    li.appendChild(button);
    list.appendChild(li);
  });
}

// ---- TG-IS chart (aligned with the depth slider) --------------------------------------------------

function sliceX(k, width) {
  const d = state.volume ? state.volume.n_slices : 1;
  return THUMB_HALF + (d > 1 ? k / (d - 1) : 0.5) * (width - 2 * THUMB_HALF);
}

function svg(name, attrs, parent) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  if (parent) parent.appendChild(el);
  return el;
}

function drawChart() {
  const chart = $("chart");
  const width = chart.clientWidth || 500;
  const height = chart.clientHeight || 130;
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  chart.textContent = "";
  const answer = state.answer;
  const base = height - 14;
  svg("line", { x1: 0, x2: width, y1: base, y2: base, stroke: "#d9dee7" }, chart);
  if (!answer || !answer.slice_scores || !state.volume) {
    drawMarker();
    return;
  }
  const scores = answer.slice_scores;
  const n = scores.length;
  const top = new Set(answer.top_slices);
  const yMax = Math.max(...scores, 2 / n) * 1.08;
  const y = (v) => base - (v / yMax) * (base - 4);
  scores.forEach((score, j) => {
    const [s, e] = answer.slice_ranges[j];
    const x0 = sliceX(s - 0.5, width) + 0.5;
    const x1 = Math.max(x0 + 1, sliceX(e - 0.5, width) - 0.5);
    const hit = svg("rect", { class: "hit", x: x0, y: 0, width: x1 - x0, height: base, "data-j": j }, chart);
    const bar = svg("rect", { class: "bar" + (top.has(j) ? " top" : ""), x: x0, y: y(score), width: x1 - x0, height: base - y(score), "data-j": j }, chart);
    const title = `model slice ${j}: slices ${s}–${e - 1}, weight ${score.toFixed(4)}`;
    svg("title", {}, hit).textContent = title;
    svg("title", {}, bar).textContent = title;
  });
  svg("line", { class: "uniform", x1: 0, x2: width, y1: y(1 / n), y2: y(1 / n) }, chart);
  svg("text", { x: 2, y: 11 }, chart).textContent = `max ${Math.max(...scores).toFixed(3)}`;
  svg("text", { x: width - 2, y: height - 2, "text-anchor": "end" }, chart).textContent = `${n} model slices, foot → head`;
  drawMarker();
}

function drawMarker() {
  const chart = $("chart");
  for (const old of chart.querySelectorAll(".marker")) old.remove();
  for (const bar of chart.querySelectorAll(".bar.current")) bar.classList.remove("current");
  if (!state.volume) return;
  const width = chart.clientWidth || 500;
  const x = sliceX(state.k, width);
  svg("line", { class: "marker", x1: x, x2: x, y1: 0, y2: (chart.clientHeight || 130) - 14 }, chart);
  const answer = state.answer;
  if (!answer || !answer.slice_scores) return;
  const j = answer.slice_ranges.findIndex(([s, e]) => s <= state.k && state.k < e);
  const bar = chart.querySelector(`.bar[data-j="${j}"]`);
  if (bar) bar.classList.add("current");
}

function onChartClick(event) {
  const j = event.target.getAttribute && event.target.getAttribute("data-j");
  if (j === null || !state.answer) return;
  showSlice(state.answer.slice_ranges[Number(j)][0]);
}

start().catch((err) => showError(`could not start: ${err}`));
