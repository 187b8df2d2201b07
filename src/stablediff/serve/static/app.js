// The stablediff web page: a form over the native API (/api), live progress read from the job's
// Server-Sent Events, a gallery of past jobs. Whatever comes from the server or the user is put
// into the page with textContent, value or createElement, never parsed as HTML.

const $ = (id) => document.getElementById(id);

const KEY_STORE = "stablediff.apiKey";
const PAGE_SIZE = 12; // jobs per gallery page
// Form controls carry the ids of the JobRequest fields they edit.
const CHOICE_FIELDS = ["sampler", "schedule"];
const NUMBER_FIELDS = ["steps", "guidance_scale", "width", "height", "seed", "batch_size", "clip_skip",
  "guidance_rescale", "strength"];
// What "use these parameters" and a dropped PNG fill in (the batch size stays the user's).
const FILLED = ["prompt", "negative_prompt", ...CHOICE_FIELDS, ...NUMBER_FIELDS.filter((f) => f !== "batch_size")];
const MASK_COLOUR = "#ff2d78"; // shown translucent over the init image; exported as white

const state = {
  running: null, // the job being followed
  lastJob: null, // the last finished job of this page (for "reuse last seed")
  offset: 0,
  defaultSize: null,
  init: null, // the init image (a Blob) for img2img and inpainting
  initUrl: null,
  details: null, // {job, k} shown in the details dialog
  erasing: false,
  labels: new Map(), // sampler and schedule names -> A1111's labels
};

// ---- talking to the server -----------------------------------------------------------------

class ApiError extends Error {}

// fetch() with the API key (when one is entered); a non-2xx answer throws its `detail` as text.
async function api(path, { method = "GET", json, form } = {}) {
  const headers = {};
  const key = $("api-key").value.trim();
  if (key) headers["X-API-Key"] = key;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body });
  } catch (err) {
    throw new ApiError(`cannot reach the server (${err.message})`);
  }
  if (!response.ok) {
    let data = null;
    try {
      data = await response.json();
    } catch {
      // not JSON: the status says enough
    }
    if (response.status === 401) $("key-field").hidden = false;
    throw new ApiError(errorText(response.status, data));
  }
  return response;
}

async function apiJson(path, options) {
  return (await api(path, options)).json();
}

// FastAPI's validation errors carry a list of {loc, msg}; ours a string.
function errorText(status, data) {
  const detail = data && data.detail;
  let text = "request failed";
  if (Array.isArray(detail)) {
    text = detail.map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".")}: ${e.msg}`).join("; ");
  } else if (typeof detail === "string") {
    text = detail;
  }
  if (status === 401) text = `enter the server's key in the API key field (${text})`;
  return `Error ${status}: ${text}`;
}

// Server-Sent Events read from a fetch() body (EventSource cannot send the key header).
async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

// Images need the key too, so they are fetched and shown as blob: URLs (kept: images never change).
const images = new Map(); // path -> Promise<{blob, url}>

function fetchImage(path) {
  if (!images.has(path)) {
    const entry = api(path)
      .then((r) => r.blob())
      .then((blob) => ({ blob, url: URL.createObjectURL(blob) }));
    entry.catch(() => images.delete(path));
    images.set(path, entry);
    if (images.size > 300) {
      const [oldest, promise] = images.entries().next().value;
      images.delete(oldest);
      promise.then((e) => URL.revokeObjectURL(e.url), () => {});
    }
  }
  return images.get(path);
}

function showImage(img, path) {
  fetchImage(path).then((e) => (img.src = e.url), showError);
}

// ---- messages -------------------------------------------------------------------------------

function showMessage(text, kind = "error") {
  $("message-text").textContent = text;
  $("message").className = kind;
  $("message").hidden = false;
}

function showError(err) {
  showMessage(err instanceof Error ? err.message : String(err), "error");
}

function clearMessage() {
  $("message").hidden = true;
}

// ---- the form -------------------------------------------------------------------------------

function option(value, label) {
  const el = document.createElement("option");
  el.value = value;
  el.textContent = label;
  return el;
}

