// The token inspector (side panel): for one generated token, its alternatives (top_logprobs), the sampler's
// trace (stage by stage, the chosen token's rank and probability, the random draw) and the logit lens at its
// position (what each layer would have predicted there), fetched from /v1/lantern/lens on demand.

import { postJSON } from "./api.js";
import { h, fill, tokenLabel, pct, num, probBar, probHue } from "./dom.js";

const LENS_TOP_K = 5;

/** els: {panel, title, body, close} */
export function createInspector({ els }) {
  let current = null; // {turn, index, span, controller}
  const lensCache = new WeakMap(); // turn -> Map(index -> lens response)

  function close() {
    if (!current) return;
    if (current.controller) current.controller.abort();
    const span = current.span;
    current = null;
    els.panel.hidden = true;
    document.body.classList.remove("inspecting");
    if (span) {
      span.setAttribute("aria-pressed", "false");
      if (span.isConnected) span.focus();
    }
  }

  function reset() {
    if (current && current.controller) current.controller.abort();
    current = null;
    els.panel.hidden = true;
    document.body.classList.remove("inspecting");
    fill(els.body);
  }

  function show(turn, index, span) {
    if (current && current.controller) current.controller.abort();
    const token = turn.tokens[index];
    current = { turn, index, span, controller: new AbortController() };
    els.title.textContent = `Token ${index + 1} of ${turn.tokens.length}`;
    fill(els.body,
      summary(token),
      section("Alternatives", "alternatives", alternatives(token)),
      section("Sampling trace", "trace", trace(token)),
      section("Logit lens", "lens", h("p", { class: "muted loading", text: "Running the logit lens…" })));
    els.panel.hidden = false;
    document.body.classList.add("inspecting");
    els.title.focus();
    loadLens(turn, index, current.controller.signal);
  }

  // ------------------------------------------------------------------ sections

  function section(title, name, content) {
    const id = `insp-${name}`;
    return h("section", { class: `insp-section insp-${name}`, "aria-labelledby": id },
      h("h3", { id, text: title }), content);
  }

  function summary(token) {
    const p = token.logprob === null ? null : Math.exp(token.logprob);
    const chip = h("span", { class: "chip big" }, tokenLabel(token.trace ? token.trace.chosen.text : token.text));
    if (p !== null) chip.style.setProperty("--h", probHue(p));
    return h("div", { class: "insp-summary" }, chip,
      h("dl", { class: "facts" },
        h("dt", { text: "id" }), h("dd", { class: "mono", text: token.id ?? "—" }),
        h("dt", { text: "piece" }), h("dd", { class: "mono" },
          token.trace && token.trace.chosen.piece !== undefined ? tokenLabel(token.trace.chosen.piece) : "—"),
        h("dt", { text: "probability" }), h("dd", { class: "mono", text: pct(p) }),
        h("dt", { text: "logprob" }), h("dd", { class: "mono", text: num(token.logprob, 4) })));
  }

  function alternatives(token) {
    if (!token.top.length) return h("p", { class: "muted", text: "The server sent no alternatives." });
    const rows = token.top.map((alt, rank) => {
      const p = Math.exp(alt.logprob);
      const chosen = alt.token === token.tokenString && Math.abs(alt.logprob - token.logprob) < 1e-6;
      return h("li", { class: chosen ? "alt chosen" : "alt" },
        h("span", { class: "rank", text: `${rank + 1}.` }),
        tokenLabel(alt.token),
        probBar(p),
        h("span", { class: "mono pnum", text: pct(p) }),
        chosen ? h("span", { class: "tag", text: "chosen" }) : h("span"));
    });
    const listed = token.top.some((alt) => alt.token === token.tokenString &&
      Math.abs(alt.logprob - token.logprob) < 1e-6);
    return h("div", {},
      h("ol", { class: "alts", "aria-label": "Most likely tokens at this position (model's raw distribution)" },
        rows),
      listed ? null : h("p", { class: "muted", text: `The chosen token (${pct(Math.exp(token.logprob))}) is ` +
        "not among these: it was sampled from further down the distribution." }));
  }

  function trace(token) {
    const t = token.trace;
    if (!t) return h("p", { class: "muted", text: "The server sent no sampling trace for this token." });
    const vocab = t.stages.length ? t.stages[0].kept : null;
    const stages = t.stages.map((stage) => h("li", { class: "stage" },
      h("div", { class: "stage-head" },
        h("strong", { text: stage.name }),
        h("span", { class: "muted", text: `kept ${stage.kept.toLocaleString("en-US")}` +
          (vocab && stage.name !== "input" ? ` of ${vocab.toLocaleString("en-US")}` : " tokens") +
          (stage.name !== "input" ? ` · ${pct(stage.kept_mass)} of the mass` : "") })),
      chips(stage.top, t.chosen.id)));
    const c = t.chosen;
    const chosenText = h("p", { class: "chosen-line" }, "Chosen ", tokenLabel(c.text),
      ` — raw rank #${c.raw_rank} (${pct(c.raw_prob)}), after the stages rank #${c.rank} (${pct(c.prob)}).`);
    return h("div", {},
      h("ol", { class: "stages", "aria-label": "Sampling stages in order" }, stages),
      chosenText, draw(t));
  }

  function draw(t) {
    const d = t.draw;
    if (!d) return h("p", { class: "draw", text: "Greedy: the most likely token is taken; no random draw." });
    const total = d.total || 1;
    const target = d.uniform * total;
    // The cumulative-probability line: the chosen token owns [low, high); the draw landed at u x total.
    const line = h("div", { class: "cdf", role: "img",
      "aria-label": `draw ${num(target, 4)} inside the chosen token's range ${num(d.low, 4)} to ${num(d.high, 4)}` },
      h("span", { class: "cdf-range", style: { left: `${(d.low / total) * 100}%`,
        width: `${Math.max(0.5, ((d.high - d.low) / total) * 100)}%` } }),
      h("span", { class: "cdf-u", style: { left: `${(target / total) * 100}%` } }));
    return h("div", { class: "draw" },
      h("p", {}, `Random draw (${d.method.replace(/_/g, " ")}): u = `, h("span", { class: "mono", text: num(d.uniform, 4) }),
        `; u × total = `, h("span", { class: "mono", text: num(target, 4) }),
        ` falls in the chosen token's slice [`, h("span", { class: "mono", text: num(d.low, 4) }), ", ",
        h("span", { class: "mono", text: num(d.high, 4) }), ") of the cumulative probability."),
      line);
  }

  function chips(top, chosenId) {
    return h("ul", { class: "chips" }, top.map((entry) => h("li", {
      class: entry.id === chosenId ? "chip chosen" : "chip",
      title: `id ${entry.id}${entry.id === chosenId ? " (the chosen token)" : ""}`,
    }, tokenLabel(entry.text), h("span", { class: "chip-p", text: pct(entry.prob) }))));
  }

  // ------------------------------------------------------------------ logit lens

  async function loadLens(turn, index, signal) {
    const target = () => els.body.querySelector(".insp-lens");
    const token = turn.tokens[index];
    const before = turn.tokens.slice(0, index).map((t) => t.id);
    if (!turn.promptIds || before.some((id) => id === null || id === undefined)) {
      replaceLens(target(), h("p", { class: "muted", text: "No lens: the token ids of this answer are unknown." }));
      return;
    }
    let cache = lensCache.get(turn);
    if (!cache) lensCache.set(turn, (cache = new Map()));
    let lens = cache.get(index);
    if (!lens) {
      try {
        lens = await postJSON("/v1/lantern/lens",
          { ids: [...turn.promptIds, ...before], position: -1, top_k: LENS_TOP_K }, signal);
      } catch (err) {
        if (err.name === "AbortError") return;
        if (current && current.turn === turn && current.index === index) {
          replaceLens(target(), h("p", { class: "error-text", role: "alert", text: `Lens failed: ${err.message}` }));
        }
        return;
      }
      cache.set(index, lens);
    }
    if (!current || current.turn !== turn || current.index !== index) return; // another token was picked
    replaceLens(target(), lensView(lens, token.id));
  }

  function replaceLens(sectionEl, content) {
    if (!sectionEl) return;
    const heading = sectionEl.querySelector("h3");
    fill(sectionEl, heading, content);
  }

  function lensView(lens, chosenId) {
    const rows = lens.depths.map((d) => h("li", { class: "depth", "data-depth": d.depth },
      h("div", { class: "depth-head" },
        h("strong", { class: "mono", text: d.name }),
        h("span", { class: "muted", text: `entropy ${num(d.entropy, 2)} nats` })),
      chips(d.top, chosenId)));
    return h("div", {},
      h("p", { class: "muted" }, `What the hidden state after each of the ${lens.num_layers} layers would predict ` +
        "here, read through the final norm and the output head. Highlighted: the token that was generated."),
      h("ol", { class: "lens", "aria-label": "Logit lens, from the embeddings to the last layer" }, rows));
  }

  // ------------------------------------------------------------------ wiring

  els.close.addEventListener("click", close);
  els.panel.addEventListener("keydown", (e) => {
    if (e.key === "Escape") {
      e.preventDefault();
      close();
    }
  });

  return { show, close, reset };
}
