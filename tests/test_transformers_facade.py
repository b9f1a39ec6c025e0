"""lanternlm.transformers against real transformers: the same tokens from generate (greedy, single and padded
batches, every architecture), the same logits, the same tokenizer and chat-template output, the same printed
module tree and pipeline results; the tutorials' own code (seed 004's blocks, seed 003's steps) run on the
default model; and every unsupported call gives one error naming the argument."""

from __future__ import annotations

import contextlib
import io
import re
import threading
from pathlib import Path

import pytest
import torch
import transformers

import lanternlm.transformers as lt
from lanternlm import LanternError, SamplingParams
from lanternlm.transformers import UnsupportedArgumentError
from lanternlm.transformers.generation import sampling_params

from test_hf_folder import save_folder

ARCHS = ["llama", "llama3_rope", "llama_tied_mha", "mistral", "qwen2", "qwen3", "phi3", "gemma3"]
TEXTS = ["Hello world! The quick brown fox", "def f(x):", "Bonjour le monde. The lazy dog jumps over"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world! The quick"}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Per architecture: the folder, transformers' model (float32) and transformers' tokenizer."""
    made = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(arch)
        hf, _ = save_folder(path, arch)
        made[arch] = (path, hf.float().eval(), transformers.AutoTokenizer.from_pretrained(path))
    return made


@pytest.fixture(scope="module")
def qwen2(folders):
    path, hf, hf_tok = folders["qwen2"]
    return (lt.AutoModelForCausalLM.from_pretrained(path, exact=True), lt.AutoTokenizer.from_pretrained(path),
            hf, hf_tok)


# ---------------------------------------------------------------------- the model against transformers


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_equals_transformers_single_and_left_padded(folders, arch):
    path, hf, hf_tok = folders[arch]
    # exact=True: Lantern's exact path (float32 weights and cache), the one that equals transformers
    model = lt.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", torch_dtype="auto",
                                                    trust_remote_code=True, exact=True)
    tok = lt.AutoTokenizer.from_pretrained(path, padding_side="left")
    hf_tok.padding_side = "left"
    single = tok(TEXTS[0], return_tensors="pt")
    ours = model.generate(single.input_ids, max_new_tokens=16)
    ref = hf.generate(single.input_ids, max_new_tokens=16, do_sample=False)
    assert ours.tolist() == ref.tolist()
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    assert (batch.attention_mask == 0).any()  # the batch really is padded
    ours = model.generate(**batch, max_new_tokens=16)
    ref = hf.generate(**hf_tok(TEXTS, padding=True, return_tensors="pt"), max_new_tokens=16, do_sample=False)
    assert ours.tolist() == ref.tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_hidden_states_tree_and_counts_equal_transformers(folders, arch):
    path, hf, _ = folders[arch]
    model = lt.AutoModelForCausalLM.from_pretrained(path, exact=True)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 61]])
    out = model(ids, output_hidden_states=True)
    ref = hf(ids, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.model(ids)[0], hf.model(ids)[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.lm_head(model.model(ids)[0]), ref.logits, atol=1e-4, rtol=1e-4)
    assert str(model) == str(hf)
    assert str(model.model) == str(hf.model)
    assert model.num_parameters() == hf.num_parameters()
    assert model.num_parameters(exclude_embeddings=True) == hf.num_parameters(exclude_embeddings=True)
    assert model.config.hidden_size == hf.config.hidden_size
    assert model.config.num_hidden_layers == hf.config.num_hidden_layers


def test_right_padded_forward_and_loss_equal_transformers(qwen2):
    model, tok, hf, hf_tok = qwen2
    tok.padding_side = hf_tok.padding_side = "right"  # transformers' forward takes positions 0.. from the left
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    ours = model(**batch).logits
    ref = hf(**hf_tok(TEXTS, padding=True, return_tensors="pt")).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=1e-4)
    ids = tok(TEXTS[0], return_tensors="pt").input_ids
    torch.testing.assert_close(model(ids, labels=ids).loss, hf(ids, labels=ids).loss, atol=1e-5, rtol=1e-5)