function fillSelect(select, entries) {
  const keep = select.value;
  select.replaceChildren(...entries.map((e) => option(e.name, e.label))); // A1111's labels, native values
  if (entries.some((e) => e.name === keep)) select.value = keep;
}

async function loadOptions() {
  const data = await apiJson("/api/options");
  const first = !$("sampler").options.length;
  fillSelect($("sampler"), data.samplers);
  fillSelect($("schedule"), data.schedules);
  for (const e of [...data.samplers, ...data.schedules]) state.labels.set(e.name, e.label);
  if (first) {
    for (const [name, value] of Object.entries(data.defaults)) {
      const el = $(name);
      // selects and sliders always hold some value: take the server's default for them
      if (el && (el.tagName === "SELECT" || el.type === "range" || el.value === "")) el.value = String(value);
    }
    if ($("seed").value === "") $("seed").value = "-1";
  }
  // A new model brings its own size, unless the user chose another one.
  for (const name of ["width", "height"]) {
    const el = $(name);
    if (el.value === "" || Number(el.value) === state.defaultSize) el.value = String(data.default_size);
  }
  state.defaultSize = data.default_size;
  $("strength-value").textContent = $("strength").value;
}

async function loadModels() {
  const data = await apiJson("/api/models");
  const select = $("model");
  select.replaceChildren(...data.models.map((m) => option(m.name, m.name)));
  select.value = select.dataset.current = data.current;
}

async function switchModel() {
  const select = $("model");
  select.disabled = true;
  showMessage(`Loading ${select.value}…`, "info");
  try {
    await apiJson("/api/models", { method: "POST", json: { name: select.value } });
    await loadModels();
    await loadOptions();
    clearMessage();
  } catch (err) {
    select.value = select.dataset.current; // the server kept its model
    showError(err);
  } finally {
    select.disabled = false;
  }
}

function readForm() {
  const params = { prompt: $("prompt").value, negative_prompt: $("negative_prompt").value };
  for (const name of CHOICE_FIELDS) if ($(name).value) params[name] = $(name).value;
  for (const name of NUMBER_FIELDS) {
    const raw = $(name).value.trim();
    if (raw !== "") params[name] = Number(raw); // empty: the server's default (e.g. the model's size)
  }
  return params;
}

function fillForm(params) {
  const unknown = [];
  for (const name of FILLED) {
    const value = params[name];
    if (value === undefined || value === null) continue;
    const el = $(name);
    if (el.tagName === "SELECT" && ![...el.options].some((o) => o.value === String(value))) {
      unknown.push(`${name} ${value}`);
      continue;
    }
    el.value = String(value);
  }
  $("strength-value").textContent = $("strength").value;
  return unknown;
}

// ---- generating -----------------------------------------------------------------------------

async function generate() {
  if (state.running) return;
  clearMessage();
  const params = readForm();
  setRunning(true);
  try {
    let job;
    if (state.init) {
      const form = new FormData();
      form.append("params", JSON.stringify(params));
      form.append("init_image", state.init, state.init.name || "init.png");
      const mask = await maskBlob();
      if (mask) form.append("mask", mask, "mask.png");
      job = await apiJson("/api/jobs/multipart", { method: "POST", form });
    } else {
      job = await apiJson("/api/jobs", { method: "POST", json: params });
    }
    state.running = job;
    await follow(job);
  } catch (err) {
    showError(err);
    $("progress-text").textContent = "Ready";
  } finally {
    state.running = null;
    setRunning(false);
  }
}

function setRunning(running) {
  $("generate").disabled = running;
  $("cancel").disabled = !running;
  if (running) {
    $("progress").value = 0;
    $("progress-text").textContent = "Sending…";
  }
}

async function follow(job) {
  const id = encodeURIComponent(job.id);
  let final = null;
  for await (const { event, data } of readEvents(await api(`/api/jobs/${id}/events`))) {
    if (event === "progress") showProgress(data);
    else if (event === "done") final = data;
  }
  finish(final || (await apiJson(`/api/jobs/${id}`))); // the stream ended early: ask once
}

