"""What a grammar costs per decoded token: the mask (llguidance's bitmask, unpacked to a (V,) bool tensor),
removing the tokens it forbids from the logits row, and advancing the matcher, against the time one decode
step of the default model takes.

`python -m bench.grammar_cost [--tokens 128] [--repeats 3]`

1. Decodes `--tokens` tokens of the default model (SmolLM2-135M Q4_1, 49,152 tokens) without a constraint and
   with a JSON schema, greedy, and reports seconds per token of each.
2. Replays the constrained output's tokens through a fresh matcher, timing only the grammar's work per token.
3. Does the same replay at 151,936 tokens (Qwen2's vocabulary, from llama.cpp's vocab-only GGUF test file)
   with the same JSON text, and compares it with the default model's decode step (an upper bound: a model
   with that vocabulary decodes more slowly) and with the output layer alone of the smallest model that has
   it (Qwen2.5-0.5B: 896 x 151,936, timed here in bf16), a lower bound on such a model's decode step.

`--xgrammar` also replays the same tokens through xgrammar (the other grammar engine vLLM and SGLang use), at
both vocabulary sizes: compile time and work per token (fill the bitmask, apply it to the logits row, accept
the token). It is installed on first use with `pip install --no-deps --target bench/.xgrammar xgrammar
apache-tvm-ffi` (its own dependencies torch, transformers, numpy and pydantic are already in the test
environment; triton, which it lists for Linux, is only used on GPUs).

Goal (issue 13): the grammar's work at most 5% of the decode time. Writes bench/results/grammar-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .serverproc import RESULTS, machine

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                      "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city"]},
        "status": {"enum": ["active", "inactive", "banned"]},
    },
    "required": ["name", "age", "tags", "status"],
}
PROMPT = [{"role": "user", "content": "Describe a fictional customer, Ada from Paris, 36, as JSON with name, age, "
                                      "email, tags, address and status."}]


def decode_seconds(llm, guide, ids: list[int], tokens: int, repeats: int) -> tuple[float, list[int]]:
    """Best seconds per generated token over `repeats` greedy runs (prefill excluded), and the tokens."""
    from lanternlm.generation.generate import generate
    from lanternlm.generation.sampling import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=guide is None).with_defaults(None)
    best, out = float("inf"), []
    for _ in range(repeats):
        steps = generate(llm.model, llm.tokenizer, ids, params, llm.context, llm.device, guide)
        first = next(steps)
        start = time.perf_counter()
        out = [first.token_id] + [s.token_id for s in steps]
        if len(out) > 1:
            best = min(best, (time.perf_counter() - start) / (len(out) - 1))
    return best, out


def replay_seconds(grammar, token_ids: list[int], vocab: int, repeats: int) -> float:
    """Median over repeats of the grammar's work per token: mask, masked logits row, accept."""
    from lanternlm.generation.sampling import apply_constraint
    logits = torch.randn(vocab)
    runs = []
    for _ in range(repeats):
        matcher = grammar.matcher()
        start = time.perf_counter()
        for token in token_ids:
            allowed = matcher.allowed()
            apply_constraint(logits, allowed)
            if not matcher.accept(token):
                raise SystemExit(f"replay rejected token {token}: {matcher.error}")
        runs.append((time.perf_counter() - start) / len(token_ids))
    return statistics.median(runs)


def lm_head_seconds(hidden: int, vocab: int, repeats: int) -> float:
    """Best seconds of one (1, hidden) x (hidden, vocab) bf16 product: the output layer of one decode step."""
    weight = torch.randn(vocab, hidden).to(torch.bfloat16)
    x = torch.randn(1, hidden).to(torch.bfloat16)
    best = float("inf")
    for _ in range(max(repeats, 3) * 5):
        start = time.perf_counter()
        torch.nn.functional.linear(x, weight)
        best = min(best, time.perf_counter() - start)
    return best


XGRAMMAR_DIR = Path(__file__).resolve().parent / ".xgrammar"


def load_xgrammar():
    if not (XGRAMMAR_DIR / "xgrammar").is_dir():
        import subprocess
        print(f"installing xgrammar into {XGRAMMAR_DIR} (first use)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(XGRAMMAR_DIR),
                        "xgrammar", "apache-tvm-ffi"], check=True)
        (XGRAMMAR_DIR / ".gitignore").write_text("*\n")
    sys.path.insert(0, str(XGRAMMAR_DIR))
    import xgrammar
    return xgrammar


