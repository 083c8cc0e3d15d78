// The chat page's conversations, kept in this browser's localStorage.
//
// One key holds them all, with a format version: a page that changes the
// format bumps STORE_VERSION, and a stored value it cannot read (corrupt, or
// written by another version of the page) is dropped with a notice for the
// person, never a blank page or an exception.
export const STORE_KEY = "orchestrator.conversations";
export const STORE_VERSION = 1;
export const MAX_CONVERSATIONS = 20; // oldest dropped first: localStorage holds ~5 MB per site

const ROLES = new Set(["user", "assistant"]);
const isString = (value) => typeof value === "string";
const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);

function validMessage(m) {
  if (!isObject(m) || !ROLES.has(m.role) || !isString(m.content)) return false;
  if (m.error !== undefined && !(isObject(m.error) && isString(m.error.code) && isString(m.error.message))) return false;
  if (m.stats !== undefined && !isObject(m.stats)) return false;
  return ["model", "state", "requestId"].every((k) => m[k] === undefined || isString(m[k]))
    && (m.failed === undefined || typeof m.failed === "boolean");
}

function validConversation(c) {
  return isObject(c) && isString(c.id) && c.id !== "" && isString(c.title) && Number.isFinite(c.updated)
    && Array.isArray(c.messages) && c.messages.every(validMessage);
}

export function newConversation() {
  const id = `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
  return { id, title: "New chat", updated: Date.now(), messages: [] };
}

/**
 * Read the stored conversations: `{conversations, currentId, notice}`, newest first.
 * `notice` is null, or a sentence telling the person what was dropped and why.
 */
export function loadConversations(storage = localStorage) {
  let raw;
  try {
    raw = storage.getItem(STORE_KEY);
  } catch {
    return { conversations: [], currentId: null, notice: "This browser does not let the page keep conversations." };
  }
  if (raw === null) return { conversations: [], currentId: null, notice: null };
  let stored;
  try {
    stored = JSON.parse(raw);
  } catch {
    stored = undefined;
  }
  const dropAll = (why) => {
    storage.removeItem(STORE_KEY);
    return { conversations: [], currentId: null, notice: `Your saved conversations ${why}, so they were dropped.` };
  };
  if (!isObject(stored)) return dropAll("could not be read (the stored data is corrupt)");
  if (stored.version !== STORE_VERSION) {
    return dropAll(`were saved by another version of this page (format ${JSON.stringify(stored.version ?? null)},`
      + ` this page reads format ${STORE_VERSION})`);
  }
  if (!Array.isArray(stored.conversations)) return dropAll("could not be read (the stored data is corrupt)");
  const conversations = stored.conversations.filter(validConversation).map(settle);
  const dropped = stored.conversations.length - conversations.length;
  conversations.sort((a, b) => b.updated - a.updated);
  const currentId = conversations.some((c) => c.id === stored.current) ? stored.current : null;
  const notice = dropped === 0 ? null
    : `${dropped} saved conversation${dropped === 1 ? " was" : "s were"} corrupt and dropped; the others are kept.`;
  return { conversations, currentId, notice };
}

// An answer still streaming when the page went away cannot be continued by this
// page load: show it as interrupted, with whatever text it had.
function settle(conversation) {
  for (const m of conversation.messages) {
    if (m.role === "assistant" && (m.state === "waiting" || m.state === "streaming" || m.state === "reconnecting")) {
      m.state = "interrupted";
    }
  }
  return conversation;
}

/**
 * Store `conversations` (newest first; empty ones are not kept) and the current id.
 * When the browser's quota is full, the oldest are dropped until they fit;
 * returns how many had to be dropped (-1: not even the newest fits).
 */
export function saveConversations(conversations, currentId, storage = localStorage) {
  const kept = conversations.filter((c) => c.messages.length).slice(0, MAX_CONVERSATIONS);
  for (let count = kept.length; count >= 0; count--) {
    const value = JSON.stringify({ version: STORE_VERSION, current: currentId, conversations: kept.slice(0, count) });
    try {
      storage.setItem(STORE_KEY, value);
      return kept.length - count;
    } catch {
      // QuotaExceededError: try again without the oldest.
    }
  }
  return -1;
}

/** The messages to send to the model: failed questions and empty or failed answers left out. */
export function modelMessages(conversation) {
  return conversation.messages
    .filter((m) => !m.failed && !m.error && (m.role === "user" || m.content))
    .map(({ role, content }) => ({ role, content }));
}

/** A conversation's title: the start of its first question. */
export function titleFor(text) {
  const line = text.trim().split("\n", 1)[0];
  return line.length > 60 ? `${line.slice(0, 59)}…` : line || "New chat";
}
