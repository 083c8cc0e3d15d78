// The chat page: model picker, composer, and one streamed answer at a time.
// Everything from the network is rendered with textContent or Text nodes,
// never parsed as HTML: a model answer containing <script> shows as text.
import { ChatError, authHeaders, cancelChat, errorFrom, streamChat } from "./sse.js";

const API_KEY_STORAGE = "orchestrator.apiKey";
const MODEL_STORAGE = "orchestrator.model";

const $ = (id) => document.getElementById(id);
const ui = {
  log: $("log"),
  intro: $("intro"),
  form: $("composer"),
  model: $("model"),
  models: $("models"),
  modelHint: $("model-hint"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  newChat: $("new-chat"),
  advanced: $("advanced"),
  apiKey: $("api-key"),
  options: $("options"),
  optionsError: $("options-error"),
};

let conversation = []; // sent with each request: [{role, content}]
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
    ui.advanced.open = true;
    return null;
  }
  return options;
}

function addUserMessage(text) {
  const node = element("article", "msg user");
  node.append(element("div", "role", "You"), element("div", "text", text));
  ui.intro.hidden = true;
  ui.log.append(node);
}

// One answer: its text, an error box, and the live numbers under it.
function addAnswer(model) {
  const node = element("article", "msg assistant");
  node.dataset.state = "waiting";
  node.dataset.resumes = "0";
  const body = element("div", "text");
  const text = document.createTextNode("");
  body.append(text);
  const error = element("div", "error");
  error.setAttribute("role", "alert");
  error.hidden = true;
  const stats = element("div", "stats");
  const state = element("span", "state", "waiting for the first token…");
  const ttft = element("span", "ttft");
  const rate = element("span", "rate");
  const count = element("span", "count");
  const resumes = element("span", "resumes");
  stats.append(state, ttft, rate, count, resumes);
  node.append(element("div", "role", model), body, error, stats);
  ui.log.append(node);
  scrollToEnd();
  return { node, text, error, state, ttft, rate, count, resumes };
}

function scrollToEnd() {
  ui.log.scrollTop = ui.log.scrollHeight;
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.hidden = !busy;
  ui.newChat.disabled = busy;
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

  conversation.push({ role: "user", content });
  addUserMessage(content);
  ui.prompt.value = "";
  const answer = addAnswer(model);
  const controller = new AbortController();
  inFlight = controller;
  setBusy(true);

  const sentAt = performance.now();
  let firstAt = null;
  let tokens = 0;
  // Time to first token counts up while we wait, then freezes.
  const waiting = setInterval(() => {
    answer.ttft.textContent = formatSeconds(performance.now() - sentAt);
  }, 100);

  try {
    await streamChat({
      body: { model, messages: conversation, options },
      apiKey: apiKey(),
      signal: controller.signal,
      onRequest: (id) => { answer.node.dataset.requestId = id || ""; },
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
          answer.ttft.textContent = `first token ${formatSeconds(now - sentAt)}`;
        }
        tokens += 1;
        answer.text.appendData(delta);
        answer.node.dataset.state = "streaming";
        answer.state.textContent = "streaming";
        answer.count.textContent = `${tokens} token${tokens === 1 ? "" : "s"}`;
        if (tokens > 1 && now > firstAt) {
          answer.rate.textContent = `${((tokens - 1) / ((now - firstAt) / 1000)).toFixed(1)} tokens/s`;
        }
        scrollToEnd();
      },
    });
    finish(answer, "done", "done");
    conversation.push({ role: "assistant", content: answer.text.data });
  } catch (err) {
    if (controller.signal.aborted) {
      finish(answer, "stopped", "stopped");
      if (answer.text.data) conversation.push({ role: "assistant", content: answer.text.data });
    } else {
      showError(answer, err);
      conversation.pop(); // the failed question is not part of the conversation the model saw
    }
  } finally {
    clearInterval(waiting);
    inFlight = null;
    setBusy(false);
    ui.prompt.focus();
  }
}

function finish(answer, state, label) {
  answer.node.dataset.state = state;
  answer.state.textContent = label;
  if (!answer.ttft.textContent.startsWith("first")) answer.ttft.textContent = "";
}

function showError(answer, err) {
  const known = err instanceof ChatError;
  answer.error.textContent = known ? err.message : `Could not reach the server (${err.message}).`;
  if (known && err.code) answer.error.dataset.code = err.code;
  answer.error.hidden = false;
  finish(answer, "error", known ? `error: ${err.code}` : "error");
}

function newChat() {
  if (inFlight) return;
  conversation = [];
  ui.log.replaceChildren(ui.intro);
  ui.intro.hidden = false;
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
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
ui.apiKey.value = localStorage.getItem(API_KEY_STORAGE) || "";
ui.apiKey.addEventListener("change", () => {
  localStorage.setItem(API_KEY_STORAGE, apiKey());
  loadModels();
});
ui.model.addEventListener("focus", loadModels);
loadModels();
ui.prompt.focus();
