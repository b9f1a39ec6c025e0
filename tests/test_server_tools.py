"""Tools, structured output and thinking end to end, through `lantern serve` and real clients.

- The default model (SmolLM2-135M, whose template knows no tools: Lantern's generic fallback), driven by the
  openai client's `parse`, LangChain's `with_structured_output` and `bind_tools`, and raw requests: every
  required call is valid, streamed equals whole, bad schemas and tools are 400s naming the field.
- Tiny random models with real chat templates (Qwen2.5, Qwen3, Llama 3.1, Mistral Nemo, Mistral Small 3.2):
  the tokens a grammar forces through the engine come back out of each family's parser as exactly the call
  that was forced, streamed and whole; a conversation with calls and results renders.
- Thinking (Qwen3's template, the DeepSeek-R1 distills'): a budget of N tokens gives reasoning of at most N
  tokens, then the answer; streamed equals whole; chat_template_kwargs reach the template.

The tiny models' tokenizer is byte-level BPE trained on the templates' (ASCII) text only, so that every token a
random model picks decodes to whole characters and a token-level check can compare texts exactly.
"""

from __future__ import annotations

import json
import queue

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from serving import KEY, Server

# ----------------------------------------------------------------------------------------------- shared helpers

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40, "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone.",
    "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "maxLength": 40, "description": "An IANA zone, e.g. Europe/Paris"}},
        "required": ["zone"]}}}
TOOLS = [WEATHER, TIME]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
# A tool whose parameters admit one call only: whatever a random model prefers, the grammar writes this call.
PARIS = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"const": "Paris"}}, "required": ["city"],
                   "additionalProperties": False}}}
PARIS_CALL = ("get_weather", {"city": "Paris"})
NAMED = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def history(arguments='{"city": "Paris"}') -> list[dict]:
    """A finished tool round: the question, the assistant's call (null content) and the tool's result."""
    return ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc123", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_abc123", "content": "Sunny, 21C"}]


def assemble(deltas: list[dict]) -> list[dict]:
    """Streamed tool-call deltas joined by index: id, type and name from the first, arguments concatenated."""
    calls: dict[int, dict] = {}
    for d in deltas:
        function = d.get("function") or {}
        if d["index"] not in calls:
            assert d.get("id") and d.get("type") == "function" and function.get("name"), d
            assert function.get("arguments") == "", d  # OpenAI's shape: the name first, the arguments after
            calls[d["index"]] = {"id": d["id"], "name": function["name"], "arguments": ""}
        else:
            assert not d.get("id") and not function.get("name"), d  # later deltas carry only arguments
            calls[d["index"]]["arguments"] += function.get("arguments") or ""
    assert sorted(calls) == list(range(len(calls)))
    return [calls[i] for i in sorted(calls)]


def pairs(calls: list[dict]) -> list[tuple[str, dict]]:
    """(name, parsed arguments) of calls, streamed (flat) or whole (OpenAI's {"function": {...}})."""
    out = []
    for call in calls:
        function = call.get("function", call)
        out.append((function["name"], json.loads(function["arguments"])))
    return out


def post(server: Server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=120)


def stream_chunks(server: Server, body: dict) -> list[dict]:
    """The chunks of a streamed chat request, as JSON."""
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def streamed_choice(chunks: list[dict], index: int = 0) -> dict:
    """One choice of a stream put together: content, reasoning, tool-call deltas and the finish reason."""
    out = {"content": "", "reasoning_content": "", "reasoning": "", "tool_calls": [], "finish_reasons": []}
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice["index"] != index:
                continue
            delta = choice["delta"]
            for key in ("content", "reasoning_content", "reasoning"):
                out[key] += delta.get(key) or ""
            assert ("reasoning_content" in delta) == ("reasoning" in delta), delta  # both names, always together
            out["tool_calls"] += delta.get("tool_calls") or []
            if choice["finish_reason"]:
                out["finish_reasons"].append(choice["finish_reason"])
    return out


def assert_openai_error(r: httpx.Response, param: str, mentions: str | None = None) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error" and error["message"], error
    assert error["param"] == param, error
    if mentions:
        assert mentions in error["message"], error


# ============================================================================ 1. the default model, end to end

class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population: int = Field(ge=0, le=100_000_000)