function showProgress(data) {
  const bar = $("progress");
  if (data.status === "queued" || !data.total) {
    $("progress-text").textContent = "Queued";
    return;
  }
  bar.max = data.total;
  bar.value = data.step;
  const eta = data.eta === null || data.eta === undefined ? "" : ` · ETA ${data.eta.toFixed(1)} s`;
  $("progress-text").textContent = `Step ${data.step}/${data.total}${eta}`;
  if (typeof data.preview === "string" && data.preview.startsWith("data:image/png;base64,")) {
    let img = $("images").querySelector("img.preview");
    if (!img) {
      img = document.createElement("img");
      img.className = "preview";
      img.alt = "preview";
      img.addEventListener("load", markSmall);
      $("images").replaceChildren(img);
    }
    img.src = data.preview;
  }
}

function finish(job) {
  const seconds = job.finished && job.started ? ` in ${(job.finished - job.started).toFixed(1)} s` : "";
  if (job.status === "done") {
    state.lastJob = job;
    $("progress").value = $("progress").max;
    $("progress-text").textContent = `Done: ${job.images.length} image(s)${seconds}`;
    $("images").replaceChildren(...job.images.map((_, k) => thumb(job, k, "result")));
    loadGallery(0).catch(showError);
  } else if (job.status === "cancelled") {
    $("progress-text").textContent = "Cancelled";
  } else {
    $("progress-text").textContent = `Job ${job.status}`;
    showMessage(`The job ${job.status}: ${job.error || "no reason given"}`);
  }
}

async function cancel() {
  if (!state.running) return;
  try {
    await apiJson(`/api/jobs/${encodeURIComponent(state.running.id)}/cancel`, { method: "POST" });
    $("progress-text").textContent = "Cancelling…";
  } catch (err) {
    showError(err);
  }
}

// ---- gallery and details --------------------------------------------------------------------

function markSmall(event) {
  // Small images (e.g. 64 x 64) look better enlarged pixel by pixel than blurred.
  event.target.classList.toggle("small", event.target.naturalWidth <= 128);
}

function thumb(job, k, className = "thumb") {
  const button = document.createElement("button");
  button.type = "button";
  button.className = className;
  button.title = job.params.prompt;
  const img = document.createElement("img");
  img.alt = job.params.prompt;
  img.addEventListener("load", markSmall);
  showImage(img, job.images[k]);
  button.append(img);
  button.addEventListener("click", () => showDetails(job, k));
  return button;
}

async function loadGallery(offset = state.offset) {
  const data = await apiJson(`/api/jobs?offset=${offset}&limit=${PAGE_SIZE}`);
  state.offset = offset;
  const tiles = data.jobs.flatMap((job) => job.images.map((_, k) => thumb(job, k)));
  if (!tiles.length) {
    const empty = document.createElement("p");
    empty.className = "hint";
    empty.textContent = "No images yet.";
    tiles.push(empty);
  }
  $("gallery").replaceChildren(...tiles);
  const pages = Math.max(1, Math.ceil(data.total / PAGE_SIZE));
  $("page-info").textContent = `${Math.floor(offset / PAGE_SIZE) + 1} / ${pages}`;
  $("newer").disabled = offset === 0;
  $("older").disabled = offset + PAGE_SIZE >= data.total;
}

// The parameters as text, in the spirit of A1111's infotext (image k of a batch has seed + k).
function paramsText(job, k) {
  const p = job.params;
  const lines = [p.prompt];
  if (p.negative_prompt) lines.push(`Negative prompt: ${p.negative_prompt}`);
  const items = [
    ["Steps", p.steps],
    ["Sampler", state.labels.get(p.sampler) || p.sampler],
    ["Schedule", state.labels.get(p.schedule) || p.schedule],
    ["CFG scale", p.guidance_scale],
    ["Seed", p.seed + k],
    ["Size", `${p.width}x${p.height}`],
    ["Model", job.model],
  ];
  if (p.clip_skip > 1) items.push(["Clip skip", p.clip_skip]);
  if (p.guidance_rescale) items.push(["CFG rescale", p.guidance_rescale]);
  if (p.init_image) items.push(["Mode", p.mask ? "inpainting" : "img2img"], ["Strength", p.strength]);
  lines.push(items.map(([name, value]) => `${name}: ${value}`).join(", "));
  return lines.join("\n");
}

