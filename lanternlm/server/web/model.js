// The model page: what /v1/lantern/inspect reports — an overview, the parameter counts per component, the
// config, tokenizer and chat-template facts, the files, and the module tree as print(model) shows it.

import { getJSON } from "./api.js";
import { h, fill, int, short, bytes } from "./dom.js";

// Labels for the parameter counts the server reports; keys it adds later still show, under their own names.
const PARAM_LABELS = {
  embed_tokens: "Token embeddings",
  layers: "All decoder layers",
  final_norm: "Final norm",
  lm_head: "Output head (lm_head)",
  total: "Total",
  total_counting_lm_head: "Total, counting a tied lm_head again",
  seeds_estimate: "Estimate: linear weights per layer × layers + lm_head",
};

/** els: {root} ; the page loads once, on first show (and again after an error). */
export function createModelPage({ els }) {
  let loaded = false;
  let loading = false;

  async function show() {
    if (loaded || loading) return;
    loading = true;
    fill(els.root, h("p", { class: "muted loading", text: "Loading the model's description…" }));
    try {
      const info = await getJSON("/v1/lantern/inspect");
      fill(els.root, render(info));
      loaded = true;
    } catch (err) {
      fill(els.root, h("p", { class: "error-text", role: "alert", text: `Could not load the model: ${err.message}` }),
        h("button", { type: "button", text: "Try again", onclick: () => show() }));
    } finally {
      loading = false;
    }
  }

  function render(info) {
    const p = info.parameters || {};
    const c = info.config || {};
    return h("div", { class: "model-grid" },
      card("Overview", overview(info, p, c), "overview"),
      card("Parameters", paramsTable(p), "params"),
      card("Config", keyValueTable(flatten(c), "Model configuration"), "config"),
      card("Tokenizer", keyValueTable(flatten(info.tokenizer || {}), "Tokenizer facts"), "tokenizer"),
      card("Chat template", keyValueTable(flatten(info.chat_template || {}), "Chat template facts"), "template"),
      card("Files", filesTable(info.files || []), "files"),
      card("Module tree", h("pre", { class: "module-tree", tabindex: "0", "aria-label": "Module tree",
        text: info.module_tree || "" }), "tree wide"));
  }

  function card(title, content, name) {
    const id = `model-${name.split(" ")[0]}`;
    return h("section", { class: `card ${name.split(" ").map((n) => `card-${n}`).join(" ")}`,
      "aria-labelledby": id }, h("h2", { id, text: title }), content);
  }

  function overview(info, p, c) {
    const facts = [
      ["Architecture", info.architecture],
      ["Format", info.format],
      ["Parameters", p.total !== undefined ? `${int(p.total)} (${short(p.total)})` : "—"],
      ["Layers", c.layers],
      ["Context length", c.context_length !== undefined ? int(c.context_length) : undefined],
      ["Vocabulary", c.vocab_size !== undefined ? int(c.vocab_size) : undefined],
    ];
    if (info.dtype) {
      facts.push(["Weights", `${info.dtype.stored} stored, ${info.dtype.compute} compute on ${info.dtype.device}`]);
      if (info.dtype.weights_bytes_in_memory !== undefined) {
        facts.push(["In memory", bytes(info.dtype.weights_bytes_in_memory)]);
      }
    }
    const dl = h("dl", { class: "facts wide-facts" });
    for (const [k, v] of facts) {
      if (v === undefined || v === null) continue;
      dl.append(h("dt", { text: k }), h("dd", { class: k === "Parameters" ? "param-total" : null, text: v }));
    }
    return dl;
  }

  function paramsTable(p) {
    const body = h("tbody");
    const row = (label, value, cls) => body.append(h("tr", { class: cls },
      h("th", { scope: "row", text: label }), h("td", { class: "mono num", text: int(value) })));
    const done = new Set(["per_layer", "lm_head_tied"]);
    if (p.embed_tokens !== undefined) row(PARAM_LABELS.embed_tokens, p.embed_tokens);
    done.add("embed_tokens");
    if (p.per_layer) {
      body.append(h("tr", { class: "group" }, h("th", { scope: "rowgroup", colspan: "2", text: "One decoder layer" })));
      for (const [key, value] of Object.entries(p.per_layer)) {
        if (value && typeof value === "object") {
          for (const [sub, n] of Object.entries(value)) row(`${key}.${sub}`, n, "sub");
        } else {
          row(key === "total" ? "layer total" : key === "linear_only" ? "linear weights only" : key, value, "sub");
        }
      }
    }
    for (const key of ["layers", "final_norm", "lm_head"]) {
      if (p[key] === undefined) continue;
      done.add(key);
      const label = key === "lm_head" && p.lm_head_tied ? `${PARAM_LABELS.lm_head} — tied to the embeddings`
        : PARAM_LABELS[key];
      row(label, p[key]);
    }
    for (const [key, value] of Object.entries(p)) {
      if (done.has(key) || ["total", "total_counting_lm_head", "seeds_estimate"].includes(key)) continue;
      if (typeof value === "number") row(PARAM_LABELS[key] || key, value);
    }
    const foot = h("tfoot");
    for (const key of ["total", "total_counting_lm_head", "seeds_estimate"]) {
      if (p[key] === undefined) continue;
      if (key === "total_counting_lm_head" && !p.lm_head_tied) continue; // same as the total
      foot.append(h("tr", { class: key === "total" ? "total" : "extra", "data-key": key },
        h("th", { scope: "row", text: PARAM_LABELS[key] }), h("td", { class: "mono num", text: int(p[key]) })));
    }
    return h("div", { class: "table-wrap" }, h("table", { class: "kv params-table" },
      h("caption", { class: "sr-only", text: "Parameter counts per component" }),
      h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Component" }),
        h("th", { scope: "col", class: "num", text: "Parameters" }))), body, foot));
  }

  function keyValueTable(pairs, caption) {
    if (!pairs.length) return h("p", { class: "muted", text: "Nothing reported." });
    return h("div", { class: "table-wrap" }, h("table", { class: "kv" },
      h("caption", { class: "sr-only", text: caption }),
      h("tbody", {}, pairs.map(([k, v]) => h("tr", {},
        h("th", { scope: "row", class: "mono", text: k }), h("td", { class: "mono", text: cell(v) }))))));

    function cell(v) {
      if (v === null || v === undefined) return "—";
      if (typeof v === "number") return Number.isInteger(v) ? int(v) : String(v);
      if (typeof v === "string") return v;
      return JSON.stringify(v);
    }
  }

  function filesTable(files) {
    if (!files.length) return h("p", { class: "muted", text: "No files reported." });
    return h("div", { class: "table-wrap" }, h("table", { class: "kv" },
      h("caption", { class: "sr-only", text: "Model files" }),
      h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "File" }), h("th", { scope: "col", class: "num",
        text: "Size" }))),
      h("tbody", {}, files.map((f) => h("tr", {},
        h("td", { class: "mono path", text: f.path }), h("td", { class: "mono num", text: bytes(f.bytes) }))))));
  }

  return { show };
}

/** Nested objects as dotted keys ("rope.theta"); arrays stay whole. */
function flatten(obj, prefix = "") {
  const out = [];
  for (const [key, value] of Object.entries(obj)) {
    const name = prefix ? `${prefix}.${key}` : key;
    if (value && typeof value === "object" && !Array.isArray(value)) out.push(...flatten(value, name));
    else out.push([name, value]);
  }
  return out;
}
