"""What the per-token trace costs: greedy decode tokens/s with the trace off (plain generation) and on
(explain_generate), same model, same prompt, and whether the tokens are the same.
`python -m bench.trace_cost [--model M] [--tokens 128] [--repeats 3]`."""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    from lanternlm import LLM, SamplingParams
    from lanternlm.explain import explain_generate
    from lanternlm.generation.generate import generate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    llm = LLM(args.model)
    ids = llm.encode_chat([{"role": "user", "content": "Write a long story about a dragon."}])
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True).with_defaults(
        llm.generation_config)

    def decode_rate(steps) -> tuple[float, list[int]]:
        first, tokens = None, []
        for item in steps:
            tokens.append((item[0] if isinstance(item, tuple) else item).token_id)
            first = first or time.perf_counter()
        return (len(tokens) - 1) / (time.perf_counter() - first), tokens

    off, on = [], []
    for _ in range(args.repeats):
        rate_off, plain = decode_rate(generate(llm.model, llm.tokenizer, ids, params, llm.context))
        rate_on, traced = decode_rate(explain_generate(llm.model, llm.tokenizer, ids, params, llm.context))
        off.append(rate_off)
        on.append(rate_on)
        if plain != traced:
            print("the trace changed the tokens", file=sys.stderr)
            return 1
    best_off, best_on = max(off), max(on)
    print(f"decode, trace off: {best_off:.1f} tokens/s; trace on: {best_on:.1f} tokens/s "
          f"(ratio {best_on / best_off:.2f}); same tokens: yes ({args.tokens} greedy tokens, best of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
