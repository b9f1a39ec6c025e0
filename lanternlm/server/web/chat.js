// The chat: keeps the conversation, streams each answer from /v1/chat/completions with per-token logprobs and
// Lantern's sampling trace, renders every generated token as its own focusable span (coloured by probability
// when the view is on), and hands a chosen token to the inspector. A reasoning model's thinking (the stream's
// `reasoning_content`) shows in a folded "Thinking" box above the answer and stays out of the conversation.

import { ApiError, postJSON, streamSSE } from "./api.js";
import { h, fill, pct, probHue } from "./dom.js";

const TOP_K = 5; // alternatives (top_logprobs) and trace width per token

/**
 * els: {messages, form, prompt, send, stop, temperature, maxTokens, showProbs, newChat, status}
 * server: {name, maxLen} (filled in by app.js once /v1/models answers)
 * settings: {systemPrompt()} ; inspector: {show(turn, index, el), close(), reset()}
 */
export function createChat({ els, server, settings, inspector }) {
  const turns = []; // {role, content, failed?, el} and for answers {tokens, promptIds, finish, thought}
  let running = null; // {controller, turn} while a reply streams

  // ------------------------------------------------------------------ conversation

  function history() {
    const system = settings.systemPrompt();
    const out = system ? [{ role: "system", content: system }] : [];
    for (const t of turns) {
      if (!t.failed && (t.role === "user" || t.content)) out.push({ role: t.role, content: t.content });
    }
    return out;
  }

  function clearEmptyState() {
    const empty = els.messages.querySelector(".empty-state");
    if (empty) empty.remove();
  }

  function addUserTurn(text) {
    clearEmptyState();
    const el = h("article", { class: "msg user", "aria-label": "You" },
      h("div", { class: "who", text: "You" }), h("div", { class: "body", text }));
    els.messages.append(el);
    const turn = { role: "user", content: text, el };
    turns.push(turn);
    return turn;
  }

  function addAssistantTurn() {
    const body = h("div", { class: "body tokens", role: "group",
      "aria-label": "Answer tokens: use the arrow keys to move between tokens and Enter to inspect one" });
    const status = h("div", { class: "msg-status", text: "thinking…" });
    const el = h("article", { class: "msg assistant", "aria-label": "Assistant", "aria-busy": "true" },
      h("div", { class: "who", text: server.name || "Assistant" }), body, status);
    els.messages.append(el);
    // thought: the "Thinking" box, made when the first reasoning arrives; the answer's content never includes it.
    const turn = { role: "assistant", content: "", tokens: [], promptIds: null, finish: null, el, body, status,
      thought: null };
    turns.push(turn);
    // On the whole message: the thinking's tokens are focusable spans too.
    el.addEventListener("click", (e) => {
      const tok = e.target.closest(".tok");
      if (tok) select(turn, Number(tok.dataset.i));
    });
    el.addEventListener("keydown", (e) => onTokenKey(turn, e));
    return turn;
  }

  // ------------------------------------------------------------------ thinking

  /** The box for the thinking, above the answer; tokens already shown (all without text) move into it. */
  function thoughtOf(turn) {
    if (!turn.thought) {
      const text = h("div", { class: "thought-text", role: "group",
        "aria-label": "Thinking tokens: use the arrow keys to move between tokens and Enter to inspect one" });
      const box = h("details", { class: "thought", open: true }, h("summary", { text: "Thinking" }), text);
      text.append(...turn.body.childNodes); // e.g. the opening tag's token: it came before any answer
      turn.body.before(box);
      turn.thought = { box, text, folded: false };
    }
    return turn.thought;
  }

  /** Fold the thinking once the answer starts (the reader can open it again); the tab stop moves to the answer. */
  function foldThought(turn) {
    const thought = turn.thought;
    if (!thought || thought.folded) return;
    thought.folded = true;
    thought.box.open = false;
    const stop = thought.text.querySelector(".tok[tabindex='0']");
    const first = turn.body.querySelector(".tok");
    if (stop && first) {
      stop.tabIndex = -1;
      first.tabIndex = 0;
    }
  }

  // ------------------------------------------------------------------ tokens

  function addToken(turn, choice) {
    const lp = choice.logprobs && choice.logprobs.content && choice.logprobs.content[0];
    const trace = choice.lantern && choice.lantern.trace && choice.lantern.trace[0];
    const delta = choice.delta || {};
    const reasoning = delta.reasoning_content || delta.reasoning || ""; // the same text under two names
    const content = delta.content || "";
    const text = reasoning + content;
    const token = {
      text,
      reasoning: Boolean(reasoning),
      logprob: lp ? lp.logprob : null,
      top: lp ? lp.top_logprobs || [] : [],
      tokenString: lp ? lp.token : null,
      trace: trace || null,
      id: trace && trace.chosen ? trace.chosen.id : null,
    };
    const i = turn.tokens.length;
    turn.tokens.push(token);
    turn.content += content;

    const p = token.logprob === null ? null : Math.exp(token.logprob);
    const span = h("span", {
      class: text ? "tok" : "tok empty", tabindex: i === 0 ? "0" : "-1", role: "button", "data-i": i,
      "data-p": p === null ? null : String(p), "aria-pressed": "false",
      title: p === null ? "no probability" : `p = ${pct(p)} · logprob ${token.logprob.toFixed(3)}` +
        (text ? "" : " · no text of its own (part of a character, or held back; it shows with a later token)"),
      text,
    });
    if (p !== null) span.style.setProperty("--h", probHue(p));
    // A token without text (a tag, the whitespace after the thinking) stays with the thinking until the answer
    // starts, so that the spans keep the tokens' order.
    const inThought = reasoning || (!text && turn.thought && !turn.thought.folded);
    (inThought ? thoughtOf(turn).text : turn.body).append(span);
    if (content) foldThought(turn);
  }

  /** An answer that stopped on an end-of-turn token shows that token (which adds no text) as a marker. */
  function markEnd(turn) {
    const last = turn.tokens[turn.tokens.length - 1];
    const span = tokenSpans(turn)[turn.tokens.length - 1];
    if (turn.finish !== "stop" || !last || last.text || !span || !last.trace) return;
    span.classList.replace("empty", "end");
    span.dataset.label = last.trace.chosen.text;
    span.title = `end of the answer: ${last.trace.chosen.text} (not part of the text) · ` +
      `p = ${pct(Math.exp(last.logprob))}`;
  }

  function tokenSpans(turn) {
    return turn.el.querySelectorAll(".tok"); // the thinking's, then the answer's: the order they came in
  }

  /** Open the folded thinking if `span` is in it, so that it can take the focus. */
  function reveal(span) {
    const box = span.closest("details");
    if (box && !box.open) box.open = true;
  }

  function focusToken(turn, i) {
    const spans = tokenSpans(turn);
    if (!spans.length) return;
    const target = spans[Math.max(0, Math.min(spans.length - 1, i))];
    for (const s of spans) s.tabIndex = -1; // roving tabindex: one tab stop per answer
    target.tabIndex = 0;
    reveal(target);
    target.focus();
  }

  function onTokenKey(turn, e) {
    const tok = e.target.closest(".tok");
    if (!tok) return;
    const i = Number(tok.dataset.i);
    const moves = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: turn.tokens.length - 1 };
    if (e.key in moves) {
      e.preventDefault();
      focusToken(turn, moves[e.key]);
    } else if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      select(turn, i);
    }
  }

  function select(turn, i) {
    for (const s of els.messages.querySelectorAll(".tok[aria-pressed='true']")) {
      s.setAttribute("aria-pressed", "false");
    }
    const span = tokenSpans(turn)[i];
    if (!span) return;
    span.setAttribute("aria-pressed", "true");
    for (const s of tokenSpans(turn)) s.tabIndex = -1;
    span.tabIndex = 0;
    reveal(span);
    inspector.show(turn, i, span);
  }

  // ------------------------------------------------------------------ sending

  function setBusy(busy) {
    const hadFocus = document.activeElement === (busy ? els.send : els.stop);
    els.stop.disabled = !busy;
    if (busy && hadFocus) els.stop.focus(); // a disabled button would drop the keyboard focus to <body>
    els.send.disabled = busy;
    els.form.setAttribute("aria-busy", busy ? "true" : "false");
  }

  function readNumber(input) {
    if (input.value.trim() === "") return null;
    const v = Number(input.value);
    return Number.isFinite(v) ? v : null;
  }

  function finishStatus(turn, seconds) {
    const n = turn.tokens.length;
    // Tokens after the first over the time they took; too short a span (a buffered burst) says nothing.
    const rate = seconds >= 0.2 && n > 2 ? ` · ${((n - 1) / seconds).toFixed(1)} tokens/s` : "";
    const reason = { stop: "finished", length: "hit the token limit" }[turn.finish] || turn.finish || "done";
    // How much of the prompt the server's prefix cache served (the earlier turns of this chat, usually).
    const cached = turn.cached && turn.promptIds ?
      ` · ${turn.cached} of ${turn.promptIds.length} prompt tokens from the cache` : "";
    return `${n} token${n === 1 ? "" : "s"} · ${reason}${rate}${cached}`;
  }

  function fail(turn, userTurn, message) {
    turn.status.textContent = "";
    turn.el.classList.add("error");
    turn.body.append(h("p", { class: "error-text", role: "alert", text: `Error: ${message}` }));
    if (!turn.tokens.length) {
      // Nothing came back: take the question out of the conversation and give its text back to edit.
      turn.failed = true;
      userTurn.failed = true;
      userTurn.el.classList.add("failed");
      if (!els.prompt.value) els.prompt.value = userTurn.content;
    }
  }

  async function submit() {
    const text = els.prompt.value.trim();
    if (!text || running) return;
    if (!server.name) {
      const waited = await server.ready().catch(() => null);
      if (!waited) return;
    }
    const temperature = readNumber(els.temperature);
    if (temperature !== null && (temperature < 0 || temperature > 2)) {
      els.temperature.setCustomValidity("Temperature must be between 0 and 2");
      els.temperature.reportValidity();
      return;
    }
    els.temperature.setCustomValidity("");
    els.prompt.value = "";
    const userTurn = addUserTurn(text);
    const messages = history();
    const turn = addAssistantTurn();
    const controller = new AbortController();
    running = { controller, turn };
    setBusy(true);
    scrollToEnd(true);
    let firstAt = 0;
    let lastAt = 0;
    try {
      // The prompt's ids: to fit max_tokens into the context, and for the logit lens of each answer token.
      const tok = await postJSON("/tokenize", { messages, add_generation_prompt: true }, controller.signal);
      turn.promptIds = tok.tokens;
      const room = (server.maxLen || Infinity) - tok.tokens.length;
      if (room < 1) {
        throw new ApiError(`the conversation is ${tok.tokens.length} tokens and fills the model's context ` +
          `(${server.maxLen}): start a new chat`);
      }
      const wanted = Math.max(1, Math.round(readNumber(els.maxTokens) ?? 256));
      const body = {
        model: server.name, messages, stream: true, max_tokens: Math.min(wanted, room),
        logprobs: true, top_logprobs: TOP_K, lantern: { trace: true, top_k: TOP_K },
      };
      if (temperature !== null) body.temperature = temperature;
      turn.status.textContent = "generating…";
      await streamSSE("/v1/chat/completions", body, (chunk) => {
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) return;
        const delta = choice.delta || {};
        if (choice.lantern && choice.lantern.cached_tokens !== undefined) turn.cached = choice.lantern.cached_tokens;
        if (choice.logprobs || choice.lantern || delta.content || delta.reasoning_content || delta.reasoning) {
          lastAt = performance.now();
          if (!firstAt) firstAt = lastAt;
          addToken(turn, choice);
          scrollToEnd(false);
        }
        if (choice.finish_reason) {
          turn.finish = choice.finish_reason;
          markEnd(turn);
        }
      }, controller.signal);
      turn.status.textContent = finishStatus(turn, (lastAt - firstAt) / 1000);
    } catch (err) {
      if (err.name === "AbortError") {
        turn.el.classList.add("stopped");
        turn.status.textContent = `stopped after ${turn.tokens.length} token${turn.tokens.length === 1 ? "" : "s"}`;
        if (!turn.tokens.length) {
          turn.failed = true;
          userTurn.failed = true;
          userTurn.el.classList.add("failed");
        }
      } else {
        fail(turn, userTurn, err.message);
      }
    } finally {
      turn.el.setAttribute("aria-busy", "false");
      running = null;
      setBusy(false);
      if (document.activeElement === els.stop || document.activeElement === document.body) els.prompt.focus();
    }
  }

  function stop() {
    if (running) running.controller.abort();
  }

  function reset() {
    stop();
    turns.length = 0;
    inspector.reset();
    fill(els.messages, emptyState());
    els.prompt.focus();
  }

  function scrollToEnd(force) {
    const box = els.messages;
    const near = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    if (force || near) box.scrollTop = box.scrollHeight;
  }

  function emptyState() {
    return h("div", { class: "empty-state" },
      h("p", { text: "Ask the model something." }),
      h("p", { text: "Turn on “Colour by probability” to see how sure the model was of each token, and select " +
        "any token of an answer (click, or Tab to the answer, move with the arrow keys and press Enter) to see " +
        "its alternatives, how the sampler chose it, and what each layer predicted (the logit lens)." }));
  }

  // ------------------------------------------------------------------ wiring

  els.form.addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
  els.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    }
  });
  els.stop.addEventListener("click", stop);
  els.newChat.addEventListener("click", reset);
  els.showProbs.addEventListener("change", () => {
    els.messages.classList.toggle("probs", els.showProbs.checked);
    els.legend.hidden = !els.showProbs.checked;
    settings.save("showProbs", els.showProbs.checked ? "1" : "");
  });
  els.showProbs.checked = settings.load("showProbs") === "1";
  els.messages.classList.toggle("probs", els.showProbs.checked);
  els.legend.hidden = !els.showProbs.checked;
  for (const [input, name] of [[els.temperature, "temperature"], [els.maxTokens, "maxTokens"]]) {
    const saved = settings.load(name);
    if (saved !== null) input.value = saved;
    input.addEventListener("change", () => settings.save(name, input.value));
  }
  fill(els.messages, emptyState());
  setBusy(false);

  return { reset };
}
