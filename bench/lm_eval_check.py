"""lm-eval against `lantern serve`, and its loglikelihoods against transformers: `python -m bench.lm_eval_check`.

lm-eval (PyPI `lm-eval`, 0.4.13) lives in its own environment, bench/.venv-lmeval (created on first use; its
dependencies never enter the project's). The script:

1. writes a tiny local multiple-choice task (20 questions, 4 choices each, a jsonl plus a task YAML in a temp
   dir, loaded with --include_path; no hub datasets, HF_*_OFFLINE=1);
2. for each of `lantern serve --exact` (the GGUF dequantized to float32: the reference path) and plain
   `lantern serve` (the quantized kernels) on the default model's GGUF, runs
   `lm_eval run --model local-completions --model_args base_url=.../v1/completions,model=NAME,
   tokenizer_backend=remote,num_concurrent=1,max_retries=1,auth_token=KEY --tasks NAME --log_samples`
   (lm-eval tokenizes through /tokenizer_info, /tokenize, /detokenize and scores with echo + logprobs on
   /v1/completions) and reads the accuracy and every per-choice loglikelihood from the logged samples;
3. re-tokenizes each (context, continuation) pair through the server's /tokenize exactly as lm-eval's
   `_encode_pair` does, so the token ids are the ones lm-eval sent, and computes the same continuation
   log-probability with transformers (`AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`, which
   dequantizes the GGUF to float32): the log-softmax of the logits, summed over the continuation's tokens;
4. reports the max abs difference per server mode. The --exact server must agree within 1e-3; the fast path's
   difference is reported without a threshold.

JSON: bench/results/lm_eval_check-*.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import toolenv
from .serverproc import Server, default_gguf, log_path, machine, write_result

LM_EVAL = ["torch==2.13.0", "lm-eval[api]==0.4.13"]  # torch pinned: unpinned it would pull CUDA wheels
TASK = "lantern_tiny_mc"
THRESHOLD = 1e-3

QUESTIONS = [
    ("What is the capital of France?", ["Berlin", "Madrid", "Paris", "Rome"], 2),
    ("How many legs does a spider have?", ["Six", "Eight", "Ten", "Four"], 1),
    ("Which planet is known as the Red Planet?", ["Venus", "Jupiter", "Mars", "Saturn"], 2),
    ("What is the boiling point of water at sea level in degrees Celsius?", ["50", "100", "150", "200"], 1),
    ("Which gas do plants absorb from the air for photosynthesis?", ["Oxygen", "Nitrogen", "Helium",
                                                                     "Carbon dioxide"], 3),
    ("What is 7 times 8?", ["54", "56", "64", "48"], 1),
    ("Who wrote the play Romeo and Juliet?", ["Charles Dickens", "William Shakespeare", "Jane Austen",
                                              "Mark Twain"], 1),
    ("What is the largest ocean on Earth?", ["Atlantic Ocean", "Indian Ocean", "Arctic Ocean", "Pacific Ocean"], 3),
    ("Which animal is known as the king of the jungle?", ["Elephant", "Lion", "Tiger", "Giraffe"], 1),
    ("What is the chemical symbol for gold?", ["Au", "Ag", "Gd", "Go"], 0),
    ("How many days are there in a leap year?", ["364", "365", "366", "367"], 2),
    ("What is the freezing point of water in degrees Celsius?", ["0", "10", "-10", "32"], 0),
    ("Which is the smallest prime number?", ["0", "1", "2", "3"], 2),
    ("What color do you get by mixing blue and yellow?", ["Purple", "Orange", "Green", "Brown"], 2),
    ("Which organ pumps blood through the human body?", ["Liver", "Heart", "Lung", "Kidney"], 1),
    ("In which continent is Egypt?", ["Asia", "Europe", "Africa", "South America"], 2),
    ("What is the square root of 81?", ["7", "8", "9", "10"], 2),
    ("Which language is mainly spoken in Brazil?", ["Spanish", "Portuguese", "French", "English"], 1),
    ("What do bees make?", ["Milk", "Silk", "Honey", "Wax paper"], 2),
    ("How many continents are there on Earth?", ["Five", "Six", "Seven", "Eight"], 2),
]

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_task(dir_: Path) -> None:
    data = dir_ / "questions.jsonl"
    with open(data, "w") as f:
        for q, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n")
    (dir_ / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))


def encode_pair(tokenize, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair for a causal model: trailing spaces of the context move to the
    continuation, the whole is encoded, and the continuation is what follows the context's own encoding."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenize(context + continuation)
    ctx = tokenize(context)
    return ctx, whole[len(ctx):]


def read_samples(out_dir: Path) -> tuple[dict, list[dict]]:
    results = sorted(out_dir.rglob("results_*.json"))
    samples = sorted(out_dir.rglob(f"samples_{TASK}_*.jsonl"))
    if not results or not samples:
        raise SystemExit(f"lm-eval wrote no results/samples under {out_dir}")
    res = json.loads(results[-1].read_text())
    rows = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
    return res, rows


def choice_scores(row: dict) -> list[tuple[str, str, float]]:
    """(context, continuation, lm-eval's loglikelihood) per choice of one logged sample."""
    out = []
    args = row["arguments"]
    items = args.values() if isinstance(args, dict) else args
    for arg, resp in zip(items, row["filtered_resps"]):
        if isinstance(arg, dict):
            context, continuation = arg["arg_0"], arg["arg_1"]
        else:
            context, continuation = arg[0], arg[1]
        ll = resp[0] if isinstance(resp, (list, tuple)) else resp
        out.append((context, continuation, float(ll)))
    return out


def run_mode(mode: str, gguf: Path, bin_dir: Path, tmp: Path, stamp: str, args) -> dict:
    extra = ["--exact"] if mode == "exact" else []
    log = log_path(f"lm_eval_check-{mode}", stamp)
    with Server(gguf, name="smollm2", extra=extra, log_path=log) as server:
        print(f"\n== lantern serve {' '.join(extra) or '(fast path)'}: pid {server.pid} on {server.base} (log {log})",
              flush=True)
        out_dir = tmp / f"out-{mode}"
        model_args = (f"base_url={server.base}/v1/completions,model={server.name},tokenizer_backend=remote,"
                      f"num_concurrent=1,max_retries=1,auth_token={server.api_key}")
        cmd = [str(bin_dir / "lm_eval"), "run", "--model", "local-completions", "--model_args", model_args,
               "--tasks", TASK, "--include_path", str(tmp / "task"), "--log_samples", "--output_path", str(out_dir)]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        shown = " ".join(c.replace(server.api_key, "KEY") for c in cmd)
        print("  " + shown, flush=True)
        env = {**os.environ, "OPENAI_API_KEY": server.api_key, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "HF_HOME": str(tmp / "hf-home"), "TOKENIZERS_PARALLELISM": "false"}
        env.pop("VIRTUAL_ENV", None)
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        seconds = time.perf_counter() - start
        output = (done.stdout + done.stderr).replace(server.api_key, "KEY")
        (log.parent / f"lm_eval_check-{mode}-{stamp}.lm_eval.out").write_text(output)
        if done.returncode != 0:
            print(output[-6000:])
            raise SystemExit(f"lm_eval failed (exit {done.returncode}) against the {mode} server; "
                             f"output: {log.parent / f'lm_eval_check-{mode}-{stamp}.lm_eval.out'}")
        res, rows = read_samples(out_dir)
        metrics = res["results"][TASK]

        import httpx

        with httpx.Client(headers=server.headers, timeout=30) as client:
            def tokenize(text: str) -> list[int]:
                r = client.post(server.base + "/tokenize", json={"prompt": text, "add_special_tokens": False})
                r.raise_for_status()
                return r.json()["tokens"]

            scored = []
            for row in rows:
                for k, (context, continuation, ll) in enumerate(choice_scores(row)):
                    ctx, cont = encode_pair(tokenize, context, continuation)
                    scored.append({"doc_id": row["doc_id"], "choice": k, "target": row.get("target"),
                                   "context_ids": ctx, "continuation_ids": cont, "lm_eval_ll": ll})
        server.stop()
    acc = metrics.get("acc,none")
    print(f"  lm-eval finished in {seconds:.0f} s: acc {acc}, acc_norm {metrics.get('acc_norm,none')} "
          f"({len(rows)} questions, {len(scored)} loglikelihoods)", flush=True)
    return {"mode": mode, "command": shown, "seconds": round(seconds, 1), "metrics": metrics, "scored": scored,
            "server_exit_code": server.exit_code}


def transformers_scores(gguf: Path, pairs: list[tuple[list[int], list[int]]], threads: int) -> list[float]:
    """Sum of log-softmax(logits) over the continuation's tokens, transformers on the GGUF dequantized to fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    out = []
    with torch.no_grad():
        for ctx, cont in pairs:
            ids = torch.tensor([ctx + cont])
            logits = model(ids).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            # token t is predicted at position t - 1
            total = sum(float(logp[len(ctx) + j - 1, tok]) for j, tok in enumerate(cont))
            out.append(total)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lm_eval_check", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a .gguf file (default: the catalogue's smollm2-135m-instruct)")
    ap.add_argument("--modes", default="exact,fast", help="server modes to check: exact, fast (default both)")
    ap.add_argument("--limit", type=int, help="lm-eval --limit (questions); default all 20")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for transformers (default 2)")
    args = ap.parse_args(argv)
    bin_dir = toolenv.ensure("lmeval", LM_EVAL)
    gguf = Path(args.model) if args.model else default_gguf()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="lantern-lm-eval-") as tmp:
        tmp = Path(tmp)
        (tmp / "task").mkdir()
        write_task(tmp / "task")
        runs = [run_mode(mode, gguf, bin_dir, tmp, stamp, args) for mode in modes]

    # Every mode tokenizes with the same server tokenizer; score each distinct pair once with transformers.
    pairs = {}
    for run in runs:
        for s in run["scored"]:
            pairs.setdefault((tuple(s["context_ids"]), tuple(s["continuation_ids"])), None)
    print(f"\ntransformers: scoring {len(pairs)} (context, continuation) pairs on {gguf.name} dequantized to float32",
          flush=True)
    keys = list(pairs)
    for key, value in zip(keys, transformers_scores(gguf, [(list(c), list(x)) for c, x in keys], args.threads)):
        pairs[key] = value

    summary = {}
    for run in runs:
        diffs = []
        hf_correct, by_doc = 0, {}
        for s in run["scored"]:
            s["transformers_ll"] = pairs[(tuple(s["context_ids"]), tuple(s["continuation_ids"]))]
            s["abs_diff"] = abs(s["lm_eval_ll"] - s["transformers_ll"])
            diffs.append(s["abs_diff"])
            by_doc.setdefault(s["doc_id"], []).append(s)
        for doc in by_doc.values():
            best = max(doc, key=lambda s: s["transformers_ll"])
            hf_correct += int(str(best["choice"]) == str(doc[0]["target"]))
        worst = max(run["scored"], key=lambda s: s["abs_diff"])
        entry = {"acc": run["metrics"].get("acc,none"), "acc_norm": run["metrics"].get("acc_norm,none"),
                 "transformers_acc": hf_correct / len(by_doc), "max_abs_diff": max(diffs),
                 "mean_abs_diff": sum(diffs) / len(diffs), "n": len(diffs),
                 "worst": {k: worst[k] for k in ("doc_id", "choice", "lm_eval_ll", "transformers_ll")}}
        if run["mode"] == "exact":
            entry["within_1e-3"] = entry["max_abs_diff"] <= THRESHOLD
        summary[run["mode"]] = entry
        verdict = ("" if run["mode"] != "exact" else
                   f" -> {'PASS' if entry['within_1e-3'] else 'FAIL'} (threshold {THRESHOLD:g})")
        print(f"{run['mode']:>5}: lm-eval acc {entry['acc']:.2f} (acc_norm {entry['acc_norm']:.2f}; transformers' "
              f"own choices would score {entry['transformers_acc']:.2f}); loglikelihood vs transformers over "
              f"{entry['n']} choices: max |diff| {entry['max_abs_diff']:.2e}, mean {entry['mean_abs_diff']:.2e}"
              f"{verdict}")
    out = {"tool": "lm_eval_check", "machine": machine(), "gguf": str(gguf), "lm_eval": LM_EVAL, "task": TASK,
           "questions": len(QUESTIONS), "summary": summary,
           "runs": [{k: v for k, v in run.items()} for run in runs]}
    path = write_result("lm_eval_check", out, stamp)
    print(f"result: {path}")
    exact = summary.get("exact")
    return 0 if exact is None or exact["within_1e-3"] else 1


if __name__ == "__main__":
    sys.exit(main())
