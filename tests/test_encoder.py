"""The BERT-family encoder against transformers' BertModel on tiny random models (fp32, padded batches with a
mask), pooling over the mask, encoder folders with sentence-transformers' files, and bad files."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers, processors

from lanternlm import LLM, LanternError, ModelFileError
from lanternlm.loader.encoder import build_encoder
from lanternlm.models.encoder import EncoderConfig
from lanternlm.models.pooling import pool

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "lantern", "light",
         "##s", "##ing", "a", "b", "c", ".", ",", "!"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_bert(seed=0, cls=transformers.BertModel, **overrides):
    cfg = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               max_position_embeddings=40, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = cls(transformers.BertConfig(**cfg)).eval()
    with torch.no_grad():  # every parameter random, LayerNorms included
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "LayerNorm.weight" in name else 0.0))
    return model


def padded_batch(lengths, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def lantern_encoder(hf_model, drop=(), **config_changes):
    raw = {**hf_model.config.to_dict(), **config_changes}
    tensors = {k: v.clone() for k, v in hf_model.state_dict().items()
               if not k.endswith(("position_ids", "token_type_ids")) and k not in drop}
    config = EncoderConfig.from_hf(raw, pooler="pooler.dense.weight" in tensors)
    return build_encoder(config, tensors, "test")


def max_diff_on_mask(a, b, mask):
    return float((a - b).abs()[mask.bool()].max())


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_hidden_states_equal_bertmodel_with_token_types(act):
    hf = tiny_bert(hidden_act=act)
    ours = lantern_encoder(hf)
    ids, mask = padded_batch([7, 12, 3, 12])
    types = (torch.arange(ids.shape[1])[None] >= 4).long().expand_as(ids) * mask  # a second segment
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = ours(ids, attention_mask=mask, token_type_ids=types)
    diff = max_diff_on_mask(out.last_hidden_state, ref.last_hidden_state, mask)
    print(f"token types, {act}: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    assert float((out.pooler_output - ref.pooler_output).abs().max()) <= 1e-5
    # no token_type_ids given: both use type 0
    ref0 = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_diff_on_mask(ours(ids, attention_mask=mask).last_hidden_state, ref0, mask) <= 1e-5


def test_hidden_states_equal_bertmodel_without_token_types():
    # A model without token types equals a BertModel whose single token-type row is zero.
    hf = tiny_bert(type_vocab_size=1, seed=3)
    with torch.no_grad():
        hf.embeddings.token_type_embeddings.weight.zero_()
    ours = lantern_encoder(hf, drop=("embeddings.token_type_embeddings.weight",), type_vocab_size=0)
    assert ours.embeddings.token_type_embeddings is None
    ids, mask = padded_batch([5, 9, 1])
    diff = max_diff_on_mask(ours(ids, attention_mask=mask).last_hidden_state,
                            hf(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    print(f"no token types: max abs diff {diff:.2e}")
    assert diff <= 1e-5


def test_padding_does_not_change_a_sequence():
    hf = tiny_bert(seed=4)
    ours = lantern_encoder(hf)
    ids, mask = padded_batch([4, 11])
    alone = ours(ids[:1, :4]).last_hidden_state
    batched = ours(ids, attention_mask=mask).last_hidden_state[:1, :4]
    assert float((alone - batched).abs().max()) <= 1e-5


@pytest.mark.parametrize("mode", ["mean", "cls", "last"])
def test_pooling_over_the_mask(mode):
    h = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    got = pool(h, mask, mode)
    for i in range(3):
        n = int(mask[i].sum())
        want = {"mean": h[i, :n].mean(0), "cls": h[i, 0], "last": h[i, n - 1]}[mode]
        assert torch.allclose(got[i], want, atol=1e-6)


# ---------------------------------------------------------------------- folders


def wordpiece_tokenizer() -> HFTokenizer:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tok


def save_encoder_folder(path, hf_model, pooling="mean", normalize=True, max_seq_length=None, prompts=None):
    hf_model.save_pretrained(path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=wordpiece_tokenizer(), unk_token="[UNK]",
                                                sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                                                mask_token="[MASK]")
    fast.save_pretrained(path)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    flags = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "last": "pooling_mode_lasttoken"}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": hf_model.config.hidden_size, **{f: f == flags[pooling] for f in flags.values()},
         "pooling_mode_max_tokens": False}))
    if max_seq_length:
        (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                    "do_lower_case": False}))
    if prompts:
        (path / "config_sentence_transformers.json").write_text(json.dumps(
            {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}))
    return fast


TEXTS = ["The quick brown fox", "hello world!", "lanterns lighting the lazy dog, a b c.", "a"]


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("last", True)])
def test_folder_embeddings_equal_pooled_bertmodel(tmp_path, pooling, normalize):
    hf = tiny_bert(seed=5, vocab_size=len(SPECIALS) + len(WORDS))
    fast = save_encoder_folder(tmp_path, hf, pooling, normalize, max_seq_length=16,
                               prompts={"query": "query: ", "passage": "passage: "})
    llm = LLM(str(tmp_path))
    assert llm.kind == "embed" and llm.embedding_max_length == 16 and llm.embedding_dimensions == 32
    assert llm.embedding_prompts == {"query": "query: ", "passage": "passage: "}
    got = torch.tensor(llm.embed(TEXTS))
    enc = fast(TEXTS, padding=True, return_tensors="pt")
    assert [llm.tokenizer.encode(t) for t in TEXTS] == [fast(t)["input_ids"] for t in TEXTS]
    hidden = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    want = pool(hidden, enc["attention_mask"], pooling)
    if normalize:
        want = torch.nn.functional.normalize(want, dim=-1)
    diff = float((got - want).abs().max())
    print(f"{pooling} pooling: max abs diff {diff:.2e}")
    assert diff <= 1e-5


def test_masked_lm_folder_with_bert_prefix(tmp_path):
    hf = tiny_bert(seed=6, cls=transformers.BertForMaskedLM, vocab_size=len(SPECIALS) + len(WORDS))
    save_encoder_folder(tmp_path, hf, "cls", normalize=False)
    llm = LLM(str(tmp_path))
    assert llm.model.pooler is None  # BertForMaskedLM has no pooler
    ids = llm.tokenizer.encode("hello world")
    want = hf.bert(input_ids=torch.tensor([ids])).last_hidden_state[0, 0]
    assert float((llm.embed_ids([ids])[0] - want).abs().max()) <= 1e-5


def test_plain_bert_folder_defaults_to_mean_pooling(tmp_path):
    hf = tiny_bert(seed=7, vocab_size=len(SPECIALS) + len(WORDS))
    save_encoder_folder(tmp_path, hf)
    for name in ("modules.json",):
        (tmp_path / name).unlink()
    llm = LLM(str(tmp_path))
    assert llm.embedding_spec.pooling == "mean" and not llm.embedding_spec.normalize
    assert llm.embedding_max_length == 40  # max_position_embeddings without sentence_bert_config.json


@pytest.mark.parametrize("change,file,message", [
    (lambda p: (p / "modules.json").write_text(json.dumps([
        {"path": "", "type": "sentence_transformers.models.Transformer"},
        {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}])), "modules.json", "not supported"),
    (lambda p: (p / "modules.json").write_text(json.dumps([
        {"path": "", "type": "sentence_transformers.models.Transformer"},
        {"path": "../../etc", "type": "sentence_transformers.models.Pooling"}])), "modules.json", "leaves the model"),
    (lambda p: (p / "modules.json").write_text("{not json"), "modules.json", "invalid JSON"),
    (lambda p: (p / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True})),
     "config.json", "pooling_mode_max_tokens"),
    (lambda p: (p / "1_Pooling" / "config.json").unlink(), "config.json", "missing"),
    (lambda p: (p / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": -3})),
     "sentence_bert_config.json", "max_seq_length"),
    (lambda p: (p / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"q": 3}})),
     "config_sentence_transformers.json", "prompts"),
    (lambda p: (p / "config.json").write_text(json.dumps({**json.loads((p / "config.json").read_text()),
                                                          "hidden_size": 30})), "config.json", "multiple"),
    (lambda p: (p / "config.json").write_text(json.dumps({**json.loads((p / "config.json").read_text()),
                                                          "position_embedding_type": "relative_key"})),
     "config.json", "position_embedding_type"),
    (lambda p: ((p / "model.safetensors").rename(p / "pytorch_model.bin")), "", "pickle"),
])
def test_bad_encoder_folders_give_one_clear_error(tmp_path, change, file, message):
    hf = tiny_bert(seed=8, vocab_size=len(SPECIALS) + len(WORDS))
    save_encoder_folder(tmp_path, hf, max_seq_length=16)
    change(tmp_path)
    with pytest.raises(ModelFileError, match=message) as err:
        LLM(str(tmp_path))
    assert file in str(err.value)


def test_encoder_refuses_to_generate(tmp_path):
    hf = tiny_bert(seed=9, vocab_size=len(SPECIALS) + len(WORDS))
    save_encoder_folder(tmp_path, hf)
    llm = LLM(str(tmp_path))
    for call in (lambda: llm.generate("hello"), lambda: llm.chat([{"role": "user", "content": "hi"}]),
                 lambda: list(llm.generate_stream("hi")), lambda: llm.logit_lens("hi")):
        with pytest.raises(LanternError, match="embedding model.*use embed"):
            call()