def get_weather(city: str, unit: str = "celsius") -> str:
    """The current weather in a city.

    Args:
        city: The city, e.g. Paris.
        unit: celsius or fahrenheit.
    """
    return json.dumps({"city": city, "temperature": 21 if unit == "celsius" else 70, "sky": "sunny"})


ASK_CITY = [{"role": "system", "content": "You answer in JSON."},
            {"role": "user", "content": "Tell me about Paris, the capital of France."}]
CALL_PROMPTS = ["What is the weather in Paris?", "What time is it in Tokyo?", "Should I take an umbrella in London?"]


@pytest.fixture(scope="module")
def smol(default_gguf):
    s = Server(str(default_gguf), "--api-key", KEY, "--max-batch", "8", name="smollm2")
    yield s
    assert s.stop() == 0


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=7)], ids=["greedy", "sampled"])
def test_openai_parse_returns_the_pydantic_object(smol, sampling):
    r = smol.client().chat.completions.parse(model="smollm2", messages=ASK_CITY, response_format=City,
                                             max_tokens=200, **sampling)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City), choice.message
    assert City.model_validate_json(choice.message.content) == choice.message.parsed


def langchain_model(server: Server, **kw):
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(base_url=f"{server.url}/v1", api_key=KEY, model="smollm2", temperature=0,
                                       max_retries=0, timeout=120, **{"max_tokens": 200, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(smol, method):
    structured = langchain_model(smol).with_structured_output(City, method=method)
    city = structured.invoke("Tell me about Paris, the capital of France, in JSON.")
    assert isinstance(city, City), city


@pytest.mark.slow
def test_langchain_bind_tools_round_trip(smol):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    chat = langchain_model(smol, max_tokens=120)
    messages = [HumanMessage("What is the weather in Paris?")]
    # "any" is OpenAI's "required"; one call, complete within max_tokens.
    first = chat.bind_tools([get_weather], tool_choice="any", parallel_tool_calls=False).invoke(messages)
    assert isinstance(first, AIMessage) and len(first.tool_calls) == 1, first
    assert first.response_metadata["finish_reason"] == "tool_calls" and not first.invalid_tool_calls
    messages.append(first)
    for call in first.tool_calls:
        assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str), call
        messages.append(ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"]))
    second = chat.bind_tools([get_weather]).invoke(messages)  # auto: free to answer or call again
    assert isinstance(second, AIMessage) and isinstance(second.content, str)
    assert second.content or second.tool_calls


@pytest.mark.slow
def test_required_calls_are_always_valid(smol):
    c = smol.client()
    for k, prompt in enumerate(CALL_PROMPTS):
        r = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}], tools=TOOLS,
                                      tool_choice="required", temperature=1.0, seed=100 + k, n=3, max_tokens=300)
        assert len(r.choices) == 3
        for choice in r.choices:
            assert choice.finish_reason == "tool_calls", choice
            assert choice.message.tool_calls and choice.message.content is None, choice.message
            for call in choice.message.tool_calls:
                assert call.type == "function" and call.id.startswith("call_")
                assert call.function.name in PARAMETERS, call
                jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


STREAM_CASES = {
    "required": dict(messages=ASK, tools=TOOLS, tool_choice="required"),
    "auto": dict(messages=ASK, tools=TOOLS),
    "named": dict(messages=[{"role": "user", "content": "And the time in Tokyo?"}], tools=TOOLS,
                  tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False),
    "json_schema": dict(messages=ASK_CITY, response_format={"type": "json_schema", "json_schema": {
        "name": "city", "schema": {**City.model_json_schema(), "additionalProperties": False}}}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_greedy_stream_equals_the_whole_answer(smol, case):
    body = {"model": "smollm2", "temperature": 0, "max_tokens": 200, **STREAM_CASES[case]}
    whole = post(smol, body)
    assert whole.status_code == 200, whole.text
    message = whole.json()["choices"][0]["message"]
    got = streamed_choice(stream_chunks(smol, body))
    assert got["finish_reasons"] == [whole.json()["choices"][0]["finish_reason"]]
    assert got["content"] == (message["content"] or "")
    assert pairs(assemble(got["tool_calls"])) == pairs(message.get("tool_calls") or [])
    if case in ("required", "named"):
        assert got["finish_reasons"] == ["tool_calls"] and message["tool_calls"]
    if case == "named":
        assert [name for name, _ in pairs(message["tool_calls"])] == ["get_time"]
    if case == "json_schema":
        assert got["finish_reasons"] == ["stop"]
        City.model_validate_json(message["content"])


def _schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


_HUGE_SCHEMA = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 90}
                                                 for i in range(10_000)}}  # about 1 MB of JSON