def test_scores_sampling_settings_and_defaults(qwen2):
    model, tok, hf, _ = qwen2
    ids = tok(TEXTS[2], return_tensors="pt").input_ids
    ours = model.generate(ids, max_new_tokens=10, repetition_penalty=1.3, return_dict_in_generate=True,
                          output_scores=True, output_logits=True)
    ref = hf.generate(ids, max_new_tokens=10, repetition_penalty=1.3, do_sample=False, return_dict_in_generate=True,
                      output_scores=True, output_logits=True)
    assert ours.sequences.tolist() == ref.sequences.tolist()
    assert len(ours.scores) == len(ref.scores)
    for ours_step, ref_step in zip(ours.scores, ref.scores):
        torch.testing.assert_close(ours_step, ref_step, atol=1e-4, rtol=1e-4)
    for ours_step, ref_step in zip(ours.logits, ref.logits):
        torch.testing.assert_close(ours_step, ref_step, atol=1e-4, rtol=1e-4)
    # No max_new_tokens: transformers' default of 20 new tokens (unless an end token comes first).
    default = model.generate(ids)
    assert default.tolist() == hf.generate(ids).tolist()
    # Sampling draws from the same (seeded) global generator torch offers; temperature 0 is greedy.
    torch.manual_seed(0)
    first = model.generate(ids, do_sample=True, top_k=5, top_p=0.9, temperature=0.7, max_new_tokens=12)
    torch.manual_seed(0)
    assert model.generate(ids, do_sample=True, top_k=5, top_p=0.9, temperature=0.7, max_new_tokens=12).tolist() \
        == first.tolist()
    assert model.generate(ids, do_sample=True, temperature=0, max_new_tokens=12).tolist() == \
        hf.generate(ids, max_new_tokens=12, do_sample=False).tolist()


def test_streamers_show_the_generated_text(qwen2):
    model, tok, _, _ = qwen2
    inputs = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=16)
    new_text = tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        model.generate(**inputs, max_new_tokens=16, streamer=lt.TextStreamer(tok, skip_prompt=True,
                                                                              skip_special_tokens=True))
    assert printed.getvalue() == new_text + "\n"
    streamer = lt.TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=60)
    worker = threading.Thread(target=model.generate, kwargs=dict(**inputs, max_new_tokens=16, streamer=streamer))
    worker.start()
    pieces = list(streamer)
    worker.join()
    assert "".join(pieces) == new_text and len(pieces) > 1


# ---------------------------------------------------------------------- the tokenizer against transformers


@pytest.mark.parametrize("side", ["left", "right"])
def test_tokenizer_calls_equal_transformers(qwen2, side):
    _, tok, _, hf_tok = qwen2
    tok.padding_side = hf_tok.padding_side = side
    for kwargs in (dict(padding=True, return_tensors="pt"), dict(padding=True), dict(),
                   dict(padding="max_length", max_length=24, return_tensors="pt"),
                   dict(truncation=True, max_length=4), dict(add_special_tokens=False)):
        ours, ref = tok(TEXTS, **kwargs), hf_tok(TEXTS, **kwargs)
        for key in ("input_ids", "attention_mask"):
            value = ours[key].tolist() if isinstance(ours[key], torch.Tensor) else ours[key]
            expected = ref[key].tolist() if isinstance(ref[key], torch.Tensor) else ref[key]
            assert value == expected, (kwargs, key)
    assert tok(TEXTS[0]).input_ids == hf_tok(TEXTS[0]).input_ids
    assert tok(TEXTS[0], return_tensors="pt").to("cpu").input_ids.tolist() == \
        hf_tok(TEXTS[0], return_tensors="pt").input_ids.tolist()
    assert tok.encode(TEXTS[1]) == hf_tok.encode(TEXTS[1])


