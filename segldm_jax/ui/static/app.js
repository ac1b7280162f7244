// The painting page: a mask of class ids painted on a canvas, sent to the
// server as a greyscale PNG (255 = "don't care"); results come back as PNGs.
// Plain browser JavaScript, no build step: the server ships these files.
"use strict";

const IGNORE = 255;
const $ = (id) => document.getElementById(id);
const state = {
  info: null, H: 0, W: 0, ids: null, cls: 0, scale: 1,
  photo: null,       // Blob of the photo being edited
  photoIds: null,    // the photo's own labels (Uint8Array), what an edit changes
  busy: false, lastPoint: null,
};

// -- Messages ----------------------------------------------------------------

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

async function api(path, form) {
  const response = await fetch(path, form ? { method: "POST", body: form } : {});
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) {
    throw new Error((body && body.error) || `${path}: HTTP ${response.status}`);
  }
  return body;
}

// -- Greyscale PNG of the ids (exact values, unlike a canvas export) --------

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function pngChunk(type, data) {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  out.set(new TextEncoder().encode(type), 4);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

async function greyPng(ids, w, h) {
  const raw = new Uint8Array((w + 1) * h);  // each row: filter 0, then pixels
  for (let y = 0; y < h; y++) raw.set(ids.subarray(y * w, (y + 1) * w), y * (w + 1) + 1);
  const zlib = new Uint8Array(await new Response(
    new Blob([raw]).stream().pipeThrough(new CompressionStream("deflate"))).arrayBuffer());
  const header = new Uint8Array(13);
  const hv = new DataView(header.buffer);
  hv.setUint32(0, w); hv.setUint32(4, h);
  header.set([8, 0, 0, 0, 0], 8);  // 8-bit greyscale
  const signature = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]);
  return new Blob([signature, pngChunk("IHDR", header), pngChunk("IDAT", zlib),
                   pngChunk("IEND", new Uint8Array())], { type: "image/png" });
}

// -- The canvas ---------------------------------------------------------------

function colourTable(transparentIgnore) {
  const table = new Uint8ClampedArray(256 * 4);  // unknown ids: black
  for (let i = 0; i < 256; i++) table[i * 4 + 3] = 255;
  for (const c of state.info.classes) table.set([...c.rgb, 255], c.id * 4);
  table.set([0, 0, 0, transparentIgnore ? 0 : 255], IGNORE * 4);
  return table;
}

function rgba(ids, transparentIgnore) {
  const table = colourTable(transparentIgnore);
  const out = new Uint8ClampedArray(ids.length * 4);
  for (let i = 0; i < ids.length; i++) out.set(table.subarray(ids[i] * 4, ids[i] * 4 + 4), i * 4);
  return new ImageData(out, state.W, state.H);
}

function render() {
  $("mask").getContext("2d").putImageData(rgba(state.ids, true), 0, 0);
}

function newCanvas(h, w, ids) {
  const step = state.info.step_px;
  if (!(h > 0 && w > 0) || h % step || w % step) {
    throw new Error(`the canvas is ${h}x${w} (height x width); sides must be ` +
                    `multiples of ${step} for this model`);
  }
  if (h * w > state.info.max_pixels) {
    throw new Error(`the canvas is ${h}x${w} (height x width), ${h * w} pixels; ` +
                    `this server takes at most ${state.info.max_pixels}`);
  }
  Object.assign(state, { H: h, W: w, ids: ids || new Uint8Array(h * w).fill(IGNORE) });
  state.scale = Math.max(1, Math.floor(Math.min(512 / w, 512 / h)));
  const canvas = $("mask");
  canvas.width = w; canvas.height = h;
  for (const el of [canvas, $("photo")]) {
    el.style.width = `${w * state.scale}px`; el.style.height = `${h * state.scale}px`;
  }
  $("height").value = h; $("width").value = w;
  render();
}

