// Charts as SVG built through the DOM (see dom.js): no chart library. The console draws
// two kinds, horizontal bars per BN layer (one or two series) and columns per channel;
// both fit in a few dozen lines, work under a strict CSP (no eval, no inline styles) and
// put every label in a text node, so a layer name can never become markup.

import { fmt, h, s } from "./dom.js";

const ROW = 24;
const LABEL = 170;
const WIDTH = 760;

function truncate(text, length) {
  return text.length > length ? `${text.slice(0, length - 1)}…` : text;
}

/**
 * Horizontal bars, one row per layer, in the order given (callers sort worst first).
 * rows: [{label, values: [number|null, ...], flagged}]; series: names of the values
 * (one or two); threshold: a dashed line; onSelect(row): click or Enter/Space on a row.
 */
export function layerBars({ title, rows, series = ["value"], threshold = null, onSelect = null, selected = null }) {
  const finite = rows.flatMap((row) => row.values).filter((value) => Number.isFinite(value));
  const top = Math.max(threshold ?? 0, ...finite, 1e-12) * 1.08;
  // room for "0.00813" or "1.36 → 1.5e-3" at the end of each row
  const VALUE = series.length > 1 ? 130 : 70;
  const plot = WIDTH - LABEL - VALUE;
  const barHeight = (ROW - 8) / series.length;
  const height = rows.length * ROW + 28;
  const x = (value) => LABEL + (Math.max(0, value) / top) * plot;
  const svg = s("svg", {
    class: "chart bars",
    viewBox: `0 0 ${WIDTH} ${height}`,
    role: "group",
    "aria-label": title,
  });
  svg.append(s("title", {}, title));
  rows.forEach((row, index) => {
    const y = index * ROW + 4;
    const label = `${row.label}: ${series.map((name, i) => `${name} ${fmt(row.values[i])}`).join(", ")}`;
    const group = s("g", {
      class: `bar${row.flagged ? " flagged" : ""}${selected === row.label ? " selected" : ""}`,
      "data-layer": row.label,
    });
    if (onSelect) {
      group.setAttribute("tabindex", "0");
      group.setAttribute("role", "button");
      group.addEventListener("click", () => onSelect(row));
      group.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          onSelect(row);
        }
      });
    }
    group.setAttribute("aria-label", label);
    group.append(
      s("title", {}, label),
      s("rect", { class: "row-hit", x: 0, y: y - 2, width: WIDTH, height: ROW }),
      s("text", { class: "label", x: LABEL - 8, y: y + ROW / 2, "text-anchor": "end" }, truncate(row.label, 24)),
    );
    series.forEach((_, i) => {
      const value = row.values[i];
      if (!Number.isFinite(value)) return;
      group.append(
        s("rect", {
          class: `series-${i}`,
          x: LABEL,
          y: y + 2 + i * barHeight,
          width: Math.max(1, x(value) - LABEL),
          height: barHeight - 1,
        }),
      );
    });
    group.append(
      s("text", { class: "value", x: WIDTH - VALUE + 6, y: y + ROW / 2 }, row.values.map((value) => fmt(value)).join(" → ")),
    );
    svg.append(group);
  });
  if (threshold !== null) {
    const tx = x(threshold);
    svg.append(
      s("line", { class: "threshold", x1: tx, x2: tx, y1: 0, y2: rows.length * ROW + 6 }),
      s("text", { class: "threshold-label", x: tx, y: rows.length * ROW + 22, "text-anchor": "middle" }, `threshold ${fmt(threshold)}`),
    );
  }
  return h(
    "figure",
    { class: "chart-figure" },
    svg,
    series.length > 1
      ? h("figcaption", { class: "legend" }, series.map((name, i) => h("span", { class: `key series-${i}` }, name)))
      : null,
  );
}

/** Columns per channel (channel order) of one measure, with the highest ones listed below. */
export function channelColumns({ title, values, measure, top = 8 }) {
  const height = 180;
  const max = Math.max(...values.filter(Number.isFinite), 1e-12) * 1.05;
  const step = WIDTH / values.length;
  const svg = s("svg", { class: "chart columns", viewBox: `0 0 ${WIDTH} ${height + 20}`, role: "img", "aria-label": title });
  svg.append(s("title", {}, title));
  values.forEach((value, channel) => {
    if (!Number.isFinite(value)) return;
    const barHeight = (Math.max(0, value) / max) * height;
    svg.append(
      s(
        "rect",
        { class: "column", x: channel * step, y: height - barHeight, width: Math.max(step - (step > 3 ? 1 : 0), 0.5), height: barHeight },
        s("title", {}, `channel ${channel}: ${measure} ${fmt(value)}`),
      ),
    );
  });
  svg.append(
    s("line", { class: "axis", x1: 0, x2: WIDTH, y1: height, y2: height }),
    s("text", { class: "axis-label", x: 0, y: height + 16 }, "channel 0"),
    s("text", { class: "axis-label", x: WIDTH, y: height + 16, "text-anchor": "end" }, `channel ${values.length - 1}`),
  );
  const worst = values
    .map((value, channel) => ({ value, channel }))
    .filter((entry) => Number.isFinite(entry.value))
    .sort((a, b) => b.value - a.value)
    .slice(0, top);
  return h(
    "figure",
    { class: "chart-figure" },
    svg,
    h("figcaption", {}, `Highest ${measure}: `, worst.map((entry) => `channel ${entry.channel} (${fmt(entry.value)})`).join(", ")),
  );
}