def test_chat_template_decode_and_special_tokens_equal_transformers(qwen2):
    _, tok, _, hf_tok = qwen2
    for gen in (True, False):
        assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen) == \
            hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
    ours = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    ref = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == ref["attention_mask"].tolist()
    assert tok.apply_chat_template(MESSAGES, return_dict=False) == hf_tok.apply_chat_template(MESSAGES,
                                                                                              return_dict=False)
    batch = [MESSAGES, MESSAGES[1:]]
    tok.padding_side = hf_tok.padding_side = "left"
    ours = tok.apply_chat_template(batch, padding=True, return_tensors="pt")
    ref = hf_tok.apply_chat_template(batch, padding=True, return_tensors="pt")
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == ref["attention_mask"].tolist()

    rows = hf_tok(TEXTS, padding=True, return_tensors="pt").input_ids
    for skip in (True, False):
        assert tok.batch_decode(rows, skip_special_tokens=skip) == hf_tok.batch_decode(rows, skip_special_tokens=skip)
        assert tok.batch_decode(rows.tolist(), skip_special_tokens=skip) == \
            hf_tok.batch_decode(rows.tolist(), skip_special_tokens=skip)
        assert tok.decode(rows[0], skip_special_tokens=skip) == hf_tok.decode(rows[0], skip_special_tokens=skip)
    assert tok.decode(rows[0, 1]) == hf_tok.decode(rows[0, 1])  # a 0-d tensor, as argmax gives
    assert tok.convert_ids_to_tokens(rows[0].tolist()) == hf_tok.convert_ids_to_tokens(rows[0].tolist())
    for name in ("eos_token", "eos_token_id", "bos_token", "bos_token_id", "pad_token", "pad_token_id"):
        assert getattr(tok, name) == getattr(hf_tok, name), name
    assert len(tok) == len(hf_tok)
    fresh = lt.AutoTokenizer.from_pretrained(tok.name_or_path)  # the shared one keeps its pad token
    fresh.pad_token = fresh.eos_token
    assert fresh.pad_token_id == fresh.eos_token_id


# ---------------------------------------------------------------------- pipelines


def test_text_generation_pipeline_equals_transformers(qwen2):
    model, tok, hf, hf_tok = qwen2
    ours = lt.pipeline("text-generation", model=model, tokenizer=tok, max_new_tokens=12, do_sample=False)
    ref = transformers.pipeline("text-generation", model=hf, tokenizer=hf_tok, max_new_tokens=12, do_sample=False)
    for full in (True, False):
        assert ours(TEXTS[0], return_full_text=full) == ref(TEXTS[0], return_full_text=full)
        assert ours(MESSAGES, return_full_text=full) == ref(MESSAGES, return_full_text=full)
    assert ours(TEXTS[:2]) == ref(TEXTS[:2])
    assert ours([MESSAGES, MESSAGES[1:]]) == ref([MESSAGES, MESSAGES[1:]])
    prefill = [*MESSAGES, {"role": "assistant", "content": "The quick"}]  # continued, not answered anew
    assert tok.apply_chat_template(prefill, tokenize=False, continue_final_message=True) == \
        hf_tok.apply_chat_template(prefill, tokenize=False, continue_final_message=True)
    assert ours(prefill) == ref(prefill)
    reply = ours(MESSAGES)[0]["generated_text"]
    assert reply[:-1] == MESSAGES and reply[-1]["role"] == "assistant"


