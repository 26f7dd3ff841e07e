// expblip page: choose or drop an image or a video, POST it to /describe (or /describe/video), show the caption, AU
// chips with FACS names, the emotion, the face box; for a video the AU timeline and a table of its frames.
// Vanilla JS, no dependencies. body[data-state] is idle | ready | busy | done | error (tests wait on it).
"use strict";

const $ = (id) => document.getElementById(id);
const el = { file: $("file"), drop: $("drop"), hint: $("drop-hint"), limits: $("limits"), frame: $("frame"),
  preview: $("preview"), facebox: $("facebox"), button: $("describe"), filename: $("filename"), status: $("status"),
  error: $("error"), caption: $("caption"), cropNote: $("crop-note"), aus: $("aus"), auCount: $("au-count"),
  emotions: $("emotions"), video: $("video-preview"), videoResult: $("video-result"), timeline: $("timeline"),
  frames: document.querySelector("#frames tbody"), keyRow: $("key-row"), key: $("apikey") };
const server = { maxUploadBytes: 5 * 1024 * 1024, maxVideoBytes: 50 * 1024 * 1024, cropFace: false, aus: [] };
const VIDEO_SUFFIX = /\.(mp4|m4v|mov|mkv|webm|avi)$/i;
let chosen = null;

const isVideo = (file) => file.type.startsWith("video/") || VIDEO_SUFFIX.test(file.name);
const mib = (bytes) => (bytes / 1048576).toFixed(1);

function setState(state, status = "") {
  document.body.dataset.state = state;
  el.status.textContent = status;
  el.button.disabled = state === "busy" || !chosen;
  el.button.textContent = state === "busy" ? "Describing…" : "Describe";
}

function showError(message) {
  el.error.textContent = message;
  el.error.hidden = !message;
}

function chip(className, parts) {
  const li = document.createElement("li");
  li.className = className;
  parts.forEach(([tag, text], i) => {
    const span = document.createElement(tag);
    span.textContent = text;
    li.append(...(i ? [" ", span] : [span]));
  });
  return li;
}

// Every AU of the vocabulary as a chip; the caption's AUs highlighted (class "on") and listed first.
function renderAUs(found) {
  const on = new Map(found.map((a) => [a.au, a.name]));
  const rest = server.aus.filter((a) => !on.has(a.au));
  el.aus.replaceChildren(
    ...found.map((a) => chip("chip au on", [["b", `AU${a.au}`], ["span", a.name]])),
    ...rest.map((a) => chip("chip au", [["b", `AU${a.au}`], ["span", a.name]])));
  for (const li of el.aus.querySelectorAll(".on")) li.title = "in the caption";
  el.auCount.textContent = `${found.length} in the caption`;
}

function renderEmotions(emotions) {
  el.emotions.replaceChildren(...(emotions.length
    ? emotions.map((e) => chip("chip emotion", [["span", e]]))
    : [chip("chip none", [["span", "none named"]])]));
}

function renderFace(result) {
  const { face, image } = result;
  el.facebox.hidden = !face;
  if (face) {
    Object.assign(el.facebox.style, { left: `${(100 * face.x) / image.width}%`, top: `${(100 * face.y) / image.height}%`,
      width: `${(100 * face.width) / image.width}%`, height: `${(100 * face.height) / image.height}%` });
  }
  const notes = { centre: "No face found: the centre square of the image was described.",
    face: "The square around the largest face (green) was described." };
  el.cropNote.textContent = notes[result.crop] || "";
  el.cropNote.hidden = !notes[result.crop];
}

function render(result) {
  el.caption.textContent = result.caption || "(empty caption)";
  el.caption.classList.remove("muted");
  renderAUs(result.aus);
  renderEmotions(result.emotions);
  renderFace(result);
  el.videoResult.hidden = true;
}

