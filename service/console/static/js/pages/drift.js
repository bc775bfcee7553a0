// Drift: the live traffic's BatchNorm input statistics against the running statistics
// (GET .../drift, refreshed), the verdict, a demo-traffic sender for the digits models,
// and recalibration (admin): before/after per layer and the new version.

import * as api from "../api.js";
import { layerBars } from "../charts.js";
import { clear, fmt, h, notice, percent, select } from "../dom.js";
import { demoBatch, shiftControls, shiftedPixels, takesDigits, thumbnails, v2Input } from "../digits.js";
import { adminHint, links, modelPicker } from "./common.js";
import { layerExplorer } from "./layers.js";

const REFRESH_MS = 2000;

const VERDICTS = {
  ok: "No layer's inputs drifted beyond the threshold.",
  drifted: "Some layers see inputs unlike their running statistics: eval-mode outputs may be off. Recalibrate on recent inputs.",
  insufficient_data: "Not enough sampled traffic in the window yet.",
};

function reportView(report, explorerState) {
  if (!report.available) {
    return [notice("info", `Drift is not monitored for version ${report.model_version}: ${report.reason}`)];
  }
  const verdict = report.verdict;
  return [
    h(
      "div",
      { class: "cards" },
      h(
        "div",
        { class: `card verdict verdict-${verdict.status}`, id: "drift-verdict" },
        h("span", { class: "big" }, verdict.status.replace("_", " ")),
        `${verdict.drifted_layers} of ${verdict.layers} layers drifted. ${VERDICTS[verdict.status] ?? ""}`,
      ),
      h(
        "div",
        { class: "card" },
        h("span", { class: "big", id: "drift-samples" }, String(report.samples)),
        `rows sampled from ${report.requests_sampled} requests in the last ${fmt(report.window_seconds)} s (version ${report.model_version}; the server samples ${percent(report.sample_fraction)} of requests; ${report.dropped} dropped)`,
      ),
    ),
    layerExplorer({
      idPrefix: "drift",
      layers: report.layers,
      threshold: report.kl_threshold,
      flagged: (layer) => layer.drifted,
      state: explorerState,
    }),
  ];
}

export async function driftPage(main, params) {
  const name = await modelPicker(main, "Live drift:", params[0], links.drift);
  if (name === null) return undefined;
  const metadata = await api.metadata(name);
  const digits = takesDigits(metadata);
  const live = h("section", { id: "drift-live", "aria-labelledby": "drift-live-title" }, h("h2", { id: "drift-live-title" }, "Live traffic against the running statistics"));
  const liveBody = h("div", {});
  const refreshBox = h("input", { type: "checkbox", id: "drift-refresh", checked: true });
  live.append(h("label", { class: "radio" }, refreshBox, `Refresh every ${REFRESH_MS / 1000} s`), liveBody);
  let lastDrawn = "";
  const explorerState = { measure: "kl", selected: null };

  const refresh = async () => {
    try {
      const report = await api.drift(name);
      // redraw only when something changed, so a focused bar keeps its focus
      const key = JSON.stringify(report);
      if (key === lastDrawn) return;
      lastDrawn = key;
      clear(liveBody).append(...reportView(report, explorerState));
    } catch (error) {
      clear(liveBody).append(notice("error", `The drift report failed: ${error.message}`));
    }
  };
  await refresh();
  const timer = setInterval(() => {
    if (refreshBox.checked && !document.hidden) refresh();
  }, REFRESH_MS);

  const shift = { contrast: 1, brightness: 0 };
  const sections = [live];
  const batch = digits ? await demoBatch() : null;

  if (digits) {
    const preview = h("div", { class: "preview" });
    const sendStatus = h("div", { class: "status-area", "aria-live": "polite" });
    const count = { value: "64" };
    const drawPreview = () => clear(preview).append(thumbnails(shiftedPixels(batch, shift)));
    drawPreview();
    const send = async () => {
      const requests = Number(count.value);
      const pixels = shiftedPixels(batch, shift);
      const perRequest = 16;
      const images = pixels.length / 64;
      let sent = 0;
      let failed = "";
      clear(sendStatus).append(notice("info", `Sending ${requests} requests…`));
      const one = async (i) => {
        const start = ((i * perRequest) % images) * 64;
        const slice = pixels.subarray(start, start + perRequest * 64);
        try {
          await api.postJson(`${api.modelPath(name)}/infer`, { inputs: [v2Input(metadata, slice)] });
          sent += 1;
        } catch (error) {
          failed = error.message;
        }
      };
      for (let i = 0; i < requests; i += 4) {
        await Promise.all([0, 1, 2, 3].filter((k) => i + k < requests).map((k) => one(i + k)));
      }
      clear(sendStatus).append(
        failed
          ? notice("error", `${sent} of ${requests} requests answered; the last error: ${failed}`)
          : notice("ok", `Sent ${sent} inference requests of ${perRequest} shifted digits.`),
      );
      await refresh();
    };
    sections.push(
      h(
        "section",
        { "aria-labelledby": "drift-demo-title" },
        h("h2", { id: "drift-demo-title" }, "Demo traffic"),
        h("p", {}, "Send shifted held-out digits through ordinary inference requests, as a camera or scanner change would, and watch the drift rise."),
        shiftControls("drift", shift, drawPreview),
        preview,
        select("drift-count", "Requests", [["16", "16"], ["64", "64"], ["256", "256"]], count.value, (value) => {
          count.value = value;
        }),
        h("button", { type: "button", id: "drift-send", onclick: send }, "Send demo traffic"),
        sendStatus,
      ),
    );
  }

  sections.push(recalibrationSection(name, metadata, batch, shift, refresh));
  main.append(...sections);
  return () => clearInterval(timer);
}

