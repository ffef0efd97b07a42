// finechat web chat: streams answers from /v1/chat/completions (server-sent events over fetch).
// Everything the model writes is HTML-escaped before the small Markdown formatter below adds any tag.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], controller: null, chat: 0 };
const SETTINGS = ["system", "temperature", "top_p", "max_tokens", "api_key"];

// -- Markdown (a small subset: code blocks, inline code, bold, italics, headings, lists, quotes, links) --
function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function inline(text) {
  // `text` is already escaped; code spans are cut out first so nothing inside them is formatted.
  const spans = [];
  text = text.replace(/`([^`\n]+)`/g, (_, code) => { spans.push(code); return "\u0000" + (spans.length - 1) + "\u0000"; });
  text = text
    .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>")
    .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  return text.replace(/\u0000(\d+)\u0000/g, (_, i) => "<code>" + spans[Number(i)] + "</code>");
}

function renderMarkdown(source) {
  const lines = source.split("\n");
  const html = [];
  let paragraph = [], list = null, i = 0;
  const flush = () => {
    if (paragraph.length) html.push("<p>" + paragraph.map(inline).join("<br>") + "</p>");
    if (list) html.push("<" + list.tag + ">" + list.items.map((it) => "<li>" + inline(it) + "</li>").join("") + "</" + list.tag + ">");
    paragraph = []; list = null;
  };
  while (i < lines.length) {
    const raw = lines[i];
    const fence = raw.match(/^\s*```\s*([\w+#.-]*)\s*$/);
    if (fence) {
      flush();
      const code = [];
      i++;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i++]);
      i++; // the closing fence (absent while the answer is still streaming)
      const lang = fence[1] ? ' data-lang="' + escapeHtml(fence[1]) + '"' : "";
      html.push("<pre" + lang + "><code>" + escapeHtml(code.join("\n")) + "</code></pre>");
      continue;
    }
    const line = escapeHtml(raw);
    let m;
    if (!line.trim()) { flush(); }
    else if ((m = line.match(/^(#{1,6})\s+(.*)$/))) { flush(); html.push("<h" + (m[1].length + 2 > 6 ? 6 : m[1].length + 2) + ">" + inline(m[2]) + "</h" + (m[1].length + 2 > 6 ? 6 : m[1].length + 2) + ">"); }
    else if ((m = line.match(/^&gt;\s?(.*)$/))) { flush(); html.push("<blockquote>" + inline(m[1]) + "</blockquote>"); }
    else if ((m = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/))) {
      const tag = /\d/.test(m[1]) ? "ol" : "ul";
      if (paragraph.length || (list && list.tag !== tag)) flush();
      if (!list) list = { tag, items: [] };
      list.items.push(m[2]);
    } else {
      if (list) flush();
      paragraph.push(line);
    }
    i++;
  }
  flush();
  return html.join("");
}

// -- the page -------------------------------------------------------------------------------------------
function copyText(text, button) {
  const done = () => { button.textContent = "Copied"; setTimeout(() => (button.textContent = "Copy"), 1200); };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text, done));
  } else fallbackCopy(text, done);
}

function fallbackCopy(text, done) {
  const area = document.createElement("textarea");
  area.value = text;
  document.body.appendChild(area);
  area.select();
  try { document.execCommand("copy"); done(); } finally { area.remove(); }
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = "msg " + role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role === "assistant" ? "finechat" : role;
  const body = document.createElement("div");
  body.className = "body";
  box.append(label, body);
  if (role === "assistant") {
    const copy = document.createElement("button");
    copy.type = "button"; copy.className = "copy"; copy.textContent = "Copy"; copy.title = "Copy the answer";
    copy.addEventListener("click", () => copyText(box.dataset.text || "", copy));
    box.appendChild(copy);
  }
  $("messages").appendChild(box);
  setText(box, text);
  return box;
}