function showDetails(job, k) {
  state.details = { job, k };
  const img = $("details-image");
  img.removeAttribute("src");
  img.alt = job.params.prompt;
  showImage(img, job.images[k]);
  $("download").removeAttribute("href"); // not the previous image's while this one loads
  fetchImage(job.images[k]).then((e) => ($("download").href = e.url), () => {});
  $("download").download = `${job.id}-${k}.png`;
  $("details-text").textContent = paramsText(job, k);
  $("details").showModal();
}

function useParams() {
  const { job, k } = state.details;
  fillForm({ ...job.params, seed: job.params.seed + k });
  $("details").close();
  $("prompt").focus();
}

async function useAsInit() {
  const { job, k } = state.details;
  try {
    setInit((await fetchImage(job.images[k])).blob);
    $("details").close();
    $("init-zone").scrollIntoView({ block: "nearest" });
  } catch (err) {
    showError(err);
  }
}

// ---- PNG info -------------------------------------------------------------------------------

async function readPngInfo(file) {
  const form = new FormData();
  form.append("image", file, file.name || "image.png");
  try {
    const info = await apiJson("/api/png-info", { method: "POST", form });
    if (!info.params) throw new ApiError(`${file.name || "the image"}: no generation parameters found in it`);
    const unknown = fillForm(info.params);
    const note = unknown.length ? ` (not available here: ${unknown.join(", ")})` : "";
    showMessage(`Parameters read from ${file.name || "the image"}${note}`, "info");
  } catch (err) {
    showError(err);
  }
}

// ---- init image and mask --------------------------------------------------------------------

const mask = $("mask");
const maskContext = mask.getContext("2d");

function setInit(blob) {
  state.init = blob;
  if (state.initUrl) URL.revokeObjectURL(state.initUrl);
  state.initUrl = URL.createObjectURL(blob);
  $("init-image").src = state.initUrl;
  $("init-area").hidden = false;
}

function removeInit() {
  state.init = null;
  if (state.initUrl) URL.revokeObjectURL(state.initUrl);
  state.initUrl = null;
  $("init-image").removeAttribute("src");
  $("init-area").hidden = true;
}

function initLoaded() {
  // The mask has the init image's own size in pixels, whatever size it is shown at.
  const img = $("init-image");
  mask.width = img.naturalWidth;
  mask.height = img.naturalHeight;
  img.classList.toggle("small", img.naturalWidth <= 128);
}

function canvasPoint(event) {
  const rect = mask.getBoundingClientRect();
  const scale = mask.width / rect.width;
  return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * scale, scale };
}

function paint(from, to) {
  const c = maskContext;
  c.globalCompositeOperation = state.erasing ? "destination-out" : "source-over";
  c.strokeStyle = c.fillStyle = MASK_COLOUR;
  c.lineWidth = Number($("brush").value) * to.scale; // the brush is in screen pixels
  c.lineCap = c.lineJoin = "round";
  c.beginPath();
  if (from === to) {
    c.arc(to.x, to.y, c.lineWidth / 2, 0, 2 * Math.PI);
    c.fill();
  } else {
    c.moveTo(from.x, from.y);
    c.lineTo(to.x, to.y);
    c.stroke();
  }
}

let lastPoint = null;

function setUpPainting() {
  mask.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    mask.setPointerCapture(event.pointerId);
    lastPoint = canvasPoint(event);
    paint(lastPoint, lastPoint);
  });
  mask.addEventListener("pointermove", (event) => {
    if (!lastPoint) return;
    const point = canvasPoint(event);
    paint(lastPoint, point);
    lastPoint = point;
  });
  for (const name of ["pointerup", "pointercancel"]) mask.addEventListener(name, () => (lastPoint = null));
}

