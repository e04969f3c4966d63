// The admin API as the console uses it: every call carries the signed-in token as a bearer
// header, and every failure becomes an ApiError with the status and the JSON answer.

const TOKEN_KEY = "miniapp-gateway-token";

export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error : `the gateway answered ${status}`);
    this.status = status;
    this.body = body || {};
  }

  /** The validation errors of a 422: [{path, message}]. */
  get fieldErrors() {
    return Array.isArray(this.body.errors) ? this.body.errors : [];
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) {
    sessionStorage.setItem(TOKEN_KEY, value);
  } else {
    sessionStorage.removeItem(TOKEN_KEY);
  }
}

function headers(extra) {
  const all = { Accept: "application/json", ...extra };
  if (token()) {
    all.Authorization = `Bearer ${token()}`;
  }
  return all;
}

export async function call(method, path, body, extraHeaders) {
  const init = { method, headers: headers(extraHeaders), cache: "no-store" };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let json = null;
  if (text) {
    try {
      json = JSON.parse(text);
    } catch {
      json = { error: text };
    }
  }
  if (!response.ok) {
    throw new ApiError(response.status, json);
  }
  return { status: response.status, etag: response.headers.get("ETag"), body: json };
}

export const app = (id) => `/v1/apps/${encodeURIComponent(id)}`;
export const entry = (id, list, value) => `${app(id)}/${list}/${encodeURIComponent(value)}`;

/**
 * Read the server-sent events of `path` until `signal` aborts; `onEvent(name, data)` for each.
 * fetch rather than EventSource, which cannot send the bearer header. Resolves when the
 * stream ends (the gateway shut down or went away).
 */
export async function events(path, signal, onEvent) {
  const response = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal, cache: "no-store" });
  if (!response.ok || !response.body) {
    throw new ApiError(response.status, null);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) {
      return;
    }
    buffered += value;
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const block = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) {
          name = line.slice(6).trim();
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).trim());
        }
      }
      if (data.length) {
        try {
          onEvent(name, JSON.parse(data.join("\n")));
        } catch {
          // a line that is not JSON is not one of ours
        }
      }
    }
  }
}
