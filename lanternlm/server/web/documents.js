// The Documents page: files added to a retrieval index (/v1/lantern/rag/documents), and a question answered
// from them (/v1/lantern/rag/ask, streamed). Every step shows: the question's tokens as the embedding model
// reads them, the chunks found with their scores and sources, the exact prompt with its token count, then the
// answer as it streams and the sources list Lantern writes after it ([1], [2] with file and position).

import { getJSON, postJSON, streamSSE } from "./api.js";
import { h, fill, bytes, int, tokenLabel } from "./dom.js";

const INDEX = "default";
const ACCEPTED = /\.(txt|md|markdown|html|htm)$/i;
const KINDS = { text: "Text", markdown: "Markdown", html: "HTML", pdf: "PDF" };

/** The last part of a server path ("/home/me/.cache/lantern/rag/default/uploads/notes.md" -> "notes.md"). */
function baseName(path) {
  return String(path).split(/[\\/]/).pop();
}

/**
 * A file name the server accepts (letters, digits, spaces, '.', '-', '_'; a letter, digit or '_' first; at
 * most 128 characters): other characters become '_', so "notes (1).md" is uploaded as "notes _1_.md".
 */
function uploadName(name) {
  const dot = name.lastIndexOf(".");
  const ext = name.slice(dot).toLowerCase();
  let stem = name.slice(0, dot).replace(/[^\w .-]/g, "_");
  if (!/^\w/.test(stem)) stem = `_${stem}`;
  return `${stem.slice(0, 128 - ext.length)}${ext}`;
}

function plural(n, word) {
  return `${int(n)} ${word}${n === 1 ? "" : "s"}`;
}

/** "lines 3-9" (and the page of a PDF), as the server's sources say it. */
function where(hit) {
  const [a, b] = hit.lines || [];
  const lines = a === undefined ? "" : a === b ? `line ${a}` : `lines ${a}-${b}`;
  return hit.page ? `page ${hit.page}, ${lines}` : lines;
}

/** A cosine similarity as a bar (its positive part) and the number, three decimals (exact in `title`). */
function scoreView(score) {
  const width = `${Math.max(0, Math.min(1, score)) * 100}%`;
  return h("span", { class: "score", title: `cosine similarity ${score}` },
    h("span", { class: "bar", "aria-hidden": "true" }, h("span", { class: "bar-fill", style: { width } })),
    h("span", { class: "score-num mono", "data-score": String(score), text: score.toFixed(3) }));
}

/**
 * els: {files, uploadLog, refresh, info, error, list, form, question, k, maxTokens, temperature, ask, stop,
 *       results, answer, status, sources, hitsInfo, query, hits, prompt}
 * settings: {load(name), save(name, value)}
 */
