// The demo batch: 128 held-out digits shipped with the console (demo/digits.json, raw
// pixels 0..16) and the covariate shift a camera or scanner change would apply to them.
// A shift maps pixels in [0, 1] to [0, 1], as benchmarks/recalibration/shifts.py does:
// contrast multiplies, brightness adds, the sensor saturates.

import { h } from "./dom.js";

let demo = null;

export async function demoBatch() {
  if (demo === null) {
    const response = await fetch("demo/digits.json");
    if (!response.ok) throw new Error(`the demo batch did not load (${response.status})`);
    demo = await response.json();
  }
  return demo;
}

const product = (dims) => dims.reduce((total, dim) => total * dim, 1);

/** Whether the model takes one FP32 input of 64 values per sample: an 8x8 digit in some shape. */
export function takesDigits(metadata) {
  if (!metadata || metadata.inputs.length !== 1) return false;
  const [input] = metadata.inputs;
  const sample = input.shape.slice(1);
  return input.datatype === "FP32" && sample.every((dim) => dim > 0) && product(sample) === 64;
}

/** The demo pixels in [0, 1] after the shift, flat (count x 64). */
export function shiftedPixels(batch, { contrast = 1, brightness = 0 }, count = batch.labels.length) {
  const out = new Float32Array(count * 64);
  for (let i = 0; i < count; i += 1) {
    const image = batch.pixels[i];
    for (let p = 0; p < 64; p += 1) {
      const value = (image[p] / batch.pixel_max) * contrast + brightness;
      out[i * 64 + p] = Math.min(1, Math.max(0, value));
    }
  }
  return out;
}

/** A V2 JSON input tensor holding `pixels` in the model's input shape. */
export function v2Input(metadata, pixels) {
  const [input] = metadata.inputs;
  const count = pixels.length / 64;
  return { name: input.name, shape: [count, ...input.shape.slice(1)], datatype: "FP32", data: Array.from(pixels) };
}

/** Fraction of rows of a (N, 10) JSON output whose argmax is the label. */
export function accuracy(output, labels) {
  const [rows, classes] = output.shape;
  let correct = 0;
  for (let row = 0; row < rows; row += 1) {
    let best = 0;
    for (let k = 1; k < classes; k += 1) {
      if (output.data[row * classes + k] > output.data[row * classes + best]) best = k;
    }
    if (best === labels[row]) correct += 1;
  }
  return correct / rows;
}

/** The first images as 8x8 thumbnails on one canvas (what the model sees after the shift). */
export function thumbnails(pixels, count = 16) {
  const scale = 5;
  const gap = 4;
  const canvas = h("canvas", {
    class: "thumbnails",
    width: count * (8 * scale + gap),
    height: 8 * scale,
    role: "img",
    "aria-label": `The first ${count} demo digits as the model receives them`,
  });
  const context = canvas.getContext("2d");
  for (let i = 0; i < count; i += 1) {
    for (let p = 0; p < 64; p += 1) {
      const level = Math.round(255 * (1 - pixels[i * 64 + p]));
      context.fillStyle = `rgb(${level}, ${level}, ${level})`;
      context.fillRect(i * (8 * scale + gap) + (p % 8) * scale, Math.floor(p / 8) * scale, scale, scale);
    }
  }
  return canvas;
}

/** Contrast and brightness sliders; onchange({contrast, brightness}) on every move. */
export function shiftControls(idPrefix, shift, onchange) {
  const slider = (key, label, min, max, step) => {
    const id = `${idPrefix}-${key}`;
    const output = h("output", { for: id, id: `${id}-value` }, shift[key].toFixed(2));
    const input = h("input", {
      type: "range",
      id,
      min,
      max,
      step,
      value: shift[key],
      oninput: (event) => {
        shift[key] = Number(event.target.value);
        output.textContent = shift[key].toFixed(2);
        onchange({ ...shift });
      },
    });
    return h("span", { class: "field slider" }, h("label", { for: id }, label), input, output);
  };
  return h(
    "fieldset",
    { class: "shift" },
    h("legend", {}, "Covariate shift of the demo digits"),
    slider("contrast", "Contrast ×", 0.1, 2, 0.05),
    slider("brightness", "Brightness +", -0.5, 0.5, 0.05),
  );
}
