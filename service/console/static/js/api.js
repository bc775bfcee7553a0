// The public HTTP API, as a script would call it: the console has no private endpoints.
// The admin token lives in this module's memory only (never localStorage or a cookie), so
// it is gone when the tab closes or reloads.

let adminToken = "";

export function setAdminToken(token) {
  adminToken = token.trim();
}

export function hasAdminToken() {
  return adminToken !== "";
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

const enc = encodeURIComponent;

/** /v2/models/{name}[/versions/{version}] */
export function modelPath(name, version) {
  return `/v2/models/${enc(name)}${version ? `/versions/${enc(version)}` : ""}`;
}

export function repositoryPath(name, version) {
  return `/v2/repository/models/${enc(name)}${version ? `/versions/${enc(version)}` : ""}`;
}

/**
 * fetch + JSON; a non-2xx answer throws ApiError carrying the server's `error` text.
 * `admin` adds the bearer token; `body` may be a string, Blob or ArrayBuffer.
 */
export async function call(path, { method = "GET", body, contentType, admin = false } = {}) {
  const headers = new Headers({ Accept: "application/json" });
  if (contentType) headers.set("Content-Type", contentType);
  if (admin && adminToken) headers.set("Authorization", `Bearer ${adminToken}`);
  let response;
  try {
    response = await fetch(path, { method, body, headers, cache: "no-store" });
  } catch (error) {
    throw new ApiError(0, `the server did not answer (${error.message})`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = data && typeof data.error === "string" ? data.error : text || response.statusText;
    throw new ApiError(response.status, `${response.status}: ${message}`);
  }
  return data;
}

export function postJson(path, payload, options = {}) {
  return call(path, { ...options, method: "POST", body: JSON.stringify(payload), contentType: "application/json" });
}

export const server = () => call("/v2");
export const repositoryIndex = () => postJson("/v2/repository/index", {});
export const metadata = (name, version) => call(modelPath(name, version));
export const packageReport = (name, version) => call(`${modelPath(name, version)}/package`);
export const drift = (name, version) => call(`${modelPath(name, version)}/drift?channels=true`);

/** The names of the models with at least one READY version, sorted. */
export async function readyModels() {
  const index = await repositoryIndex();
  return [...new Set(index.filter((entry) => entry.state === "READY").map((entry) => entry.name))].sort();
}
