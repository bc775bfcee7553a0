// The console's shell: a hash router over four pages, the admin-token form, the footer.
// Each page is `async (main, params, rerender) => cleanup?`; it renders into `main` from
// the public API and may return a function that stops its timers when the page changes.

import * as api from "./api.js";
import { clear, h, notice } from "./dom.js";
import { comparePage } from "./pages/compare.js";
import { driftPage } from "./pages/drift.js";
import { modelPage } from "./pages/model.js";
import { repositoryPage } from "./pages/repository.js";

const ROUTES = [
  [/^#?\/?$/, repositoryPage, "Repository", "repository"],
  [/^#\/model\/([^/]+)(?:\/([^/]+))?$/, modelPage, "Model", "repository"],
  [/^#\/compare(?:\/([^/]+))?$/, comparePage, "Compare", "compare"],
  [/^#\/drift(?:\/([^/]+))?$/, driftPage, "Drift", "drift"],
];

const main = document.getElementById("main");
let cleanup = null;
let generation = 0;

function decode(part) {
  try {
    return part === undefined ? undefined : decodeURIComponent(part);
  } catch {
    return part;
  }
}

async function render(flash) {
  const mine = ++generation;
  if (cleanup) cleanup();
  cleanup = null;
  const hash = window.location.hash || "#/";
  const route = ROUTES.find(([pattern]) => pattern.test(hash));
  for (const link of document.querySelectorAll("nav a[data-nav]")) {
    link.toggleAttribute("aria-current", route !== undefined && link.dataset.nav === route[3]);
    if (link.hasAttribute("aria-current")) link.setAttribute("aria-current", "page");
  }
  const page = h("div", { class: "page", "aria-busy": "true" });
  clear(main).append(page);
  if (flash) page.append(flash);
  if (!route) {
    page.append(h("h1", {}, "Not found"), notice("error", `No page at ${hash}.`), h("a", { href: "#/" }, "Go to the repository"));
    page.removeAttribute("aria-busy");
    return;
  }
  const [pattern, view, title] = route;
  const params = pattern.exec(hash).slice(1).map(decode);
  document.title = `${title} · bnfold console`;
  try {
    const stop = await view(page, params, render);
    if (mine === generation) cleanup = stop || null;
    else if (stop) stop();
  } catch (error) {
    if (mine === generation) page.append(notice("error", `This page could not load: ${error.message}`));
  }
  page.removeAttribute("aria-busy");
}

function tokenForm() {
  const form = document.getElementById("token-form");
  const input = document.getElementById("admin-token");
  const state = document.getElementById("token-state");
  const forget = document.getElementById("token-forget");
  const show = () => {
    state.textContent = api.hasAdminToken() ? "Admin on (kept in this tab only)" : "Read-only";
    forget.hidden = !api.hasAdminToken();
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    api.setAdminToken(input.value);
    input.value = "";
    show();
    render();
  });
  forget.addEventListener("click", () => {
    api.setAdminToken("");
    show();
    render();
  });
  show();
}

async function footer() {
  const target = document.getElementById("server-info");
  try {
    const server = await api.server();
    target.textContent = `${server.name} ${server.version} · extensions: ${server.extensions.join(", ")}`;
  } catch (error) {
    target.textContent = `The server did not answer: ${error.message}`;
  }
}

window.addEventListener("hashchange", () => render());
tokenForm();
footer();
render();
