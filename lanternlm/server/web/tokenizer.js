// The tokenizer playground: text typed in the box goes to /tokenize (as plain text, or as one user message
// through the chat template) and comes back as coloured tokens, each with its vocabulary piece and id.

import { postJSON } from "./api.js";
import { h, fill, tokenLabel } from "./dom.js";

const DEBOUNCE_MS = 250;

/** els: {form, text, special, chat, count, tokens, ids, error} */
export function createTokenizerPage({ els }) {
  let timer = 0;
  let controller = null;
  let asked = 0; // number of the latest request: older answers that arrive late are dropped

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(run, DEBOUNCE_MS);
  }

  async function run() {
    clearTimeout(timer);
    if (controller) controller.abort();
    controller = new AbortController();
    const ticket = ++asked;
    const text = els.text.value;
    const chat = els.chat.checked;
    els.special.disabled = chat; // the template decides the special tokens of a chat
    const body = chat ? { messages: [{ role: "user", content: text }], add_generation_prompt: true }
      : { prompt: text, add_special_tokens: els.special.checked };
    els.tokens.setAttribute("aria-busy", "true");
    try {
      const res = await postJSON("/tokenize", body, controller.signal);
      if (ticket !== asked) return;
      els.error.hidden = true;
      render(res);
    } catch (err) {
      if (err.name === "AbortError" || ticket !== asked) return;
      els.error.textContent = `Could not tokenize: ${err.message}`;
      els.error.hidden = false;
    } finally {
      if (ticket === asked) els.tokens.setAttribute("aria-busy", "false");
    }
  }

  function render(res) {
    const pieces = res.token_strs || [];
    els.count.textContent = `${res.count} token${res.count === 1 ? "" : "s"}` +
      (res.max_model_len ? ` · context ${res.max_model_len.toLocaleString("en-US")}` : "");
    fill(els.tokens, res.tokens.map((id, i) => h("li", {
      class: `tchip c${i % 6}`, "data-id": id, title: `token ${i + 1}: id ${id}`,
    }, h("span", { class: "piece" }, tokenLabel(pieces[i] ?? "")), h("span", { class: "tid mono", text: id }))));
    els.ids.value = res.tokens.join(", ");
  }

  els.form.addEventListener("submit", (e) => {
    e.preventDefault();
    run();
  });
  els.text.addEventListener("input", schedule);
  els.special.addEventListener("change", run);
  els.chat.addEventListener("change", run);

  let shown = false;
  return {
    show() {
      if (!shown) {
        shown = true;
        run();
      }
    },
  };
}