function recalibrationSection(name, metadata, batch, shift, refresh) {
  const admin = api.hasAdminToken();
  const status = h("div", { class: "status-area", "aria-live": "polite" });
  const result = h("div", { id: "recalibration-result" });
  const sources = [];
  if (batch) sources.push(["demo", "the demo digits with the shift above"]);
  sources.push(["file", "an uploaded .npy / .npz"], ["reservoir", "the live inputs the server kept (--drift-reservoir-samples)"]);
  const choice = { source: sources[0][0], method: "sequential" };
  const fileInput = h("input", { type: "file", id: "recalibrate-file", accept: ".npy,.npz" });

  const request = () => {
    const path = `${api.repositoryPath(name)}/recalibrate`;
    if (choice.source === "demo") {
      const pixels = shiftedPixels(batch, shift);
      return api.postJson(path, { inputs: [v2Input(metadata, pixels)], parameters: { method: choice.method } }, { admin: true });
    }
    if (choice.source === "file") {
      const [file] = fileInput.files;
      if (!file) throw new Error("choose a .npy or .npz file first");
      const contentType = file.name.toLowerCase().endsWith(".npz") ? "application/x-npz" : "application/x-npy";
      return api.call(`${path}?method=${choice.method}`, { method: "POST", body: file, contentType, admin: true });
    }
    return api.postJson(path, { parameters: { source: "reservoir", method: choice.method } }, { admin: true });
  };

  const showResult = (answer) => {
    const report = answer.recalibration;
    const rows = report.layers.map((layer) => ({
      label: layer.name,
      values: [layer.before.kl_divergence?.mean ?? null, layer.after.kl_divergence?.mean ?? null],
    }));
    const version = answer.model_version;
    clear(result).append(
      notice(
        "ok",
        h("strong", { id: "new-version" }, `Version ${version} is ${answer.state}`),
        ` (from version ${answer.from_version}, ${report.samples} samples, ${report.method}, ${fmt(report.seconds)} s). `,
        answer.version_policy === "latest" ? "Unversioned requests now go to it." : "",
      ),
      layerBars({ title: "KL divergence per layer on the calibration data: before → after", rows, series: ["before", "after"] }),
      h(
        "p",
        { class: "actions" },
        h("a", { href: links.model(name, version) }, `Package report of version ${version}`),
        h(
          "button",
          {
            type: "button",
            id: "rollback",
            onclick: async () => {
              try {
                await api.call(`${api.repositoryPath(name, version)}/unload`, { method: "POST", admin: true, body: "{}", contentType: "application/json" });
                clear(status).append(notice("ok", `Version ${version} unloaded: unversioned requests are back on the previous version.`));
                await refresh();
              } catch (error) {
                clear(status).append(notice("error", `Roll back failed: ${error.message}`));
              }
            },
          },
          `Roll back (unload version ${version})`,
        ),
      ),
    );
  };

  const run = async () => {
    clear(status).append(notice("info", "Recalibrating: estimating statistics, re-folding, verifying, loading…"));
    clear(result);
    try {
      showResult(await request());
      clear(status);
      await refresh();
    } catch (error) {
      clear(status).append(notice("error", `Recalibration failed: ${error.message}`));
    }
  };

  return h(
    "section",
    { "aria-labelledby": "recalibrate-title" },
    h("h2", { id: "recalibrate-title" }, "Recalibrate (admin)"),
    h(
      "p",
      {},
      "Re-estimate the BatchNorm running statistics on unlabeled inputs, re-fold and verify them into a new version beside the current one, and load it.",
    ),
    select("recalibrate-source", "Data", sources, choice.source, (value) => {
      choice.source = value;
    }),
    h("span", { class: "field" }, h("label", { for: "recalibrate-file" }, "File (for an upload)"), fileInput),
    select("recalibrate-method", "Method", [["sequential", "sequential (exact eval-mode statistics)"], ["batch", "batch (precise-BN)"]], choice.method, (value) => {
      choice.method = value;
    }),
    h("button", { type: "button", id: "recalibrate", disabled: !admin, "aria-describedby": admin ? null : "recalibrate-hint", onclick: run }, "Recalibrate"),
    adminHint("recalibrate-hint"),
    status,
    result,
  );
}
