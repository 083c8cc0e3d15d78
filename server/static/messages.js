// The chat page's messages: a question as text, an answer as Markdown (through
// markdown.js) with its error box and the numbers under it.
import { renderMarkdown } from "./markdown.js";

const STATE_LABELS = { waiting: "waiting for the first token…", done: "done", stopped: "stopped",
  interrupted: "interrupted by a reload", streaming: "streaming" };

export function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function formatSeconds(ms) {
  return `${(ms / 1000).toFixed(2)} s`;
}

/** Append a question to `log`; `message` is a stored `{role: "user", content, failed?}`. */
export function addUserMessage(log, message) {
  const node = element("article", "msg user");
  if (message.failed) node.dataset.failed = "true";
  node.append(element("div", "role", "You"), element("div", "text", message.content));
  log.append(node);
}

/**
 * Append an answer to `log` and return its parts; `message` is the stored answer
 * (`{role: "assistant", content, model, state, stats, error?, requestId?}`), which
 * `renderAnswer` shows again whenever it changes.
 */
export function addAnswer(log, message) {
  const node = element("article", "msg assistant");
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
  log.append(node);
  const answer = { node, body, error, stats, message, ...parts };
  renderAnswer(answer);
  return answer;
}

export function renderAnswer(answer) {
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
