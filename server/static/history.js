// The chat page's list of past conversations (titles are the person's own
// words: rendered as text). Clicks are handled by the page, by data-id.

const when = new Intl.DateTimeFormat(undefined, { dateStyle: "short", timeStyle: "short" });

export function renderHistory(list, conversations, currentId, { disabled = false } = {}) {
  if (!conversations.length) {
    const empty = document.createElement("li");
    empty.className = "history-empty";
    empty.textContent = "No saved conversation yet.";
    list.replaceChildren(empty);
    return;
  }
  list.replaceChildren(...conversations.map((conversation) => {
    const item = document.createElement("li");
    item.dataset.id = conversation.id;
    const open = document.createElement("button");
    open.type = "button";
    open.className = "history-open";
    open.disabled = disabled;
    if (conversation.id === currentId) open.setAttribute("aria-current", "true");
    const title = document.createElement("span");
    title.className = "history-title";
    title.textContent = conversation.title;
    const date = document.createElement("small");
    date.textContent = when.format(conversation.updated);
    open.append(title, date);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "icon-button history-delete";
    remove.disabled = disabled;
    remove.textContent = "✕";
    remove.setAttribute("aria-label", `Delete “${conversation.title}”`);
    remove.title = "Delete this conversation";
    item.append(open, remove);
    return item;
  }));
}

/** On narrow screens the list is a drawer: `toggle` opens it; `close`, the backdrop and Escape close it. */
export function historyDrawer(panel, toggle, close, backdrop) {
  const setOpen = (open) => {
    panel.classList.toggle("open", open);
    backdrop.hidden = !open;
    toggle.setAttribute("aria-expanded", String(open));
  };
  toggle.addEventListener("click", () => setOpen(true));
  close.addEventListener("click", () => setOpen(false));
  backdrop.addEventListener("click", () => setOpen(false));
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") setOpen(false); });
  return { close: () => setOpen(false) };
}