def test_feature_extraction_and_auto_model(folders):
    path, hf, hf_tok = folders["llama"]
    base = lt.AutoModel.from_pretrained(path, exact=True)
    ids = hf_tok(TEXTS[0], return_tensors="pt").input_ids
    torch.testing.assert_close(base(ids).last_hidden_state, hf.model(ids).last_hidden_state, atol=1e-4, rtol=1e-4)
    features = lt.pipeline("feature-extraction", model=str(path), exact=True)(TEXTS[0])
    torch.testing.assert_close(torch.tensor(features), hf.model(ids).last_hidden_state, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- what is refused, and how


def test_unsupported_calls_give_one_error_naming_the_argument(qwen2, folders, tmp_path):
    model, tok, _, _ = qwen2
    path = folders["qwen2"][0]
    ids = tok(TEXTS[0], return_tensors="pt").input_ids
    cases = [
        (lambda: lt.pipeline("summarization", model=model), "task"),
        (lambda: model.generate(ids, num_beams=2), "num_beams"),
        (lambda: model.generate(ids, min_new_tokens=3), "min_new_tokens"),
        (lambda: model.generate(ids, num_return_sequences=2), "num_return_sequences"),
        (lambda: model.generate(ids, past_key_values=object()), "past_key_values"),
        (lambda: model(ids, past_key_values=object()), "past_key_values"),
        (lambda: lt.AutoModelForCausalLM.from_pretrained(path, load_in_8bit=True), "load_in_8bit"),
        (lambda: lt.AutoModelForCausalLM.from_pretrained(path, device_map={"model": 0}), "device_map"),
        (lambda: lt.AutoModelForCausalLM.from_pretrained(path, attn_implementation="flash_attention_2"),
         "attn_implementation"),
        (lambda: lt.AutoTokenizer.from_pretrained(path, legacy=False), "legacy"),
        (lambda: tok(TEXTS, return_tensors="tf"), "return_tensors"),
        (lambda: tok.apply_chat_template(MESSAGES, return_assistant_tokens_mask=True), "return_assistant_tokens_mask"),
        (lambda: lt.pipeline("text-generation", model=model)(TEXTS[0], num_beams=3), "num_beams"),
    ]
    for call, name in cases:
        with pytest.raises(UnsupportedArgumentError, match=f"'{name}'") as info:
            call()
        assert isinstance(info.value, LanternError) and info.value.argument == name
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(LanternError, match="nowhere.gguf"):
        lt.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="nowhere.gguf")
    with pytest.raises(LanternError, match="nowhere"):
        lt.AutoTokenizer.from_pretrained(str(missing))


# ---------------------------------------------------------------------- the tutorials on the default model

# The tutorials live in ../shared/seeds beside the repository; CI checks the repository out elsewhere, so the
# test data keeps a byte-for-byte copy of seed 004, used when the shared folder is not there.
SEED_FOLDERS = (Path(__file__).resolve().parents[2] / "shared" / "seeds", Path(__file__).parent / "data")


def seed_004_blocks() -> list[str]:
    """The fenced python blocks of seed 004 that are code, not pasted output (those follow a '输出结果' line)."""
    files = [f for folder in SEED_FOLDERS for f in sorted(folder.glob("004_*.txt"))]
    if not files:
        pytest.fail(f"seed 004 not found in {' or '.join(map(str, SEED_FOLDERS))}")
    text = files[0].read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"```python\n(.*?)```", text, re.S):
        before = text[:match.start()].rstrip().splitlines()[-1]
        if "输出结果" not in before:
            blocks.append(match.group(1))
    return blocks


# The seed's own mistakes, fixed the same way for both libraries: (old, new, why).
SEED_004_FIXES = [
    ("AutoTokenizer.fom_pretrained", "AutoTokenizer.from_pretrained", "typo in the seed"),
    ("print(iput_ids)", "print(input_ids)", "typo: the name is input_ids"),
    ("lm_header_output[0, -1]", "lm_head_output[0, -1]", "typo: the name is lm_head_output"),
    ("(embed_tokens): Embedding(32064, 3072, padding_idx=32000)", "", "pasted output inside a code block"),
]


def seed_004_program(library: str, folder: Path, gguf: str, exact: bool) -> list[str]:
    """The seed's blocks with the import line and model id swapped (and the exact path asked for when
    `exact`, the only change to the code itself)."""
    model_id = f'"{folder}", gguf_file="{gguf}"' + (", exact=True" if exact else "")
    tokenizer_id = f'"{folder}", gguf_file="{gguf}"'
    program = []
    for block in seed_004_blocks():
        for old, new, _why in SEED_004_FIXES:
            block = block.replace(old, new)
        block = block.replace("from transformers import", f"from {library} import")
        block = block.replace('AutoTokenizer.from_pretrained("microsoft/Phi-3-mini-4k-instruct")',
                              f"AutoTokenizer.from_pretrained({tokenizer_id})")
        block = block.replace('"microsoft/Phi-3-mini-4k-instruct"', model_id)
        program.append(block)
    return program


def run_blocks(blocks: list[str]) -> tuple[dict, list[str]]:
    """Run the blocks in one namespace; return it and what each block printed."""
    namespace: dict = {}
    printed = []
    for block in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), torch.no_grad():
            exec(compile(block, "<seed 004>", "exec"), namespace)
        printed.append(out.getvalue())
    return namespace, printed


