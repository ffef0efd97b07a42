// finechat board: the page over the board's JSON API. The Train form is built from /api/train/schema (the
// config's own fields and help); the server checks every value. Text from files and models is shown as text.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { schema: null, info: null, job: null, jobs: [], checkpoints: [], chatReady: false };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function clearErrors() {
  for (const el of document.querySelectorAll(".error")) el.textContent = "";
  for (const el of document.querySelectorAll(".invalid")) el.classList.remove("invalid");
  $("message").hidden = true;
}

function showError(body, status) {
  const err = (body && body.error) || { message: "HTTP " + status };
  const tab = document.querySelector(".tab:not([hidden])");
  const spot = err.param && tab && (tab.querySelector(`.error[data-for="${err.param}"]`)
    || tab.querySelector(`[data-key="${err.param}"] .error`));
  if (spot) {
    spot.textContent = err.message;
    const input = spot.closest("[data-key]") && spot.closest("[data-key]").querySelector("input,select,textarea");
    if (input) input.classList.add("invalid");
  }
  $("message").textContent = err.message;
  $("message").className = "error-box";
  $("message").hidden = false;
}

function note(text) {
  $("message").textContent = text;
  $("message").className = "note-box";
  $("message").hidden = false;
}

async function api(method, path, body) {
  const response = await fetch(path, { method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) { showError(data, response.status); throw new Error((data && data.error && data.error.message) || response.status); }
  return data;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function fillSelect(select, items, keep) {
  const old = select.value;
  select.replaceChildren(...items.map(([value, label]) => el("option", { value, text: label })));
  if (keep && items.some(([v]) => v === old)) select.value = old;
}

function bytes(n) {
  return n > 1e9 ? (n / 1e9).toFixed(2) + " GB" : n > 1e6 ? (n / 1e6).toFixed(1) + " MB" : (n / 1e3).toFixed(1) + " kB";
}

// -- tabs -------------------------------------------------------------------------------------------------
function showTab(name) {
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== "tab-" + name;
  for (const b of document.querySelectorAll("#tabs button")) b.setAttribute("aria-selected", b.dataset.tab === name);
  $("jobs-panel").hidden = !["train", "eval", "export"].includes(name);
  localStorage.setItem("finechat.board.tab", name);
  clearErrors();
}

// -- data -------------------------------------------------------------------------------------------------
async function refreshFiles() {
  const { files } = await api("GET", "/api/files");
  fillSelect($("data-file"), files.map((f) => [f.path, `${f.path} (${bytes(f.bytes)})`]), true);
  for (const s of document.querySelectorAll("select.files")) fillSelect(s, files.map((f) => [f.path, f.path]), true);
  $("files-list").replaceChildren(...files.map((f) => el("option", { value: f.path })));
}

async function upload() {
  clearErrors();
  const file = $("upload-file").files[0];
  if (!file) { showError({ error: { message: "name: choose a file first", param: "name" } }); return; }
  const content = await file.text();
  const done = await api("POST", "/api/upload", { name: file.name, content });
  note(`${t("uploaded")}: ${done.path} (${bytes(done.bytes)})`);
  await refreshFiles();
  $("data-file").value = done.path;
  await analyse();
}

async function analyse() {
  clearErrors();
  const body = { path: $("data-file").value, model: $("data-model").value, format: $("data-format").value,
    dataset: $("data-dataset").value };
  $("data-result").replaceChildren(el("p", { class: "muted", text: "…" }));
  let r;
  try { r = await api("POST", "/api/data/analyse", body); } catch (e) { $("data-result").replaceChildren(); return; }
  const out = [el("h3", { text: `${r.path}: ${r.format}` + (r.template ? ` · template ${r.template}` : "") })];
  out.push(el("h4", { text: t("counts") }), table(Object.entries(r.counts)));
  if (r.tokens) out.push(el("h4", { text: t("lengths") }), table(Object.entries(r.tokens)), histogram(r.histogram));
  if (r.bad_records.length) {
    out.push(el("h4", { text: `${t("bad_records")} (${r.bad_records.length})` }),
      table(r.bad_records.map((b) => [`${b.file}:${b.line}`, `${b.field}: ${b.reason}`]), "bad-records"));
  }
  if (r.examples) {
    out.push(el("h4", { text: t("examples") }));
    for (const ex of r.examples) {
      const pre = el("pre", { class: "example" });
      for (const span of ex.spans) pre.append(span.trained ? el("mark", { text: span.text }) : span.text);
      out.push(el("p", { class: "muted", text: `${ex.where} · ${ex.tokens || 0} tokens, ${ex.trained || 0} trained · ${ex.status}` }), pre);
    }
  }
  const lic = r.licence;
  out.push(el("h4", { text: t("licence") }),
    table([[lic.model.name, `${lic.model.license} (${t("commercial_use")}: ${verdict(lic.model.commercial)})`],
      ...lic.datasets.map((d) => [d.name, `${d.license} (${t("commercial_use")}: ${verdict(d.commercial)})`]),
      ...(lic.datasets.length ? [] : [[t("dataset"), t("no_dataset")]]),
      [t("commercial"), t("verdict_" + lic.commercial_use_text)]], "licence"));
  $("data-result").replaceChildren(...out);
}

function verdict(flag) {
  return t(flag === true ? "verdict_yes" : flag === false ? "verdict_no" : "verdict_unknown");
}

function table(rows, cls) {
  return el("table", { class: cls || "" }, ...rows.map(([k, v]) => el("tr", {}, el("th", { text: String(k) }), el("td", { text: String(v) }))));
}

function histogram(bins) {
  const max = Math.max(1, ...bins.map((b) => b.count));
  const box = el("div", { class: "histogram" });
  for (const b of bins) {
    const bar = el("div", { class: "bar", title: `${b.lo}-${b.hi}: ${b.count}` });
    bar.style.height = Math.round(100 * b.count / max) + "%";
    box.append(bar);
  }
  return el("div", {}, box, el("p", { class: "muted", text: bins.length ? `${bins[0].lo} … ${bins[bins.length - 1].hi} tokens` : "" }));
}

// -- train form -------------------------------------------------------------------------------------------
function buildForm() {
  const form = $("train-form");
  const more = el("details", {}, el("summary", { "data-i18n": "more", text: t("more") }));
  const common = el("div", { class: "grid" });
  const rest = el("div", { class: "grid" });
  let group = null;
  for (const f of state.schema.fields) {
    if (!f.common && f.group !== group) {  // the config's own groups (model, data, method, ...)
      group = f.group;
      if (group) rest.append(el("h4", { class: "group", text: group }));
    }
    const input = fieldInput(f);
    input.id = "cfg-" + f.key;
    const row = el("div", { class: "field", "data-key": f.key },
      el("label", { for: input.id, title: f.help }, el("code", { text: f.key })), input,
      el("small", { class: "help", text: f.help }), el("span", { class: "error" }));
    (f.common ? common : rest).append(row);
  }
  more.append(rest);
  form.replaceChildren(common, more);
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem("finechat.board.form") || "{}"); } catch (e) { saved = {}; }
  setValues(saved);  // the form as the user left it, across reloads
  form.addEventListener("change", () => localStorage.setItem("finechat.board.form", JSON.stringify(formValues())));
}

