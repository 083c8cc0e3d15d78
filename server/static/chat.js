// The chat page: model picker, composer, the conversation and its history.
// Questions, errors and model names are rendered as text; answers as Markdown
// through markdown.js, which never lets an answer's own markup through.
import { ChatError, authHeaders, cancelChat, errorFrom, streamChat } from "./sse.js";
import { copyCode, renderMarkdown } from "./markdown.js";
import {
  loadConversations, modelMessages, newConversation, saveConversations, titleFor,
} from "./conversations.js";
import { renderHistory } from "./history.js";

const API_KEY_STORAGE = "orchestrator.apiKey";
const MODEL_STORAGE = "orchestrator.model";
const SAVE_WHILE_STREAMING_MS = 1000; // a reload mid-answer keeps the text up to the last second

const $ = (id) => document.getElementById(id);
const ui = {
  log: $("log"), intro: $("intro"), form: $("composer"), model: $("model"), models: $("models"),
  modelHint: $("model-hint"), prompt: $("prompt"), send: $("send"), stop: $("stop"), newChat: $("new-chat"),
  title: $("chat-title"), notice: $("notice"), noticeText: $("notice-text"), noticeClose: $("notice-close"),
  advanced: $("advanced"), advancedOpen: $("advanced-open"), advancedDone: $("advanced-done"),
  apiKey: $("api-key"), options: $("options"), optionsError: $("options-error"),
  history: $("history"), historyList: $("history-list"), historyToggle: $("history-toggle"),
  historyClose: $("history-close"), backdrop: $("history-backdrop"),
};

const loaded = loadConversations();
let conversations = loaded.conversations; // newest first
let current = conversations.find((c) => c.id === loaded.currentId) || newConversation();
let inFlight = null; // the AbortController of the answer being streamed

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function apiKey() {
  return ui.apiKey.value.trim();
}

function showNotice(text) {
  ui.noticeText.textContent = text || "";
  ui.notice.hidden = !text;
}

function save() {
  if (!conversations.includes(current) && current.messages.length) conversations.unshift(current);
  const dropped = saveConversations(conversations, current.id);
  if (dropped > 0) {
    conversations = conversations.slice(0, conversations.length - dropped);
    showNotice(`This browser's storage is full: the ${dropped} oldest conversation${dropped === 1 ? " was" : "s were"}`
      + " dropped.");
  } else if (dropped < 0) {
    showNotice("This browser's storage is full: the conversation is not kept across reloads.");
  }
  showHistory();
}

function showHistory() {
  renderHistory(ui.historyList, conversations, current.id, { disabled: inFlight !== null });
  ui.title.textContent = current.title;
  ui.newChat.disabled = inFlight !== null;
}

async function loadModels() {
  let response;
  try {
    response = await fetch("/api/v1/models", { headers: authHeaders(apiKey()), cache: "no-store" });
  } catch {
    ui.modelHint.textContent = "Cannot reach the server.";
    return;
  }
  if (!response.ok) {
    const err = await errorFrom(response);
    ui.modelHint.textContent = err.status === 401 ? "This server needs an API key (see Advanced)." : err.message;
    return;
  }
  const { models } = await response.json();
  ui.models.replaceChildren(...models.map((m) => {
    const option = element("option");
    option.value = m.name;
    option.label = `${m.agents} agent${m.agents === 1 ? "" : "s"}, ${m.slots} slot${m.slots === 1 ? "" : "s"}`;
    return option;
  }));
  const names = models.map((m) => m.name);
  if (!ui.model.value) {
    const remembered = localStorage.getItem(MODEL_STORAGE);
    ui.model.value = names.includes(remembered) ? remembered : (names[0] || "");
  }
  ui.modelHint.textContent = names.length
    ? `${names.length} model${names.length === 1 ? "" : "s"} online`
    : "No agent is online yet.";
}

function readOptions() {
  const raw = ui.options.value.trim();
  ui.optionsError.hidden = true;
  if (!raw) return {};
  let options;
  try {
    options = JSON.parse(raw);
  } catch (err) {
    options = err;
  }
  if (options === null || typeof options !== "object" || Array.isArray(options) || options instanceof Error) {
    ui.optionsError.textContent = "Options must be a JSON object, like {\"temperature\": 0.7}.";
    ui.optionsError.hidden = false;
    if (!ui.advanced.open) ui.advanced.showModal();
    return null;
  }
  return options;
}

function addUserMessage(message) {
  const node = element("article", "msg user");
  if (message.failed) node.dataset.failed = "true";
  node.append(element("div", "role", "You"), element("div", "text", message.content));
  ui.intro.hidden = true;
  ui.log.append(node);
}

