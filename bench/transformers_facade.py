"""The tutorials' transformers code on Lantern vs on transformers, same GGUF, one run (issue 16):
`python -m bench.transformers_facade [--model NAME]`.

Seed 003's `generate` call (64 greedy new tokens after a chat prompt) and seed 004's pipeline call (50 greedy
new tokens), each through `lanternlm.transformers` and through transformers reading the same GGUF
(`from_pretrained(folder, gguf_file=...)`, which dequantizes it to float). Load = tokenizer + model. Prints
each figure and the ratios against the issue's goals (>= 5x faster generation, >= 10x faster load). Time it
only on an idle machine (`uptime`); the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time

import torch

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Tell me about yourself."}]
EMAIL = "Write an email apologizing to Sarah for the tragic gardening mishap. Explain how it happened."


def measure(library: str, path) -> dict:
    m = importlib.import_module(library)
    start = time.perf_counter()
    tokenizer = m.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = m.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype="auto")
    load = time.perf_counter() - start
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        model.generate(inputs.input_ids, max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(inputs.input_ids, max_new_tokens=64, do_sample=False)
        generate = time.perf_counter() - start
        new = out.shape[1] - inputs.input_ids.shape[1]
        pipe = m.pipeline("text-generation", model=model, tokenizer=tokenizer, return_full_text=False,
                          max_new_tokens=50, do_sample=False)
        start = time.perf_counter()
        pipe(EMAIL)
        pipeline = time.perf_counter() - start
    return {"load_s": load, "generate_s": generate, "new_tokens": new, "pipeline_s": pipeline}


def main() -> None:
    from lanternlm.store import resolve

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = resolve(args.model)
    print(f"load average before: {os.getloadavg()[0]:.2f}, threads {torch.get_num_threads()}")
    ours, theirs = measure("lanternlm.transformers", path), measure("transformers", path)
    for name, r in (("lanternlm.transformers", ours), ("transformers", theirs)):
        print(f"{name:24s} load {r['load_s']:6.2f} s   generate {r['new_tokens']} tokens {r['generate_s']:6.2f} s "
              f"({r['new_tokens'] / r['generate_s']:6.1f} tok/s)   pipeline (50 tokens) {r['pipeline_s']:6.2f} s")
    for what, goal in (("load_s", 10), ("generate_s", 5), ("pipeline_s", 5)):
        ratio = theirs[what] / ours[what]
        print(f"{what[:-2]:9s} {ratio:6.1f}x faster on Lantern (goal >= {goal}x: {'met' if ratio >= goal else 'NOT met'})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
