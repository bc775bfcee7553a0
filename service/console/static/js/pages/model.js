// Model: the package report as the converter wrote it (GET .../package): each BatchNorm
// folded into which layer or kept and why, verification, tensors, provenance and the
// recalibration history.

import * as api from "../api.js";
import { code, fmt, h, notice, select, table } from "../dom.js";
import { links, stateBadge } from "./common.js";

function section(title, id, ...children) {
  return h("section", { "aria-labelledby": id }, h("h2", { id }, title), ...children);
}

function batchnormTable(batchnorm) {
  const folded = new Map(batchnorm.folded.map((entry) => [entry.name, entry]));
  const kept = new Map(batchnorm.kept.map((entry) => [entry.name, entry]));
  const layers = new Map(batchnorm.layers.map((layer) => [layer.name, layer]));
  const names = [...new Set([...layers.keys(), ...folded.keys(), ...kept.keys()])];
  const rows = names.map((name) => {
    const layer = layers.get(name);
    let outcome;
    if (folded.has(name)) {
      const entry = folded.get(name);
      outcome = h("span", { class: "folded" }, "folded into ", code(entry.into), ` (${entry.direction})`);
    } else if (kept.has(name)) {
      outcome = h("span", { class: "kept" }, "kept: ", kept.get(name).reason);
    } else {
      outcome = "–";
    }
    return [code(name), layer ? String(layer.channels) : "–", layer ? fmt(layer.eps) : "–", outcome];
  });
  return h(
    "div",
    {},
    h(
      "p",
      {},
      `${batchnorm.total} BatchNorm layers: ${batchnorm.folded.length} folded, ${batchnorm.kept.length} kept.`,
    ),
    h("div", { class: "table-wrap" }, table(["Layer", "Channels", "eps", "Outcome"], rows, { className: "batchnorm" })),
  );
}

function verificationTable(verification) {
  if (!verification) return h("p", {}, "This package records no verification.");
  const graphs = ["eval", "train", "calibration"].filter((key) => verification[key]);
  const rows = graphs.map((key) => {
    const part = verification[key];
    return [key, fmt(part.max_abs_err), fmt(part.max_rel_err), String(part.samples), part.passed ? "passed" : "FAILED"];
  });
  const tolerance = verification.tolerance;
  return h(
    "div",
    {},
    h("div", { class: "table-wrap" }, table(["Graph", "max |Δ|", "max relative Δ", "Samples", "Result"], rows)),
    tolerance ? h("p", {}, `Tolerance: atol ${fmt(tolerance.atol)}, rtol ${fmt(tolerance.rtol)}.`) : null,
  );
}

function tensorsTable(manifest) {
  const rows = [
    ...manifest.inputs.map((t) => ["input", code(t.name), t.datatype, `[${t.shape.join(", ")}]`]),
    ...manifest.outputs.map((t) => ["output", code(t.name), t.datatype, `[${t.shape.join(", ")}]`]),
  ];
  return h("div", { class: "table-wrap" }, table(["Kind", "Name", "Datatype", "Shape (-1: any size)"], rows));
}

function provenance(manifest) {
  const items = [];
  const add = (term, ...definition) => items.push(h("dt", {}, term), h("dd", {}, ...definition));
  if (manifest.source) {
    add("Source", `${manifest.source.kind}: `, code(manifest.source.ref));
    if (manifest.source.sha256) add("Source sha256", code(manifest.source.sha256));
  }
  if (manifest.created) add("Created", manifest.created);
  add("Package schema", String(manifest.schema_version));
  for (const [tool, version] of Object.entries(manifest.tool_versions || {})) add(tool, String(version));
  if (manifest.node_counts) {
    const counts = manifest.node_counts;
    add("Nodes", `${counts.nodes_before} → ${counts.nodes_after}; BatchNorm ${counts.batchnorm_before} → ${counts.batchnorm_after}`);
  }
  return h("dl", { class: "facts" }, items);
}

function recalibrations(manifest) {
  const history = manifest.recalibrations || [];
  if (history.length === 0) return h("p", {}, "Never recalibrated: the running statistics are the ones training left.");
  const rows = history.map((entry) => [
    String(entry.from_version),
    entry.method,
    String(entry.samples),
    entry.data ?? "–",
    entry.created ?? "–",
    entry.data_sha256 ? code(entry.data_sha256.slice(0, 16)) : "–",
  ]);
  return h("div", { class: "table-wrap" }, table(["From version", "Method", "Samples", "Data", "Created", "Data sha256"], rows));
}

export async function modelPage(main, params) {
  const name = params[0];
  const index = (await api.repositoryIndex()).filter((entry) => entry.name === name);
  if (index.length === 0) {
    main.append(h("h1", {}, "Model ", h("span", { class: "model-name" }, name)), notice("error", `The repository has no model called “${name}”.`));
    return;
  }
  const versions = index.map((entry) => entry.version);
  const entry = index.find((e) => e.version === params[1]) ?? null;
  main.append(
    h(
      "div",
      { class: "page-head" },
      h("h1", {}, "Model ", h("span", { class: "model-name" }, name)),
      select(
        "version-picker",
        "Version",
        [["", "served by default"], ...versions.map((v) => [v, `version ${v}`])],
        params[1] ?? "",
        (version) => {
          window.location.hash = links.model(name, version || undefined);
        },
      ),
      h("a", { href: links.compare(name) }, "Compare train vs eval"),
      h("a", { href: links.drift(name) }, "Live drift"),
    ),
  );
  if (entry && entry.state !== "READY") {
    main.append(notice("error", h("strong", {}, `Version ${entry.version} is ${entry.state}. `), entry.reason || ""));
    return;
  }
  let report;
  try {
    report = await api.packageReport(name, params[1]);
  } catch (error) {
    main.append(notice("error", `The package report is not available: ${error.message}`));
    return;
  }
  const manifest = report.manifest;
  const state = (index.find((e) => e.version === report.model_version) || {}).state || "READY";
  main.append(
    h("p", { class: "lead" }, "Version ", h("strong", {}, report.model_version), " ", stateBadge(state)),
    section("BatchNorm layers", "bn-title", batchnormTable(manifest.batchnorm)),
    section("Verification against the source", "verification-title", verificationTable(manifest.verification)),
    section("Tensors", "tensors-title", tensorsTable(manifest)),
    section("Provenance", "provenance-title", provenance(manifest)),
    section("Recalibration history", "recalibration-title", recalibrations(manifest)),
  );
}