BAD = {
    "invalid_schema": ({"response_format": _schema_format({"type": "foo"})}, "response_format", None),
    "unsupported_keyword": ({"response_format": _schema_format(
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True})}, "response_format", "uniqueItems"),
    "nameless_tool": ({"tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}]}, "tools",
                      None),
    "missing_tool_choice": ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                            "tool_choice", "nope"),
    "history_arguments_not_json": ({"messages": history(arguments="{city: Paris")}, "messages", None),
    "huge_schema": ({"response_format": _schema_format(_HUGE_SCHEMA)}, "response_format", None),
    "invalid_regex": ({"lantern": {"regex": "(unclosed"}}, "lantern", None),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_bad_tool_and_schema_requests_are_400s_naming_the_field(smol, case):
    extra, param, mentions = BAD[case]
    body = {"model": "smollm2", "messages": ASK, "max_tokens": 5, **extra}
    if case == "huge_schema":
        assert 1_000_000 <= len(json.dumps(body)) < 4 * 1024 * 1024  # over the schema limit, under the body limit
    assert_openai_error(post(smol, body), param, mentions)
    ok = smol.client().chat.completions.create(model="smollm2", messages=ASK, max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")


# ================================================================= 2. tiny random models with real templates

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
           "<|eom_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>", "<s>", "</s>", "[INST]",
           "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
           "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[ARGS]", "[CALL_ID]", "[TOOL_CONTENT]",
           "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
# Added but not special, as in Qwen's tokenizers: they stay in the decoded text.
PLAIN = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
# template name -> (bos, eos, tool-call family or None)
TINY = {
    "Qwen-Qwen2.5-7B-Instruct": (None, "<|im_end|>", "hermes"),
    "Qwen-Qwen3-0.6B": (None, "<|im_end|>", "hermes"),
    "meta-llama-Llama-3.1-8B-Instruct": ("<|begin_of_text|>", "<|eot_id|>", "llama3"),
    "mistralai-Mistral-Nemo-Instruct-2407": ("<s>", "</s>", "mistral"),
    "Mistral-Small-3.2-24B-Instruct-2506": ("<s>", "</s>", "mistral_args"),
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", None),
    # llama.cpp's copy adds an enable_thinking switch, off unless given.
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", None),
}
TOOL_TEMPLATES = [name for name, (_, _, family) in TINY.items() if family]
QWEN3, MISTRAL_SMALL = "Qwen-Qwen3-0.6B", "Mistral-Small-3.2-24B-Instruct-2506"
R1, R1_SWITCH = "deepseek-ai-DeepSeek-R1-Distill-Llama-8B", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict[str, str]:
    """One tiny random Qwen2 model per template, sharing a tokenizer that has every template's tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llama_cpp_data import template
    from tiny_models import make_hf_model

    sources = {name: template(name) for name in TINY}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # No initial byte alphabet: the vocabulary holds only the ASCII the corpus shows (the templates' only other
    # characters are inside special tokens), so any token sequence decodes to whole characters.
    # Every printable ASCII character too: a template computes text of its own (Mistral Small 3.2's system
    # prompt has today's date, whose digits the templates' text may lack: "7" failed on 2026-12-07).
    corpus = [s.encode("ascii", "ignore").decode() for s in sources.values()] * 3 + [
        json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}), "Sunny, 21C",
        "What is the weather in Paris? What is the capital of France? The quick brown fox.",
        "".join(map(chr, range(32, 127))) + "\n\t"] * 10
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1500, special_tokens=SPECIAL,
                                                        show_progress=False))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN])
    root = tmp_path_factory.mktemp("tiny-templates")
    folders = {}
    for k, (name, (bos, eos, _)) in enumerate(TINY.items()):
        path = root / name
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<|endoftext|>",
                                       pad_token="<|endoftext|>", chat_template=sources[name])
        eos_id = tok.token_to_id(eos)
        model = make_hf_model("qwen2", seed=k, vocab_size=tok.get_vocab_size(), max_position_embeddings=2048,
                              bos_token_id=tok.token_to_id(bos) if bos else None, eos_token_id=eos_id)
        model.generation_config.eos_token_id = eos_id
        model.save_pretrained(path)
        fast.save_pretrained(path)
        folders[name] = str(path)
    return folders


@pytest.fixture(scope="module")
def tiny_llms(tiny_folders):
    from lanternlm import LLM
    return {name: LLM(folder) for name, folder in tiny_folders.items()}


def options(**kw):
    from lanternlm.generation.chat_plan import ChatOptions
    return ChatOptions(**kw)


def run_engine(llm, plan, params_list) -> list[list]:
    """The steps of each request, all decoded together by one Engine (as the server runs them)."""
    from lanternlm.engine import Engine

    engine = Engine(llm.model, llm.tokenizer, context=llm.context, max_batch=len(params_list)).start()
    events: queue.Queue = queue.Queue()
    try:
        for i, params in enumerate(params_list):
            engine.submit(plan.prompt_ids, plan.sampling(params).with_defaults(llm.generation_config),
                          lambda event, i=i: events.put((i, event)), guide=plan.guide)
        steps: list[list] = [[] for _ in params_list]
        running = len(params_list)
        while running:
            i, event = events.get(timeout=120)
            assert event.error is None, event.error
            steps[i].append(event.step)
            running -= bool(event.step.finish_reason)
    finally:
        engine.shutdown()
    return steps


def read_back(plan, steps) -> tuple[dict, str, list[dict], str]:
    """(whole message, whole finish reason, streamed items, streamed finish reason) of one request's steps."""
    reader = plan.reader()
    items = []
    for step in steps:
        items += reader.push(step.text) + (reader.finish() if step.finish_reason else [])
    message, reason = plan.message("".join(step.text for step in steps), steps[-1].finish_reason)
    return message, reason, items, reader.finish_reason(steps[-1].finish_reason)


def sampling_runs(max_tokens: int = 200):
    from lanternlm import SamplingParams
    return [SamplingParams(temperature=0, max_tokens=max_tokens)] + [
        SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens) for seed in range(4)]


