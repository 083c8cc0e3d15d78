// The status page's two charts, drawn by uPlot (vendor/uplot, loaded as a
// classic script before this module) from GET /api/v1/status/series.
const HEIGHT_PX = 180;

function cssColor(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function formatSeconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toFixed(2)} s`;
}

function formatRate(value) {
  if (value === null || value === undefined) return "–";
  return value >= 100 ? value.toFixed(0) : value.toFixed(1);
}

function clockTime(unixSeconds) {
  return new Date(unixSeconds * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

// A y-axis from zero, so an idle network is a flat line at the bottom and a
// burst reaches near the top, whatever its size.
const fromZero = (minimum) => (u, min, max) => [0, Math.max(max || 0, minimum) * 1.15];

function axes(format, size) {
  const muted = cssColor("--muted");
  const grid = { stroke: cssColor("--border"), width: 1 };
  return [
    { stroke: muted, grid, ticks: grid, space: 60 },
    { stroke: muted, grid, ticks: grid, size, values: (u, values) => values.map(format) },
  ];
}

class Chart {
  constructor(target, series, { format, minimum, axisWidth }) {
    this.target = target;
    const options = {
      width: Math.max(target.clientWidth, 200),
      height: HEIGHT_PX,
      scales: { x: { time: true }, y: { range: fromZero(minimum) } },
      axes: axes(format, axisWidth),
      series: [{ value: (u, t) => (t === null ? "–" : clockTime(t)) }, ...series.map((s) => ({
        spanGaps: false, width: 2, value: (u, v) => format(v), ...s,
      }))],
      cursor: { drag: { x: false, y: false } },
      legend: { show: true },
    };
    this.plot = new globalThis.uPlot(options, [[], ...series.map(() => [])], target);
    // Follow the card's width: phones rotate, sidebars open.
    new ResizeObserver(() => {
      const width = Math.max(target.clientWidth, 200);
      if (width !== this.plot.width) this.plot.setSize({ width, height: HEIGHT_PX });
    }).observe(target);
  }

  update(columns) {
    this.plot.setData(columns);
    this.target.dataset.points = String(columns[0].length);
  }
}

/** Both charts; `update(series)` redraws them from one series answer and returns the summaries. */
export function createCharts(tokensTarget, latencyTarget) {
  if (typeof globalThis.uPlot !== "function") return null; // the script did not load: tables still work
  const tokens = new Chart(tokensTarget, [
    { label: "tokens/s", stroke: cssColor("--accent"), fill: `${cssColor("--accent")}22`, points: { show: false } },
  ], { format: formatRate, minimum: 1, axisWidth: 48 });
  const latency = new Chart(latencyTarget, [
    // Few buckets have first tokens: solid points, so a lone one shows.
    { label: "p50", stroke: cssColor("--accent"), points: { show: true, size: 7, fill: cssColor("--accent") } },
    { label: "p95", stroke: cssColor("--warn"), points: { show: true, size: 7, fill: cssColor("--warn") } },
  ], { format: formatSeconds, minimum: 0.1, axisWidth: 70 });
  return {
    update(series) {
      const { buckets } = series;
      const times = buckets.map((b) => b.start);
      tokens.update([times, buckets.map((b) => b.tokens_per_second)]);
      latency.update([times, buckets.map((b) => b.first_token_p50), buckets.map((b) => b.first_token_p95)]);
      return summaries(series);
    },
  };
}

/** What the charts show, in words (their text alternative, and what a phone reads at a glance). */
export function summaries({ buckets, bucket_seconds: width, window_seconds: window, truncated }) {
  const minutes = Math.round(window / 60);
  const peak = buckets.reduce((best, b) => (b.tokens_per_second > best.tokens_per_second ? b : best), buckets[0]);
  const latest = buckets[buckets.length - 1];
  const partial = truncated ? " Only the newest 10,000 requests are drawn." : "";
  const tokens = peak && peak.tokens_per_second > 0
    ? `Peak ${formatRate(peak.tokens_per_second)} tokens/s at ${clockTime(peak.start)}, now `
      + `${formatRate(latest.tokens_per_second)}; ${width} s buckets over ${minutes} min.${partial}`
    : `No tokens delivered in the last ${minutes} min.`;
  const measured = buckets.filter((b) => b.first_tokens > 0);
  const last = measured[measured.length - 1];
  const latency = last
    ? `Latest (${clockTime(last.start)}, ${last.first_tokens} request${last.first_tokens === 1 ? "" : "s"}): `
      + `p50 ${formatSeconds(last.first_token_p50)}, p95 ${formatSeconds(last.first_token_p95)}.${partial}`
    : `No first token in the last ${minutes} min.`;
  return { tokens, latency };
}