function fieldInput(f) {
  if (f.kind === "bool") return el("input", { type: "checkbox" });
  if (f.kind === "choice") return el("select", {}, ...f.choices.map((c) => el("option", { value: c, text: c })));
  if (f.kind === "int" || f.kind === "float") return el("input", { type: "number", step: f.kind === "int" ? "1" : "any" });
  if (f.kind === "dict") return el("textarea", { rows: "2" });
  const attrs = { type: "text" };
  if (f.path) attrs.list = f.key === "model" ? "models-list" : "files-list";
  return el("input", attrs);
}

function setValues(values) {
  for (const f of state.schema.fields) {
    const input = $("cfg-" + f.key);
    const v = f.key in values ? values[f.key] : f.default;
    if (f.kind === "bool") input.checked = !!v;
    else if (f.kind === "list") input.value = (Array.isArray(v) ? v : v == null ? [] : [v]).join(",");
    else if (f.kind === "dict") input.value = v && Object.keys(v).length ? JSON.stringify(v) : "";
    else input.value = v == null ? "" : v;
  }
}

function formValues() {
  const out = {};
  for (const f of state.schema.fields) {
    const input = $("cfg-" + f.key);
    let v;
    if (f.kind === "bool") v = input.checked;
    else if (f.kind === "list") v = input.value.split(",").map((s) => s.trim()).filter(Boolean);
    else if (f.kind === "dict") { try { v = input.value.trim() ? JSON.parse(input.value) : {}; } catch (e) { v = input.value; } }
    else if ((f.kind === "int" || f.kind === "float") && input.value !== "") v = Number(input.value);
    else v = input.value === "" ? null : input.value;
    if (JSON.stringify(v) !== JSON.stringify(f.kind === "list" && f.default == null ? [] : f.default)) out[f.key] = v;
  }
  return out;
}