@pytest.mark.parametrize("name", TOOL_TEMPLATES)
def test_each_template_renders_and_is_read_as_its_family(tiny_llms, name):
    llm = tiny_llms[name]
    plan = llm.plan_chat(ASK, options(tools=[PARIS], tool_choice=NAMED))
    assert plan.tool_format.name == TINY[name][2] and plan.tool_format.native
    assert "get_weather" in plan.prompt_text  # the template itself listed the tool
    assert llm.tokenizer.decode(plan.prompt_ids, skip_special_tokens=False) == plan.prompt_text
    # Mistral's trigger is a control token: the output is decoded with it, or no call could be read.
    assert plan.keep_special_tokens == name.lower().startswith("mistral")


@pytest.mark.parametrize("name", TOOL_TEMPLATES)
def test_a_forced_call_comes_back_as_exactly_that_call(tiny_llms, name):
    llm = tiny_llms[name]
    # Qwen3 may think first (the grammar waits for the thought); a small budget keeps that short.
    plan = llm.plan_chat(ASK, options(tools=[PARIS, TIME], tool_choice=NAMED, parallel_tool_calls=False,
                                      thinking_token_budget=4 if name == QWEN3 else None))
    for steps in run_engine(llm, plan, sampling_runs()):
        message, reason, items, streamed_reason = read_back(plan, steps)
        assert reason == streamed_reason == "tool_calls", message
        assert pairs(message["tool_calls"]) == [PARIS_CALL] and message["content"] is None, message
        streamed = assemble([item["tool_call"] for item in items if "tool_call" in item])
        assert [(c["name"], c["arguments"]) for c in streamed] == [  # ids: each reader draws its own
            (c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
        assert not any(item.get("content") for item in items)  # nothing of the call's text leaks into content
        call_id = message["tool_calls"][0]["id"]
        if TINY[name][2].startswith("mistral"):
            assert len(call_id) == 9 and call_id.isalnum()
        else:
            assert call_id.startswith("call_")


@pytest.mark.parametrize("name", TOOL_TEMPLATES)
def test_required_parallel_calls_are_each_valid(tiny_llms, name):
    from lanternlm.text.toolcalls.grammars import MAX_PARALLEL_CALLS

    llm = tiny_llms[name]
    plan = llm.plan_chat(ASK, options(tools=TOOLS, tool_choice="required",
                                      thinking_token_budget=4 if name == QWEN3 else None))
    finished = 0
    for steps in run_engine(llm, plan, sampling_runs(400)[1:]):
        message, reason, items, _ = read_back(plan, steps)
        if steps[-1].finish_reason == "length":  # a random model may pad each call's JSON to the limit
            continue
        finished += 1
        assert reason == "tool_calls" and 1 <= len(message["tool_calls"]) <= MAX_PARALLEL_CALLS, message
        for call_name, arguments in pairs(message["tool_calls"]):
            jsonschema.validate(arguments, PARAMETERS[call_name])
    assert finished >= 2


@pytest.mark.parametrize("name", TOOL_TEMPLATES)
def test_a_tool_round_renders_with_each_template(tiny_llms, name):
    plan = tiny_llms[name].plan_chat(history(), options(tools=[PARIS]))
    assert "Sunny, 21C" in plan.prompt_text and "Paris" in plan.prompt_text
    assert plan.tool_format.name == TINY[name][2]


# Served over HTTP: Qwen3 (hermes calls, thinking the model opens itself), Mistral Small 3.2 (control-token markers,
# kept in the decoded output and out of the content) and a DeepSeek-R1 distill (thinking opened by the prompt).
HTTP_TOOL_TEMPLATES = [QWEN3, MISTRAL_SMALL]


@pytest.fixture(scope="module")
def tiny_server(tiny_folders):
    """tiny_server(template name): a server for that template's tiny model, started on first use."""
    started: dict[str, Server] = {}

    def get(name: str) -> Server:
        if name not in started:
            started[name] = Server(tiny_folders[name], "--api-key", KEY, "--max-batch", "4", name="tiny")
        return started[name]

    yield get
    for server in started.values():
        assert server.stop() == 0


@pytest.mark.parametrize("name", HTTP_TOOL_TEMPLATES)
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=3)], ids=["greedy", "sampled"])
def test_a_forced_call_over_http_streamed_and_whole(tiny_server, name, sampling):
    server = tiny_server(name)
    body = {"model": "tiny", "messages": ASK, "tools": [PARIS, TIME], "tool_choice": NAMED,
            "parallel_tool_calls": False, "max_tokens": 200, "thinking_token_budget": 4, **sampling}
    whole = post(server, body)
    assert whole.status_code == 200, whole.text
    choice = whole.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None and pairs(choice["message"]["tool_calls"]) == [PARIS_CALL]
    got = streamed_choice(stream_chunks(server, body))
    assert got["finish_reasons"] == ["tool_calls"] and got["content"] == ""
    assert pairs(assemble(got["tool_calls"])) == [PARIS_CALL]
    assert got["reasoning_content"] == (choice["message"].get("reasoning_content") or "")