@pytest.fixture(scope="module")
def seed_004_transformers(default_gguf):
    return run_blocks(seed_004_program("transformers", default_gguf.parent, default_gguf.name, exact=False))


def test_seed_004_runs_on_lantern_and_prints_what_transformers_prints(seed_004_transformers, default_gguf):
    # warnings, load, pipeline, the email, print(model), model.model, embed_tokens, tokens -> model.model,
    # lm_head -> argmax -> decode
    assert len(seed_004_blocks()) == 9
    ref, ref_printed = seed_004_transformers
    ours, printed = run_blocks(seed_004_program("lanternlm.transformers", default_gguf.parent, default_gguf.name,
                                                exact=True))
    assert printed[3] == ref_printed[3]                                  # the pipeline's greedy email
    assert ours["output"] == ref["output"]
    assert printed[4] == ref_printed[4]                                  # print(model): the same tree
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    torch.testing.assert_close(ours["model_output"][0], ref["model_output"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours["lm_head_output"], ref["lm_head_output"], atol=1e-4, rtol=1e-4)
    assert int(ours["token_id"]) == int(ref["token_id"])
    assert printed[7].splitlines()[0] == ref_printed[7].splitlines()[0]       # the prompt's token ids
    assert printed[8].splitlines()[-1] == ref_printed[8].splitlines()[-1] == " Paris"


def test_seed_004_fast_path_is_sensible_and_equals_lantern_llm(seed_004_transformers, default_gguf):
    ours, printed = run_blocks(seed_004_program("lanternlm.transformers", default_gguf.parent, default_gguf.name,
                                                exact=False))
    ref_printed = seed_004_transformers[1]
    assert printed[4] == ref_printed[4]  # the readable tree, whatever runs underneath
    running = {type(m).__name__ for m in ours["model"].llm.model.modules()}
    assert running & {"QuantLinear", "Int8Linear"}  # the fast path really runs underneath
    assert printed[8].splitlines()[-1] == " Paris"
    llm = ours["model"].llm
    email = "Write an email apologizing to Sarah for the tragic gardening mishap. Explain how it happened."
    expected = llm.generate(email, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True,
                                                  stop_token_ids=(llm.tokenizer.eos_token_id,)))
    assert ours["output"][0]["generated_text"] == expected.text
    assert printed[3] == expected.text + "\n"
    assert len(expected.text.split()) > 10 and "Sarah" in expected.text


