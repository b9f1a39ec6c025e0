"""Fuzz `lantern serve` from its own OpenAPI schema with schemathesis: `python -m bench.schemathesis_run
[--max-examples 100] [--seed 0]`.

schemathesis lives in its own environment, bench/.venv-schemathesis (created on first use; never in the
project's test extras). The server runs a tiny random-weight Qwen2 model saved as an HF folder (the test
suite's tests/tiny_models.py and tiny tokenizer), so thousands of requests take minutes, with an API key that
schemathesis sends on every request. Every operation in /openapi.json is tested, in every phase (examples,
coverage, fuzzing, stateful), positive and negative data, with one check: `not_a_server_error` (no 5xx, no
dropped connection). The report counts operations, test cases and failures; each failure is printed with the
request that reproduces it (schemathesis's curl line). JSON: bench/results/schemathesis-*.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import toolenv
from .serverproc import Server, log_path, machine, write_result

SCHEMATHESIS = ["schemathesis==4.32.5"]


def tiny_folder(path: Path) -> Path:
    """A random-weight Qwen2 (tests/tiny_models.py) with the test suite's tiny BPE tokenizer and chat template
    (tests/test_hf_folder.py), saved as an HF folder for `lantern serve -m`."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # as pytest sees the test modules
    from test_hf_folder import tiny_tokenizer
    from tiny_models import make_hf_model

    tok = tiny_tokenizer()
    hf = make_hf_model("qwen2", vocab_size=len(tok), max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    hf.generation_config.eos_token_id = [2, 0]
    hf.generation_config.do_sample = False
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def pin_model(schema: dict, name: str) -> dict:
    """The schema with every request body's `model` field allowed only the served name: random model names
    all get 404 (model_not_found) before anything else is looked at, so this pass reaches the sampling fields."""
    for comp in schema.get("components", {}).get("schemas", {}).values():
        props = comp.get("properties") or {}
        if "model" in props:
            props["model"] = {"type": "string", "enum": [name], "title": "Model"}
    return schema


def run_pass(label: str, bin_dir: Path, location: str, server: Server, args, report_dir: Path,
             extra: list[str] = ()) -> dict:
    cmd = [str(bin_dir / "schemathesis"), "run", location, *extra,
           "--header", f"Authorization: Bearer {server.api_key}",
           "--checks", "not_a_server_error", "--max-examples", str(args.max_examples),
           "--seed", str(args.seed), "--workers", args.workers, "--phases", args.phases,
           "--request-timeout", str(args.request_timeout), "--continue-on-failure",
           "--suppress-health-check", "all", "--output-truncate", "false",
           "--report", "ndjson,junit", "--report-dir", str(report_dir)]
    shown = [c.replace(server.api_key, "KEY") for c in cmd]
    print(f"\n== pass '{label}': " + " ".join(shown), flush=True)
    before = server_statuses(server)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin",
                                                                     "HOME": str(report_dir), "COLUMNS": "160"})
    seconds = time.perf_counter() - start
    after = server_statuses(server)
    output = (done.stdout + done.stderr).replace(server.api_key, "KEY")
    summary_start = output.rfind("SUMMARY")
    summary = output[summary_start:] if summary_start >= 0 else output[-4000:]
    failures = output[output.find("FAILURES"):summary_start] if "FAILURES" in output else ""
    junit = next(report_dir.glob("*.xml"), None)
    junit_text = junit.read_text() if junit else ""
    tests = re.findall(r'<testcase[^>]*name="([^"]+)"', junit_text)
    failed = re.findall(r'<testcase[^>]*name="([^"]+)"[^>]*>\s*<(?:failure|error)', junit_text)
    m = re.search(r"(\d+) generated, (\d+) (?:passed|found)", summary)
    statuses = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(after) if after.get(k, 0) - before.get(k, 0)}
    print(summary.strip())
    if failures.strip():
        print("\n" + failures.strip())
    print(f"pass '{label}': exit code {done.returncode} in {seconds:.0f} s; operations {len(tests)}, failed "
          f"{len(failed)} {failed}; server answers by status: {statuses}", flush=True)
    return {"label": label, "command": shown, "exit_code": done.returncode, "seconds": round(seconds, 1),
            "test_cases_generated": int(m.group(1)) if m else None, "summary": summary.strip(),
            "failures_text": failures.strip(), "operations": tests, "failed_operations": failed,
            "server_status_counts": statuses, "output": output}


def server_statuses(server: Server) -> dict[str, int]:
    by_status = collections.Counter()
    for k, v in server.metrics().items():
        m = re.match(r'lantern_requests_total\{route="([^"]*)",status="(\d+)"\}', k)
        if m:
            by_status[m.group(2)] += int(v)
    return dict(by_status)


def main(argv: list[str] | None = None) -> int:
    import httpx

    ap = argparse.ArgumentParser(prog="python -m bench.schemathesis_run", description=__doc__.splitlines()[0])
    ap.add_argument("--max-examples", type=int, default=100, help="test cases per operation and phase (100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", default="1")
    ap.add_argument("--phases", default="examples,coverage,fuzzing,stateful")
    ap.add_argument("--request-timeout", type=float, default=120, help="schemathesis's per-request limit, s")
    ap.add_argument("--model", help="serve this instead of the tiny model")
    ap.add_argument("--context", type=int, default=1024,
                    help="the server's --context (default 1024: bounds how long the fuzzed generations get)")
    args = ap.parse_args(argv)
    bin_dir = toolenv.ensure("schemathesis", SCHEMATHESIS)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    passes = []
    with tempfile.TemporaryDirectory(prefix="lantern-schemathesis-") as tmp:
        tmp = Path(tmp)
        model = args.model or tiny_folder(tmp / "tiny-qwen2")
        log = log_path("schemathesis", stamp)
        with Server(model, name="tiny", log_path=log, extra=["--max-queue", "64", "--context", str(args.context)]) as server:
            print(f"schemathesis: server pid {server.pid} on {server.base} serving {model} (log {log})", flush=True)
            passes.append(run_pass("server schema", bin_dir, server.base + "/openapi.json", server, args,
                                   tmp / "report-1"))
            schema = httpx.get(server.base + "/openapi.json", timeout=30).json()
            pinned = tmp / "openapi-model-pinned.json"
            pinned.write_text(json.dumps(pin_model(schema, server.name)))
            passes.append(run_pass("model pinned", bin_dir, str(pinned), server, args, tmp / "report-2",
                                   ["--url", server.base]))
            alive = httpx.get(server.base + "/health", timeout=10).status_code
            code = server.stop()
    outputs = log.parent / f"schemathesis-{stamp}.out"
    outputs.write_text("\n\n".join(p.pop("output") for p in passes))
    ok = all(p["exit_code"] == 0 for p in passes)
    total = sum(p["test_cases_generated"] or 0 for p in passes)
    print(f"\nschemathesis: {total} test cases in {len(passes)} passes, "
          f"{'no failures' if ok else 'FAILURES (above)'}; /health after the run: {alive}; "
          f"server exit code after SIGTERM: {code}")
    out = {"tool": "schemathesis", "machine": machine(), "args": vars(args), "passes": passes,
           "health_after": alive, "server_exit_code": code, "all_passed": ok}
    path = write_result("schemathesis", out, stamp)
    print(f"full output: {outputs}\nresult: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
