// Talking to the Lantern server (same origin): JSON requests with the optional API key, OpenAI-shaped errors
// turned into one readable ApiError, and the server-sent-event stream of a chat completion.

const KEY_STORAGE = "lantern.apiKey";

/** An error the server answered with (or a network failure), with the server's own message. */
export class ApiError extends Error {
  constructor(message, status = 0, body = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.body = body;
  }

  get needsKey() {
    return this.status === 401;
  }
}

export function getKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // storage disabled (private mode, file policy): work without a key
  }
}

export function setKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    /* nothing to do: the key then lasts only as long as the field's value */
  }
}

function headers(json) {
  const out = {};
  if (json) out["Content-Type"] = "application/json";
  const key = getKey();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

/** The message of an OpenAI-shaped error body, or a fallback naming the HTTP status. */
async function errorFrom(response, path) {
  let body = null;
  let message = `${path}: HTTP ${response.status} ${response.statusText}`.trim();
  try {
    body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch {
    /* not JSON: keep the status line */
  }
  if (response.status === 401) message = `${message} — set the server's API key in Settings`;
  return new ApiError(message, response.status, body);
}

async function send(path, init) {
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(`cannot reach the server (${path}): ${err.message}`);
  }
  if (!response.ok) throw await errorFrom(response, path);
  return response;
}

export async function getJSON(path, signal) {
  return (await send(path, { headers: headers(false), signal })).json();
}

export async function postJSON(path, body, signal) {
  return (await send(path, { method: "POST", headers: headers(true), body: JSON.stringify(body), signal })).json();
}

/**
 * POST a streaming request and call `onChunk(obj)` for each `data: {json}` event until `data: [DONE]`.
 * An `{"error": ...}` event mid-stream becomes an ApiError; aborting `signal` rejects with an AbortError.
 */
export async function streamSSE(path, body, onChunk, signal) {
  const response = await send(path, {
    method: "POST", headers: { ...headers(true), Accept: "text/event-stream" }, body: JSON.stringify(body), signal,
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      // An event's data is its `data:` lines joined by newlines (other SSE fields are not used here).
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      let obj;
      try {
        obj = JSON.parse(data);
      } catch {
        throw new ApiError(`the server sent an event that is not JSON: ${data.slice(0, 80)}`);
      }
      if (obj.error) throw new ApiError(obj.error.message || "the generation failed", 0, obj);
      onChunk(obj);
    }
  }
  throw new ApiError("the stream ended before [DONE]: the server closed the connection");
}