async function preview() {
  clearErrors();
  const plan = await api("POST", "/api/train/plan", { config: formValues() });
  $("yaml").textContent = plan.yaml;
  $("command").textContent = `cd ${plan.workspace} && ${plan.command}`;
  $("plan").hidden = false;
}

async function estimate() {
  clearErrors();
  $("estimate-out").hidden = false;
  $("estimate-out").textContent = "…";
  try {
    const est = await api("POST", "/api/train/estimate", { config: formValues() });
    $("estimate-out").textContent = est.table;
  } catch (e) { $("estimate-out").textContent = ""; }
}

async function startTrain() {
  clearErrors();
  await preview();
  const job = await api("POST", "/api/train/start", { config: formValues() });
  note(`${t("started")}: ${job.id}`);
  selectJob(job.id);
  await refreshJobs();
}

// -- jobs -------------------------------------------------------------------------------------------------
async function refreshJobs() {
  const { jobs } = await api("GET", "/api/jobs");
  state.jobs = jobs;
  const rows = jobs.map((j) => {
    const open = el("button", { type: "button", class: "open", "data-job": j.id, text: t("open") });
    open.addEventListener("click", () => selectJob(j.id));
    return el("tr", { "data-job": j.id, class: j.id === state.job ? "selected" : "" },
      el("td", { text: j.id }), el("td", { text: j.kind }), el("td", { class: "state " + j.state, text: j.state }),
      el("td", { text: j.attempt > 1 ? `attempt ${j.attempt}` : "" }), el("td", {}, open));
  });
  $("jobs").querySelector("tbody").replaceChildren(...rows);
  if (!state.job && jobs.length) selectJob(jobs[0].id);
  if (state.job) await refreshJob();
}

function selectJob(id) {
  state.job = id;
  localStorage.setItem("finechat.board.job", id);
  refreshJob();
}

async function refreshJob() {
  if (!state.job) return;
  let j;
  try { j = await fetch("/api/job?id=" + encodeURIComponent(state.job), { headers: headers() }).then((r) => r.ok ? r.json() : null); } catch (e) { j = null; }
  if (!j) return;
  $("job-detail").hidden = false;
  $("job-title").textContent = `${j.id} (${j.kind})`;
  $("job-state").textContent = j.state;
  $("job-state").className = "state " + j.state;
  const p = j.progress;
  const total = p && p.total ? p.total : (j.extra && j.extra.max_steps > 0 ? j.extra.max_steps : null);
  $("job-progress").textContent = p ? `${j.kind === "train" ? t("step") + " " : ""}${p.step}${total ? "/" + total : ""}` : "";
  $("job-eta").textContent = p && p.eta && j.state === "running" ? `${t("eta")} ${p.eta}` : "";
  $("job-bar").value = p && total ? p.step / total : (j.state === "finished" ? 1 : 0);
  $("job-stop").disabled = !["queued", "running"].includes(j.state);
  $("job-resume").disabled = !(j.kind === "train" && ["stopped", "failed"].includes(j.state));
  $("job-command").textContent = j.command;
  state.jobConfig = j.config || null;
  $("job-load").hidden = !j.config;
  $("job-log").textContent = j.log;
  $("job-checkpoints").textContent = j.checkpoints ? `${t("checkpoints")}: ${j.checkpoints.join(", ") || t("none")}` : "";
  $("job-result").textContent = j.result ? `${t("result")}: ${j.result.path} · ${t("size")} ${bytes(j.result.bytes)}`
    + (j.result.modelfile ? `\nModelfile: ${j.result.modelfile}` : "") : (j.report || "");
  $("job-result").hidden = !$("job-result").textContent;
  $("loss-chart").hidden = !j.points;
  if (j.points) drawLoss($("loss-chart"), j.points);
}