// The mask as the API wants it: a PNG of the init image's size, white = repaint, black = keep;
// null when nothing is painted (then the job is plain img2img).
async function maskBlob() {
  const { width, height } = mask;
  const alpha = maskContext.getImageData(0, 0, width, height).data;
  let painted = false;
  for (let i = 3; i < alpha.length && !painted; i += 4) painted = alpha[i] > 0;
  if (!painted) return null;
  const out = document.createElement("canvas");
  out.width = width;
  out.height = height;
  const c = out.getContext("2d");
  c.drawImage(mask, 0, 0);
  c.globalCompositeOperation = "source-in"; // the painted pixels become white
  c.fillStyle = "#fff";
  c.fillRect(0, 0, width, height);
  c.globalCompositeOperation = "destination-over"; // the rest black
  c.fillStyle = "#000";
  c.fillRect(0, 0, width, height);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

// ---- drag and drop --------------------------------------------------------------------------

function setUpDrop() {
  const hasFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
  let depth = 0; // dragenter/dragleave fire for every child element
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth += 1;
    $("drop-hint").hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) $("drop-hint").hidden = true;
  });
  document.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault(); // allows the drop
  });
  document.addEventListener("drop", (event) => {
    depth = 0;
    $("drop-hint").hidden = true;
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (!file) return;
    event.preventDefault(); // the browser would open the file instead
    if ($("init-zone").contains(event.target)) setInit(file);
    else readPngInfo(file);
  });
}

// ---- start ----------------------------------------------------------------------------------

async function load() {
  try {
    await Promise.all([loadOptions(), loadModels(), loadGallery(0)]);
  } catch (err) {
    showError(err);
  }
}

function setUp() {
  const key = localStorage.getItem(KEY_STORE) || "";
  $("api-key").value = key;
  $("key-field").hidden = !key;
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, $("api-key").value.trim());
    clearMessage();
    load();
  });

  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  for (const id of ["prompt", "negative_prompt"]) {
    $(id).addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        generate();
      }
    });
  }
  $("cancel").addEventListener("click", cancel);
  $("model").addEventListener("change", switchModel);
  $("seed-random").addEventListener("click", () => ($("seed").value = "-1"));
  $("seed-reuse").addEventListener("click", () => {
    const job = state.lastJob || (state.details && state.details.job);
    if (job) $("seed").value = String(job.params.seed);
    else showMessage("No image yet whose seed could be reused", "info");
  });
  $("strength").addEventListener("input", () => ($("strength-value").textContent = $("strength").value));

  $("newer").addEventListener("click", () => loadGallery(Math.max(0, state.offset - PAGE_SIZE)).catch(showError));
  $("older").addEventListener("click", () => loadGallery(state.offset + PAGE_SIZE).catch(showError));
  $("refresh").addEventListener("click", () => loadGallery().catch(showError));
  $("use-params").addEventListener("click", useParams);
  $("use-init").addEventListener("click", useAsInit);
  $("details-close").addEventListener("click", () => $("details").close());
  $("details").addEventListener("click", (event) => {
    if (event.target === $("details")) $("details").close(); // a click on the backdrop
  });
  $("message-close").addEventListener("click", clearMessage);

  $("png-file").addEventListener("change", (event) => {
    if (event.target.files[0]) readPngInfo(event.target.files[0]);
    event.target.value = ""; // the same file again fires change again
  });
  $("init-file").addEventListener("change", (event) => {
    if (event.target.files[0]) setInit(event.target.files[0]);
    event.target.value = "";
  });
  $("init-image").addEventListener("load", initLoaded);
  $("details-image").addEventListener("load", markSmall);
  $("init-image").addEventListener("error", () => {
    if (!state.init) return;
    removeInit();
    showMessage("The init image cannot be read by this browser (PNG, JPEG, WebP, BMP or GIF)");
  });
  $("init-remove").addEventListener("click", removeInit);
  $("mask-clear").addEventListener("click", () => maskContext.clearRect(0, 0, mask.width, mask.height));
  $("mask-mode").addEventListener("click", () => {
    state.erasing = !state.erasing;
    $("mask-mode").setAttribute("aria-pressed", String(state.erasing));
  });
  setUpPainting();
  setUpDrop();
  load();
}

setUp();
