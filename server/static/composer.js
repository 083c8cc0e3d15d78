// The chat page's composer: the model picker (models of online agents) and the
// Advanced dialog's options, read and checked before a question is sent.
import { authHeaders, errorFrom } from "./sse.js";
import { element } from "./messages.js";

export const MODEL_STORAGE = "orchestrator.model";

/** Fill the model picker from GET /api/v1/models; problems are said in `ui.modelHint`. */
export async function loadModels(ui, apiKey) {
  let response;
  try {
    response = await fetch("/api/v1/models", { headers: authHeaders(apiKey), cache: "no-store" });
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

/** The Advanced dialog's options as an object, or null (the dialog then shows why). */
export function readOptions(ui) {
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

/** The message box grows with its text, up to the cap the stylesheet sets. */
export function fitPrompt(textarea) {
  textarea.style.height = "auto";
  textarea.style.height = `${textarea.scrollHeight + 2}px`;
}
