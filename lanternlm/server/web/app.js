// The page's entry point: finds the served model (/v1/models), wires the settings (API key, system prompt), the
// tabs (Chat, Documents, Model, Tokenizer; the URL hash remembers which) and starts the four pages' modules.

import { getJSON, getKey, setKey } from "./api.js";
import { createChat } from "./chat.js";
import { createDocumentsPage } from "./documents.js";
import { createInspector } from "./inspector.js";
import { createModelPage } from "./model.js";
import { createTokenizerPage } from "./tokenizer.js";

const $ = (id) => document.getElementById(id);

/** Small persisted preferences (localStorage, namespaced); failures just mean nothing is remembered. */
const settings = {
  load(name) {
    try {
      return localStorage.getItem(`lantern.${name}`);
    } catch {
      return null;
    }
  },
  save(name, value) {
    try {
      if (value === "" || value === null) localStorage.removeItem(`lantern.${name}`);
      else localStorage.setItem(`lantern.${name}`, value);
    } catch {
      /* storage disabled */
    }
  },
  systemPrompt() {
    return $("system-prompt").value.trim();
  },
};

// ------------------------------------------------------------------ notices

function notify(message, kind = "error") {
  const box = $("notice");
  box.textContent = message;
  box.className = `notice ${kind}`;
  box.hidden = !message;
}

// ------------------------------------------------------------------ the served model

const server = {
  name: null,
  maxLen: null,
  pending: null,
  ready() {
    if (!this.pending) {
      this.pending = getJSON("/v1/models").then((res) => {
        const first = res.data && res.data[0];
        if (!first) throw new Error("the server lists no model");
        this.name = first.id;
        this.maxLen = first.max_model_len || null;
        $("model-name").textContent = first.id;
        $("model-name").title = `${first.id}${this.maxLen ? ` · context ${this.maxLen} tokens` : ""}`;
        notify("");
        return first;
      }).catch((err) => {
        this.pending = null; // ask again next time (after a key is saved, say)
        $("model-name").textContent = "not connected";
        notify(err.message);
        if (err.needsKey) openSettings(true);
        throw err;
      });
    }
    return this.pending;
  },
};

// ------------------------------------------------------------------ settings

function openSettings(focusKey) {
  $("settings").open = true;
  if (focusKey) $("api-key").focus();
}

function wireSettings() {
  $("api-key").value = getKey();
  $("system-prompt").value = settings.load("systemPrompt") || "";
  $("settings-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setKey($("api-key").value.trim());
    settings.save("systemPrompt", $("system-prompt").value.trim());
    $("settings-status").textContent = "Saved.";
    server.ready().then(() => {
      $("settings").open = false;
      $("settings-summary").focus();
    }).catch(() => {});
  });
  $("forget-key").addEventListener("click", () => {
    $("api-key").value = "";
    setKey("");
    $("settings-status").textContent = "Key removed.";
  });
  $("settings").addEventListener("keydown", (e) => {
    if (e.key === "Escape" && $("settings").open) {
      $("settings").open = false;
      $("settings-summary").focus();
    }
  });
}

// ------------------------------------------------------------------ tabs

function wireTabs(pages) {
  const tabs = [...document.querySelectorAll("[role=tab]")];

  function activate(name, focus) {
    if (!pages[name]) name = "chat";
    for (const tab of tabs) {
      const on = tab.dataset.page === name;
      tab.setAttribute("aria-selected", on ? "true" : "false");
      tab.tabIndex = on ? 0 : -1;
      $(tab.getAttribute("aria-controls")).hidden = !on;
      if (on && focus) tab.focus();
    }
    document.body.dataset.page = name;
    if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
    pages[name]();
  }

  for (const [i, tab] of tabs.entries()) {
    tab.addEventListener("click", () => activate(tab.dataset.page, false));
    tab.addEventListener("keydown", (e) => {
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
      if (next === undefined) return;
      e.preventDefault();
      activate(tabs[(next + tabs.length) % tabs.length].dataset.page, true);
    });
  }
  window.addEventListener("hashchange", () => activate(location.hash.slice(1), false));
  activate(location.hash.slice(1), false);
}

// ------------------------------------------------------------------ start

function main() {
  wireSettings();
  const inspector = createInspector({
    els: { panel: $("inspector"), title: $("inspector-title"), body: $("inspector-body"), close: $("inspector-close") },
  });
  createChat({
    server, settings, inspector,
    els: {
      messages: $("messages"), form: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
      temperature: $("temperature"), maxTokens: $("max-tokens"), showProbs: $("show-probs"), newChat: $("new-chat"),
      legend: $("prob-legend"),
    },
  });
  const documents = createDocumentsPage({
    settings,
    els: {
      files: $("rag-files"), uploadLog: $("rag-upload-log"), refresh: $("rag-refresh"), info: $("rag-index-info"),
      error: $("rag-docs-error"), list: $("rag-docs-list"), form: $("rag-form"), question: $("rag-question"),
      k: $("rag-k"), maxTokens: $("rag-max-tokens"), temperature: $("rag-temperature"), ask: $("rag-ask"),
      stop: $("rag-stop"), results: $("rag-results"), answer: $("rag-answer"), status: $("rag-status"),
      sources: $("rag-sources"), hitsInfo: $("rag-hits-info"), query: $("rag-query"), hits: $("rag-hits"),
      prompt: $("rag-prompt"),
    },
  });
  const model = createModelPage({ els: { root: $("model-root") } });
  const tokenizer = createTokenizerPage({
    els: { form: $("tok-form"), text: $("tok-text"), special: $("tok-special"), chat: $("tok-chat"),
      count: $("tok-count"), tokens: $("tok-tokens"), ids: $("tok-ids"), error: $("tok-error") },
  });
  wireTabs({
    chat: () => {}, documents: () => documents.show(), model: () => model.show(), tokenizer: () => tokenizer.show(),
  });
  server.ready().catch(() => {});
  document.body.classList.add("ready");
}

main();