@pytest.mark.parametrize("name", HTTP_TOOL_TEMPLATES)
def test_a_call_the_model_starts_itself_is_completed_by_the_grammar(tiny_server, tiny_llms, name):
    # tool_choice "auto": free text until the model writes the trigger (pushed here by logit_bias), then the
    # call's grammar holds until the call is complete; one call only, so the answer ends there.
    trigger = tiny_llms[name].plan_chat(ASK, options(tools=[PARIS])).tool_format.trigger
    trigger_id = tiny_llms[name].tokenizer.token_to_id(trigger)
    server = tiny_server(name)
    body = {"model": "tiny", "messages": ASK, "tools": [PARIS], "parallel_tool_calls": False, "max_tokens": 200,
            "temperature": 0, "logit_bias": {str(trigger_id): 100}}
    whole = post(server, body)
    assert whole.status_code == 200, whole.text
    choice = whole.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] is None and pairs(choice["message"]["tool_calls"]) == [PARIS_CALL]
    got = streamed_choice(stream_chunks(server, body))
    assert got["finish_reasons"] == ["tool_calls"] and got["content"] == ""
    assert pairs(assemble(got["tool_calls"])) == [PARIS_CALL]


@pytest.mark.parametrize("name", HTTP_TOOL_TEMPLATES)
def test_a_tool_round_over_http(tiny_server, name):
    r = tiny_server(name).client().chat.completions.create(model="tiny", messages=history(), tools=[PARIS],
                                                           max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ============================================================================================ 3. thinking

CLOSE = "\n</think>\n\n"  # what the budget forces


def check_thinking(server: Server, body: dict, thought_from: int, budget: int) -> dict:
    """Whole and streamed, the answer to `body` (greedy or seeded, with logprobs) when the thought, which
    starts at token `thought_from`, is cut by `budget`: reasoning_content is the text of those `budget` tokens,
    the forced close follows, then the content; streamed deltas join to the same."""
    r = post(server, body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    message = choice["message"]
    # Token by token: the tiny vocabulary decodes each token to whole ASCII characters, and the answer's text
    # leaves out special tokens (logprobs name them).
    tokens = ["" if entry["token"] in SPECIAL else entry["token"] for entry in choice["logprobs"]["content"]]
    assert len(tokens) == r.json()["usage"]["completion_tokens"]
    end = thought_from + budget
    after = "".join(tokens[end:])
    assert after.startswith(CLOSE), tokens  # the close tag came right after `budget` tokens of thought
    thought = "".join(tokens[thought_from:end]).strip()
    assert message.get("reasoning_content", "") == thought
    assert message.get("reasoning") == message.get("reasoning_content")
    assert message["content"] == after[len(CLOSE):].lstrip()

    got = streamed_choice(stream_chunks(server, body))
    assert got["reasoning_content"] == got["reasoning"] == message.get("reasoning_content", "")
    assert got["content"] == message["content"]
    assert got["finish_reasons"] == [choice["finish_reason"]]
    return message


@pytest.mark.parametrize("budget", [0, 1, 6])
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=11)], ids=["greedy", "sampled"])
def test_a_thought_the_prompt_opens_is_cut_at_the_budget(tiny_server, tiny_llms, budget, sampling):
    assert tiny_llms[R1].plan_chat(ASK).thinking_inside  # DeepSeek-R1's generation prompt opens the thought
    body = {"model": "tiny", "messages": ASK, "thinking_token_budget": budget, "max_tokens": budget + 16,
            "logprobs": True, **sampling}
    message = check_thinking(tiny_server(R1), body, 0, budget)
    assert "<think>" not in message["content"] and "</think>" not in message["content"]


