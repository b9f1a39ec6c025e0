"""Top-1 agreement with the float32 reference, per GGUF file or HF folder: `python -m bench.agreement [--batch N]
FILE [FILE ...]`.

For each file, the exact path (every tensor dequantized to float32, `LLM(path, exact=True)`, the
transformers-equal reference) greedily writes 256 tokens after a fixed prompt. Then, teacher-forced on that
same sequence:
- Lantern's fast path decodes it token by token (the int16-activation kernels, as serving does), and, separately,
  prefills it in one forward (the dense bf16 path), and with --batch N also decodes it as N identical streams in
  one batch (the path of a server's batched decode: on a CPU with AMX, a bf16 folder's matrices go dense there);
- llama.cpp (llama-cpp-python from bench/.venv, run in that environment) evaluates it token by token.
Each one's arg-max at every position is compared with the reference's: the share that agree is printed.
Speed is not measured here; the machine's load does not matter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
VENV_PYTHON = HERE / ".venv" / "bin" / "python"
PROMPT = "The history of the lighthouse begins"
TOKENS = 256

LLAMA_CPP = """
import json, sys, numpy as np, llama_cpp
path, ids = sys.argv[1], json.load(open(sys.argv[2]))
m = llama_cpp.Llama(path, n_ctx=len(ids) + 8, n_batch=1, n_ubatch=1, logits_all=True, verbose=False, n_threads=2)
m.eval(ids)
print(json.dumps([int(np.argmax(m.scores[i])) for i in range(len(ids))]))
"""


def positions_agreeing(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def decode_argmax(llm, ids: list[int], rows: int = 1) -> list[int]:
    """The fast path's arg-max after each of `ids`, fed one token at a time through a paged cache; with `rows` > 1
    every step is a batch of that many copies of the sequence (as that many streams decoding together: on a CPU
    with AMX, bf16 matrices go to the dense matmul from 16 rows), and the first row's arg-max is taken."""
    from lanternlm.models.kv_cache import BLOCK_SIZE, PagedKVCache
    blocks = -(-len(ids) // BLOCK_SIZE)
    cache = PagedKVCache(llm.config, blocks * rows, BLOCK_SIZE, llm.kv_dtype, llm.model.dtype, llm.device)
    table = torch.arange(blocks * rows).view(rows, blocks)
    out = []
    with torch.inference_mode():
        for p, token in enumerate(ids):
            logits = llm.model(torch.tensor([[token]] * rows), torch.tensor([[p]] * rows), cache, slots=table,
                               logits_to_keep=1).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


def main() -> None:
    torch.set_num_threads(2)
    from lanternlm import LLM
    from lanternlm.generation.sampling import SamplingParams

    args = sys.argv[1:]
    batch = 0
    if args[:1] == ["--batch"]:  # also decode as a batch of this many streams
        batch, args = int(args[1]), args[2:]
    for path in args:
        exact = LLM(path, exact=True)
        prompt = exact.encode(PROMPT)
        params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
        ids = prompt + [s.token_id for s in exact.stream_ids(prompt, params)]
        with torch.inference_mode():
            reference = exact.model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
        del exact
        fast = LLM(path)
        decoded = decode_argmax(fast, ids)
        batched = decode_argmax(fast, ids, batch) if batch > 1 else None
        with torch.inference_mode():
            prefilled = fast.model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
        del fast
        scored = slice(len(prompt) - 1, len(ids) - 1)  # the positions that predict the generated tokens
        line = (f"{Path(path).name}: top-1 agreement with float32 over {len(ids[scored])} positions: "
                f"Lantern decode {positions_agreeing(decoded[scored], reference[scored]):.3f}, "
                f"Lantern one-forward prefill {positions_agreeing(prefilled[scored], reference[scored]):.3f}")
        if batched is not None:
            line += f", Lantern decode in a batch of {batch} {positions_agreeing(batched[scored], reference[scored]):.3f}"
        if VENV_PYTHON.exists() and Path(path).suffix == ".gguf":  # llama.cpp reads GGUF files only
            with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
                json.dump(ids, f)
                f.flush()
                done = subprocess.run([str(VENV_PYTHON), "-c", LLAMA_CPP, path, f.name], capture_output=True,
                                      text=True)
            if done.returncode == 0:
                theirs = json.loads(done.stdout.strip().splitlines()[-1])
                line += f", llama.cpp decode {positions_agreeing(theirs[scored], reference[scored]):.3f}"
            else:
                line += f", llama.cpp failed: {done.stderr.strip().splitlines()[-1:]}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
