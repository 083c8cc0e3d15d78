// The operator page: polls GET /api/v1/status every few seconds and renders
// it with textContent only (agent names and models are data, not markup).
import { authHeaders, errorFrom } from "./sse.js";

const TOKEN_STORAGE = "orchestrator.adminToken";
const REFRESH_MS = 3000;

const $ = (id) => document.getElementById(id);
const ui = {
  updated: $("updated"),
  banner: $("banner"),
  tokenBox: $("token-box"),
  tokenForm: $("token-form"),
  token: $("admin-token"),
  tiles: { agents: $("tile-agents"), queued: $("tile-queued"), active: $("tile-active"), latency: $("tile-latency") },
  agents: document.querySelector("#agents tbody"),
  queue: document.querySelector("#queue tbody"),
  outcomesTitle: $("outcomes-title"),
  outcomes: $("outcomes"),
  errors: $("errors"),
  latency: $("latency"),
};

let timer = null;

function cell(text, className, label) {
  const td = document.createElement("td");
  if (className) td.className = className;
  if (label) td.dataset.label = label; // shown before the value where a phone stacks the table
  td.textContent = text;
  return td;
}

function row(...cells) {
  const tr = document.createElement("tr");
  tr.append(...cells);
  return tr;
}

function emptyRow(columns, text) {
  const td = cell(text, "empty");
  td.colSpan = columns;
  return row(td);
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toFixed(2)} s`;
}

function ago(now, then) {
  if (!then) return "never";
  const s = Math.max(0, Math.round(now - then));
  if (s < 2) return "just now";
  return s < 90 ? `${s} s ago` : `${Math.round(s / 60)} min ago`;
}

function number(value) {
  return value === null || value === undefined ? "–" : value.toLocaleString("en");
}

function agentRow(agent, now) {
  const name = cell(agent.name, "agent-name");
  name.append(document.createElement("br"), Object.assign(document.createElement("small"), { textContent: agent.id }));
  const models = cell("", "models", "Models");
  if (agent.models.length) {
    models.append(...agent.models.map((m) => Object.assign(document.createElement("span"), { className: "chip", textContent: m })));
  } else {
    models.textContent = "any";
  }
  const speed = agent.tokens_per_second === null ? "–" : agent.tokens_per_second.toFixed(1);
  return row(name, models, cell(number(agent.slots), "num", "Slots"), cell(ago(now, agent.last_seen), "num", "Last seen"),
    cell(number(agent.jobs_done), "num", "Jobs done"), cell(number(agent.tokens_streamed), "num", "Tokens"),
    cell(speed, "num", "Tokens/s (1 min)"));
}

function render(status) {
  const { agents, queue, requests, first_token_latency: latency } = status;
  const minutes = Math.round(status.window_seconds / 60);
  const queued = queue.reduce((sum, q) => sum + q.queued, 0);
  const active = queue.reduce((sum, q) => sum + q.active, 0);

  ui.tiles.agents.textContent = number(agents.length);
  ui.tiles.queued.textContent = number(queued);
  ui.tiles.active.textContent = number(active);
  ui.tiles.latency.textContent = `${seconds(latency.p50)} / ${seconds(latency.p95)}`;

  ui.agents.replaceChildren(...(agents.length
    ? agents.map((a) => agentRow(a, status.now))
    : [emptyRow(7, "No agent has been seen recently.")]));
  ui.queue.replaceChildren(...(queue.length
    ? queue.map((q) => row(cell(q.model), cell(number(q.queued), "num"), cell(number(q.active), "num")))
    : [emptyRow(3, "Nothing queued or running.")]));

  ui.outcomesTitle.textContent = `Finished in the last ${minutes} min`;
  ui.outcomes.replaceChildren(...Object.entries(requests.by_status).flatMap(([name, count]) => {
    const dt = document.createElement("dt");
    dt.textContent = name;
    dt.className = `outcome-${name}`;
    const dd = document.createElement("dd");
    dd.textContent = number(count);
    return [dt, dd];
  }));
  const errors = Object.entries(requests.errors);
  ui.errors.textContent = errors.length
    ? `Failures: ${errors.map(([code, count]) => `${code} ×${count}`).join(", ")}`
    : "No failures.";
  ui.latency.textContent = latency.samples
    ? `First-token latency over ${number(latency.samples)} request${latency.samples === 1 ? "" : "s"}: `
      + `p50 ${seconds(latency.p50)}, p95 ${seconds(latency.p95)}.`
    : "No finished request to measure first-token latency from yet.";
}

function showBanner(text) {
  ui.banner.textContent = text;
  ui.banner.hidden = !text;
}

async function refresh() {
  clearTimeout(timer);
  if (document.hidden) { // a background tab asks nothing; it refreshes when shown again
    timer = setTimeout(refresh, REFRESH_MS);
    return;
  }
  try {
    const response = await fetch("/api/v1/status", { headers: authHeaders(ui.token.value.trim()), cache: "no-store" });
    if (!response.ok) {
      const err = await errorFrom(response);
      if (response.status === 401) {
        ui.tokenBox.open = true;
        showBanner("This server needs its admin token to show its status: enter it below.");
      } else {
        showBanner(`Could not load the status: ${err.message}`);
      }
      return;
    }
    render(await response.json());
    showBanner("");
    document.body.dataset.loaded = "true";
    ui.updated.textContent = `Updated ${new Date().toLocaleTimeString()} · every ${REFRESH_MS / 1000} s`;
  } catch (err) {
    showBanner(`Could not reach the server (${err.message}); retrying.`);
  } finally {
    timer = setTimeout(refresh, REFRESH_MS);
  }
}

ui.token.value = localStorage.getItem(TOKEN_STORAGE) || "";
ui.tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(TOKEN_STORAGE, ui.token.value.trim());
  ui.tokenBox.open = false;
  refresh();
});
document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
refresh();