// One answer: its Markdown, an error box, and the numbers under it.
function addAnswer(message) {
  const node = element("article", "msg assistant");
  node.dataset.state = message.state;
  node.dataset.resumes = "0";
  if (message.requestId) node.dataset.requestId = message.requestId;
  const body = element("div", "text markdown");
  const error = element("div", "error");
  error.setAttribute("role", "alert");
  error.hidden = true;
  const stats = element("div", "stats");
  const parts = Object.fromEntries(["state", "ttft", "rate", "count", "resumes"].map((k) => [k, element("span", k)]));
  stats.append(...Object.values(parts));
  node.append(element("div", "role", message.model || "model"), body, error, stats);
  ui.intro.hidden = true;
  ui.log.append(node);
  const answer = { node, body, error, stats, message, ...parts };
  renderAnswer(answer);
  return answer;
}

const STATE_LABELS = { waiting: "waiting for the first token…", done: "done", stopped: "stopped",
  interrupted: "interrupted by a reload", streaming: "streaming" };

function renderAnswer(answer) {
  const { message } = answer;
  if (message.content) renderMarkdown(answer.body, message.content);
  answer.node.dataset.state = message.state;
  answer.state.textContent = message.error ? `error: ${message.error.code}` : (STATE_LABELS[message.state] || "");
  const stats = message.stats || {};
  if (stats.ttft !== undefined) answer.ttft.textContent = `first token ${formatSeconds(stats.ttft)}`;
  if (stats.rate !== undefined) answer.rate.textContent = `${stats.rate.toFixed(1)} tokens/s`;
  if (stats.tokens !== undefined) answer.count.textContent = `${stats.tokens} token${stats.tokens === 1 ? "" : "s"}`;
  if (message.error) {
    answer.error.textContent = message.error.message;
    answer.error.dataset.code = message.error.code;
    answer.error.hidden = false;
  }
}

function showConversation() {
  ui.log.replaceChildren(ui.intro);
  ui.intro.hidden = current.messages.length > 0;
  for (const message of current.messages) {
    if (message.role === "user") addUserMessage(message);
    else addAnswer(message);
  }
  showHistory();
  scrollToEnd(true);
}

function nearEnd() {
  return ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 80;
}

function scrollToEnd(force = false) {
  if (force || nearEnd()) ui.log.scrollTop = ui.log.scrollHeight;
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.hidden = !busy;
  showHistory();
}

function formatSeconds(ms) {
  return `${(ms / 1000).toFixed(2)} s`;
}

async function send(event) {
  event.preventDefault();
  if (inFlight) return;
  const content = ui.prompt.value;
  const model = ui.model.value.trim();
  if (!content.trim()) return ui.prompt.focus();
  if (!model) {
    ui.modelHint.textContent = "Pick a model first.";
    return ui.model.focus();
  }
  const options = readOptions();
  if (options === null) return;
  localStorage.setItem(MODEL_STORAGE, model);

  const question = { role: "user", content };
  if (!current.messages.length) current.title = titleFor(content);
  current.messages.push(question);
  const messages = modelMessages(current);
  const reply = { role: "assistant", content: "", model, state: "waiting", stats: {} };
  current.messages.push(reply);
  current.updated = Date.now();
  addUserMessage(question);
  ui.prompt.value = "";
  fitPrompt();
  const answer = addAnswer(reply);
  scrollToEnd(true);
  const controller = new AbortController();
  inFlight = controller;
  setBusy(true);
  save();
  await stream(answer, { model, messages, options }, controller);
}

