// The operator page: polls GET /api/v1/status and /api/v1/status/series every
// few seconds; tables are rendered with textContent only (agent names and
// models are data, not markup), the charts by charts.js.
import { authHeaders, errorFrom } from "./sse.js";
import { createCharts } from "./charts.js";

const TOKEN_STORAGE = "orchestrator.adminToken";
const REFRESH_MS = 3000;

const $ = (id) => document.getElementById(id);
const ui = {
  updated: $("updated"),
  banner: $("banner"),
  tokenBox: $("token-box"),
  tokenForm: $("token-form"),
  token: $("admin-token"),
  tiles: {
    agents: $("tile-agents"), queued: $("tile-queued"), active: $("tile-active"), rate: $("tile-rate"),
    rateLabel: $("tile-rate-label"), p50: $("tile-p50"), p95: $("tile-p95"),
    p50Label: $("tile-p50-label"), p95Label: $("tile-p95-label"),
  },
  rateHead: $("rate-head"),
  tokensSummary: $("tokens-summary"),
  latencySummary: $("latency-summary"),
  agents: document.querySelector("#agents tbody"),
  queue: document.querySelector("#queue tbody"),
  outcomesTitle: $("outcomes-title"),
  outcomes: $("outcomes"),
  errors: $("errors"),
  latency: $("latency"),
};

let timer = null;
const charts = createCharts($("tokens-chart"), $("latency-chart"));
if (!charts) {
  ui.tokensSummary.textContent = ui.latencySummary.textContent = "The chart library did not load; the tables below still work.";
}

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

function rate(value) {
  if (value === null || value === undefined) return "–";
  return value >= 100 ? value.toFixed(0) : value.toFixed(1);
}

function agentRow(agent, now, rateLabel) {
  const name = cell(agent.name, "agent-name");
  name.append(document.createElement("br"), Object.assign(document.createElement("small"), { textContent: agent.id }));
  const models = cell("", "models", "Models");
  if (agent.models.length) {
    models.append(...agent.models.map((m) => Object.assign(document.createElement("span"), { className: "chip", textContent: m })));
  } else {
    models.textContent = "any";
  }
  return row(name, models, cell(number(agent.slots), "num", "Slots"), cell(ago(now, agent.last_seen), "num", "Last seen"),
    cell(number(agent.jobs_done), "num", "Jobs done"), cell(number(agent.tokens_streamed), "num", "Tokens"),
    cell(rate(agent.current_tokens_per_second), "num rate", rateLabel));
}

function render(status) {
  const { agents, queue, requests, first_token_latency: latency } = status;
  const minutes = Math.round(status.window_seconds / 60);
  const queued = queue.reduce((sum, q) => sum + q.queued, 0);
  const active = queue.reduce((sum, q) => sum + q.active, 0);
  // Each agent's rate is over the last few seconds: say so wherever it shows.
  const rateLabel = `Tokens/s (last ${status.current_rate_seconds} s)`;
  const totalRate = agents.reduce((sum, a) => sum + (a.current_tokens_per_second || 0), 0);

  ui.tiles.agents.textContent = number(agents.length);
  ui.tiles.queued.textContent = number(queued);
  ui.tiles.active.textContent = number(active);
  ui.tiles.rateLabel.textContent = rateLabel;
  ui.tiles.rate.textContent = rate(totalRate);
  ui.tiles.p50Label.textContent = `First token p50 (${minutes} min)`;
  ui.tiles.p95Label.textContent = `First token p95 (${minutes} min)`;
  ui.tiles.p50.textContent = seconds(latency.p50);
  ui.tiles.p95.textContent = seconds(latency.p95);
  ui.rateHead.textContent = rateLabel;

  ui.agents.replaceChildren(...(agents.length
    ? agents.map((a) => agentRow(a, status.now, rateLabel))
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

function renderCharts(series) {
  const { tokens, latency } = charts.update(series);
  ui.tokensSummary.textContent = tokens;
  ui.latencySummary.textContent = latency;
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
    const request = { headers: authHeaders(ui.token.value.trim()), cache: "no-store" };
    const [response, series] = await Promise.all([
      fetch("/api/v1/status", request), charts ? fetch("/api/v1/status/series", request) : null]);
    const refused = [response, series].find((r) => r && !r.ok);
    if (refused) {
      const err = await errorFrom(refused);
      if (refused.status === 401) {
        ui.tokenBox.open = true;
        showBanner("This server needs its admin token to show its status: enter it below.");
      } else {
        showBanner(`Could not load the status: ${err.message}`);
      }
      return;
    }
    render(await response.json());
    if (series) renderCharts(await series.json());
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
