// expblip page: choose or drop an image, POST it to /describe, show the caption, AU chips and emotion chips.
// Vanilla JS, no dependencies. body[data-state] is idle | ready | busy | done | error (tests wait on it).
"use strict";

const $ = (id) => document.getElementById(id);
const el = { file: $("file"), drop: $("drop"), hint: $("drop-hint"), limits: $("limits"), frame: $("frame"),
  preview: $("preview"), facebox: $("facebox"), button: $("describe"), filename: $("filename"), status: $("status"),
  error: $("error"), caption: $("caption"), cropNote: $("crop-note"), aus: $("aus"), auCount: $("au-count"),
  emotions: $("emotions") };
const server = { maxUploadBytes: 5 * 1024 * 1024, cropFace: false, aus: [] };
let chosen = null;

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
}

function clearResult() {
  el.caption.textContent = "No image described yet.";
  el.caption.classList.add("muted");
  el.cropNote.hidden = true;
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
  if (file.size > server.maxUploadBytes) {
    chosen = null;
    setState("error");
    showError(`${file.name} is ${(file.size / 1048576).toFixed(1)} MiB; the limit is ` +
      `${(server.maxUploadBytes / 1048576).toFixed(1)} MiB.`);
    return;
  }
  chosen = file;
  if (el.preview.src) URL.revokeObjectURL(el.preview.src);
  el.preview.src = URL.createObjectURL(file);
  el.frame.hidden = false;
  el.hint.hidden = true;
  el.facebox.hidden = true;
  el.filename.textContent = file.name;
  setState("ready", "Ready: press Describe.");
}

async function describe() {
  if (!chosen) return;
  showError("");
  setState("busy", "Describing…");
  const form = new FormData();
  form.append("image", chosen, chosen.name);
  try {
    const response = await fetch("/describe", { method: "POST", body: form });
    const body = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
    if (!response.ok) throw new Error(body.error || `request failed: ${response.status}`);
    render(body);
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
    server.cropFace = health.crop_face;
    server.aus = vocab.aus;
    el.limits.textContent = `${health.formats.map((f) => f.toUpperCase()).join(", ")} · up to ` +
      `${(health.max_upload_bytes / 1048576).toFixed(1)} MiB` + (health.crop_face ? " · the largest face is cropped" : "");
    renderAUs([]);
  } catch (err) {
    showError(`cannot reach the server: ${err.message}`);
  }
}

el.file.addEventListener("change", () => choose(el.file.files[0]));
el.preview.addEventListener("error", () => { el.frame.hidden = true; el.hint.hidden = false; });  // not displayable
el.button.addEventListener("click", describe);
for (const type of ["dragenter", "dragover"]) {
  el.drop.addEventListener(type, (e) => { e.preventDefault(); el.drop.classList.add("over"); });
}
for (const type of ["dragleave", "drop"]) {
  el.drop.addEventListener(type, () => el.drop.classList.remove("over"));
}
el.drop.addEventListener("drop", (e) => { e.preventDefault(); choose(e.dataTransfer.files[0]); });
loadServerInfo();