async function stream(answer, body, controller) {
  const { message } = answer;
  const sentAt = performance.now();
  let firstAt = null;
  let frame = null;
  let savedAt = Date.now();
  // Time to first token counts up while we wait, then freezes.
  const waiting = setInterval(() => { answer.ttft.textContent = formatSeconds(performance.now() - sentAt); }, 100);
  const draw = () => {
    frame = null;
    renderAnswer(answer);
    scrollToEnd();
  };

  try {
    await streamChat({
      body,
      apiKey: apiKey(),
      signal: controller.signal,
      onRequest: (id) => {
        message.requestId = id || "";
        answer.node.dataset.requestId = message.requestId;
      },
      onStatus: ({ state, position }) => {
        answer.state.textContent = state === "queued" && position ? `queued, position ${position}` : "an agent is on it";
      },
      onReconnecting: (attempt) => {
        if (attempt === 1) {
          const drops = Number(answer.node.dataset.resumes) + 1;
          answer.node.dataset.resumes = String(drops);
          answer.resumes.textContent = drops === 1 ? "resumed after a dropped connection"
            : `resumed after ${drops} dropped connections`;
        }
        answer.node.dataset.state = "reconnecting";
        answer.state.textContent = "connection lost, resuming…";
      },
      onDelta: (delta) => {
        const now = performance.now();
        if (firstAt === null) {
          firstAt = now;
          clearInterval(waiting);
          message.stats.ttft = now - sentAt;
        }
        message.content += delta;
        message.state = "streaming";
        message.stats.tokens = (message.stats.tokens || 0) + 1;
        if (message.stats.tokens > 1 && now > firstAt) {
          message.stats.rate = (message.stats.tokens - 1) / ((now - firstAt) / 1000);
        }
        // Markdown is re-rendered once per frame, not once per token.
        if (frame === null) frame = requestAnimationFrame(draw);
        if (Date.now() - savedAt > SAVE_WHILE_STREAMING_MS) {
          savedAt = Date.now();
          save();
        }
      },
    });
    message.state = "done";
  } catch (err) {
    if (controller.signal.aborted) {
      message.state = "stopped";
    } else {
      const known = err instanceof ChatError;
      message.error = { code: known ? err.code : "network_error",
        message: known ? err.message : `Could not reach the server (${err.message}).` };
      message.state = "error";
      // The failed question is not part of the conversation the model saw.
      current.messages[current.messages.indexOf(message) - 1].failed = true;
    }
  } finally {
    clearInterval(waiting);
    if (frame !== null) cancelAnimationFrame(frame);
    if (firstAt === null) answer.ttft.textContent = "";
    inFlight = null;
    renderAnswer(answer);
    setBusy(false);
    save();
    // An error is always brought into view above the composer, with the line under it.
    if (message.error) answer.stats.scrollIntoView({ block: "nearest" });
    else scrollToEnd();
    ui.prompt.focus();
  }
}

function openConversation(id) {
  if (inFlight) return;
  current = conversations.find((c) => c.id === id) || newConversation();
  closeHistory();
  showConversation();
  saveConversations(conversations, current.id);
  ui.prompt.focus();
}

function deleteConversation(id) {
  if (inFlight) return;
  conversations = conversations.filter((c) => c.id !== id);
  if (current.id === id) {
    current = conversations[0] || newConversation();
    showConversation();
  }
  save();
}

function newChat() {
  if (inFlight) return;
  current = newConversation();
  closeHistory();
  showConversation();
  ui.prompt.focus();
}

function openHistory() {
  ui.history.classList.add("open");
  ui.backdrop.hidden = false;
  ui.historyToggle.setAttribute("aria-expanded", "true");
}

function closeHistory() {
  ui.history.classList.remove("open");
  ui.backdrop.hidden = true;
  ui.historyToggle.setAttribute("aria-expanded", "false");
}

// The message box grows with its text, up to the cap the stylesheet sets.
function fitPrompt() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${ui.prompt.scrollHeight + 2}px`;
}

ui.form.addEventListener("submit", send);
ui.stop.addEventListener("click", () => {
  if (!inFlight) return;
  inFlight.abort();
  const answers = ui.log.querySelectorAll("[data-request-id]");
  const last = answers[answers.length - 1];
  if (last) cancelChat(last.dataset.requestId, apiKey());
});
ui.newChat.addEventListener("click", newChat);
ui.historyToggle.addEventListener("click", openHistory);
ui.historyClose.addEventListener("click", closeHistory);
ui.backdrop.addEventListener("click", closeHistory);
ui.historyList.addEventListener("click", (event) => {
  const item = event.target.closest("[data-id]");
  if (!item) return;
  if (event.target.closest(".history-delete")) deleteConversation(item.dataset.id);
  else if (event.target.closest(".history-open")) openConversation(item.dataset.id);
});
ui.log.addEventListener("click", (event) => {
  const button = event.target.closest(".copy-code");
  if (button) copyCode(button);
});
ui.advancedOpen.addEventListener("click", () => ui.advanced.showModal());
ui.advancedDone.addEventListener("click", () => { if (readOptions() !== null) ui.advanced.close(); });
ui.advanced.addEventListener("click", (event) => { if (event.target === ui.advanced) ui.advanced.close(); });
ui.noticeClose.addEventListener("click", () => showNotice(""));
ui.prompt.addEventListener("input", fitPrompt);
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
document.addEventListener("keydown", (event) => { if (event.key === "Escape") closeHistory(); });
ui.apiKey.value = localStorage.getItem(API_KEY_STORAGE) || "";
ui.apiKey.addEventListener("change", () => {
  localStorage.setItem(API_KEY_STORAGE, apiKey());
  loadModels();
});
ui.model.addEventListener("focus", loadModels);

showNotice(loaded.notice);
showConversation();
loadModels();
ui.prompt.focus();
