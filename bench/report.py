"""Turn the engines' results into what people read: a text table with ratios, a JSON file and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path

# (result key, column title, format, higher is better)
METRICS = [
    ("load_s", "load s", "{:.2f}", False),
    ("pp128_tok_s", "pp128 tok/s", "{:.1f}", True),
    ("pp512_tok_s", "pp512 tok/s", "{:.1f}", True),
    ("tg128_tok_s", "tg128 tok/s", "{:.1f}", True),
    ("ttft_s", "TTFT ms", "{:.0f}", False),
    ("peak_rss_mb", "peak RSS MiB", "{:.0f}", False),
]
SUSPECT_STALL = 0.10  # share of the run during which some task waited for a core
NAMES = {"lantern": "Lantern", "llamacpp": "llama.cpp", "transformers": "transformers"}


def _cell(key: str, fmt: str, value) -> str:
    if value is None:
        return "-"
    return fmt.format(value * 1000 if key == "ttft_s" else value)


def _ratio(a, b, higher_is_better: bool) -> str:
    """How many times better `a` is than `b` (>1: a wins), whatever the metric's direction."""
    if not a or not b:
        return "-"
    return f"{(a / b if higher_is_better else b / a):.2f}x"


def suspect(result: dict) -> bool:
    """Whether tasks waited for a CPU so often during the engine's run that its timings are doubtful."""
    return result.get("cpu_stall_share", 0.0) > SUSPECT_STALL


def compute(result: dict) -> str:
    """What an engine computes from: the GGUF's quantized blocks, or weights dequantized at load."""
    if result["engine"] == "llamacpp":
        return "quantized weights"
    if result.get("quantized"):
        kernels = result.get("kernels")
        return f"quantized weights ({'kernels: ' + kernels if kernels and kernels != 'none' else 'PyTorch int8 fallback'})"
    return f"{result.get('dtype', '?')} weights dequantized at load"


def table(results: dict[str, dict]) -> str:
    ok = {e: r for e, r in results.items() if "error" not in r}
    header = ["engine"] + [title for _, title, _, _ in METRICS]
    rows = [[NAMES.get(e, e) + (" *" if suspect(r) else "")] + [_cell(k, f, r.get(k)) for k, _, f, _ in METRICS]
            for e, r in ok.items()]
    lantern = ok.get("lantern")
    for peer in ("llamacpp", "transformers"):
        if lantern and peer in ok:
            rows.append([f"Lantern vs {NAMES[peer]}"] +
                        [_ratio(lantern.get(k), ok[peer].get(k), up) for k, _, _, up in METRICS])
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if lantern and lantern.get("streams"):
        lines += ["", "Lantern Engine, concurrent streams (tg128 each):",
                  "streams  aggregate tok/s  decode-only tok/s  per stream tok/s"]
        for row in lantern["streams"]:
            decode = row.get("decode_tok_s")
            lines.append(f"{row['streams']:>7}  {row['aggregate_tok_s']:>15.1f}  "
                         f"{(f'{decode:.1f}' if decode else '-'):>17}  {row['aggregate_tok_s'] / row['streams']:>16.1f}")
    if not ok:
        lines = ["(no engine finished)"]
    else:
        lines += ["", "computes with: " + "; ".join(f"{NAMES.get(e, e)} {compute(r)}" for e, r in ok.items())]
    stalls = [f"{NAMES.get(e, e)} {r['cpu_stall_share']:.0%}" for e, r in ok.items() if "cpu_stall_share" in r]
    if stalls:
        lines.append("waited for a CPU (near 0% = cores to itself): " + "; ".join(stalls))
    if any(suspect(r) for r in ok.values()):
        lines.append("* other work competed for the CPU during this engine's run: its figures are suspect")
    for engine, r in results.items():
        if "error" in r:
            lines.append(f"\n{NAMES.get(engine, engine)} FAILED: {r['error']}")
    return "\n".join(lines)


def save_json(run: dict, path: Path) -> None:
    path.write_text(json.dumps(run, indent=2) + "\n")


def save_chart(results: dict[str, dict], path: Path, title: str) -> None:
    """Bars of throughput and latency per engine, plus Lantern's scaling with concurrent streams."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ok = {e: r for e, r in results.items() if "error" not in r}
    engines = list(ok)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels = [  # (axes, keys, y label, log scale: load times span milliseconds to tens of seconds)
        (axes[0][0], ["pp128_tok_s", "pp512_tok_s", "tg128_tok_s"], "tokens/s (higher is better)", False),
        (axes[0][1], ["load_s", "ttft_s"], "seconds, log scale (lower is better)", True),
        (axes[1][0], ["peak_rss_mb"], "MiB (lower is better)", False),
    ]
    for ax, keys, label, log in panels:
        width = 0.8 / max(len(engines), 1)
        for i, engine in enumerate(engines):
            values = [ok[engine].get(k) or 0 for k in keys]
            bars = ax.bar([x + i * width for x in range(len(keys))], values, width, label=NAMES.get(engine, engine))
            ax.bar_label(bars, fmt="%.4g", fontsize=8)
        ax.set_xticks([x + width * (len(engines) - 1) / 2 for x in range(len(keys))], keys)
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    streams = (ok.get("lantern") or {}).get("streams") or []
    ax = axes[1][1]
    if streams:
        xs = [row["streams"] for row in streams]
        ax.plot(xs, [row["aggregate_tok_s"] for row in streams], marker="o", label="Lantern Engine, aggregate")
        if "llamacpp" in ok:
            ax.axhline(ok["llamacpp"]["tg128_tok_s"], color="gray", linestyle="--", label="llama.cpp tg128, 1 stream")
        ax.set_xticks(xs)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("decode tokens/s (higher is better)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