// A video: the AUs and emotions named in any frame as chips, the server's timeline plot, one table row per frame.
function renderVideo(result) {
  const names = new Map(server.aus.map((a) => [a.au, a.name]));
  const seen = [...new Set(result.frames.flatMap((f) => f.aus))].sort((a, b) => a - b);
  const emotions = [...new Set(result.frames.flatMap((f) => f.emotions))];
  const { frames, fps } = result.video;
  el.caption.textContent = `${frames} frames described (${fps} per second); AUs and emotions of any frame below.`;
  el.caption.classList.remove("muted");
  renderAUs(seen.map((au) => ({ au, name: names.get(au) || `action unit ${au}` })));
  el.auCount.textContent = `${seen.length} in the frames`;
  renderEmotions(emotions);
  el.facebox.hidden = true;
  el.cropNote.hidden = true;
  el.timeline.src = result.timeline_png;
  el.frames.replaceChildren(...result.frames.map((f) => {
    const row = document.createElement("tr");
    for (const text of [`${f.time.toFixed(2)} s`, f.caption, f.aus.map((a) => `AU${a}`).join(" ") || "—",
      f.emotions.join(", ") || "—"]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    return row;
  }));
  el.videoResult.hidden = false;
}

function clearResult() {
  el.caption.textContent = "No image described yet.";
  el.caption.classList.add("muted");
  el.cropNote.hidden = true;
  el.videoResult.hidden = true;
  renderAUs([]);
  const dash = document.createElement("li");
  dash.className = "muted";
  dash.textContent = "—";
  el.emotions.replaceChildren(dash);
}

function choose(file) {
  showError("");
  if (!file) return;
  clearResult();  // the old caption does not describe the new image
  const limit = isVideo(file) ? server.maxVideoBytes : server.maxUploadBytes;
  if (file.size > limit) {
    chosen = null;
    setState("error");
    showError(`${file.name} is ${mib(file.size)} MiB; the limit is ${mib(limit)} MiB.`);
    return;
  }
  chosen = file;
  for (const media of [el.preview, el.video]) if (media.src) URL.revokeObjectURL(media.src);
  const target = isVideo(file) ? el.video : el.preview;
  target.src = URL.createObjectURL(file);
  el.frame.hidden = isVideo(file);
  el.video.hidden = !isVideo(file);
  el.hint.hidden = true;
  el.facebox.hidden = true;
  el.filename.textContent = file.name;
  setState("ready", "Ready: press Describe.");
}

async function describe() {
  if (!chosen) return;
  showError("");
  setState("busy", "Describing…");
  const video = isVideo(chosen);
  const form = new FormData();
  form.append(video ? "video" : "image", chosen, chosen.name);
  const headers = el.key.value ? { Authorization: `Bearer ${el.key.value}` } : {};
  try {
    const response = await fetch(video ? "/describe/video" : "/describe", { method: "POST", body: form, headers });
    const body = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
    if (!response.ok) throw new Error(body.error || `request failed: ${response.status}`);
    (video ? renderVideo : render)(body);
    setState("done", "");
  } catch (err) {
    setState("error");
    showError(err.message || String(err));
  }
}

async function loadServerInfo() {
  try {
    const [health, vocab] = await Promise.all(["/health", "/vocabulary"].map((u) => fetch(u).then((r) => r.json())));
    server.maxUploadBytes = health.max_upload_bytes;
    server.maxVideoBytes = health.video.max_upload_bytes;
    server.cropFace = health.crop_face;
    server.aus = vocab.aus;
    el.keyRow.hidden = !health.auth;
    el.limits.textContent = `${health.formats.map((f) => f.toUpperCase()).join(", ")} up to ${mib(health.max_upload_bytes)} MiB` +
      ` · videos (${health.video.formats.map((f) => f.toUpperCase()).join(", ")}) up to ` +
      `${mib(health.video.max_upload_bytes)} MiB, ${health.video.max_seconds} s` +
      (health.crop_face ? " · the largest face is cropped" : "");
    renderAUs([]);
  } catch (err) {
    showError(`cannot reach the server: ${err.message}`);
  }
}

el.file.addEventListener("change", () => choose(el.file.files[0]));
el.preview.addEventListener("error", () => { el.frame.hidden = true; el.hint.hidden = false; });  // not displayable
el.video.addEventListener("error", () => { el.video.hidden = true; el.hint.hidden = false; });
el.button.addEventListener("click", describe);
for (const type of ["dragenter", "dragover"]) {
  el.drop.addEventListener(type, (e) => { e.preventDefault(); el.drop.classList.add("over"); });
}
for (const type of ["dragleave", "drop"]) {
  el.drop.addEventListener(type, () => el.drop.classList.remove("over"));
}
el.drop.addEventListener("drop", (e) => { e.preventDefault(); choose(e.dataTransfer.files[0]); });
loadServerInfo();
