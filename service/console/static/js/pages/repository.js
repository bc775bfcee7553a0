// Repository: every model and version with its state (and why it is unavailable), its
// execution providers and batching policy; load and unload with the admin token.

import * as api from "../api.js";
import { clear, h, notice } from "../dom.js";
import { adminHint, emptyRepository, links, stateBadge } from "./common.js";

function batchingText(batching) {
  if (!batching) return "–";
  if (!batching.enabled) return `off${batching.disabled_reason ? `: ${batching.disabled_reason}` : ""}`;
  return `up to ${batching.max_batch_size} per run, ${batching.max_queue_delay_us} µs delay, queue ${batching.max_queue_size}`;
}

async function describe(entry) {
  if (entry.state !== "READY") return null;
  try {
    return await api.metadata(entry.name, entry.version);
  } catch {
    return null;
  }
}

export async function repositoryPage(main, _params, rerender) {
  const index = await api.repositoryIndex();
  main.append(h("h1", {}, "Model repository"));
  if (index.length === 0) {
    main.append(emptyRepository());
    return;
  }
  const status = h("div", { class: "status-area", "aria-live": "polite" });
  const details = await Promise.all(index.map(describe));
  const admin = api.hasAdminToken();

  const act = async (label, path) => {
    clear(status).append(notice("info", `${label}…`));
    try {
      await api.call(path, { method: "POST", admin: true, body: "{}", contentType: "application/json" });
      rerender(notice("ok", `${label}: done.`));
    } catch (error) {
      clear(status).append(notice("error", `${label} failed: ${error.message}`));
    }
  };
  const button = (label, path, describedBy) =>
    h(
      "button",
      { type: "button", disabled: !admin, "aria-describedby": admin ? null : describedBy, onclick: () => act(label, path) },
      label.split(" ")[0],
    );

  const rows = index.map((entry, i) => {
    const meta = details[i];
    const ready = entry.state === "READY";
    const actions = h(
      "span",
      { class: "actions" },
      h("a", { href: links.model(entry.name, entry.version) }, "Report"),
      ready ? h("a", { href: links.compare(entry.name) }, "Compare") : null,
      ready ? h("a", { href: links.drift(entry.name) }, "Drift") : null,
      ready
        ? button(`Unload ${entry.name} version ${entry.version}`, `${api.repositoryPath(entry.name, entry.version)}/unload`, "admin-hint")
        : button(`Load ${entry.name}`, `${api.repositoryPath(entry.name)}/load`, "admin-hint"),
    );
    return h(
      "tr",
      { "data-model": entry.name, "data-version": entry.version },
      h("th", { scope: "row" }, h("a", { href: links.model(entry.name, entry.version) }, entry.name)),
      h("td", {}, entry.version),
      h("td", {}, stateBadge(entry.state), entry.reason ? h("div", { class: "reason" }, entry.reason) : null),
      h("td", {}, meta ? meta.parameters.execution_providers.join(", ") : "–"),
      h("td", {}, meta ? batchingText(meta.parameters.batching) : "–"),
      h("td", {}, actions),
    );
  });
  main.append(
    status,
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { id: "repository-table" },
        h("caption", {}, `${new Set(index.map((e) => e.name)).size} models, ${index.length} versions`),
        h(
          "thead",
          {},
          h("tr", {}, ["Model", "Version", "State", "Execution providers", "Batching", "Actions"].map((t) => h("th", { scope: "col" }, t))),
        ),
        h("tbody", {}, rows),
      ),
    ),
    adminHint("admin-hint"),
  );
}