function drawLoss(canvas, points) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 36;
  ctx.clearRect(0, 0, w, h);
  const all = points.train.concat(points.eval);
  canvas.dataset.points = String(points.train.length);
  canvas.dataset.evalPoints = String(points.eval.length);
  ctx.strokeStyle = "#888"; ctx.strokeRect(pad, 8, w - pad - 8, h - pad - 8);
  if (!all.length) return;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const X = (x) => pad + (w - pad - 8) * (x - x0) / (x1 - x0), Y = (y) => 8 + (h - pad - 8) * (1 - (y - y0) / (y1 - y0));
  ctx.fillStyle = "#444"; ctx.font = "11px sans-serif";
  ctx.fillText(y1.toFixed(3), 2, 16); ctx.fillText(y0.toFixed(3), 2, h - pad); ctx.fillText(String(x0), pad, h - 18);
  ctx.fillText(String(x1), w - 30, h - 18);
  for (const [series, color, label, dy] of [[points.train, "#2f6fb3", t("train_loss"), 0], [points.eval, "#c0504d", t("eval_loss"), 14]]) {
    if (!series.length) continue;
    ctx.strokeStyle = color; ctx.fillStyle = color; ctx.beginPath();
    series.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    for (const [x, y] of series) ctx.fillRect(X(x) - 2, Y(y) - 2, 4, 4);
    ctx.fillText(label, w - 100, 22 + dy);
  }
}

async function jobAction(action) {
  clearErrors();
  await api("POST", "/api/jobs/" + action, { run: state.job });
  await refreshJobs();
}

// -- checkpoints: evaluate, chat, export ------------------------------------------------------------------
async function refreshCheckpoints() {
  const { checkpoints } = await api("GET", "/api/checkpoints");
  state.checkpoints = checkpoints;
  const items = [["", t("base_only")], ...checkpoints.map((c) => [c.path, `${c.path} (${c.model})`])];
  for (const s of document.querySelectorAll("select.checkpoints")) fillSelect(s, items, true);
  const box = $("eval-adapters");
  const checked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  box.replaceChildren(...checkpoints.map((c) => el("label", {},
    Object.assign(el("input", { type: "checkbox", value: c.path }), { checked: checked.has(c.path) }), " " + c.path)));
}

function checkpointModel(path) {
  const c = state.checkpoints.find((x) => x.path === path);
  return c ? { model: c.model, adapter: c.adapter ? c.path : null, folder: c.adapter ? null : c.path } : null;
}

async function startEval() {
  clearErrors();
  const adapters = [...$("eval-adapters").querySelectorAll("input:checked")].map((i) => i.value);
  const first = adapters.length ? checkpointModel(adapters[0]) : null;
  const body = { name: $("eval-name").value, model: first ? first.model : $("eval-model").value, adapters,
    base: $("eval-base").checked, data: $("eval-data").value, max_samples: $("eval-max-samples").value,
    max_new_tokens: $("eval-max-new-tokens").value, tasks: $("eval-tasks").value, limit: $("eval-limit").value };
  const job = await api("POST", "/api/eval/start", body);
  note(`${t("started")}: ${job.id}`);
  selectJob(job.id);
}

async function startExport() {
  clearErrors();
  const c = checkpointModel($("export-checkpoint").value);
  const to = $("export-to").value;
  const body = { name: $("export-name").value, model: c ? (c.folder || c.model) : "default", adapter: c ? c.adapter : null,
    to: to === "gguf" ? "gguf" : "hf", outtype: $("export-outtype").value, quantization_bit: to === "hf8" ? 8 : null };
  const job = await api("POST", "/api/export/start", body);
  note(`${t("started")}: ${job.id}`);
  selectJob(job.id);
}

