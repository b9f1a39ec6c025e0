"""The GGUF files issue 15's bench measures, written here once: `python -m bench.files [--only NAME]`.

People download K-quant mixes (Q4_K_M above all), not the Q4_1 the default model ships as. Speed does not
need trained weights, so most files hold random weights at real models' shapes; tokenizers come from
llama.cpp's vocabulary files (tests/llama_cpp_data.py fetches them). Each file is written as F16 with gguf-py
and quantized with llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`, from the bench's
llama-cpp-python in bench/.venv), so the type mix is exactly what llama.cpp's Q4_K_M recipe picks:

- `smollm2-135m-f16.gguf`: the default model's weights (dequantized from its Q4_1 file) as F16, which should
  take the same path as an HF folder; and `smollm2-135m-q4_k_m.gguf` from it. Its hidden size, 576, is not a
  multiple of 256, so most tensors fall back to Q5_0/Q8_0, as in the real Q4_K_M files of many small models.
- `smollm2-135m-bf16/`: the default model's weights (its Q4_1 file, dequantized by transformers) as a bf16
  Hugging Face folder (config, safetensors, tokenizer with its chat template): the folder table's model
  (Lantern with and without `--quantize q8_0`, and vLLM's CPU backend, which loads HF folders, not GGUF files).
- `smollm2-135m-q8_0.gguf`: the same weights quantized to Q8_0 by llama.cpp, its peer for Lantern's
  `--quantize q8_0` in the folder table.
- `qwen2-0.5b-shape-q4_k_m.gguf`: Qwen2-0.5B's shapes (hidden 896, 24 layers, 151,936 tokens).
- `gemma3-270m-shape-q4_k_m.gguf`: Gemma-3-270M's shapes (hidden 640, 18 layers, 262,144 tokens, head_dim
  256, sliding windows of 512 on 5 of every 6 layers).
- `llama-1b-shape-q4_k_m.gguf`: a Llama whose sizes are multiples of 256 (hidden 2048, 16 layers, MLP 8192),
  so Q4_K and Q6_K are used throughout;
- `llama-1b-shape-q3_k_m.gguf`: the same random weights in Q3_K_M (Q3_K most, Q4_K/Q5_K/Q6_K some), the mix
  people take for big models in little memory; `llama-1b-shape-q2_k.gguf` (Q2_K most, Q3_K/Q4_K/Q6_K
  some), the smallest of llama.cpp's K-quant mixes; and `llama-1b-shape-iq4_xs.gguf` (IQ4_XS most), the
  non-linear 4-bit type many people pick over Q4_K_M.

Files go to bench/files/ (gitignored); each one's tensor-type histogram is printed.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
OUT = HERE / "files"
VENV_PYTHON = HERE / ".venv" / "bin" / "python"
FOLDER = OUT / "smollm2-135m-bf16"          # the HF folder of the default model's weights
# The GGUF file llama.cpp runs in the folder table (an HF folder is not something llama.cpp loads):
FOLDER_PEER_GGUF = {FOLDER.name: OUT / "smollm2-135m-q8_0.gguf"}

# (name, architecture, shapes, vocabulary file, tied embeddings)
SHAPES = {
    "qwen2-0.5b-shape": ("qwen2", dict(hidden=896, layers=24, ffn=4864, heads=14, kv=2, head_dim=64,
                                      rope=1_000_000.0, ctx=32768), "ggml-vocab-qwen2.gguf", True),
    "gemma3-270m-shape": ("gemma3", dict(hidden=640, layers=18, ffn=2048, heads=4, kv=1, head_dim=256,
                                        rope=1_000_000.0, ctx=32768, window=512), "ggml-vocab-gemma-4.gguf", True),
    "llama-1b-shape": ("llama", dict(hidden=2048, layers=16, ffn=8192, heads=32, kv=8, head_dim=64,
                                     rope=500_000.0, ctx=8192), "ggml-vocab-llama-spm.gguf", False),
}


def vocab_dir() -> Path:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from llama_cpp_data import data_dir  # the tests' cached copy of llama.cpp's data (downloaded once)
    return data_dir()


def copy_tokenizer(writer, vocab_path: Path, as_spm: bool) -> None:
    """The vocabulary file's tokenizer.* fields. `as_spm`: write it as a SentencePiece-style ('llama') vocab
    from its tokens, scores and types, the way Gemma 3 GGUF files carry theirs."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(vocab_path)
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer.") or (as_spm and name == "tokenizer.ggml.merges"):
            continue
        value = field.contents()
        if as_spm and name == "tokenizer.ggml.model":
            value = "llama"
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, kind, sub_type=sub)


