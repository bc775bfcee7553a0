// The per-layer view compare and drift share: one bar per BatchNorm layer, worst first by
// the chosen measure, and a per-channel drill-down of the layer picked.

import { channelColumns, layerBars } from "../charts.js";
import { clear, fmt, h, select } from "../dom.js";

export const MEASURES = [
  ["kl", "KL divergence (mean over channels, nats)", (layer) => layer.kl_divergence?.mean],
  ["mean_shift", "Mean shift (mean over channels, running σ)", (layer) => layer.mean_shift?.mean],
  ["var_ratio", "Variance ratio (mean over channels; 1 = agreement)", (layer) => layer.var_ratio?.mean],
  ["log_var", "Largest |log variance ratio|", (layer) => layer.max_abs_log_var_ratio],
];

const CHANNEL_MEASURES = { kl: "kl_divergence", mean_shift: "mean_shift" };

/** layers: compare's `batchnorm` or drift's `layers`; threshold applies to the KL view. */
/** `state` ({measure, selected}) outlives a redraw: the drift page passes the same one to
 * every refresh, so the layer and measure picked stay picked. */
export function layerExplorer({ idPrefix, layers, threshold = null, flagged = () => false, state = { measure: "kl", selected: null } }) {
  const chartArea = h("div", { class: "chart-area" });
  const detail = h("div", { class: "drilldown", "aria-live": "polite" });

  const showChannels = (layer) => {
    clear(detail);
    if (!layer) return;
    const statistics = layer.channel_statistics;
    const key = CHANNEL_MEASURES[state.measure] ?? "kl_divergence";
    const label = key === "kl_divergence" ? "KL divergence" : "mean shift";
    detail.append(h("h3", { id: `${idPrefix}-channels-title` }, "Channels of ", h("code", {}, layer.name)));
    if (!statistics) {
      detail.append(h("p", {}, "No per-channel values for this layer yet."));
      return;
    }
    detail.append(
      channelColumns({ title: `${label} per channel of ${layer.name}`, values: statistics[key], measure: label }),
      h(
        "p",
        {},
        `${layer.channels} channels; batch mean ranges ${fmt(Math.min(...statistics.mean))} to ${fmt(Math.max(...statistics.mean))}, variance ${fmt(Math.min(...statistics.var))} to ${fmt(Math.max(...statistics.var))}.`,
      ),
    );
  };

  const draw = () => {
    const [, title, value] = MEASURES.find(([key]) => key === state.measure);
    const rows = layers
      .map((layer) => ({ label: layer.name, values: [value(layer) ?? null], flagged: flagged(layer), layer }))
      .sort((a, b) => (b.values[0] ?? -Infinity) - (a.values[0] ?? -Infinity));
    clear(chartArea).append(
      layerBars({
        title,
        rows,
        threshold: state.measure === "kl" ? threshold : null,
        selected: state.selected,
        onSelect: (row) => {
          state.selected = row.label;
          draw();
          showChannels(row.layer);
        },
      }),
    );
  };

  const picker = select(`${idPrefix}-measure`, "Measure", MEASURES.map(([key, title]) => [key, title]), state.measure, (key) => {
    state.measure = key;
    draw();
    showChannels(layers.find((layer) => layer.name === state.selected));
  });
  const current = layers.find((layer) => layer.name === state.selected) ?? layers[0];
  state.selected = current ? current.name : null;
  draw();
  showChannels(current);
  return h(
    "div",
    { class: "layer-explorer" },
    picker,
    h("p", { class: "hint" }, "Select a layer (click, or Tab then Enter) for its channels."),
    chartArea,
    detail,
  );
}
