// The chat page: model picker, composer, the conversation and its history.
// Questions, errors and model names are rendered as text; answers as Markdown
// through markdown.js, which never lets an answer's own markup through.
import { ChatError, cancelChat, streamChat } from "./sse.js";
import { MODEL_STORAGE, fitPrompt, loadModels, readOptions } from "./composer.js";
import { copyCode } from "./markdown.js";
import {
  STORE_KEY, loadConversations, modelMessages, newConversation, saveConversations, titleFor,
} from "./conversations.js";
import { historyDrawer, renderHistory } from "./history.js";
import { addAnswer, addUserMessage, formatSeconds, renderAnswer } from "./messages.js";

const API_KEY_STORAGE = "orchestrator.apiKey";
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
const drawer = historyDrawer(ui.history, ui.historyToggle, ui.historyClose, ui.backdrop);

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

function showConversation() {
  ui.log.replaceChildren(ui.intro);
  ui.intro.hidden = current.messages.length > 0;
  for (const message of current.messages) {
    if (message.role === "user") addUserMessage(ui.log, message);
    else addAnswer(ui.log, message);
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
  const options = readOptions(ui);
  if (options === null) return;
  localStorage.setItem(MODEL_STORAGE, model);

  const question = { role: "user", content };
  if (!current.messages.length) current.title = titleFor(content);
  current.messages.push(question);
  const messages = modelMessages(current);
  const reply = { role: "assistant", content: "", model, state: "waiting", stats: {} };
  current.messages.push(reply);
  current.updated = Date.now();
  ui.intro.hidden = true;
  addUserMessage(ui.log, question);
  ui.prompt.value = "";
  fitPrompt(ui.prompt);
  const answer = addAnswer(ui.log, reply);
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
  drawer.close();
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
  drawer.close();
  showConversation();
  ui.prompt.focus();
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
ui.advancedDone.addEventListener("click", () => { if (readOptions(ui) !== null) ui.advanced.close(); });
ui.advanced.addEventListener("click", (event) => { if (event.target === ui.advanced) ui.advanced.close(); });
ui.noticeClose.addEventListener("click", () => showNotice(""));
ui.prompt.addEventListener("input", () => fitPrompt(ui.prompt));
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
// Another tab saved: take its list, keeping the conversation on this screen as it is here.
window.addEventListener("storage", (event) => {
  if (event.key !== STORE_KEY) return;
  conversations = loadConversations().conversations.map((c) => (c.id === current.id ? current : c));
  showHistory();
});
window.addEventListener("pagehide", () => { if (inFlight) save(); });
ui.apiKey.value = localStorage.getItem(API_KEY_STORAGE) || "";
ui.apiKey.addEventListener("change", () => {
  localStorage.setItem(API_KEY_STORAGE, apiKey());
  loadModels(ui, apiKey());
});
ui.model.addEventListener("focus", () => loadModels(ui, apiKey()));

showNotice(loaded.notice);
showConversation();
loadModels(ui, apiKey());
ui.prompt.focus();