def test_seed_003_steps_on_the_default_model(default_gguf):
    """Seed 003's walk-through in its order: load, chat template, tokenize, generate, slice and decode, the
    hand-written softmax/multinomial loop, print(model), state_dict (exact path: readable weights)."""
    device = "cpu"
    model = lt.AutoModelForCausalLM.from_pretrained(default_gguf, torch_dtype=torch.float32, exact=True).to(
        device)
    tokenizer = lt.AutoTokenizer.from_pretrained(default_gguf, use_fast=False, trust_remote_code=True)
    llm = model.llm
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Tell me about yourself."}]
    input_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert input_text == llm.apply_chat_template(messages)
    model_inputs = tokenizer([input_text], return_tensors="pt").to(device)
    assert model_inputs.input_ids.tolist() == [llm.encode_chat(messages)]
    assert model_inputs.attention_mask.tolist() == [[1] * model_inputs.input_ids.shape[1]]

    response_ids = model.generate(model_inputs.input_ids, max_new_tokens=32)
    expected = llm.generate(model_inputs.input_ids[0].tolist(), SamplingParams(temperature=0, max_tokens=32))
    assert response_ids[0].tolist() == model_inputs.input_ids[0].tolist() + expected.token_ids
    response_ids = [output_ids[len(input_ids):] for input_ids, output_ids in zip(model_inputs.input_ids,
                                                                                  response_ids)]
    response_text = tokenizer.batch_decode(response_ids, skip_special_tokens=True)[0]
    assert response_text == expected.text and len(response_text.split()) > 5

    def generate_next_token(model, generate_ids, temperature=0.7):
        logits = model.forward(generate_ids).logits
        if temperature > 0:
            probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
            next_token = torch.multinomial(probs[-1], num_samples=1)
        else:
            next_token = torch.argmax(logits[:, -1], dim=-1)
        return next_token.reshape(-1, 1)

    generate_ids = model_inputs.input_ids
    for _ in range(6):  # greedy: the loop continues exactly as generate did
        generate_ids = torch.cat((generate_ids, generate_next_token(model, generate_ids, temperature=0)), dim=1)
    assert generate_ids[0, model_inputs.input_ids.shape[1]:].tolist() == expected.token_ids[:6]
    torch.manual_seed(0)
    sampled = generate_next_token(model, generate_ids)
    assert sampled.shape == (1, 1) and 0 <= int(sampled) < model.config.vocab_size

    assert str(model).startswith("LlamaForCausalLM(\n  (model): LlamaModel(")
    assert "(0-29): 30 x LlamaDecoderLayer(" in str(model)
    params = model.state_dict()
    assert params["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)


def test_look_inside_views_take_the_facade_objects(qwen2):
    model, tok, _, _ = qwen2
    inputs = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=6)
    trace = lt.explain(model, MESSAGES, max_new_tokens=6)
    assert trace["token_ids"] == generated[0, inputs["input_ids"].shape[1]:].tolist()
    lens = lt.logit_lens(model, inputs["input_ids"])
    assert len(lens["depths"]) == model.config.num_hidden_layers + 1
    # The lens's last depth is the model's own prediction: the first token generate chose.
    assert lens["final_token"]["id"] == trace["token_ids"][0]
    pipe = lt.pipeline("text-generation", model=model, tokenizer=tok)
    assert lt.describe(pipe)["architecture"] == "Qwen2ForCausalLM"


def test_default_model_loads_by_catalogue_name_and_generates_greedily_by_default():
    model = lt.AutoModelForCausalLM.from_pretrained("smollm2-135m-instruct")
    tok = lt.AutoTokenizer.from_pretrained("smollm2-135m-instruct")
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt")
    ids = model.generate(**inputs)  # transformers' defaults: greedy, 20 new tokens; not the catalogue's sampling
    # Lantern's own API on the same loaded model, greedy by request (its catalogue default would sample).
    expected = model.llm.generate(inputs["input_ids"][0].tolist(), SamplingParams(temperature=0, max_tokens=20))
    assert ids[0, inputs["input_ids"].shape[1]:].tolist() == expected.token_ids
    assert "Paris" in tok.decode(ids[0], skip_special_tokens=True)
    # transformers' defaults reach Lantern as greedy, not as Lantern's own (the catalogue's temperature 0.2).
    assert model.llm.generation_config.get("temperature") == 0.2
    assert sampling_params(model.generation_config, 20).temperature == 0.0


def test_auto_model_on_the_default_encoder_equals_transformers():
    from lanternlm.store import resolve

    folder = resolve("all-minilm-l6-v2")
    model, tok = lt.AutoModel.from_pretrained("all-minilm-l6-v2"), lt.AutoTokenizer.from_pretrained("all-minilm-l6-v2")
    hf, hf_tok = transformers.AutoModel.from_pretrained(folder).eval(), transformers.AutoTokenizer.from_pretrained(folder)
    texts = ["Hello world", "A longer sentence about a tragic gardening mishap."]
    ours, ref = tok(texts, padding=True, return_tensors="pt"), hf_tok(texts, padding=True, return_tensors="pt")
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == ref["attention_mask"].tolist()
    out, expected = model(**ours), hf(**ref)
    real = ours["attention_mask"].bool()
    torch.testing.assert_close(out.last_hidden_state[real], expected.last_hidden_state[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.pooler_output, expected.pooler_output, atol=1e-4, rtol=1e-4)
    assert model.num_parameters() == hf.num_parameters()
    features = lt.pipeline("feature-extraction", model=model, tokenizer=tok)(texts[0], return_tensors=True)
    torch.testing.assert_close(features, expected.last_hidden_state[:1, :real[0].sum()], atol=1e-4, rtol=1e-4)