export function createDocumentsPage({ els, settings }) {
  let available = true; // false once the server said it has no embedding model
  let listing = 0; // number of the latest list request: older answers that arrive late are dropped
  let uploading = false;
  let running = null; // the AbortController of the question being answered

  // ------------------------------------------------------------------ the index

  async function refresh() {
    const ticket = ++listing;
    els.list.setAttribute("aria-busy", "true");
    try {
      const res = await getJSON(`/v1/lantern/rag/documents?index=${encodeURIComponent(INDEX)}`);
      if (ticket !== listing) return;
      available = true;
      els.error.hidden = true;
      renderList(res);
    } catch (err) {
      if (ticket !== listing) return;
      const code = err.body && err.body.error && err.body.error.code;
      available = !(code === "no_embedding_model" || (err.status === 400 && /no embedding model/i.test(err.message)));
      els.error.textContent = available ? `Could not list the documents: ${err.message}`
        : `Retrieval is off on this server: ${err.message}.`;
      els.error.hidden = false;
      if (!available) {
        els.info.textContent = "";
        fill(els.list);
      }
    } finally {
      if (ticket === listing) els.list.setAttribute("aria-busy", "false");
      setBusy();
    }
  }

  function renderList(res) {
    const docs = res.documents || [];
    const model = res.embedding_model;
    els.info.replaceChildren(
      "Index ", h("strong", { text: res.index || INDEX }), " · ",
      model ? `embedding model ${model.name}${model.dimensions ? ` (${model.dimensions} dimensions)` : ""}`
        : "no embedding model recorded yet (the first document records it)",
      " · ", plural(docs.length, "document"), " · ", plural(res.chunks ?? 0, "chunk"));
    if (res.path) els.info.title = res.path;
    if (!docs.length) {
      fill(els.list, h("p", { class: "muted empty-docs", text: "No documents yet: add .txt, .md or .html files." }));
      return;
    }
    const rows = docs.map((d) => h("tr", { "data-path": d.path },
      h("th", { scope: "row", class: "path", title: d.path, text: baseName(d.path) }),
      h("td", { text: KINDS[d.kind] || d.kind || "—" }),
      h("td", { class: "num", text: bytes(d.size) }),
      h("td", { class: "num doc-chunks", text: int(d.chunks) })));
    fill(els.list, h("div", { class: "table-wrap" }, h("table", { class: "kv docs-table" },
      h("caption", { class: "sr-only", text: "Documents in the index" }),
      h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "File" }), h("th", { scope: "col", text: "Type" }),
        h("th", { scope: "col", class: "num", text: "Size" }), h("th", { scope: "col", class: "num", text: "Chunks" }))),
      h("tbody", {}, rows))));
  }

  function log(text, kind = "") {
    const item = h("li", { class: kind, text });
    els.uploadLog.append(item);
    return item;
  }

  async function upload(files) {
    if (!files.length || uploading) return;
    const hadFocus = document.activeElement === els.files; // disabling the input below drops its focus
    uploading = true;
    setBusy();
    fill(els.uploadLog);
    let changed = false;
    for (const [i, file] of files.entries()) {
      const count = files.length > 1 ? ` (${i + 1} of ${files.length})` : "";
      if (!ACCEPTED.test(file.name)) {
        log(`${file.name}: skipped, not a .txt, .md, .markdown, .html or .htm file`, "error-text");
        continue;
      }
      const name = uploadName(file.name);
      const item = log(`${file.name}: adding${count}…`, "pending");
      try {
        const text = await file.text();
        if (!text.trim()) throw new Error("the file is empty");
        const res = await postJSON("/v1/lantern/rag/documents", { index: INDEX, name, text });
        item.className = res.status;
        item.textContent = `${file.name}: ${res.status}, ${plural(res.chunks, "chunk")}` +
          (name === file.name ? "" : ` (stored as ${name})`);
        changed = changed || res.status !== "unchanged";
      } catch (err) {
        item.className = "error-text";
        item.textContent = `${file.name}: not added: ${err.message}`;
      }
    }
    els.files.value = ""; // the same files can be picked again
    uploading = false;
    setBusy();
    if (hadFocus) els.files.focus();
    if (changed || !available) await refresh();
  }

  // ------------------------------------------------------------------ asking

  function setBusy() {
    const asking = Boolean(running);
    const hadFocus = document.activeElement === els.ask;
    els.stop.disabled = !asking;
    if (asking && hadFocus) els.stop.focus(); // a disabled button would drop the keyboard focus to <body>
    els.ask.disabled = asking || !available;
    els.files.disabled = uploading || !available;
    els.form.setAttribute("aria-busy", asking ? "true" : "false");
  }

  function readNumber(input) {
    if (input.value.trim() === "") return null;
    const v = Number(input.value);
    return Number.isFinite(v) ? v : null;
  }

  function check(input, ok, message) {
    input.setCustomValidity(ok ? "" : message);
    if (!ok) input.reportValidity();
    return ok;
  }

  async function submit() {
    const question = els.question.value.trim();
    if (!question || running || !available) return;
    const k = readNumber(els.k) ?? 4;
    const maxTokens = readNumber(els.maxTokens) ?? 256;
    const temperature = readNumber(els.temperature);
    if (!check(els.k, Number.isInteger(k) && k >= 1 && k <= 50, "Passages must be a whole number from 1 to 50") ||
        !check(els.maxTokens, Number.isInteger(maxTokens) && maxTokens >= 1, "Max tokens must be at least 1") ||
        !check(els.temperature, temperature === null || (temperature >= 0 && temperature <= 2),
          "Temperature must be between 0 and 2")) return;
    const body = { index: INDEX, question, k, max_tokens: maxTokens, stream: true };
    if (temperature !== null) body.temperature = temperature;

    const controller = new AbortController();
    running = controller;
    setBusy();
    startResults();
    let text = "";
    let finish = null;
    let plan = null;
    const started = performance.now();
    try {
      await streamSSE("/v1/lantern/rag/ask", body, (chunk) => {
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) return;
        if (choice.plan) {
          plan = choice.plan;
          renderPlan(plan);
          els.status.textContent = "generating…";
        }
        if (choice.text) {
          text += choice.text;
          els.answer.textContent = text;
          els.answer.classList.remove("empty");
        }
        if (choice.finish_reason) finish = choice.finish_reason;
        if (choice.sources) renderSources(choice.sources);
      }, controller.signal);
      const seconds = (performance.now() - started) / 1000;
      const reason = { stop: "finished", length: "hit the token limit" }[finish] || finish || "done";
      els.status.textContent = `${reason} · ${seconds.toFixed(1)} s`;
      if (!text) els.answer.textContent = "(the model answered with no text)";
    } catch (err) {
      if (err.name === "AbortError") {
        els.status.textContent = `stopped after ${plural(text.length, "character")}`;
        els.results.classList.add("stopped");
        if (plan) renderSources(plan.sources || []); // the passages the model was given, all the same
      } else {
        els.status.textContent = "";
        els.answer.classList.remove("empty");
        els.answer.append(h("p", { class: "error-text", role: "alert", text: `Error: ${err.message}` }));
        els.results.classList.add("error");
        if (plan) renderSources(plan.sources || []);
        else {
          fill(els.sources, h("li", { class: "muted", text: "None: nothing was retrieved." }));
          els.hitsInfo.textContent = "Nothing was retrieved.";
        }
      }
    } finally {
      els.results.setAttribute("aria-busy", "false");
      running = null;
      setBusy();
      if (document.activeElement === els.stop || document.activeElement === document.body) els.question.focus();
    }
  }

  function startResults() {
    els.results.hidden = false;
    els.results.classList.remove("stopped", "error");
    els.results.setAttribute("aria-busy", "true");
    fill(els.answer);
    els.answer.classList.add("empty");
    els.status.textContent = "retrieving…";
    fill(els.sources, h("li", { class: "muted", text: "listed when the answer is complete" }));
    els.hitsInfo.textContent = "searching…";
    fill(els.query);
    fill(els.hits);
    els.prompt.hidden = true;
  }

  function renderPlan(plan) {
    const hits = plan.hits || [];
    const given = plan.passages ?? (plan.sources || []).length;
    const tokens = (plan.query && plan.query.tokens) || [];
    els.hitsInfo.textContent = `${plural(hits.length, "chunk")} found by ${plan.embedding_model || "the embedding " +
      "model"}, best first; score = cosine similarity between the question and the chunk.` +
      (plan.dropped_passages ? ` ${plural(plan.dropped_passages, "chunk")} did not fit the chat model's context ` +
        "and were left out of the prompt." : "");
    if (tokens.length) {
      const prefix = plan.query.prefix ? [h("p", { class: "small", text: `Prefix: ${plan.query.prefix}` })] : [];
      fill(els.query, h("details", { class: "rag-step" },
        h("summary", { text: `The question as the embedding model reads it (${plural(tokens.length, "token")})` }),
        prefix, h("ol", { class: "tok-tokens", "aria-label": "Question tokens" },
          tokens.map((t, i) => h("li", { class: `tchip c${i % 6}`, title: `token ${i + 1}` },
            h("span", { class: "piece" }, tokenLabel(t)))))));
    }
    fill(els.hits, hits.map((hit, i) => hitView(hit, i, i < given)));
    if (!hits.length) fill(els.hits, h("li", { class: "muted", text: "No chunks found." }));
    els.prompt.hidden = false;
    els.prompt.open = false;
    els.prompt.querySelector("summary").textContent = `Prompt (${plural(plan.prompt_tokens, "token")})`;
    els.prompt.querySelector("pre").textContent = plan.prompt || "";
  }

  function hitView(hit, i, inPrompt) {
    const n = i + 1;
    const name = baseName(hit.source);
    const facts = [`chunk ${hit.chunk + 1}`, hit.tokens ? plural(hit.tokens, "token") : null,
      hit.chars ? `characters ${hit.chars[0]}-${hit.chars[1]}` : null,
      inPrompt ? `in the prompt as [${n}]` : "left out of the prompt (no room in the context)"].filter(Boolean);
    return h("li", { class: inPrompt ? "hit" : "hit dropped", "data-rank": n, "data-source": hit.source },
      h("details", { id: `rag-hit-${n}`, open: inPrompt },
        h("summary", { "aria-label": `[${n}] ${name}, ${where(hit)}, score ${hit.score.toFixed(3)}` },
          h("span", { class: "hit-n mono", text: `[${n}]` }),
          h("span", { class: "hit-source" }, h("span", { class: "hit-file", title: hit.source, text: name }),
            h("span", { class: "muted", text: ` · ${where(hit)}` })),
          scoreView(hit.score)),
        h("div", { class: "hit-text", text: hit.text }),
        h("p", { class: "hit-facts muted small", text: facts.join(" · ") })));
  }

  function renderSources(sources) {
    if (!sources.length) {
      fill(els.sources, h("li", { class: "muted", text: "No passages were given to the model." }));
      return;
    }
    fill(els.sources, sources.map((s) => h("li", { "data-n": s.n },
      h("button", { type: "button", class: "linklike", title: `Show chunk [${s.n}]: ${s.source}`,
        onclick: () => showHit(s.n) },
      h("span", { class: "mono", text: `[${s.n}]` }), " ", h("span", { class: "source-file", text: baseName(s.source) }),
      `, ${s.position}`),
      h("span", { class: "muted small", text: ` · score ${s.score.toFixed(3)}` }))));
  }

  /** Open a retrieved chunk, bring it into view and put the keyboard focus on it. */
  function showHit(n) {
    const details = document.getElementById(`rag-hit-${n}`);
    if (!details) return;
    details.open = true;
    const summary = details.querySelector("summary");
    summary.focus({ preventScroll: true });
    const still = matchMedia("(prefers-reduced-motion: reduce)").matches;
    details.scrollIntoView({ block: "nearest", behavior: still ? "auto" : "smooth" });
  }

  // ------------------------------------------------------------------ wiring

  els.files.addEventListener("change", () => upload([...els.files.files]));
  els.refresh.addEventListener("click", () => {
    fill(els.uploadLog);
    refresh();
  });
  els.form.addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
  els.question.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    }
  });
  els.stop.addEventListener("click", () => {
    if (running) running.abort();
  });
  for (const [input, name] of [[els.k, "ragK"], [els.maxTokens, "ragMaxTokens"], [els.temperature, "ragTemperature"]]) {
    const saved = settings.load(name);
    if (saved !== null) input.value = saved;
    input.addEventListener("change", () => settings.save(name, input.value));
  }
  setBusy();

  return {
    show() {
      // Listed again on every visit: `lantern rag add` may have changed the index meanwhile.
      if (!uploading) refresh();
    },
  };
}