@pytest.mark.parametrize("budget", [0, 3])
def test_a_thought_the_model_opens_is_cut_at_the_budget(tiny_server, tiny_llms, budget):
    # Qwen3's prompt leaves the choice to the model; a random one opens a thought only when pushed to.
    think = tiny_llms[QWEN3].tokenizer.token_to_id("<think>")
    body = {"model": "tiny", "messages": ASK, "thinking_token_budget": budget, "max_tokens": budget + 8,
            "logprobs": True, "temperature": 0, "logit_bias": {str(think): 100}}
    message = check_thinking(tiny_server(QWEN3), body, 1, budget)
    assert message.get("reasoning_content", "") == "<think>" * budget  # the bias picks it inside the thought too


def test_enable_thinking_reaches_the_template(tiny_llms, tiny_server):
    llm = tiny_llms[QWEN3]
    on = llm.plan_chat(ASK)
    off = llm.plan_chat(ASK, options(chat_template_kwargs={"enable_thinking": False}))
    assert on.prompt_text.endswith("<|im_start|>assistant\n")
    assert off.prompt_text == on.prompt_text + "<think>\n\n</think>\n\n"  # an empty thought, closed
    assert not off.thinking_inside
    # Over HTTP: the prompt the server counted is the one the template rendered with the switch.
    for kwargs, plan in ((None, on), ({"enable_thinking": False}, off)):
        body = {"model": "tiny", "messages": ASK, "max_tokens": 2}
        if kwargs:
            body["chat_template_kwargs"] = kwargs
        r = post(tiny_server(QWEN3), body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(plan.prompt_ids)


def test_the_r1_distill_switch_reaches_the_template(tiny_llms):
    llm = tiny_llms[R1_SWITCH]
    off = llm.plan_chat(ASK)
    on = llm.plan_chat(ASK, options(chat_template_kwargs={"enable_thinking": True}))
    assert off.prompt_text.endswith("<think>\n</think>") and not off.thinking_inside
    assert on.prompt_text.endswith("<think>\n") and on.thinking_inside