function pixelAt(event) {
  const r = $("mask").getBoundingClientRect();
  return [Math.floor((event.clientX - r.left) / r.width * state.W),
          Math.floor((event.clientY - r.top) / r.height * state.H)];
}

// A disc of diameter `size` mask pixels around (cx, cy).
function stamp(cx, cy, value) {
  const r = Math.floor(Number($("brush-size").value) / 2);
  for (let y = Math.max(0, cy - r); y <= Math.min(state.H - 1, cy + r); y++) {
    for (let x = Math.max(0, cx - r); x <= Math.min(state.W - 1, cx + r); x++) {
      if ((x - cx) ** 2 + (y - cy) ** 2 <= r * r) state.ids[y * state.W + x] = value;
    }
  }
}

function stroke(from, to, value) {
  const n = Math.max(1, Math.ceil(Math.hypot(to[0] - from[0], to[1] - from[1])));
  for (let i = 0; i <= n; i++) {
    stamp(Math.round(from[0] + (to[0] - from[0]) * i / n),
          Math.round(from[1] + (to[1] - from[1]) * i / n), value);
  }
}

function fill(x, y, value) {
  const { W, H, ids } = state;
  const target = ids[y * W + x];
  if (target === value) return;
  const stack = [y * W + x];
  while (stack.length) {
    const p = stack.pop();
    if (ids[p] !== target) continue;
    ids[p] = value;
    const px = p % W;
    if (px > 0) stack.push(p - 1);
    if (px < W - 1) stack.push(p + 1);
    if (p >= W) stack.push(p - W);
    if (p < W * (H - 1)) stack.push(p + W);
  }
}

function tool() { return document.querySelector("input[name=tool]:checked").value; }

function onPointer(event) {
  if (event.type === "pointerup" || event.type === "pointerleave") { state.lastPoint = null; return; }
  if (event.type === "pointermove" && !state.lastPoint) return;
  const [x, y] = pixelAt(event);
  if (x < 0 || y < 0 || x >= state.W || y >= state.H) return;
  showError("");
  const value = tool() === "eraser" ? IGNORE : state.cls;
  if (tool() === "fill") {
    if (event.type === "pointerdown") fill(x, y, value);
  } else {
    stroke(state.lastPoint || [x, y], [x, y], value);
    state.lastPoint = [x, y];
  }
  if (event.type === "pointerdown" && tool() !== "fill") $("mask").setPointerCapture(event.pointerId);
  render();
}

// -- The palette --------------------------------------------------------------

function selectClass(id) {
  state.cls = id;
  const c = state.info.classes[id];
  document.querySelector("#current-class .swatch").style.background = `rgb(${c.rgb})`;
  document.querySelector("#current-class .name").textContent = `${c.id} ${c.name}`;
  for (const li of $("palette").children) li.setAttribute("aria-selected", String(Number(li.dataset.id) === id));
}

function buildPalette() {
  const list = $("palette");
  for (const c of state.info.classes) {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    li.dataset.name = c.name.toLowerCase();
    li.setAttribute("role", "option");
    li.innerHTML = `<span class="swatch" style="background: rgb(${c.rgb})"></span>` +
                   `<span>${c.id} ${c.name}</span>`;
    li.addEventListener("click", () => selectClass(c.id));
    list.append(li);
  }
  $("class-search").addEventListener("input", (e) => {
    const q = e.target.value.trim().toLowerCase();
    for (const li of list.children) li.hidden = !!q && !li.dataset.name.includes(q) && li.dataset.id !== q;
  });
  $("class-search").addEventListener("keydown", (e) => {
    const first = [...list.children].find((li) => !li.hidden);
    if (e.key === "Enter" && first) selectClass(Number(first.dataset.id));
  });
  selectClass(0);
}

// -- Files in and out -----------------------------------------------------------

