// The page for people: draw a digit, ask the pool over KServe v2 REST; submit a bulk
// job and watch it over Server-Sent Events. Plain JS, served by the API (no CDN).
"use strict";

const MODEL = "digits";
const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");
let drawing = false;

function clearCanvas() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
}
clearCanvas();

function pen() {
  ctx.strokeStyle = ctx.fillStyle = "#fff";
  ctx.lineWidth = Number($("pen").value);
  ctx.lineCap = ctx.lineJoin = "round";
}

function at(event) {
  const r = canvas.getBoundingClientRect();
  return [(event.clientX - r.left) * canvas.width / r.width, (event.clientY - r.top) * canvas.height / r.height];
}

canvas.addEventListener("pointerdown", (e) => {
  drawing = true;
  canvas.setPointerCapture(e.pointerId);
  pen();
  const [x, y] = at(e);
  ctx.beginPath();
  ctx.arc(x, y, ctx.lineWidth / 2, 0, 2 * Math.PI);
  ctx.fill();
  ctx.beginPath();
  ctx.moveTo(x, y);
});
canvas.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  const [x, y] = at(e);
  ctx.lineTo(x, y);
  ctx.stroke();
});
canvas.addEventListener("pointerup", () => { drawing = false; });
$("clear").addEventListener("click", () => { clearCanvas(); $("error").textContent = ""; });

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const token = $("token").value.trim();
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

// What a person should read for an error answer.
async function explain(response) {
  let message = response.statusText;
  try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
  const why = {
    400: "The input was refused",
    401: "The server needs a valid token (type it above)",
    404: "Not found",
    408: "The upload stalled",
    413: "The input is too large",
    503: "The pool is overloaded or unavailable; try again shortly",
    504: "No answer within the deadline; try again",
  }[response.status] || "The server answered " + response.status;
  return why + ": " + message;
}

// The drawing as the model's input, as models/train_digits.py made its data: the ink's
// bounding box scaled into a 32x32 box (as the digits' bitmaps were normalised), counted
// in 4x4 blocks into 8x8 values in [0, 1], then bilinearly upsampled to 28x28
// (align_corners=False, as torch.nn.functional.interpolate).
function modelInput() {
  const w = canvas.width, h = canvas.height;
  const pixels = ctx.getImageData(0, 0, w, h).data;
  const ink = new Float32Array(w * h);
  let x0 = w, y0 = h, x1 = -1, y1 = -1;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const v = pixels[4 * (y * w + x)] / 255;
      ink[y * w + x] = v;
      if (v > 0.2) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
    }
  }
  if (x1 < 0) return null;
  const side = Math.max(x1 - x0 + 1, y1 - y0 + 1);
  const left = (x0 + x1 + 1) / 2 - side / 2, top = (y0 + y1 + 1) / 2 - side / 2;
  // 32x32: the mean ink over each cell's share of the square box.
  const box = new Float32Array(32 * 32);
  const step = side / 32;
  for (let j = 0; j < 32; j++) {
    for (let i = 0; i < 32; i++) {
      let sum = 0, n = 0;
      const ya = top + j * step, xa = left + i * step;
      for (let y = Math.floor(ya); y < Math.ceil(ya + step); y++) {
        for (let x = Math.floor(xa); x < Math.ceil(xa + step); x++) {
          n++;
          if (x >= 0 && y >= 0 && x < w && y < h) sum += ink[y * w + x];
        }
      }
      box[j * 32 + i] = n ? sum / n : 0;
    }
  }
  const small = new Float32Array(64);
  for (let j = 0; j < 8; j++) {
    for (let i = 0; i < 8; i++) {
      let on = 0;
      for (let y = 0; y < 4; y++) for (let x = 0; x < 4; x++) on += box[(4 * j + y) * 32 + 4 * i + x] >= 0.5 ? 1 : 0;
      small[j * 8 + i] = on / 16;
    }
  }
  const out = new Array(28 * 28);
  const src = (d) => Math.max(0, (d + 0.5) * 8 / 28 - 0.5);
  for (let y = 0; y < 28; y++) {
    const sy = src(y), ya = Math.floor(sy), yb = Math.min(ya + 1, 7), fy = sy - ya;
    for (let x = 0; x < 28; x++) {
      const sx = src(x), xa = Math.floor(sx), xb = Math.min(xa + 1, 7), fx = sx - xa;
      const top_ = small[ya * 8 + xa] * (1 - fx) + small[ya * 8 + xb] * fx;
      const bottom = small[yb * 8 + xa] * (1 - fx) + small[yb * 8 + xb] * fx;
      out[y * 28 + x] = top_ * (1 - fy) + bottom * fy;
    }
  }
  return out;
}

