"""The real `lantern` command, run as a subprocess: run, chat, inspect, tokenize, list, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import ARCHS, make_hf_model


def lantern(*args, stdin: str | None = None, env_extra: dict | None = None, timeout: int = 180):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "lanternlm", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def model_arg(default_gguf):
    return ["-m", str(default_gguf)]


def test_run_prompt_argument_streams_only_the_answer(model_arg):
    r = lantern("run", *model_arg, "--temperature", "0", "--max-tokens", "40", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tokens/s" not in r.stdout and r.stderr == ""


def test_run_reads_stdin_and_verbose_goes_to_stderr(model_arg):
    r = lantern("run", *model_arg, "--temperature", "0", "--max-tokens", "8", "-v",
                stdin="What is the capital of France?\n")
    assert r.returncode == 0, r.stderr
    assert "generated 8 tokens" in r.stderr or "finish stop" in r.stderr
    assert "tokens/s" in r.stderr and "tokens/s" not in r.stdout
    one = lantern("run", *model_arg, "--temperature", "0", "--max-tokens", "8", "-v", "--threads", "1",
                  "What is the capital of France?")
    assert one.returncode == 0 and "on 1 threads]" in one.stderr, one.stderr
    assert one.stdout == lantern("run", *model_arg, "--temperature", "0", "--max-tokens", "8",
                                 "What is the capital of France?").stdout  # the same answer on 1 thread


def test_run_flags_seed_repeats_and_raw_mode(model_arg):
    args = ("run", *model_arg, "--temperature", "1.0", "--top-p", "0.9", "--top-k", "40", "--seed", "7",
            "--max-tokens", "12", "Tell me a story")
    a, b = lantern(*args), lantern(*args)
    assert a.returncode == 0 and a.stdout == b.stdout
    raw = lantern("run", *model_arg, "--raw", "--temperature", "0", "--max-tokens", "5", "--stop", "zzz",
                  "The capital of France is")
    assert raw.returncode == 0 and "Paris" in raw.stdout


def test_chat_through_a_pipe_with_reset(model_arg):
    script = "What is the capital of France?\n/reset\n/system Answer in one word.\nWhat is the capital of Italy?\n/exit\n"
    r = lantern("chat", *model_arg, "--temperature", "0", "--max-tokens", "30", stdin=script)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "Rome" in r.stdout
    assert "conversation cleared" in r.stderr


def test_tokenize_ids_equal_the_tokenizer(model_arg, default_gguf):
    from lanternlm.loader.gguf import read_gguf
    from lanternlm.text.tokenizer import Tokenizer
    text = "Hello world 12345 日本語"
    r = lantern("tokenize", *model_arg, "--json", text)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    with read_gguf(default_gguf) as g:
        tok = Tokenizer.from_gguf_metadata(g.metadata)
    assert out["ids"] == tok.encode(text)
    assert out["count"] == len(out["ids"]) and len(out["tokens"]) == len(out["ids"])
    chat = lantern("tokenize", *model_arg, "--chat", "hi")
    assert chat.returncode == 0 and "<|im_start|>user" in chat.stdout and "(special)" in chat.stdout


def test_inspect_json_totals_equal_transformers_for_the_default_model(model_arg, default_gguf):
    import transformers
    r = lantern("inspect", *model_arg, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    assert info["parameters"]["total"] == hf.num_parameters()
    assert info["config"]["layers"] == 30 and info["config"]["kv_heads"] == 3
    assert "(0-29): 30 x DecoderLayer" in info["module_tree"]
    # bf16 keys and values on the quantized path: 30 layers x 3 KV heads x 64 x 2 (K and V) x 2 bytes per token
    assert info["kv_cache"]["dtype"] == "bfloat16" and info["kv_cache"]["bytes_per_token"] == 23_040
    assert info["kv_cache"]["serve_default_budget_bytes"] == 8 * 4096 * 23_040
    text = lantern("inspect", *model_arg)
    assert text.returncode == 0 and "seeds' estimate" in text.stdout and "23,040 bytes per token" in text.stdout


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_inspect_totals_equal_transformers_for_each_architecture(tmp_path, arch):
    from test_hf_folder import tiny_tokenizer
    tok = tiny_tokenizer()
    hf = make_hf_model(arch, vocab_size=len(tok))
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    from lanternlm import LLM
    from lanternlm.inspect import describe
    info = describe(LLM(str(tmp_path)))
    assert info["parameters"]["total"] == hf.num_parameters()
    assert info["parameters"]["lm_head_tied"] == hf.config.tie_word_embeddings


def test_seeds_qwen2_arithmetic():
    # Qwen2-0.5B's config, built on the meta device (no weights), as in the seeds' arithmetic.
    import torch
    import transformers

    from lanternlm.config import ModelConfig
    from lanternlm.inspect import parameter_counts
    from lanternlm.model import CausalLM
    raw = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
           "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
           "tie_word_embeddings": True}
    with torch.device("meta"):
        counts = parameter_counts(CausalLM(ModelConfig.from_hf(raw)))
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**raw))
    # The seed (003) writes 494,020,928, but its k/v lines count 896x128+128 as 115,584 (it is 114,816) and
    # its per-layer sum is 200 off its own terms. The correct figures:
    # q 803,712 + k 114,816 + v 114,816 + o 802,816 + gate/up/down 3 x 4,358,144 = 14,910,592 per layer.
    assert counts["per_layer"]["linear_only"] == 14_910_592
    assert counts["seeds_estimate"] == 14_910_592 * 24 + 151936 * 896 == 493_988_864
    assert counts["total"] == hf.num_parameters() == 494_032_768


@pytest.mark.parametrize("args,message", [
    (("run", "-m", "no-such-model", "hi"), "unknown model"),
    (("run", "-m", "/nonexistent/model.gguf", "hi"), "unknown model"),
    (("run", "--temperature", "-1", "hi"), "temperature"),
    (("run", "--max-tokens", "abc", "hi"), "invalid int value"),
    (("run", "--threads", "0", "hi"), "threads >= 1"),
    (("inspect", "-m", str(Path(__file__).resolve().parent.parent / "pyproject.toml")), "not a model"),
    (("rm", "no-such-model"), "unknown model"),
    (("frobnicate",), "invalid choice"),
])
def test_errors_are_one_line_and_non_zero(args, message, model_arg):
    if args[0] == "run" and "-m" not in args:
        args = (args[0], *model_arg, *args[1:])
    r = lantern(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_gguf_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    r = lantern("inspect", "-m", str(bad))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and str(bad) in r.stderr


def test_help_has_examples():
    for command in ("run", "chat", "pull", "list", "rm", "inspect", "tokenize"):
        r = lantern(command, "--help")
        assert r.returncode == 0 and "examples:" in r.stdout, command


def test_run_explain_and_lens(model_arg):
    r = lantern("run", *model_arg, "--explain", "2", "--temperature", "0", "--max-tokens", "8",
                "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) >= 6 and "Paris" in r.stdout
    lens = lantern("lens", *model_arg, "--json", "The capital of France is")
    assert lens.returncode == 0, lens.stderr
    out = json.loads(lens.stdout)
    assert out["final_token"]["text"].strip() == "Paris" and len(out["depths"]) == 31


def test_stop_flag_keeps_non_ascii_and_reads_newline_escapes():
    from lanternlm.cli import build_parser, sampling_from
    args = build_parser().parse_args(["run", "--stop", "。", "--stop", "\\n\\n", "hi"])
    assert sampling_from(args).stop == ("。", "\n\n")


def test_serve_api_keys_come_from_flags_and_a_file(tmp_path):
    """`--api-key` repeats and `--api-key-file` adds one key per line; blank, commented and repeated keys are
    dropped; a key with a space, or partitioning per key without any key, is one clear error."""
    import argparse

    from lanternlm.cli import api_keys
    from lanternlm.errors import LanternError

    keys = tmp_path / "keys"
    keys.write_text("# tenants\nalpha\n\n  beta  \nalpha\n")
    args = argparse.Namespace(api_key=["gamma"], api_key_file=str(keys), prefix_cache_per_key=True)
    assert api_keys(args) == ("gamma", "alpha", "beta")
    with pytest.raises(LanternError, match="without spaces"):
        api_keys(argparse.Namespace(api_key=["two words"], api_key_file=None, prefix_cache_per_key=False))
    with pytest.raises(LanternError, match="needs API keys"):
        api_keys(argparse.Namespace(api_key=[], api_key_file=None, prefix_cache_per_key=True))
    with pytest.raises(LanternError, match="cannot read --api-key-file"):
        api_keys(argparse.Namespace(api_key=[], api_key_file=str(tmp_path / "none"), prefix_cache_per_key=False))


def test_serve_loads_the_model_on_a_thread_that_ends(monkeypatch):
    """`lantern serve` loads on a thread of its own that has ended by the time it serves (so the load's OpenMP
    team is gone: cli._open_on_a_passing_thread says why); a load error is raised on the main thread as it was."""
    import threading
    import types

    from lanternlm import cli

    seen = []

    def fake_open(args):
        seen.append(threading.current_thread())
        if args.model == "bad":
            raise cli.LanternError("no such model: bad")
        return "the model"

    monkeypatch.setattr(cli, "open_model", fake_open)
    assert cli._open_on_a_passing_thread(types.SimpleNamespace(model="good")) == "the model"
    assert seen[0] is not threading.main_thread() and not seen[0].is_alive()
    with pytest.raises(cli.LanternError, match="no such model: bad"):
        cli._open_on_a_passing_thread(types.SimpleNamespace(model="bad"))
