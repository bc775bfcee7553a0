// Pieces several pages share: the model picker, state badges, links between pages.

import * as api from "../api.js";
import { h, notice, select } from "../dom.js";

const enc = encodeURIComponent;

export const links = {
  repository: () => "#/",
  model: (name, version) => `#/model/${enc(name)}${version ? `/${enc(version)}` : ""}`,
  compare: (name) => `#/compare/${enc(name)}`,
  drift: (name) => `#/drift/${enc(name)}`,
};

export function stateBadge(state) {
  return h("span", { class: `badge state-${String(state).toLowerCase()}` }, state);
}

/**
 * The page's heading with a model picker over the ready models; picking one navigates to
 * `link(name)`. Returns null (after rendering the empty state) when no model is ready.
 */
export async function modelPicker(main, title, current, link) {
  const names = await api.readyModels();
  if (names.length === 0) {
    main.append(h("h1", {}, title), emptyRepository());
    return null;
  }
  const name = current && names.includes(current) ? current : names[0];
  if (current && !names.includes(current)) {
    main.append(notice("error", `No ready model is called “${current}”; showing ${name}.`));
  }
  main.append(
    h(
      "div",
      { class: "page-head" },
      h("h1", {}, title, " ", h("span", { class: "model-name" }, name)),
      select("model-picker", "Model", names.map((n) => [n, n]), name, (picked) => {
        window.location.hash = link(picked);
      }),
    ),
  );
  return name;
}

/** What a new user sees with an empty repository: how to put a model in it. */
export function emptyRepository() {
  return h(
    "section",
    { class: "empty", "aria-labelledby": "empty-title" },
    h("h2", { id: "empty-title" }, "No models are being served yet"),
    h("p", {}, "Convert a PyTorch model (or an ONNX file) into a package in the repository this server reads, then load it:"),
    h("pre", {}, h("code", {}, "bnfold convert digits_mlp --repository ./repo\nbnfold serve --repository ./repo")),
    h(
      "p",
      {},
      "A server that is already running picks a new package up with ",
      h("code", {}, "POST /v2/repository/models/{name}/load"),
      " (admin token) or on restart. ",
      h("code", {}, "bnfold serve"),
      " with no arguments serves the built-in digits models. See ",
      h("a", { href: "/docs" }, "the API docs"),
      ".",
    ),
  );
}

/** The admin hint shown beside a disabled admin action. */
export function adminHint(id) {
  return api.hasAdminToken()
    ? null
    : h("span", { class: "hint", id }, "Enter the admin token at the top of the page to enable this.");
}
