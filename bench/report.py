"""Turn the engines' results into what people read: text tables with ratios, the goals, a JSON file, a PNG chart
and (bench.all) markdown."""

from __future__ import annotations

import json
from pathlib import Path

# (result key, column title, format, higher is better); "long_tok_s" is titled by the run (tg128@4k)
METRICS = [
    ("load_s", "load s", "{:.2f}", False),
    ("pp128_tok_s", "pp128 tok/s", "{:.1f}", True),
    ("pp512_tok_s", "pp512 tok/s", "{:.1f}", True),
    ("tg128_tok_s", "tg128 tok/s", "{:.1f}", True),
    ("long_tok_s", "tg128@4k tok/s", "{:.1f}", True),
    ("ttft_s", "TTFT ms", "{:.0f}", False),
    ("peak_rss_mb", "peak RSS MiB", "{:.0f}", False),
]
SUSPECT_STALL = 0.10  # share of the run during which some task waited for a core
NAMES = {"lantern": "Lantern", "lantern-q8": "Lantern q8_0", "llamacpp": "llama.cpp", "llama-bench": "llama-bench",
         "transformers": "transformers", "vllm": "vLLM"}
LANTERNS = ("lantern", "lantern-q8")
PEERS = ("llamacpp", "llama-bench", "transformers", "vllm")
# The goals (issue 15), as (factor, what)
DECODE_VS_LLAMA = 1.5
PREFILL_VS_LLAMA = 2.0
LOAD_MAX_S = 1.0
HTTP8_VS_LLAMA_TG = 3.0
HTTP8_VS_LLAMA_SERVER = 1.5
HTTP1_VS_ALONE = 0.95
FOLDER_DECODE_VS_VLLM = 1.5


def name(engine: str, run: dict | None = None) -> str:
    base = NAMES.get(engine, engine)
    if run and run.get("kind") == "folder" and engine in ("llamacpp", "llama-bench") and run.get("peer_gguf"):
        return f"{base} ({Path(run['peer_gguf']).stem})"
    return base


def _cell(key: str, fmt: str, value) -> str:
    if value is None:
        return "-"
    return fmt.format(value * 1000 if key.startswith("ttft") else value)


def _ratio(a, b, higher_is_better: bool) -> str:
    """How many times better `a` is than `b` (>1: a wins), whatever the metric's direction."""
    if not a or not b:
        return "-"
    return f"{(a / b if higher_is_better else b / a):.2f}x"


def suspect(result: dict) -> bool:
    """Whether tasks waited for a CPU so often during the engine's run that its timings are doubtful."""
    return result.get("cpu_stall_share", 0.0) > SUSPECT_STALL


def in_process(result: dict) -> bool:
    """Whether the engine has figures of its own process (load, pp, tg): not vLLM, which is only served."""
    return "error" not in result and any(result.get(k) is not None for k, *_ in METRICS)


def http(result: dict) -> dict | None:
    h = result.get("http")
    return h if h and "error" not in h else None


def level(result: dict, n: int) -> dict | None:
    h = http(result)
    return next((row for row in (h or {}).get("levels", []) if row["streams"] == n), None)


def failures(results: dict[str, dict]) -> list[str]:
    """Engines (or their HTTP parts) that failed."""
    out = []
    for engine, r in results.items():
        if "error" in r:
            out.append(engine)
        if "error" in (r.get("http") or {}):
            out.append(f"{engine} (HTTP)")
    return out


def compute(result: dict) -> str:
    """What an engine computes from: the GGUF's quantized blocks, a folder's bf16 matrices, or weights
    dequantized at load."""
    if result["engine"] in ("llamacpp", "llama-bench"):
        return "quantized weights" if not str(result.get("model", "")).endswith("f16.gguf") else "the file's weights"
    if result.get("quantize"):
        return f"{result['quantize']} blocks made at load (kernels: {result.get('kernels')})"
    if result.get("quantized"):
        kernels = result.get("kernels")
        stored = "the folder's bf16 matrices" if result.get("format") == "hf" else "quantized weights"
        return f"{stored} ({'kernels: ' + kernels if kernels and kernels != 'none' else 'PyTorch int8 fallback'})"
    return f"{result.get('dtype', '?')} weights dequantized at load"


