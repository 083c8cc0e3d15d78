// How a browser consumes the orchestrator's chat stream, resume included.
//
// EventSource cannot POST, so the answer is read from fetch()'s streaming body
// with a small Server-Sent Events parser. Each chunk arrives as
//   id: <seq>\ndata: {"delta": "<text>"}\n\n
// and the stream ends with `data: [DONE]`, or with `event: error` carrying the
// API's error envelope. If the connection drops mid-answer, we ask
// GET /api/v1/chat/stream/<X-Request-Id> with `Last-Event-ID: <last seq seen>`:
// the server replays what we missed, then continues live.

export class ChatError extends Error {
  constructor(code, message, status = null) {
    super(message);
    this.name = "ChatError";
    this.code = code;
    this.status = status;
  }
}

// Resume back-off: 250 ms, doubling, capped at 4 s; give up after a minute.
// The server keeps an abandoned request alive for ORCH_CANCEL_GRACE (5 s by
// default), so the first attempts must come well within that.
const RESUME_FIRST_DELAY_MS = 250;
const RESUME_MAX_DELAY_MS = 4000;
const RESUME_GIVE_UP_MS = 60000;

export function authHeaders(apiKey) {
  return apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
}

/**
 * Cancel a request at once (DELETE /api/v1/chat/<id>): aborting the fetch alone
 * leaves the job running for the server's cancel grace, in case the client resumes.
 */
export function cancelChat(requestId, apiKey) {
  if (!requestId) return Promise.resolve();
  return fetch(`/api/v1/chat/${encodeURIComponent(requestId)}`, {
    method: "DELETE", headers: authHeaders(apiKey), keepalive: true,
  }).catch(() => {}); // best effort: the disconnect cancels it after the grace anyway
}

/** The ChatError for a refused request, from the API's `{"error": {code, message}}` envelope. */
export async function errorFrom(response) {
  let code = `http_${response.status}`;
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    // Not JSON (a proxy's error page, say): keep the status line.
  }
  return new ChatError(code, message, response.status);
}

/** Yield `{event, id, data}` for each event of a text/event-stream response body. */
export async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { event: "message", id: null, data: [] };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      // A trailing "\r" may be half of a "\r\n" split across reads: keep it for the next one.
      const lines = buffer.split(/\r\n|\r(?!$)|\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (event.data.length) yield { event: event.event, id: event.id, data: event.data.join("\n") };
          event = { event: "message", id: null, data: [] };
          continue;
        }
        if (line.startsWith(":")) continue; // a comment, e.g. ": keepalive"
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "data") event.data.push(text);
        else if (field === "event") event.event = text;
        else if (field === "id") event.id = text;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/**
 * Stream one answer. `onDelta(text, seq)` runs once per chunk, in order, and
 * never twice for one seq, however often the connection is resumed.
 * `onRequest(id)` runs when the server accepted the request,
 * `onStatus({state, position})` while it waits for an agent (queued, then
 * assigned), and `onReconnecting(attempt)` before each resume attempt.
 * Resolves when the answer is complete; rejects with a ChatError (refused
 * request, or the stream's error event), or with `signal`'s AbortError.
 */
export async function streamChat({ body, apiKey, signal, onRequest, onDelta, onStatus, onReconnecting }) {
  const statusEvents = typeof onStatus === "function";
  let response = await fetch("/api/v1/chat/stream", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders(apiKey) },
    body: JSON.stringify(statusEvents ? { ...body, status_events: true } : body),
    signal,
  });
  if (!response.ok) throw await errorFrom(response);
  const requestId = response.headers.get("X-Request-Id");
  if (onRequest) onRequest(requestId);
  let lastSeq = null;
  for (;;) {
    try {
      for await (const event of readEvents(response)) {
        if (event.event === "error") {
          const err = streamError(event.data);
          if (err.code !== "server_shutting_down") throw err;
          break; // the server is restarting: resume like after a drop
        }
        if (event.data === "[DONE]") return;
        if (event.event === "status" && statusEvents) onStatus(parseJson(event.data));
        if (event.event !== "message") continue; // status, or kinds this page does not know
        const seq = event.id === null ? null : Number(event.id);
        if (seq !== null && lastSeq !== null && seq <= lastSeq) continue; // seen before a resume
        const delta = parseDelta(event.data);
        if (seq !== null) lastSeq = seq;
        if (delta) onDelta(delta, seq);
      }
    } catch (err) {
      if (err instanceof ChatError || (signal && signal.aborted)) throw err;
      // Anything else is the connection failing mid-answer: resume below.
    }
    if (!requestId) throw new ChatError("connection_lost", "the connection dropped and cannot be resumed");
    response = await resume(requestId, lastSeq, { apiKey, signal, onReconnecting, statusEvents });
  }
}

async function resume(requestId, lastSeq, { apiKey, signal, onReconnecting, statusEvents }) {
  const url = `/api/v1/chat/stream/${encodeURIComponent(requestId)}${statusEvents ? "?status_events=true" : ""}`;
  const giveUpAt = Date.now() + RESUME_GIVE_UP_MS;
  for (let attempt = 1; ; attempt++) {
    if (onReconnecting) onReconnecting(attempt);
    await sleep(Math.min(RESUME_FIRST_DELAY_MS * 2 ** (attempt - 1), RESUME_MAX_DELAY_MS), signal);
    const headers = { Accept: "text/event-stream", ...authHeaders(apiKey) };
    if (lastSeq !== null) headers["Last-Event-ID"] = String(lastSeq);
    try {
      const response = await fetch(url, { headers, signal });
      if (response.ok) return response;
      // 4xx will not get better by asking again; 5xx (a restarting server) may.
      if (response.status < 500) throw await errorFrom(response);
    } catch (err) {
      if (err instanceof ChatError || (signal && signal.aborted)) throw err;
    }
    if (Date.now() > giveUpAt) {
      throw new ChatError("connection_lost", "lost the connection to the server and could not resume");
    }
  }
}

function parseJson(data) {
  try {
    return JSON.parse(data);
  } catch {
    throw new ChatError("bad_event", "the server sent an event that is not JSON");
  }
}

function parseDelta(data) {
  const { delta } = parseJson(data);
  return typeof delta === "string" ? delta : "";
}

function streamError(data) {
  try {
    const { error } = JSON.parse(data);
    return new ChatError(error.code || "error", error.message || "the request failed");
  } catch {
    return new ChatError("error", data || "the request failed");
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal && signal.aborted) return reject(signal.reason);
    const timer = setTimeout(resolve, ms);
    if (signal) {
      signal.addEventListener("abort", () => {
        clearTimeout(timer);
        reject(signal.reason);
      }, { once: true });
    }
  });
}