function saveBlob(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

async function colourPng(ids) {
  const canvas = document.createElement("canvas");
  canvas.width = state.W; canvas.height = state.H;
  canvas.getContext("2d").putImageData(rgba(ids, false), 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

async function uploadLabels(file) {
  const form = new FormData();
  form.append("mask", file, file.name);
  const got = await api("/api/labels", form);
  const bytes = Uint8Array.from(atob(got.ids), (ch) => ch.charCodeAt(0));
  newCanvas(got.height, got.width, bytes);
  state.photoIds = bytes.slice();  // the labels an edit starts from
  updateEditState();
}

function setPhoto(blob, ids) {
  state.photo = blob;
  if (ids) state.photoIds = ids.slice();
  const img = $("photo");
  img.onerror = () => showError(`${blob.name || "the photo"} is not an image this browser can show`);
  img.src = URL.createObjectURL(blob);
  img.hidden = !$("show-photo").checked;
  $("stage").classList.toggle("with-photo", !img.hidden);
  updateEditState();
}

function updateEditState() {
  const ready = state.photo && state.photoIds && state.photoIds.length === state.ids.length;
  $("edit-btn").disabled = !ready;
  $("edit-state").textContent = !state.photo ? "no photo" :
    !state.photoIds ? "upload the photo's label map" :
    ready ? "repaint, then Edit region" : "the photo's labels are another size than the canvas";
}

// -- Requests ------------------------------------------------------------------

function options(form) {
  for (const [key, id] of [["sampler", "sampler"], ["steps", "steps"], ["guidance_scale", "guidance"],
                           ["seed", "seed"], ["count", "count"]]) {
    form.append(key, $(id).value);
  }
  return form;
}

async function run(kind) {
  if (state.busy) {
    showError("a request is already running: wait for its images before starting another");
    return;
  }
  state.busy = true;  // before any await: a second click sees it at once
  showError("");
  const ids = state.ids.slice();
  const form = new FormData();
  form.append(kind === "edit" ? "new_labels" : "mask", await greyPng(ids, state.W, state.H), "painted.png");
  if (kind === "edit") {
    form.append("photo", state.photo, state.photo.name || "photo.png");
    form.append("labels", await greyPng(state.photoIds, state.W, state.H), "labels.png");
  }
  const started = performance.now();
  const bar = $("progress");
  bar.hidden = false; bar.removeAttribute("value");
  let finished = false;  // a status answer that arrives later is stale
  const poll = setInterval(async () => {
    let s = null;
    try { s = await api("/api/status"); } catch (e) { return; }
    if (finished) return;
    const secs = ((performance.now() - started) / 1000).toFixed(1);
    const job = s.running;
    if (job && job.total > 1) { bar.max = job.total; bar.value = job.done; }
    $("progress-text").textContent = job ?
      `${kind}: ${job.kind} ${job.done}/${job.total} on the server, ${secs} s` +
      (s.waiting ? `, ${s.waiting} waiting` : "") : `${kind}: ${secs} s`;
  }, 250);
  try {
    const got = await api(`/api/${kind}`, options(form));
    showResults(got, ids, kind);
    showError("");
    $("progress-text").textContent = `${got.images.length} image(s) in ${got.seconds.toFixed(1)} s`;
  } catch (e) {
    showError(e.message);
    $("progress-text").textContent = "";
  } finally {
    finished = true;
    clearInterval(poll);
    bar.hidden = true;
    state.busy = false;
  }
}

function figure(src, caption, name, extra) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = src;
  // Results at half the canvas's size (at least the image's own): several
  // fit beside the mask.
  const scale = Math.max(1, state.scale / 2);
  img.style.width = `${state.W * scale}px`;
  img.style.height = `${state.H * scale}px`;
  const cap = document.createElement("figcaption");
  cap.textContent = caption + " ";
  const a = document.createElement("a");
  a.href = src; a.download = name; a.textContent = "download";
  cap.append(a);
  if (extra) cap.append(extra);
  fig.append(img, cap);
  return [fig, img];
}

function showResults(got, ids, kind) {
  const box = $("results");
  box.replaceChildren();
  box.append(figure(got.mask_colour, "mask", "mask_colour.png")[0]);
  got.images.forEach((src, k) => {
    const edit = document.createElement("button");
    edit.type = "button"; edit.textContent = "Edit this";
    edit.addEventListener("click", async () => {
      setPhoto(await (await fetch(src)).blob(), ids);
    });
    const [fig, img] = figure(src, `${kind} ${k} (seed ${got.options.seed})`,
                              `${kind}_seed${got.options.seed}_${k}.png`, edit);
    img.classList.add("sample");
    box.append(fig);
  });
}

// The steps field offers what the chosen sampler runs (the server's own
// limits: /api/info), so the form and sample.py say the same range.
function updateSteps() {
  const limits = state.info.steps[$("sampler").value];
  const ranges = limits.ranges;
  $("steps").min = ranges[0][0];
  $("steps").max = ranges[ranges.length - 1][1];
  $("steps").title = `${$("sampler").value} takes ${limits.text} steps`;
}

// -- Start ---------------------------------------------------------------------

function guard(fn) {
  return async (...args) => {
    if (!state.busy) showError("");  // a new action; a busy message stays
    try { await fn(...args); } catch (e) { showError(e.message); }
  };
}

async function start() {
  const info = state.info = await api("/api/info");
  $("model").textContent = `${info.workdir}, step ${info.step}: ${info.classes.length} classes, ` +
                           `sides in multiples of ${info.step_px} px`;
  for (const s of info.samplers) $("sampler").append(new Option(s, s));
  $("sampler").value = info.defaults.sampler;
  $("sampler").addEventListener("change", updateSteps);
  updateSteps();
  $("steps").value = info.defaults.steps;
  $("guidance").value = info.defaults.guidance_scale;
  $("guidance").max = info.max_guidance;
  $("count").max = info.max_count;
  for (const id of ["height", "width"]) $(id).step = info.step_px;
  $("brush-size").value = Math.max(1, Math.round(info.width / 12));
  $("brush-size-out").value = $("brush-size").value;
  buildPalette();
  newCanvas(info.height, info.width);

  const canvas = $("mask");
  for (const type of ["pointerdown", "pointermove", "pointerup", "pointerleave"]) {
    canvas.addEventListener(type, onPointer);
  }
  $("brush-size").addEventListener("input", (e) => { $("brush-size-out").value = e.target.value; });
  $("resize").addEventListener("click", guard(() => {
    newCanvas(Number($("height").value), Number($("width").value));
    updateEditState();
  }));
  $("clear").addEventListener("click", () => { state.ids.fill(IGNORE); render(); });
  $("download-ids").addEventListener("click", guard(async (e) => {
    e.preventDefault();
    saveBlob(await greyPng(state.ids, state.W, state.H), "mask_ids.png");
  }));
  $("download-colour").addEventListener("click", guard(async (e) => {
    e.preventDefault();
    saveBlob(await colourPng(state.ids), "mask_colour.png");
  }));
  $("upload-labels").addEventListener("change", guard(async (e) => {
    if (e.target.files[0]) await uploadLabels(e.target.files[0]);
    e.target.value = "";
  }));
  $("upload-photo").addEventListener("change", (e) => {
    if (!e.target.files[0]) return;
    setPhoto(e.target.files[0], state.photoIds || state.ids);
    e.target.value = "";
  });
  $("show-photo").addEventListener("change", () => {
    $("photo").hidden = !$("show-photo").checked || !state.photo;
    $("stage").classList.toggle("with-photo", !$("photo").hidden);
  });
  $("generate-btn").addEventListener("click", guard(() => run("generate")));
  $("edit-btn").addEventListener("click", guard(() => run("edit")));
  document.body.dataset.ready = "true";  // for tests and scripts
}

guard(start)();