def _grid(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Aligned columns: the first `left` to the left (names), the rest to the right (figures)."""
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) if i >= left else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _pairs(ok: dict) -> list[tuple[str, str]]:
    return [(lantern, peer) for lantern in LANTERNS if lantern in ok for peer in PEERS if peer in ok]


def table(results: dict[str, dict], run: dict | None = None) -> str:
    """The engines' own figures (in-process), with Lantern-vs-peer ratios, and Lantern's in-process Engine
    streams."""
    ok = {e: r for e, r in results.items() if in_process(r)}
    if not ok:
        return "(no engine finished its in-process runs)"
    long_title = next((f"{r['long_key']} tok/s" for r in ok.values() if r.get("long_key")), None)
    metrics = [m for m in METRICS if m[0] != "long_tok_s" or long_title]
    header = ["engine"] + [long_title if k == "long_tok_s" else t for k, t, _, _ in metrics]
    rows = [[name(e, run) + (" *" if suspect(r) else "")] + [_cell(k, f, r.get(k)) for k, _, f, _ in metrics]
            for e, r in ok.items()]
    for lantern, peer in _pairs(ok):
        rows.append([f"{name(lantern)} vs {name(peer, run)}"] +
                    [_ratio(ok[lantern].get(k), ok[peer].get(k), up) for k, _, _, up in metrics])
    lines = _grid(header, rows)
    for e, r in ok.items():
        if r.get("long_note"):
            lines.append(f"{name(e, run)} {r.get('long_key', 'long context')}: {r['long_note']}")
    for e in LANTERNS:
        if ok.get(e, {}).get("streams"):
            lines += ["", f"{name(e)} Engine in-process, concurrent streams (tg128 each):",
                      "streams  aggregate tok/s  decode-only tok/s  per stream tok/s"]
            for row in ok[e]["streams"]:
                decode = row.get("decode_tok_s")
                lines.append(f"{row['streams']:>7}  {row['aggregate_tok_s']:>15.1f}  "
                             f"{(f'{decode:.1f}' if decode else '-'):>17}  {row['aggregate_tok_s'] / row['streams']:>16.1f}")
    return "\n".join(lines)


def http_table(results: dict[str, dict], run: dict | None = None) -> str:
    """Every served engine over HTTP: server load, TTFT, aggregate tok/s per level, 1-stream decode, peak RSS."""
    served = {e: http(r) for e, r in results.items() if http(r)}
    if not served:
        return ""
    levels = sorted({row["streams"] for h in served.values() for row in h["levels"]})
    header = ["over HTTP", "load s", "TTFT ms"] + [f"{n} str tok/s" for n in levels] + ["1-str decode", "peak RSS MiB"]

    def values(h: dict) -> list:
        by = {row["streams"]: row for row in h["levels"]}
        return ([h.get("load_s"), h.get("ttft_s")] + [by[n]["aggregate_tok_s"] if n in by else None for n in levels]
                + [by[1].get("decode_tok_s") if 1 in by else None, h.get("peak_rss_mb")])

    ups = [False, False] + [True] * len(levels) + [True, False]
    fmts = ["{:.2f}", "{:.0f}"] + ["{:.1f}"] * (len(levels) + 1) + ["{:.0f}"]
    keys = ["load_s", "ttft_s"] + ["x"] * (len(levels) + 2)
    rows = []
    for e, h in served.items():
        label = name(e, run) + (" *" if suspect(h) else "")
        rows.append([label] + [_cell(k, f, v) for k, f, v in zip(keys, fmts, values(h))])
    for lantern, peer in _pairs(served):
        rows.append([f"{name(lantern)} vs {name(peer, run)}"] +
                    [_ratio(a, b, up) for a, b, up in zip(values(served[lantern]), values(served[peer]), ups)])
    lines = _grid(header, rows)
    notes = []
    for e, h in served.items():
        what = {"llamacpp": f"llama-server -np {h.get('np')} -c {h.get('ctx')}",
                "vllm": f"vLLM {h.get('vllm', '')} --max-num-seqs {h.get('max_num_seqs')}"}.get(
            e, f"lantern serve --max-batch {h.get('slots')}")
        rss = f"peak RSS summed over {h.get('rss_processes')} processes" if (h.get("rss_processes") or 1) > 1 else ""
        notes.append(f"{name(e, run)}: {what}" + (f", {rss}" if rss else ""))
    lines.append("servers: " + "; ".join(notes))
    endpoint = next(iter(served.values())).get("endpoint")
    kind = "chat completion" if endpoint == "chat" else "plain completion (the model has no chat template)"
    lines.append(f"each stream: {kind}, greedy, 128 tokens (ignore_eos); aggregate = all tokens / "
                 f"wall, prefills included; 1-str decode = tokens after the first / their time")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- goals


def _goal(text: str, met: bool | None, figures: str) -> dict:
    return {"goal": text, "met": met, "figures": figures}


def _missing(text: str, what: str) -> dict:
    return _goal(text, None, f"not measured ({what})")


def goals(run: dict) -> list[dict]:
    """The issue's goals that this run's table can judge: each met / not met, with its figures."""
    r = {e: x for e, x in run["results"].items()}
    L, Q, C, V = (r.get(k, {}) for k in ("lantern", "lantern-q8", "llamacpp", "vllm"))
    out = []

    def ratio_goal(text, a, b, factor, an, bn, fmt="{:.1f}"):
        if a is None or b is None:
            return _missing(text, f"{an if a is None else bn} missing")
        ratio = a / b
        return _goal(text, ratio >= factor, f"{an} {fmt.format(a)} vs {bn} {fmt.format(b)}: {ratio:.2f}x")

    def val(x, key):
        return x.get(key) if in_process(x) else None

    def agg(x, n):
        row = level(x, n)
        return row["aggregate_tok_s"] if row else None

    def dec1(x):
        row = level(x, 1)
        return row.get("decode_tok_s") if row else None

    def load_goal(engine, x):
        text = f"{name(engine)} load <= {LOAD_MAX_S:g} s"
        if val(x, "load_s") is None:
            return _missing(text, f"{name(engine)} missing")
        return _goal(text, x["load_s"] <= LOAD_MAX_S, f"{x['load_s']:.2f} s")

    if run["kind"] == "gguf":
        out.append(ratio_goal(f"decode tg128 >= {DECODE_VS_LLAMA}x llama.cpp", val(L, "tg128_tok_s"),
                              val(C, "tg128_tok_s"), DECODE_VS_LLAMA, "Lantern", "llama.cpp"))
        out.append(ratio_goal(f"prefill pp512 >= {PREFILL_VS_LLAMA:g}x llama.cpp", val(L, "pp512_tok_s"),
                              val(C, "pp512_tok_s"), PREFILL_VS_LLAMA, "Lantern", "llama.cpp"))
        out.append(load_goal("lantern", L))
        out.append(ratio_goal(f"aggregate at 8 HTTP streams >= {HTTP8_VS_LLAMA_TG:g}x llama.cpp's single-stream "
                              f"tg128", agg(L, 8), val(C, "tg128_tok_s"), HTTP8_VS_LLAMA_TG,
                              "Lantern 8 streams", "llama.cpp tg128"))
        out.append(ratio_goal(f"aggregate at 8 HTTP streams >= {HTTP8_VS_LLAMA_SERVER}x llama-server's", agg(L, 8),
                              agg(C, 8), HTTP8_VS_LLAMA_SERVER, "Lantern 8 streams", "llama-server 8 streams"))
        out.append(ratio_goal(f"one HTTP stream within {1 - HTTP1_VS_ALONE:.0%} of the engine alone (tg128)",
                              dec1(L), val(L, "tg128_tok_s"), HTTP1_VS_ALONE, "HTTP 1-stream decode",
                              "engine tg128"))
    else:
        for engine, x in (("lantern", L), ("lantern-q8", Q)):
            out.append(load_goal(engine, x))
        levels = [row["streams"] for row in (http(V) or {}).get("levels", [])]
        text = f"Lantern (bf16) ahead of vLLM at every HTTP level ({', '.join(map(str, levels)) or '1-32'})"
        if not http(L) or not http(V):
            out.append(_missing(text, "Lantern's or vLLM's HTTP run missing"))
        else:
            pairs = [(n, agg(L, n), agg(V, n)) for n in levels]
            behind = [n for n, a, b in pairs if a is None or b is None or a <= b]
            figs = "; ".join(f"{n}: {a:.1f} vs {b:.1f}" if a and b else f"{n}: -" for n, a, b in pairs)
            out.append(_goal(text, not behind, figs + (f" (behind at {behind})" if behind else "")))
        out.append(ratio_goal(f"bf16 folder single-stream decode >= {FOLDER_DECODE_VS_VLLM}x vLLM (HTTP, 1 stream)",
                              dec1(L), dec1(V), FOLDER_DECODE_VS_VLLM, "Lantern", "vLLM"))
        out.append(ratio_goal("--quantize q8_0 decode >= llama.cpp on the Q8_0 GGUF (tg128)", val(Q, "tg128_tok_s"),
                              val(C, "tg128_tok_s"), 1.0, "Lantern q8_0", "llama.cpp Q8_0"))
        out.append(ratio_goal(f"one HTTP stream within {1 - HTTP1_VS_ALONE:.0%} of the engine alone (tg128)",
                              dec1(L), val(L, "tg128_tok_s"), HTTP1_VS_ALONE, "HTTP 1-stream decode",
                              "engine tg128"))
    return out


def goals_text(items: list[dict]) -> str:
    lines = ["goals:"]
    for g in items:
        mark = {True: "met", False: "NOT met", None: "n/a"}[g["met"]]
        lines.append(f"  [{mark:>7}] {g['goal']}: {g['figures']}")
    return "\n".join(lines)


def full(run: dict) -> str:
    """Everything printed for one model: both tables, notes, the goals and the failures (one line each)."""
    results = run["results"]
    parts = [table(results, run)]
    served = http_table(results, run)
    if served:
        parts.append(served)
    notes = []
    ok = {e: r for e, r in results.items() if in_process(r)}
    if ok:
        notes.append("computes with: " + "; ".join(f"{name(e, run)} {compute(r)}" for e, r in ok.items()))
    if http(results.get("vllm", {})):
        notes.append(f"vLLM computes with the folder's bf16 weights ({http(results['vllm']).get('vllm')}, "
                     f"torch {http(results['vllm']).get('torch')})")
    stalls = []
    for e, r in results.items():
        for part, x in (("", r), (" HTTP", http(r) or {})):
            if "cpu_stall_share" in x:
                stalls.append(f"{name(e, run)}{part} {x['cpu_stall_share']:.0%}")
    if stalls:
        notes.append("waited for a CPU (near 0% = cores to itself): " + "; ".join(stalls))
    if any(suspect(r) or suspect(http(r) or {}) for r in results.values()):
        notes.append("* other work competed for the CPU during this engine's run: its figures are suspect")
    parts.append("\n".join(notes))
    parts.append(goals_text(goals(run)))
    fails = []
    for engine, r in results.items():
        if "error" in r:
            fails.append(f"{name(engine, run)} FAILED: {r['error']}")
        if "error" in (r.get("http") or {}):
            fails.append(f"{name(engine, run)} over HTTP FAILED: {r['http']['error']}")
    if fails:
        parts.append("\n".join(fails))
    return "\n\n".join(p for p in parts if p)


def save_json(run: dict, path: Path) -> None:
    path.write_text(json.dumps(run, indent=2) + "\n")


def save_chart(results: dict[str, dict], path: Path, title: str) -> None:
    """Bars of throughput and latency per engine, plus aggregate decode against concurrent streams (HTTP for
    every served engine, Lantern's in-process Engine dashed)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ok = {e: r for e, r in results.items() if in_process(r)}
    engines = list(ok)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels = [  # (axes, keys, y label, log scale: load times span milliseconds to tens of seconds)
        (axes[0][0], ["pp128_tok_s", "pp512_tok_s", "tg128_tok_s", "long_tok_s"], "tokens/s (higher is better)", False),
        (axes[0][1], ["load_s", "ttft_s"], "seconds, log scale (lower is better)", True),
        (axes[1][0], ["peak_rss_mb"], "MiB (lower is better)", False),
    ]
    for ax, keys, label, log in panels:
        width = 0.8 / max(len(engines), 1)
        for i, engine in enumerate(engines):
            values = [ok[engine].get(k) or 0 for k in keys]
            bars = ax.bar([x + i * width for x in range(len(keys))], values, width, label=NAMES.get(engine, engine))
            ax.bar_label(bars, fmt="%.4g", fontsize=8)
        ax.set_xticks([x + width * (len(engines) - 1) / 2 for x in range(len(keys))],
                      [k.replace("long_tok_s", "tg128@long") for k in keys])
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax = axes[1][1]
    drawn = False
    for e, r in results.items():
        h = http(r)
        if h and h.get("levels"):
            xs = [row["streams"] for row in h["levels"]]
            ax.plot(xs, [row["aggregate_tok_s"] for row in h["levels"]], marker="o", label=f"{NAMES.get(e, e)} HTTP")
            drawn = True
        if e in ok and ok[e].get("streams"):
            xs = [row["streams"] for row in ok[e]["streams"]]
            ax.plot(xs, [row["aggregate_tok_s"] for row in ok[e]["streams"]], marker=".", linestyle="--",
                    label=f"{NAMES.get(e, e)} Engine in-process")
            drawn = True
    if drawn:
        ax.set_xticks(sorted({row["streams"] for r in results.values()
                              for row in (http(r) or {}).get("levels", []) + (r.get("streams") or [])}))
        if "llamacpp" in ok:
            ax.axhline(ok["llamacpp"]["tg128_tok_s"], color="gray", linestyle=":", label="llama.cpp tg128, 1 stream")
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("aggregate decode tokens/s (higher is better)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------- bench.all: combined


def _combined_rows(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per model and engine (and per Lantern-vs-peer ratio): the issue's table across files."""
    levels = sorted({row["streams"] for run in runs for r in run["results"].values()
                     for row in (http(r) or {}).get("levels", [])})
    header = (["model", "engine", "load s", "pp512 tok/s", "tg128 tok/s", "tg128@4k tok/s", "TTFT ms", "RSS MiB",
               "HTTP TTFT ms"] + [f"HTTP {n} tok/s" for n in levels] + ["server RSS MiB"])
    spec = ([("load_s", "{:.2f}", False), ("pp512_tok_s", "{:.1f}", True), ("tg128_tok_s", "{:.1f}", True),
             ("long_tok_s", "{:.1f}", True), ("ttft_s", "{:.0f}", False), ("peak_rss_mb", "{:.0f}", False)])

    def values(r: dict) -> list:
        inp = r if in_process(r) else {}
        h = http(r) or {}
        by = {row["streams"]: row["aggregate_tok_s"] for row in h.get("levels", [])}
        return ([inp.get(k) for k, _, _ in spec] + [h.get("ttft_s")] + [by.get(n) for n in levels]
                + [h.get("peak_rss_mb")])

    keys = [k for k, _, _ in spec] + ["ttft_s"] + ["x"] * len(levels) + ["x"]
    fmts = [f for _, f, _ in spec] + ["{:.0f}"] + ["{:.1f}"] * len(levels) + ["{:.0f}"]
    ups = [u for _, _, u in spec] + [False] + [True] * len(levels) + [False]
    rows = []
    for run in runs:
        model = Path(run["model"]).name + ("/" if run["kind"] == "folder" else "")
        res = {e: r for e, r in run["results"].items() if in_process(r) or http(r)}
        for e, r in run["results"].items():
            if e in res:
                rows.append([model, name(e, run)] + [_cell(k, f, v) for k, f, v in zip(keys, fmts, values(r))])
            else:
                rows.append([model, name(e, run)] + ["FAILED"] + [""] * (len(keys) - 1))
        for lantern, peer in _pairs(res):
            rows.append([model, f"{name(lantern)} vs {name(peer, run)}"] +
                        [_ratio(a, b, up) for a, b, up in zip(values(res[lantern]), values(res[peer]), ups)])
    return header, rows


def summary(runs: list[dict]) -> str:
    """The combined table as text, then every model's goals."""
    header, rows = _combined_rows(runs)
    lines = ["All models (tok/s; ratios: above 1.00x Lantern is better):", ""] + _grid(header, rows, left=2)
    for run in runs:
        lines += ["", f"{Path(run['model']).name}: " + goals_text(goals(run))]
    return "\n".join(lines)


def markdown(everything: dict, titles: list[str]) -> str:
    """bench.all's markdown: the machine, the combined table, each model's goals and full text report."""
    m = everything["machine"]
    header, rows = _combined_rows(everything["runs"])
    md = [f"# Lantern bench, all models ({everything['when']})", "",
          f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads, Lantern {m['lantern_commit']}, "
          f"load average {m['load_1min_at_start']:.2f} at start" + (" (UNDER LOAD: forced)" if m["forced"] else ""),
          "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(c or " " for c in row) + " |" for row in rows]
    md += ["", "Ratios: how many times better Lantern is (above 1.00x Lantern wins, whatever the column's "
               "direction). HTTP columns: aggregate completion tokens/s at N concurrent streams.", ""]
    for run, heading in zip(everything["runs"], titles):
        md += [f"## {heading}", ""]
        md += [("- **met**" if g["met"] else "- **NOT met**" if g["met"] is False else "- n/a") +
               f" {g['goal']}: {g['figures']}" for g in goals(run)]
        md += ["", "```", full(run), "```", ""]
    return "\n".join(md) + "\n"
