// Answers are untrusted input rendered as Markdown, behind two walls.
//
// 1. marked, configured so that nothing in an answer becomes live markup: raw
//    HTML comes out as escaped text (shown as the model wrote it), links other
//    than http(s)/mailto become inert text, and images become plain links (never
//    fetched: the CSP's img-src would block them anyway).
// 2. DOMPurify, with a short allow-list of the tags and attributes that wall 1
//    produces. If it ever has to remove something, wall 1 let it through: the
//    answer is then shown as plain text, so nothing is silently dropped.
//
// DOMPurify hands back a DocumentFragment, so no HTML string is ever assigned
// to the page.
import { Marked } from "./vendor/marked/marked.esm.js";

const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

const PURIFY_CONFIG = {
  // "body" is the root DOMPurify parses into: without it, the root itself is reported as removed.
  ALLOWED_TAGS: ["body", "a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "li",
    "ol", "p", "pre", "span", "strong", "table", "tbody", "td", "th", "thead", "tr", "ul"],
  ALLOWED_ATTR: ["href", "title", "class", "rel", "target", "align", "start"],
  // DOMPurify checks every attribute not listed as URI-safe against this pattern.
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
  ADD_URI_SAFE_ATTR: ["rel", "target", "align", "start"],
  RETURN_DOM_FRAGMENT: true,
};

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** The URL if following it cannot run script on this page: http(s) or mailto, absolute. */
function safeUrl(href) {
  let url;
  try {
    url = new URL(href); // relative URLs throw: an answer has no business linking into this server
  } catch {
    return null;
  }
  return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
}

const marked = new Marked({
  gfm: true,
  breaks: true, // a chat answer's single newlines are meant as line breaks
  renderer: {
    html({ text, block }) {
      const shown = escapeHtml(block ? text.replace(/\n+$/, "") : text);
      return block ? `<p class="raw-html">${shown}</p>\n` : `<span class="raw-html">${shown}</span>`;
    },
    link({ href, title, tokens }) {
      const text = this.parser.parseInline(tokens);
      const url = safeUrl(href);
      if (!url) return `<span class="inert-link" title="${escapeHtml(`link not followed: ${href}`)}">${text}</span>`;
      const titled = title ? ` title="${escapeHtml(title)}"` : "";
      return `<a href="${escapeHtml(url)}"${titled} rel="noopener noreferrer nofollow" target="_blank">${text}</a>`;
    },
    image({ href, text }) {
      const label = `[image: ${escapeHtml(text || "no description")}]`;
      const url = safeUrl(href);
      if (!url || url.startsWith("mailto:")) return `<span class="inert-link image-link">${label}</span>`;
      return `<a class="image-link" href="${escapeHtml(url)}" rel="noopener noreferrer nofollow" target="_blank"`
        + ` title="image, not loaded: ${escapeHtml(url)}">${label}</a>`;
    },
    checkbox({ checked }) {
      return checked ? "☑ " : "☐ "; // a task list's box as text: no form controls in an answer
    },
  },
});

/**
 * Render `source` (an answer's Markdown) into `target`, replacing its children.
 * Returns "markdown", or "text" when it was shown as plain text instead.
 */
export function renderMarkdown(target, source) {
  const purify = globalThis.DOMPurify;
  if (purify && purify.isSupported) {
    const fragment = purify.sanitize(marked.parse(source), PURIFY_CONFIG);
    if (purify.removed.length === 0) {
      addCopyButtons(fragment);
      target.replaceChildren(fragment);
      target.dataset.rendered = "markdown";
      return "markdown";
    }
    console.warn("markdown: the sanitiser removed", purify.removed.length, "node(s); showing the answer as text");
  }
  target.replaceChildren(document.createTextNode(source));
  target.dataset.rendered = "text";
  return "text";
}

function addCopyButtons(fragment) {
  for (const pre of fragment.querySelectorAll("pre")) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy-code";
    button.textContent = "Copy";
    button.setAttribute("aria-label", "Copy this code");
    pre.prepend(button);
  }
}

/** Copy the code block that `button` belongs to; resolves to true when the clipboard took it. */
export async function copyCode(button) {
  const code = button.closest("pre").querySelector("code");
  const text = code ? code.textContent : "";
  let copied = false;
  try {
    await navigator.clipboard.writeText(text);
    copied = true;
  } catch {
    copied = copyBySelection(code); // navigator.clipboard exists only on https:// and localhost
  }
  button.textContent = copied ? "Copied" : "Copy failed";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
  return copied;
}

function copyBySelection(node) {
  if (!node) return false;
  const selection = window.getSelection();
  const range = document.createRange();
  range.selectNodeContents(node);
  selection.removeAllRanges();
  selection.addRange(range);
  try {
    return document.execCommand("copy");
  } catch {
    return false;
  } finally {
    selection.removeAllRanges();
  }
}