def xgrammar_replay(xgr, tokenizer, vocab: int, token_ids: list[int], repeats: int) -> tuple[float, float]:
    """(compile seconds, median seconds of xgrammar's work per token) for SCHEMA and these tokens."""
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=sorted(tokenizer.end_token_ids))
    # strict_mode=False: undeclared properties allowed, as JSON schema (and llguidance) allow them.
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), strict_mode=False)
    compile_s = time.perf_counter() - start
    logits = torch.randn(1, vocab)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    runs = []
    for _ in range(repeats):
        matcher = xgr.GrammarMatcher(compiled)
        start = time.perf_counter()
        for token in token_ids:
            matcher.fill_next_token_bitmask(bitmask)
            row = logits.clone()
            xgr.apply_token_bitmask_inplace(row, bitmask)
            if not matcher.accept_token(token):
                raise SystemExit(f"xgrammar rejected token {token}")
        runs.append((time.perf_counter() - start) / len(token_ids))
    return compile_s, statistics.median(runs)


def qwen_tokenizer():
    """Qwen2's 151,936-token vocabulary from llama.cpp's test data (downloaded by the tests' helper)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from lanternlm.loader.gguf import read_gguf
    from lanternlm.text.tokenizer import Tokenizer

    from llama_cpp_data import read_case
    with read_gguf(read_case("qwen2").gguf) as f:
        return Tokenizer.from_gguf_metadata(f.metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--xgrammar", action="store_true", help="also measure xgrammar on the same tokens")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from lanternlm.api import LLM
    from lanternlm.generation.grammar import GrammarCompiler
    from lanternlm.generation.guide import GuideSpec
    from lanternlm.text.constraint import GrammarSpec

    llm = LLM("smollm2-135m-instruct")
    ids = llm.encode_chat(PROMPT)
    spec = GrammarSpec.json_schema(SCHEMA)
    start = time.perf_counter()
    grammar = llm.grammars.compile(spec)
    compile_s = time.perf_counter() - start
    free_s, _ = decode_seconds(llm, None, ids, args.tokens, args.repeats)
    guided_s, guided_ids = decode_seconds(llm, GuideSpec(grammar), ids, args.tokens, args.repeats)
    text = llm.tokenizer.decode(guided_ids, skip_special_tokens=True)
    mask_49k = replay_seconds(grammar, guided_ids, llm.config.vocab_size, args.repeats)

    qwen = qwen_tokenizer()
    qwen_vocab = qwen.backend.get_vocab_size(with_added_tokens=True)
    compiler = GrammarCompiler(qwen, qwen_vocab)
    start = time.perf_counter()
    qwen_grammar = compiler.compile(spec)
    qwen_compile_s = time.perf_counter() - start
    qwen_ids = qwen.encode(text, add_special_tokens=False)
    end = sorted(qwen.end_token_ids)[:1]
    mask_151k = replay_seconds(qwen_grammar, qwen_ids + end, qwen_vocab, args.repeats)
    head_151k = lm_head_seconds(896, qwen_vocab, args.repeats)

    rows = [
        ("decode step, free (default model)", free_s, None),
        ("decode step, with the JSON schema", guided_s, guided_s / free_s - 1),
        ("grammar work per token, 49,152 vocab", mask_49k, mask_49k / free_s),
        ("grammar work per token, 151,936 vocab", mask_151k, mask_151k / free_s),
    ]
    head_row = ("output layer alone, 896 x 151,936 bf16", head_151k, None)
    print(f"{machine()}\nJSON output ({len(guided_ids)} tokens): {text[:120]}...")
    print(f"compile: {compile_s * 1e3:.1f} ms at 49k, {qwen_compile_s * 1e3:.1f} ms at 151k (first compile "
          f"includes llguidance's view of the vocabulary)")
    print(f"{'':42} {'ms/token':>9} {'share of a free decode step':>28}")
    for name, seconds, share in rows + [head_row]:
        print(f"{name:42} {seconds * 1e3:9.3f} {'' if share is None else f'{share * 100:27.1f}%'}")
    print(f"grammar work at 151,936 vs that output layer alone: {mask_151k / head_151k * 100:.1f}%")
    print("goal: grammar work <= 5% of the decode step")
    peers = {}
    if args.xgrammar:
        xgr = load_xgrammar()
        for label, tok, vocab, token_ids, ours in (("49,152", llm.tokenizer, llm.config.vocab_size, guided_ids,
                                                     mask_49k),
                                                    ("151,936", qwen, qwen_vocab, qwen_ids + end, mask_151k)):
            compile_x, work_x = xgrammar_replay(xgr, tok, vocab, token_ids, args.repeats)
            peers[label] = {"compile_s": compile_x, "work_s": work_x}
            print(f"xgrammar at {label}: compile {compile_x * 1e3:.1f} ms, {work_x * 1e3:.3f} ms/token "
                  f"(llguidance {ours * 1e3:.3f}: ratio xgrammar/llguidance {work_x / ours:.2f})")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"grammar-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": machine(), "tokens": len(guided_ids), "compile_s_49k": compile_s,
                               "compile_s_151k": qwen_compile_s, "free_decode_s": free_s,
                               "guided_decode_s": guided_s, "mask_s_49k": mask_49k, "mask_s_151k": mask_151k,
                               "lm_head_s_151k_bf16": head_151k, "xgrammar": peers},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
