// Compare: the same batch through the eval graph (running statistics) and the train graph
// (the batch's own statistics). Output agreement, then per layer how far the batch's
// statistics are from the running ones. The batch: the demo digits under a shift, an
// uploaded .npy / .npz, or a pasted V2 JSON body.

import * as api from "../api.js";
import { clear, fmt, h, notice, percent, table } from "../dom.js";
import { accuracy, demoBatch, shiftControls, shiftedPixels, takesDigits, thumbnails, v2Input } from "../digits.js";
import { links, modelPicker } from "./common.js";
import { layerExplorer } from "./layers.js";

function outputsTable(outputs) {
  const rows = outputs.map((output) => [
    h("code", {}, output.name),
    output.argmax_agreement === null ? "–" : percent(output.argmax_agreement),
    `${fmt(output.cosine_similarity)} (min ${fmt(output.cosine_similarity_min)})`,
    fmt(output.relative_l2_diff),
    fmt(output.max_abs_diff),
  ]);
  return h(
    "div",
    { class: "table-wrap" },
    table(["Output", "Argmax agreement", "Cosine similarity", "Relative L2 difference", "Max |Δ|"], rows, {
      caption: "Train mode against eval mode, per output",
    }),
  );
}

function showResult(area, result, labels) {
  clear(area);
  const summary = [`Batch of ${result.batch_size} on ${result.model_name} version ${result.model_version}.`];
  const pieces = [h("p", { class: "lead", id: "compare-summary" }, summary.join(" "))];
  if (labels && result.eval_outputs && result.train_outputs) {
    const evalAccuracy = accuracy(result.eval_outputs[0], labels);
    const trainAccuracy = accuracy(result.train_outputs[0], labels);
    pieces.push(
      h(
        "div",
        { class: "cards" },
        h("div", { class: "card", id: "eval-accuracy" }, h("span", { class: "big" }, percent(evalAccuracy)), "eval-mode accuracy (running statistics: what model.onnx serves)"),
        h("div", { class: "card", id: "train-accuracy" }, h("span", { class: "big" }, percent(trainAccuracy)), "train-mode accuracy (this batch's statistics)"),
      ),
    );
  }
  pieces.push(
    outputsTable(result.outputs),
    h("h2", { id: "compare-layers-title" }, "BatchNorm layers: this batch against the running statistics"),
    layerExplorer({ idPrefix: "compare", layers: result.batchnorm }),
  );
  area.append(...pieces);
}

const EXAMPLE_NOTE = "A V2 inference body: {\"inputs\": [{\"name\", \"shape\", \"datatype\", \"data\"}]}";

export async function comparePage(main, params) {
  const name = await modelPicker(main, "Compare train vs eval:", params[0], links.compare);
  if (name === null) return;
  const metadata = await api.metadata(name);
  const digits = takesDigits(metadata);
  const path = `${api.modelPath(name)}/compare?channels=true`;
  const status = h("div", { class: "status-area", "aria-live": "polite" });
  const result = h("div", { id: "compare-result" });
  let busy = 0;

  const run = async (request, labels) => {
    const ticket = ++busy;
    clear(status).append(notice("info", "Comparing…"));
    try {
      const answer = await request();
      if (ticket !== busy) return;
      clear(status);
      showResult(result, answer, labels);
    } catch (error) {
      if (ticket !== busy) return;
      clear(status).append(notice("error", `Compare failed: ${error.message}`));
    }
  };

  const intro = h(
    "p",
    {},
    "Eval mode normalises with the running statistics training left; train mode with the batch's own. ",
    "When they disagree, the batch does not look like the training data to the BatchNorm layers.",
  );

  // the three sources, as radio buttons: demo digits, a file, pasted JSON
  const sources = [];
  if (digits) sources.push(["demo", "Demo digits"]);
  sources.push(["file", "Upload .npy / .npz"], ["json", "Paste V2 JSON"]);
  const panels = {};

  if (digits) {
    const batch = await demoBatch();
    const shift = { contrast: 1, brightness: 0 };
    const preview = h("div", { class: "preview" });
    let timer = null;
    const compareDemo = () => {
      const pixels = shiftedPixels(batch, shift);
      clear(preview).append(thumbnails(pixels));
      run(
        () => api.postJson(path, { inputs: [v2Input(metadata, pixels)], return_outputs: true }),
        batch.labels,
      );
    };
    panels.demo = h(
      "div",
      { class: "panel" },
      h("p", {}, `${batch.labels.length} held-out digits the model never trained on. Move a slider: the comparison reruns.`),
      shiftControls("compare", shift, () => {
        clearTimeout(timer);
        timer = setTimeout(compareDemo, 200);
      }),
      preview,
      h("button", { type: "button", id: "compare-demo", onclick: compareDemo }, "Compare the demo batch"),
    );
    compareDemo();
  }

  const fileInput = h("input", { type: "file", id: "compare-file", accept: ".npy,.npz" });
  panels.file = h(
    "div",
    { class: "panel" },
    h(
      "p",
      {},
      "One .npy array for a one-input model, or an .npz with one array per input name; the first axis is the batch (2 or more samples).",
    ),
    h("span", { class: "field" }, h("label", { for: "compare-file" }, "Batch file"), fileInput),
    h(
      "button",
      {
        type: "button",
        id: "compare-upload",
        onclick: () => {
          const [file] = fileInput.files;
          if (!file) {
            clear(status).append(notice("error", "Choose a .npy or .npz file first."));
            return;
          }
          const contentType = file.name.toLowerCase().endsWith(".npz") ? "application/x-npz" : "application/x-npy";
          run(() => api.call(path, { method: "POST", body: file, contentType }));
        },
      },
      "Compare the file",
    ),
  );

  const example = {
    inputs: metadata.inputs.map((input) => ({
      name: input.name,
      shape: [2, ...input.shape.slice(1).map((dim) => (dim > 0 ? dim : 1))],
      datatype: input.datatype,
      data: [],
    })),
  };
  const textarea = h("textarea", { id: "compare-json", rows: 8, spellcheck: "false" }, JSON.stringify(example));
  panels.json = h(
    "div",
    { class: "panel" },
    h("p", {}, EXAMPLE_NOTE, " (fill in data: shape says how many values)."),
    h("span", { class: "field wide" }, h("label", { for: "compare-json" }, "Request body"), textarea),
    h(
      "button",
      {
        type: "button",
        id: "compare-paste",
        onclick: () => run(() => api.call(path, { method: "POST", body: textarea.value, contentType: "application/json" })),
      },
      "Compare the pasted body",
    ),
  );

  const panelArea = h("div", {});
  const choose = (key) => clear(panelArea).append(panels[key]);
  const radios = h(
    "fieldset",
    { class: "sources" },
    h("legend", {}, "Batch"),
    sources.map(([key, label], i) =>
      h(
        "label",
        { class: "radio" },
        h("input", { type: "radio", name: "compare-source", value: key, checked: i === 0, onchange: () => choose(key) }),
        label,
      ),
    ),
  );
  choose(sources[0][0]);
  main.append(intro, radios, panelArea, status, result);
}