async function chatLoad() {
  clearErrors();
  const c = checkpointModel($("chat-checkpoint").value);
  await api("POST", "/api/chat/start", { model: c ? (c.folder || c.model) : "default", adapter: c ? c.adapter : null,
    tools: $("chat-tools").value, knowledge: $("chat-knowledge").value, medical: $("chat-medical").checked });
  state.chatReady = false;
  $("chat-frame").hidden = true;
  await chatStatus();
}

async function chatStatus() {
  let s;
  try { s = await fetch("/api/chat/status", { headers: headers() }).then((r) => r.ok ? r.json() : null); } catch (e) { s = null; }
  if (!s) return;
  const what = s.adapter ? `${s.model} + ${s.adapter}` : s.model || "";
  $("chat-status").textContent = `${t(s.state)} ${what}` + (s.state === "failed" ? "\n" + (s.log || "") : "");
  $("chat-status").dataset.state = s.state;
  if (s.state === "ready" && !state.chatReady) {
    state.chatReady = true;
    $("chat-frame").src = "/chat/";
    $("chat-frame").hidden = false;
  }
  if (s.state !== "ready") { state.chatReady = false; $("chat-frame").hidden = true; }
}

// -- start --------------------------------------------------------------------------------------------------
async function init() {
  $("api_key").value = localStorage.getItem("finechat.api_key") || "";
  $("api_key").addEventListener("change", () => { localStorage.setItem("finechat.api_key", $("api_key").value); init(); });
  $("lang").value = lang();
  $("lang").onchange = () => { localStorage.setItem("finechat.board.lang", $("lang").value); applyLanguage(); refreshJobs(); };
  applyLanguage();
  for (const b of document.querySelectorAll("#tabs button")) b.onclick = () => showTab(b.dataset.tab);
  showTab(localStorage.getItem("finechat.board.tab") || "data");
  try {
    state.info = await api("GET", "/api/info");
    state.schema = await api("GET", "/api/train/schema");
  } catch (e) { return; }
  const models = state.info.models.map((m) => [m, m]);
  fillSelect($("data-model"), models);
  for (const s of document.querySelectorAll("select.models")) fillSelect(s, models, true);
  $("models-list").replaceChildren(...state.info.models.map((m) => el("option", { value: m })));
  fillSelect($("data-format"), state.info.formats.map((f) => [f, f]));
  fillSelect($("data-dataset"), [["", "?"], ...state.info.datasets.map((d) => [d, d])]);
  fillSelect($("recipe"), state.info.recipes.map((r) => [r.name, r.name]));
  fillSelect($("export-outtype"), state.info.gguf_types.map((x) => [x, x]));
  buildForm();
  await refreshFiles();
  const saved = localStorage.getItem("finechat.board.job");
  if (saved) state.job = saved;
  await refreshJobs();
  await refreshCheckpoints();
  await chatStatus();
}

$("upload").onclick = () => upload().catch(() => {});
$("analyse").onclick = () => analyse().catch(() => {});
$("load-recipe").onclick = () => {
  const r = state.info.recipes.find((x) => x.name === $("recipe").value);
  if (r) setValues(r.values);
  localStorage.setItem("finechat.board.form", JSON.stringify(formValues()));
};
$("preview").onclick = () => preview().catch(() => {});
$("estimate").onclick = () => estimate();
$("start").onclick = () => startTrain().catch(() => {});
$("job-stop").onclick = () => jobAction("stop").catch(() => {});
$("job-load").onclick = () => {
  if (!state.jobConfig) return;
  setValues(state.jobConfig);
  localStorage.setItem("finechat.board.form", JSON.stringify(formValues()));
  showTab("train");
};
$("job-resume").onclick = () => jobAction("resume").catch(() => {});
$("eval-start").onclick = () => startEval().catch(() => {});
$("export-start").onclick = () => startExport().catch(() => {});
$("chat-load").onclick = () => chatLoad().catch(() => {});
$("chat-unload").onclick = () => api("POST", "/api/chat/stop", {}).then(chatStatus).catch(() => {});
for (const b of document.querySelectorAll("button.copy")) b.onclick = () => navigator.clipboard.writeText($(b.dataset.copy).textContent).catch(() => {});
setInterval(() => { if (state.schema) { refreshJobs().catch(() => {}); refreshCheckpoints().catch(() => {}); chatStatus(); } }, 1500);
init();