async function classify() {
  $("error").textContent = "";
  const data = modelInput();
  if (data === null) { $("error").textContent = "Draw a digit first."; return; }
  const body = {
    inputs: [{ name: "image", datatype: "FP32", shape: [1, 1, 28, 28], data: data }],
    outputs: [{ name: "probabilities" }],
  };
  const t0 = performance.now();
  let response;
  try {
    response = await fetch(`/v2/models/${MODEL}/infer`, {
      method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
    });
  } catch (e) { $("error").textContent = "The server could not be reached: " + e; return; }
  const ms = performance.now() - t0;
  if (!response.ok) { $("error").textContent = await explain(response); return; }
  const answer = await response.json();
  const probs = answer.outputs[0].data;
  const order = probs.map((p, i) => [p, i]).sort((a, b) => b[0] - a[0]);
  $("label").textContent = String(order[0][1]);
  const p = answer.parameters || {};
  const cached = (p.inferpool_cache_hits || 0) > 0;
  $("cached").textContent = cached ? "(from the cache)" : "(computed)";
  $("cached").dataset.cached = String(cached);
  $("bars").innerHTML = "";
  for (const [prob, i] of order.slice(0, 5)) {
    const row = document.createElement("div");
    row.className = "bar";
    row.innerHTML = `<span>${i}</span><div style="width:${Math.round(prob * 200)}px"></div><span>${(prob * 100).toFixed(1)}%</span>`;
    $("bars").appendChild(row);
  }
  $("timing").textContent = cached
    ? `round trip ${ms.toFixed(1)} ms (answered from the cache, no worker)`
    : `round trip ${ms.toFixed(1)} ms; queue ${(p.inferpool_queue_ms || 0).toFixed(1)} ms, ` +
      `batch of ${p.inferpool_batch_size || 1}, compute ${(p.inferpool_compute_ms || 0).toFixed(1)} ms`;
  $("answer").dataset.count = String(Number($("answer").dataset.count) + 1);
}
$("classify").addEventListener("click", classify);

// Server-Sent Events read with fetch (EventSource cannot send the Authorization header).
async function watch(jobId) {
  const response = await fetch(`/v1/jobs/${jobId}/watch`, { headers: headers() });
  if (!response.ok) { $("error").textContent = await explain(response); return null; }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data) continue;
      const job = JSON.parse(data);
      if (block.startsWith("event: error")) { $("error").textContent = job.error; continue; }
      last = job;
      const total = job.counts.total || 1;
      $("progress").max = total;
      $("progress").value = job.counts.done + job.counts.failed;
      $("job-state").textContent = `${job.state}: ${job.counts.done + job.counts.failed} of ${job.counts.total}`;
    }
  }
  return last;
}

async function submitJob() {
  $("error").textContent = "";
  $("download").hidden = true;
  const file = $("file").files[0];
  if (!file) { $("error").textContent = "Choose a .npy file first."; return; }
  $("job-state").textContent = "uploading";
  const response = await fetch(`/v1/jobs?model=${MODEL}&top_k=3`, {
    method: "POST", headers: headers({ "Content-Type": "application/x-npy" }), body: file,
  });
  if (!response.ok) { $("error").textContent = await explain(response); $("job-state").textContent = "refused"; return; }
  const submitted = await response.json();
  const job = await watch(submitted.job_id);
  if (job && job.state === "SUCCEEDED") {
    const results = await fetch(`/v1/jobs/${submitted.job_id}/results`, { headers: headers() });
    if (!results.ok) { $("error").textContent = await explain(results); return; }
    const link = $("download");
    link.href = URL.createObjectURL(await results.blob());
    link.download = `${submitted.job_id}.jsonl`;
    link.hidden = false;
  }
}
$("submit").addEventListener("click", submitJob);
