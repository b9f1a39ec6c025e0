// DOM and formatting helpers shared by the page's modules: building elements safely (model text is always set
// as text, never parsed as HTML), showing a token's invisible characters, and formatting numbers.

/** Create an element. `attrs` keys: "class", "text", "on<event>", "data-*", aria-*, or any property/attribute. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "style" && typeof value === "object") Object.assign(el.style, value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Remove an element's children and append new ones. */
export function fill(el, ...children) {
  el.replaceChildren();
  for (const child of children.flat()) {
    if (child !== undefined && child !== null && child !== false) el.append(child);
  }
  return el;
}

// Characters a token may hold that would be invisible or break the layout, and what to show instead.
const VISIBLE = { " ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍", "\u00a0": "⍽" };
// Controls, other spaces, zero-width and format characters: shown as \uXXXX escapes.
const INVISIBLE = /[\p{Cc}\p{Cf}\p{Z}]/u;

/**
 * A token's text with its whitespace and control characters made visible, as a <span class="tokstr">.
 * The marks sit in their own <span class="mark"> so styles can mute them; `title` keeps the exact text.
 */
export function tokenLabel(text) {
  const out = h("span", { class: "tokstr", title: JSON.stringify(text) });
  if (text === "") {
    out.append(h("span", { class: "mark", text: "∅" }));
    return out;
  }
  let plain = "";
  for (const ch of text) {
    const code = ch.codePointAt(0);
    const mark = VISIBLE[ch] ?? (INVISIBLE.test(ch) ? `\\u${code.toString(16).padStart(4, "0")}` : null);
    if (mark === null) {
      plain += ch;
      continue;
    }
    if (plain) out.append(plain);
    plain = "";
    out.append(h("span", { class: "mark", text: mark }));
  }
  if (plain) out.append(plain);
  return out;
}

/** A probability in [0, 1] as a percentage with sensible precision ("83.2%", "0.041%", "<0.001%"). */
export function pct(p) {
  if (p === null || p === undefined || Number.isNaN(p)) return "—";
  const v = p * 100;
  if (v === 0) return "0%";
  if (v < 0.001) return "<0.001%";
  if (v < 0.1) return `${v.toPrecision(2)}%`;
  if (v < 99.95) return `${v.toFixed(1)}%`;
  return `${v.toFixed(v === 100 ? 0 : 2)}%`;
}

/** A number with a fixed count of decimals, or "—". */
export function num(x, digits = 3) {
  return typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "—";
}

/** An integer with thousands separators (always en-US, so the page reads the same everywhere). */
export function int(n) {
  return typeof n === "number" ? n.toLocaleString("en-US") : String(n ?? "—");
}

/** A count in short form: 134,515,008 -> "134.5M". */
export function short(n) {
  if (typeof n !== "number") return String(n ?? "—");
  for (const [size, unit] of [[1e12, "T"], [1e9, "B"], [1e6, "M"], [1e3, "K"]]) {
    if (Math.abs(n) >= size) return `${(n / size).toFixed(1)}${unit}`;
  }
  return String(n);
}

/** Bytes in short form: 453920 -> "443.3 KiB". */
export function bytes(n) {
  if (typeof n !== "number") return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
}

/** The hue (0 = red .. 120 = green) the probability view paints a token with probability p. */
export function probHue(p) {
  return Math.round(120 * Math.min(1, Math.max(0, p)));
}

/** A horizontal bar showing a probability; the number stays readable next to it. */
export function probBar(p) {
  const bar = h("span", { class: "bar", "aria-hidden": "true" });
  bar.append(h("span", { class: "bar-fill", style: { width: `${Math.max(0, Math.min(1, p)) * 100}%` } }));
  return bar;
}