function setText(box, text) {
  box.dataset.text = text;
  const body = box.querySelector(".body");
  if (box.classList.contains("user") || box.classList.contains("error")) { body.textContent = text; return; }
  body.innerHTML = renderMarkdown(text);
  for (const pre of body.querySelectorAll("pre")) {
    const button = document.createElement("button");
    button.type = "button"; button.className = "copy"; button.textContent = "Copy";
    button.addEventListener("click", () => copyText(pre.querySelector("code").textContent, button));
    pre.appendChild(button);
  }
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

// A tool the server ran (finechat serve --tools), folded: the call in the summary, its result inside.
function showTool(box, tool) {
  let list = box.querySelector(".tools");
  if (!list) {
    list = document.createElement("div");
    list.className = "tools";
    box.insertBefore(list, box.querySelector(".body"));
  }
  let item = Array.from(list.children).find((el) => el.dataset.id === String(tool.id));
  if (!item) {
    item = document.createElement("details");
    item.className = "tool";
    item.dataset.id = String(tool.id);
    const args = Array.isArray(tool.arguments) ? tool.arguments.map((a) => JSON.stringify(a)).join(", ")
      : JSON.stringify(tool.arguments);
    const summary = document.createElement("summary");
    summary.textContent = "Tool: " + tool.name + "(" + args + ")";
    const result = document.createElement("pre");
    result.className = "result";
    result.textContent = "running…";
    item.append(summary, result);
    list.appendChild(item);
  }
  if (tool.type === "result") {
    item.querySelector(".result").textContent = tool.content;
    item.classList.add(tool.ok ? "ok" : "failed");
  }
}

function settings() {
  const number = (id) => { const v = parseFloat($(id).value); return Number.isFinite(v) ? v : undefined; };
  return { temperature: number("temperature"), top_p: number("top_p"), max_tokens: Math.round(number("max_tokens") || 256) };
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function errorText(response) {
  try { const data = await response.json(); return (data.error && data.error.message) || response.statusText; }
  catch (e) { return response.statusText; }
}

async function send(text) {
  const chat = state.chat;
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const box = addMessage("assistant", "");
  box.classList.add("streaming");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  $("status").textContent = "Generating…";
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.messages);
  let answer = "", finish = null, pending = false;
  const paint = () => { pending = false; setText(box, answer); };
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify(Object.assign({ messages, stream: true, stream_options: { include_usage: true } }, settings())),
    });
    if (!response.ok) {
      const message = await errorText(response);
      throw new Error(response.status === 401 ? message + " (set the API key in Settings)" : message);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.usage) $("status").textContent = chunk.usage.completion_tokens + " tokens";
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) answer += choice.delta.content;
          if (choice.delta && choice.delta.finechat_tool) showTool(box, choice.delta.finechat_tool);
          if (choice.finish_reason) finish = choice.finish_reason;
          if (!pending) { pending = true; requestAnimationFrame(paint); }
        }
      }
    }
    setText(box, answer);
    if (finish === "length") $("status").textContent += " (stopped at the token limit)";
  } catch (err) {
    setText(box, answer);
    if (err.name === "AbortError") {
      const note = document.createElement("div");
      note.className = "stopped"; note.textContent = "stopped";
      box.appendChild(note);
      $("status").textContent = "Stopped.";
    } else {
      box.remove();
      addMessage("error", "Error: " + err.message);
      if (chat === state.chat) state.messages.pop();
      $("status").textContent = "";
      return;
    }
  } finally {
    box.classList.remove("streaming");
    if (state.controller === controller) { state.controller = null; setBusy(false); }
  }
  if (chat === state.chat) state.messages.push({ role: "assistant", content: answer });
}

function stop() { if (state.controller) state.controller.abort(); }

function clearChat() {
  stop();
  state.chat += 1;
  state.messages = [];
  $("messages").replaceChildren();
  $("status").textContent = "New chat.";
}

function init() {
  for (const id of SETTINGS) {
    const saved = localStorage.getItem("finechat." + id);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("change", () => localStorage.setItem("finechat." + id, $(id).value));
  }
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", clearChat);
  $("toggle-settings").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
  });
  $("input").disabled = false;  // (the page ships them disabled: see index.html)
  $("send").disabled = false;
  fetch("v1/models", { headers: headers() })
    .then((r) => (r.ok ? r.json() : null))
    .then((data) => { if (data && data.data && data.data[0]) $("model-name").textContent = data.data[0].id; })
    .catch(() => {});
}

init();