def write_random(path: Path, arch: str, s: dict, vocab_path: Path, tied: bool, seed: int = 0) -> None:
    """An F16 GGUF of random weights (N(0, 0.02), norms 1) at these shapes."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    w.add_name(path.stem)
    w.add_block_count(s["layers"])
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv"])
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
    w.add_rope_freq_base(s["rope"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(1)  # mostly F16
    if "window" in s:
        w.add_sliding_window(s["window"])
    copy_tokenizer(w, vocab_path, as_spm=arch == "gemma3")
    n_vocab = len(__import__("gguf").GGUFReader(vocab_path).fields["tokenizer.ggml.tokens"].data)

    def rand(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    def ones(n):
        return np.ones(n, dtype=np.float32)

    H, D, q, kv, F = s["hidden"], s["head_dim"], s["heads"] * s["head_dim"], s["kv"] * s["head_dim"], s["ffn"]
    w.add_tensor("token_embd.weight", rand(n_vocab, H))
    for i in range(s["layers"]):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", ones(H))
        w.add_tensor(f"{b}.attn_q.weight", rand(q, H))
        w.add_tensor(f"{b}.attn_k.weight", rand(kv, H))
        w.add_tensor(f"{b}.attn_v.weight", rand(kv, H))
        if arch == "qwen2":
            for name, n in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
                w.add_tensor(f"{b}.{name}.bias", np.zeros(n, dtype=np.float32))
        if arch == "gemma3":
            w.add_tensor(f"{b}.attn_q_norm.weight", ones(D))
            w.add_tensor(f"{b}.attn_k_norm.weight", ones(D))
            w.add_tensor(f"{b}.post_attention_norm.weight", ones(H))
            w.add_tensor(f"{b}.post_ffw_norm.weight", ones(H))
        w.add_tensor(f"{b}.attn_output.weight", rand(H, q))
        w.add_tensor(f"{b}.ffn_norm.weight", ones(H))
        w.add_tensor(f"{b}.ffn_gate.weight", rand(F, H))
        w.add_tensor(f"{b}.ffn_up.weight", rand(F, H))
        w.add_tensor(f"{b}.ffn_down.weight", rand(H, F))
    w.add_tensor("output_norm.weight", ones(H))
    if not tied:
        w.add_tensor("output.weight", rand(n_vocab, H))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_default_f16(path: Path) -> None:
    """The default model's Q4_1 file with every tensor dequantized to F16 (metadata copied as is)."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    from lanternlm.store import resolve

    reader = GGUFReader(resolve("smollm2-135m-instruct"))
    arch = reader.fields["general.architecture"].contents()
    w = GGUFWriter(str(path), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        kind = field.types[0]
        w.add_key_value(name, field.contents(), kind, sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
    w.add_file_type(1)
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        w.add_tensor(t.name, values.astype(np.float16 if values.ndim == 2 else np.float32),
                     raw_dtype=GGMLQuantizationType.F16 if values.ndim == 2 else GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_default_folder(folder: Path) -> None:
    """The default model's Q4_1 weights as a bf16 Hugging Face folder, with the tokenizer and its chat template.

    transformers reads the GGUF (dequantizing to float32) and writes safetensors in bfloat16; written to a
    temporary folder first, so an interrupted run leaves no half folder behind."""
    import shutil

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from lanternlm.store import resolve

    gguf_file = Path(resolve("smollm2-135m-instruct"))
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    if not tokenizer.chat_template:  # transformers carries it over from the GGUF; make sure
        from gguf import GGUFReader
        tokenizer.chat_template = GGUFReader(gguf_file).fields["tokenizer.chat_template"].contents()
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                 dtype=torch.float32)
    # A model loaded from a GGUF counts as quantized and refuses save_pretrained: copy its weights into a plain
    # model built from the same config, in bfloat16.
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(folder)


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, sys.argv[3])
params.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def quantize(src: Path, dst: Path, ftype: str = "LLAMA_FTYPE_MOSTLY_Q4_K_M") -> None:
    if not VENV_PYTHON.exists():
        raise SystemExit("bench/.venv is missing: run `python -m bench` once to build it (llama-cpp-python)")
    subprocess.run([str(VENV_PYTHON), "-c", QUANTIZE, str(src), str(dst), ftype], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def histogram(path: Path) -> str:
    from gguf import GGUFReader
    counts = collections.Counter(t.tensor_type.name for t in GGUFReader(path).tensors)
    return ", ".join(f"{k} x{v}" for k, v in counts.most_common())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="one of: smollm2 (its F16, Q4_K_M, Q8_0 files and HF folder), "
                    + ", ".join(SHAPES))
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    made = []
    if args.only in (None, "smollm2"):
        f16 = OUT / "smollm2-135m-f16.gguf"
        if not f16.exists():
            write_default_f16(f16)
        q = OUT / "smollm2-135m-q4_k_m.gguf"
        if not q.exists():
            quantize(f16, q)
        q8 = OUT / "smollm2-135m-q8_0.gguf"
        if not q8.exists():
            quantize(f16, q8, "LLAMA_FTYPE_MOSTLY_Q8_0")
        if not FOLDER.is_dir():
            write_default_folder(FOLDER)
        made += [f16, q, q8, FOLDER]
    vocab = None
    for name, (arch, shapes, vocab_file, tied) in SHAPES.items():
        if args.only not in (None, name):
            continue
        mixes = ["q4_k_m"] + (["q3_k_m", "q2_k", "iq4_xs"] if name == "llama-1b-shape" else [])
        files = {mix: OUT / f"{name}-{mix}.gguf" for mix in mixes}
        if not all(q.exists() for q in files.values()):
            vocab = vocab or vocab_dir()
            f16 = OUT / f"{name}-f16.gguf"
            write_random(f16, arch, shapes, vocab / vocab_file, tied)
            for mix, q in files.items():
                if not q.exists():
                    quantize(f16, q, f"LLAMA_FTYPE_MOSTLY_{mix.upper()}")
            f16.unlink()  # only the quantized files are measured; the F16 one is the default model's
        made += files.values()
    for path in made:
        if path.is_dir():
            print(f"{path.name}/: {folder_size(path) / 2**20:.0f} MiB; an HF folder (bf16 safetensors)")
        else:
            print(f"{path.name}: {path.stat().st_size / 2**20:.0f} MiB; {histogram(path)}")


if __name__ == "__main__":
    main()
