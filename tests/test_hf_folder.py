"""Hugging Face folders end to end: sharded safetensors, half-precision weights, tokenizer and template files,
generation equal to transformers' generate; and every malformed folder gives one clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lanternlm import LLM, ModelFileError, SamplingParams

from tiny_models import make_hf_model

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                          "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["The quick brown fox jumps over the lazy dog.", "Hello world! Bonjour le monde.",
              "def f(x):\n    return x + 1\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=TEMPLATE)


def save_folder(path, arch="qwen2", dtype=torch.float32, shard=None, **overrides):
    tok = tiny_tokenizer()
    hf = make_hf_model(arch, vocab_size=len(tok), bos_token_id=1, eos_token_id=2, **overrides).to(dtype)
    hf.generation_config.eos_token_id = [2, 0]  # a list, as many models have
    hf.generation_config.do_sample = False
    hf.save_pretrained(path, max_shard_size=shard) if shard else hf.save_pretrained(path)
    tok.save_pretrained(path)
    return hf, tok


@pytest.mark.parametrize("arch,dtype,shard", [
    ("qwen2", torch.float32, None),
    ("llama", torch.bfloat16, "40KB"),
    ("gemma3", torch.float16, None),
    ("phi3", torch.float32, "60KB"),
])
def test_folder_generates_what_transformers_generates(tmp_path, arch, dtype, shard):
    hf, tok = save_folder(tmp_path, arch, dtype, shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    llm = LLM(str(tmp_path), exact=True)  # the reference path (test_bf16_path.py compares the fast one to it)
    assert llm.model.lm_head.weight.dtype == torch.float32  # computed in fp32 on CPU, as transformers does
    messages = [{"role": "user", "content": "Hello world! The quick brown fox"}]
    ids = llm.encode_chat(messages)
    assert ids == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=False)
    ours = llm.generate(ids, SamplingParams(temperature=0, max_tokens=24))
    ref = hf.float().generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                              eos_token_id=[2, 0], pad_token_id=0)[0, len(ids):].tolist()
    assert ours.token_ids == ref
    assert ours.finish_reason == ("stop" if ref[-1] in (0, 2) else "length")
    assert ours.text == tok.decode(ref, skip_special_tokens=True)


def test_generation_config_end_ids_all_stop(tmp_path):
    save_folder(tmp_path)
    llm = LLM(str(tmp_path))
    assert {0, 2} <= set(llm.tokenizer.end_token_ids)


def test_chat_template_jinja_file_is_used(tmp_path):
    save_folder(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    llm = LLM(str(tmp_path))
    assert llm.apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]"


# ------------------------------------------------------------------ malformed folders


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    save_folder(path, "llama", shard="40KB")
    return path


def broken(good_folder, tmp_path, change):
    target = tmp_path / "m"
    shutil.copytree(good_folder, target)
    change(target)
    return target


def shard_names(folder):
    return sorted(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


CASES = {
    "missing config": (lambda p: (p / "config.json").unlink(), "no config.json"),
    # (BERT was the example here until encoders were supported; a state-space model is still unknown.)
    "unknown architecture": (lambda p: edit_json(p / "config.json", lambda d: d.update(
        model_type="mamba", architectures=["MambaForCausalLM"])), "unsupported architecture"),
    "invalid json": (lambda p: (p / "config.json").write_text("{ not json"), "invalid JSON"),
    "truncated shard": (lambda p: (p / shard_names(p)[0]).write_bytes((p / shard_names(p)[0]).read_bytes()[:5000]),
                        "invalid safetensors"),
    "corrupted header": (lambda p: (p / shard_names(p)[0]).write_bytes(
        (2**40).to_bytes(8, "little") + (p / shard_names(p)[0]).read_bytes()[8:]), "invalid safetensors"),
    "missing shard": (lambda p: (p / shard_names(p)[-1]).unlink(), "missing from the folder"),
    "shard path escapes": (lambda p: edit_json(p / "model.safetensors.index.json",
                                               lambda d: d["weight_map"].update(x="../../etc/passwd")),
                           "invalid shard file name"),
    "wrong shape": (lambda p: edit_json(p / "config.json", lambda d: d.update(intermediate_size=100)),
                    "has shape"),
    "missing tensor": (lambda p: edit_json(p / "config.json", lambda d: d.update(num_hidden_layers=4)),
                       "missing tensor"),
    "pickle only": (lambda p: [f.unlink() for f in p.glob("model*.safetensors*")] and
                    (p / "pytorch_model.bin").write_bytes(b"\x80\x04junk"), "refusing pickled"),
    "no tokenizer": (lambda p: (p / "tokenizer.json").unlink(), "tokenizer"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_folder_gives_one_clear_error(good_folder, tmp_path, case):
    change, message = CASES[case]
    path = broken(good_folder, tmp_path, change)
    with pytest.raises(Exception) as info:
        LLM(str(path))
    err = info.value
    assert isinstance(err, ModelFileError) or type(err).__name__.endswith("Error") and "lanternlm" in type(err).__module__
    assert message in str(err)
    assert str(path) in str(err)  # names the file or folder
    assert "\n" not in str(err)


def test_lazy_tensors_read_each_matrix_only_when_taken(tmp_path):
    """The fast path's matrices come from loader.hf.LazyTensors: shapes and dtypes up front without the data
    (meta tensors), each tensor's values when it is popped (through a handle of its own, so its mapped pages go
    when it does), and a non-float tensor is one clear error."""
    from safetensors.torch import save_file

    from lanternlm.loader.hf import LazyTensors
    a, b = torch.randn(3, 64).to(torch.bfloat16), torch.randn(5, 32, dtype=torch.float16)
    save_file({"a.weight": a, "b.weight": b, "norm.weight": torch.ones(4)}, tmp_path / "model.safetensors")
    lazy = LazyTensors([tmp_path / "model.safetensors"], frozenset({"a.weight", "b.weight"}))
    meta = dict(lazy.items())
    assert set(meta) == {"a.weight", "b.weight"} and all(t.device.type == "meta" for t in meta.values())
    assert (meta["a.weight"].shape, meta["a.weight"].dtype) == ((3, 64), torch.bfloat16)
    assert "a.weight" in lazy and "norm.weight" not in lazy
    assert torch.equal(lazy.pop("a.weight"), a) and "a.weight" not in lazy
    assert torch.equal(lazy.pop("b.weight"), b) and dict(lazy.items()) == {}
    save_file({"ids": torch.arange(4)}, tmp_path / "ints.safetensors")
    with pytest.raises(ModelFileError, match="ids.*I64.*floating point"):
        LazyTensors([tmp_path / "ints.safetensors"], frozenset({"ids"}))
