"""Tool calls without a model: family detection on real chat templates (llama.cpp's copies), validation errors,
conversations rendered natively and through Lantern's fallback, reading calls back (whole and streamed, for
every split of the text), and the grammar a call must match, walked with the default model's tokenizer."""

from __future__ import annotations

import itertools
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lanternlm.generation.grammar import GrammarCompiler
from lanternlm.loader.gguf import read_gguf
from lanternlm.text.chat import ChatTemplate
from lanternlm.text.constraint import GrammarError, GrammarSpec
from lanternlm.text.tokenizer import Tokenizer
from lanternlm.text.toolcalls import (
    GENERIC,
    MAX_TOOLS,
    ToolCallStream,
    ToolError,
    ToolFormat,
    call_grammar,
    detect_format,
    parse_tool_calls,
    prepare_messages,
    validate_tool_choice,
    validate_tools,
)
from lanternlm.text.toolcalls.messages import RESULTS_PROMPT

HERMES = ToolFormat("hermes", True, "<tool_call>")
LLAMA3 = ToolFormat("llama3", True, '{"name": "')
MISTRAL = ToolFormat("mistral", True, "[TOOL_CALLS]")
MISTRAL_ARGS = ToolFormat("mistral_args", True, "[TOOL_CALLS]")
FORMATS = [HERMES, LLAMA3, MISTRAL, MISTRAL_ARGS, GENERIC]

# The family of every template llama.cpp 11434 ships; all the others are generic (they ignore `tools`, or write
# calls in a format Lantern does not read: XML parameters, pythonic calls, their own special tokens, ...).
FAMILIES = {
    "Bielik-11B-v3.0-Instruct": "hermes", "MiMo-VL": "hermes", "Reka-Edge": "hermes",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": "hermes", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": "hermes",
    "Qwen-QwQ-32B": "hermes", "Qwen-Qwen2.5-7B-Instruct": "hermes", "Qwen-Qwen3-0.6B": "hermes",
    "ibm-granite-granite-4.0": "hermes", "ibm-granite-granite-4.1": "hermes",
    "meta-llama-Llama-3.1-8B-Instruct": "llama3", "meta-llama-Llama-3.2-3B-Instruct": "llama3",
    "meta-llama-Llama-3.3-70B-Instruct": "llama3",
    "mistralai-Mistral-Nemo-Instruct-2407": "mistral",
    "Mistral-Small-3.2-24B-Instruct-2506": "mistral_args", "unsloth-mistral-Devstral-Small-2507": "mistral_args",
    "mistralai-Ministral-3-14B-Reasoning-2512": "mistral_args",
}
NO_SYSTEM_ROLE = {"google-gemma-2-2b-it", "CohereForAI-c4ai-command-r-plus-tool_use",
                  "fireworks-ai-llama-3-firefunction-v2"}
# Templates made only for requests with tools (they iterate `tools`/`functions` unconditionally): unusable
# through the fallback, which renders without `tools`.
TOOLS_ONLY = {"CohereForAI-c4ai-command-r-plus-tool_use", "fireworks-ai-llama-3-firefunction-v2"}
# Mistral's templates refuse a user turn right after tool results (roles must alternate, skipping tool turns).
USER_AFTER_TOOL_REFUSED = {name for name, family in FAMILIES.items() if family.startswith("mistral")}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}},
]
CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "Asia/Tokyo"})]
CALLING = {"role": "assistant", "content": None, "tool_calls": [
    {"id": f"call_{k}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    for k, (name, arguments) in enumerate(CALLS)]}
RESULTS = [{"role": "tool", "tool_call_id": "call_0", "content": "Sunny, 21C"},
           {"role": "tool", "tool_call_id": "call_1", "content": "09:30"}]
SYSTEM = {"role": "system", "content": "You are helpful."}
ASK = {"role": "user", "content": "Weather in Paris and the time in Tokyo?"}
THANKS = {"role": "user", "content": "Thanks! And tomorrow?"}
ANSWER = {"role": "assistant", "content": "Sunny in Paris; 09:30 in Tokyo."}
EXPECTED_TEXT = ["get_weather", "Paris", "get_time", "Asia/Tokyo", "Sunny, 21C", "09:30", "Thanks!"]


def template(name: str) -> str:
    from llama_cpp_data import template as llama_cpp_template  # downloads llama.cpp's templates once, or skips
    return llama_cpp_template(name)


def template_names() -> list[str]:
    from llama_cpp_data import template_names as names
    return names()


@pytest.fixture(scope="module")
def smollm2_template(default_gguf) -> str:
    with read_gguf(default_gguf) as gguf:
        return gguf.metadata["tokenizer.chat_template"]


def render(source: str, messages: list[dict], fmt: ToolFormat, tools=TOOLS, generation_prompt=True) -> str:
    prepared, template_tools = prepare_messages(messages, validate_tools(tools) if tools else None, fmt)
    return ChatTemplate(source, bos_token="<s>", eos_token="</s>").render(
        prepared, add_generation_prompt=generation_prompt, tools=template_tools)


def assistant_turn(source: str, fmt: ToolFormat, message: dict) -> str:
    """The text a template writes for `message` answering one question (its own header and end marker included)."""
    before = render(source, [ASK], fmt, generation_prompt=False)
    after = render(source, [ASK, message], fmt, generation_prompt=False)
    return after[len(os.path.commonprefix([before, after])):]


def call_pairs(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


# ------------------------------------------------------------------------------------------------ detection

def test_every_llama_cpp_template_is_detected_as_its_family():
    found = {name: detect_format(template(name)) for name in template_names()}
    assert len(found) > 60
    assert {name: fmt.name for name, fmt in found.items() if fmt.name != "generic"} == FAMILIES
    for name, fmt in found.items():
        assert fmt.native == (fmt.name != "generic"), name
        assert fmt.system_role == (name not in NO_SYSTEM_ROLE), name


def test_triggers_are_the_text_each_family_starts_a_call_with():
    assert detect_format(template("Qwen-Qwen3-0.6B")) == HERMES
    assert detect_format(template("meta-llama-Llama-3.1-8B-Instruct")) == LLAMA3
    assert detect_format(template("mistralai-Mistral-Nemo-Instruct-2407")) == MISTRAL
    assert detect_format(template("Mistral-Small-3.2-24B-Instruct-2506")) == MISTRAL_ARGS


@pytest.mark.parametrize("source", [None, "", "   ", "{% for %}", "{{ raise_exception('no') }}"])
def test_no_template_or_a_broken_one_is_generic(source):
    assert detect_format(source).name == "generic"


def test_the_default_models_template_is_generic(smollm2_template):
    assert detect_format(smollm2_template) == GENERIC


def test_a_template_that_renders_tools_in_an_unknown_format_falls_back():
    source = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% for c in m.tool_calls or [] %}"
              "CALL {{ c.function.name }} {{ c.function.arguments | tojson }}\n{% endfor %}{% endfor %}"
              "{% if tools %}TOOLS {{ tools | tojson }}{% endif %}")
    assert detect_format(source) == GENERIC


# ----------------------------------------------------------------------------------------------- validation

def test_tools_are_normalised():
    tools = validate_tools([{"type": "function", "function": {"name": "ping"}}] + TOOLS)
    assert tools[0] == {"type": "function", "function": {"name": "ping",
                                                         "parameters": {"type": "object", "properties": {}}}}
    assert tools[1] == TOOLS[0]
    assert validate_tools([]) == []


@pytest.mark.parametrize("tools, where", [
    ({"type": "function"}, "tools must be a list"),
    ([{"function": {"name": "a"}}], "tools[0] must be an object with type \"function\""),
    ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}],
     "tools[1].function.name 'a' is given twice"),
    ([{"type": "function", "function": {"name": "a", "parameters": {"type": "array"}}}],
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "a", "parameters": {"type": "object", "properties": 3}}}],
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "a", "description": 5}}], "tools[0].function.description"),
    ([{"type": "function", "function": {"name": f"f{k}"}} for k in range(MAX_TOOLS + 1)], "at most 128"),
])
def test_invalid_tools_name_the_field(tools, where):
    with pytest.raises(ToolError) as raised:
        validate_tools(tools)
    assert raised.value.param == "tools"
    assert where in str(raised.value)


def test_tool_choice():
    tools = validate_tools(TOOLS)
    assert validate_tool_choice(None, tools) == "auto"
    assert validate_tool_choice(None, []) == "none"
    assert validate_tool_choice("required", tools) == "required"
    assert validate_tool_choice({"type": "function", "function": {"name": "get_time"}}, tools) == "get_time"
    for choice, message in [({"type": "function", "function": {"name": "get_news"}}, "'get_news'"),
                            ("sometimes", "tool_choice must be"), ({"type": "function"}, "tool_choice must be")]:
        with pytest.raises(ToolError, match=message) as raised:
            validate_tool_choice(choice, tools)
        assert raised.value.param == "tool_choice"
    with pytest.raises(ToolError, match="no tools") as raised:
        validate_tool_choice("required", [])
    assert raised.value.param == "tool_choice"


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]", '"text"', 7])
@pytest.mark.parametrize("fmt", FORMATS)
def test_history_arguments_must_be_a_json_object(fmt, arguments):
    bad = {"role": "assistant", "tool_calls": [CALLING["tool_calls"][0],
                                               {"id": "x", "function": {"name": "f", "arguments": arguments}}]}
    with pytest.raises(ToolError, match=r"messages\[1\]\.tool_calls\[1\]\.function\.arguments") as raised:
        prepare_messages([ASK, bad], None, fmt)
    assert raised.value.param == "messages"


# ------------------------------------------------------------------------------------ rendering conversations

@pytest.mark.parametrize("name", sorted(FAMILIES) + ["google-gemma-2-2b-it", "HuggingFaceTB-SmolLM3-3B",
                                                     "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"])
def test_a_tool_conversation_renders_with_real_templates(name):
    source = template(name)
    fmt = detect_format(source)
    system = [SYSTEM] if fmt.system_role else []
    shapes = [system + [ASK, CALLING, *RESULTS, ANSWER, THANKS]]  # calls, results, an answer, a new question
    if name not in USER_AFTER_TOOL_REFUSED:
        shapes.append(system + [ASK, CALLING, *RESULTS, THANKS])  # a question right after the results
    for messages in shapes:
        text = render(source, messages, fmt)
        for expected in EXPECTED_TEXT + ["Current weather in a city"]:
            assert expected in text, (name, expected)
        if not fmt.native:
            assert 'arguments": {"city": "Paris"}' in text and "<tool_response>" in text


# Hermes' tool_use templates iterate `tools` unconditionally: they only render requests that have tools.
HERMES_TOOL_USE = {"NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use"}


@pytest.mark.parametrize("name", sorted(set(FAMILIES) - HERMES_TOOL_USE) + ["google-gemma-2-2b-it"])
def test_calls_in_history_render_without_tools_too(name):
    """tool_choice "none" (or a request without tools) after calls: the history still renders."""
    fmt = detect_format(template(name))
    text = render(template(name), [ASK, CALLING, *RESULTS, ANSWER, THANKS], fmt, tools=None)
    assert all(expected in text for expected in EXPECTED_TEXT)


def test_the_fallback_with_the_default_models_template(smollm2_template):
    text = render(smollm2_template, [SYSTEM, ASK, CALLING, *RESULTS, THANKS], GENERIC)
    system, rest = text.split("<|im_end|>", 1)
    assert system.startswith("<|im_start|>system\nYou are helpful.\n\n# Tools")
    assert '{"name": "get_weather", "description": "Current weather in a city", "parameters": ' in system
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}\n</tool_call>'
            '<|im_end|>') in rest
    assert ('<|im_start|>user\n<tool_response>\n{"name": "get_weather", "content": "Sunny, 21C"}\n</tool_response>\n'
            '<tool_response>\n{"name": "get_time", "content": "09:30"}\n</tool_response>\n\nThanks! And tomorrow?'
            '<|im_end|>') in rest
    # No system message given: the tools become one (replacing the template's default system prompt).
    assert render(smollm2_template, [ASK], GENERIC).startswith("<|im_start|>system\n# Tools\n")


def test_the_fallback_without_a_system_role_opens_the_first_user_message():
    fmt = detect_format(template("google-gemma-2-2b-it"))
    text = render(template("google-gemma-2-2b-it"), [ASK, CALLING, *RESULTS, THANKS], fmt)
    assert text.startswith("<s><start_of_turn>user\n# Tools\n")
    assert text.count("<start_of_turn>user") == 2 and text.count("<start_of_turn>model") == 2


def test_a_json_tool_result_is_shown_as_json():
    messages, _ = prepare_messages([ASK, CALLING, {"role": "tool", "tool_call_id": "call_1",
                                                   "content": [{"type": "text", "text": '{"t": "09:30"}'}]}],
                                   None, GENERIC)
    assert messages[-1] == {"role": "user", "content":
                            '<tool_response>\n{"name": "get_time", "content": {"t": "09:30"}}\n</tool_response>'
                            "\n\n" + RESULTS_PROMPT}


def test_native_messages_get_object_arguments_and_text_content():
    messages, tools = prepare_messages([ASK, CALLING, *RESULTS], validate_tools(TOOLS), HERMES)
    assert messages[1]["content"] == "" and messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert tools[1]["function"]["description"] == ""  # Hermes' template concatenates it
    assert CALLING["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # the caller's data is untouched


def test_llama3_gets_one_call_per_assistant_message():
    messages, _ = prepare_messages([ASK, CALLING, *RESULTS], None, LLAMA3)
    assert [len(m.get("tool_calls", [])) for m in messages] == [0, 1, 1, 0, 0]


@pytest.mark.parametrize("fmt", [MISTRAL, MISTRAL_ARGS])
def test_mistral_ids_are_nine_alphanumerics_matched_between_call_and_result(fmt):
    results = [dict(RESULTS[1]), {k: v for k, v in RESULTS[0].items() if k != "tool_call_id"}]
    calling = {**CALLING, "tool_calls": CALLING["tool_calls"] + [
        {"id": "abcDEF123", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}
    messages, _ = prepare_messages([ASK, calling, *results, {"role": "tool", "tool_call_id": "abcDEF123",
                                                             "content": "x"}], None, fmt)
    ids = [c["id"] for c in messages[1]["tool_calls"]]
    assert all(len(i) == 9 and i.isalnum() for i in ids) and len(set(ids)) == 3 and ids[2] == "abcDEF123"
    assert [m["tool_call_id"] for m in messages[2:]] == [ids[1], ids[0], ids[2]]  # a missing id: the next call
    again, _ = prepare_messages([ASK, calling], None, fmt)
    assert [c["id"] for c in again[1]["tool_calls"]] == ids  # stable: the same prompt for the same conversation


# ------------------------------------------------------------------------------ reading calls back from text

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_calls_a_template_writes_read_back(name):
    """The assistant turn as each native template writes it, parsed with its family's format, gives the calls."""
    fmt = detect_format(template(name))
    turn = assistant_turn(template(name), fmt, CALLING)
    content, calls = parse_tool_calls(fmt, turn)
    assert call_pairs(calls) == CALLS, turn
    assert fmt.trigger not in content and "get_weather" not in content


@pytest.mark.parametrize("fmt, text, content, calls", [
    (HERMES, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
             '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}\n</tool_call>',
     "Let me check.", CALLS),
    (HERMES, '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}', "", CALLS[:1]),  # no closing tag
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>',
     "", CALLS[:1]),  # arguments given as a JSON string
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', None, []),  # cut short: text
    (HERMES, 'Use <tool_call> tags.', None, []),
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool', "", CALLS[:1]),
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call> Done.',
     "Done.", CALLS[:1]),
    (HERMES, '<tool_call>\n["get_weather"]\n</tool_call>', None, []),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", CALLS[:1]),
    (LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', "", CALLS[:1]),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}\n{"name": "get_time", "arguments": '
             '{"zone": "Asia/Tokyo"}}', "", CALLS),
    (LLAMA3, 'As JSON: {"name": "Alice", "age": 30}', None, []),
    (MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}, '
              '{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}]', "", CALLS),
    (MISTRAL, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}', None, []),
    (MISTRAL_ARGS, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[CALL_ID]abcDEF123[ARGS]'
                   '{"zone": "Asia/Tokyo"}', "", CALLS),
    (MISTRAL_ARGS, '[TOOL_CALLS]get weather[ARGS]{}', None, []),
    (GENERIC, 'Sure.\n\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}\n</tool_call>\n',
     "Sure.", CALLS[1:]),
])
def test_parse_tool_calls(fmt, text, content, calls):
    got_content, got_calls = parse_tool_calls(fmt, text)
    assert got_content == (text if content is None else content)
    assert call_pairs(got_calls) == calls
    for call in got_calls:
        assert call["type"] == "function" and json.loads(call["function"]["arguments"]) is not None
        assert call["function"]["arguments"] == json.dumps(json.loads(call["function"]["arguments"]),
                                                           separators=(",", ":"), ensure_ascii=False)
        if fmt.name.startswith("mistral"):
            assert len(call["id"]) == 9 and call["id"].isalnum()
        else:
            assert call["id"].startswith("call_") and len(call["id"]) == 29 and call["id"][5:].isalnum()


def test_mistral_keeps_the_id_the_model_wrote():
    _, calls = parse_tool_calls(MISTRAL, '[TOOL_CALLS][{"name": "f", "arguments": {}, "id": "abcDEF123"}]')
    assert calls[0]["id"] == "abcDEF123"


def streamed(fmt: ToolFormat, pieces: list[str]) -> tuple[str, list[dict], list[dict]]:
    stream = ToolCallStream(fmt)
    items = [item for piece in pieces for item in stream.push(piece)] + stream.finish()
    return "".join(i["content"] for i in items if "content" in i), stream.calls, items


def assert_stream_matches(fmt: ToolFormat, text: str, pieces: list[str]) -> None:
    content, calls = parse_tool_calls(fmt, text)
    got_content, got_calls, items = streamed(fmt, pieces)
    assert (got_content, call_pairs(got_calls)) == (content, call_pairs(calls)), pieces
    deltas = [i["tool_call"] for i in items if "tool_call" in i]
    for index, call in enumerate(got_calls):  # the deltas of each call add up to the call
        own = [d for d in deltas if d["index"] == index]
        assert own[0]["id"] == call["id"] and own[0]["function"]["name"] == call["function"]["name"]
        assert "".join(d["function"]["arguments"] for d in own) == call["function"]["arguments"]


STREAM_TEXTS = [
    (HERMES, 'Hi <tool_call>\n{"name": "f", "arguments": {"a": "}"}}\n</tool_call>\n<tool_call>{"name": "g"}'),
    (HERMES, 'a <tool_c> b <tool_call>{"x": 1}</tool_call> \n'),
    (LLAMA3, '<|python_tag|>{"name": "f", "parameters": {"q": "\\"{"}} {"name"'),
    (MISTRAL, 'ok [TOOL_CALLS][{"name": "f", "arguments": {}}] [TOOL'),
    (MISTRAL_ARGS, '[TOOL_CALLS]f[CALL_ID]abcDEF123[ARGS]{"a": [1]}[TOOL_CALLS]g[AR'),
]


@pytest.mark.parametrize("fmt, text", STREAM_TEXTS)
def test_streaming_equals_parsing_for_every_split_in_two_or_three(fmt, text):
    for cuts in itertools.chain(itertools.combinations(range(1, len(text)), 1),
                                itertools.combinations(range(1, len(text), 3), 2)):
        bounds = (0, *cuts, len(text))
        assert_stream_matches(fmt, text, [text[a:b] for a, b in itertools.pairwise(bounds)])


_PARTS = st.sampled_from(["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<|python_tag|>",
                          '{"name": "f", "arguments": {"a": 1}}', '{"name": "g", "parameters": {}}',
                          '[{"name": "h", "arguments": {"b": "x"}}]', "get_x", "abcDEF123", "\n", " ", "{", "}",
                          "[", "]", '"', "\\", "text", "<tool", '{"name"'])


@settings(max_examples=300, deadline=None)
@given(fmt=st.sampled_from(FORMATS), parts=st.lists(_PARTS, max_size=12), data=st.data())
def test_streaming_equals_parsing_for_any_split(fmt, parts, data):
    text = "".join(parts)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=8)))
    assert_stream_matches(fmt, text, [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])])


def test_streaming_holds_back_only_what_could_start_a_call():
    stream = ToolCallStream(HERMES)
    assert stream.push("Hello <tool") == [{"content": "Hello"}]
    assert stream.push("box> x") == [{"content": " <toolbox> x"}]
    assert stream.push(' <tool_call>\n{"name": "f", "arguments": {"a": ') == []
    items = stream.push('1}}\n</tool_call>')
    assert items[0] == {"tool_call": {"index": 0, "id": stream.calls[0]["id"], "type": "function",
                                      "function": {"name": "f", "arguments": ""}}}
    assert items[1] == {"tool_call": {"index": 0, "function": {"arguments": '{"a":1}'}}}
    assert stream.finish() == []


# --------------------------------------------------------------------------------------------------- grammars

@pytest.fixture(scope="module")
def tokenizer(default_gguf) -> Tokenizer:
    """The default model's tokenizer from its GGUF metadata, without loading the weights."""
    with read_gguf(default_gguf) as gguf:
        return Tokenizer.from_gguf_metadata(gguf.metadata, source=str(default_gguf))


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, tokenizer.backend.get_vocab_size())


def accepts(compiler, tokenizer, source: str, text: str, *, prefix_ids=()) -> bool:
    """The grammar takes the whole text and is then complete."""
    matcher = compiler.compile(GrammarSpec.lark(source)).matcher()
    return matcher.accept_many([*prefix_ids, *tokenizer.encode(text, add_special_tokens=False)]) and \
        matcher.accepting


def grammar(fmt, choice="required", parallel=True, after_trigger=False, trigger_id=None, tools=TOOLS):
    return call_grammar(fmt, validate_tools(tools), choice, parallel, after_trigger=after_trigger,
                        trigger_id=trigger_id)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("choice", ["auto", "required", "get_time"])
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("after_trigger", [True, False])
def test_every_call_grammar_compiles(compiler, fmt, choice, parallel, after_trigger):
    compiler.compile(GrammarSpec.lark(grammar(fmt, choice, parallel, after_trigger)))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_grammar_accepts_the_calls_each_template_writes(compiler, tokenizer, name):
    fmt = detect_format(template(name))
    turn = assistant_turn(template(name), fmt, {**CALLING, "tool_calls": CALLING["tool_calls"][:1]})
    call = turn[turn.index(fmt.trigger):]  # from the trigger to the end of the call as written
    end = {"hermes": "</tool_call>", "llama3": '"Paris"}}', "mistral": "}]", "mistral_args": '"Paris"}'}[fmt.name]
    call = call[:call.index(end) + len(end)]
    assert accepts(compiler, tokenizer, grammar(fmt, parallel=False), call), call
    assert accepts(compiler, tokenizer, grammar(fmt, "get_weather"), call), call
    assert accepts(compiler, tokenizer, grammar(fmt, after_trigger=True), call[len(fmt.trigger):]), call
    assert not accepts(compiler, tokenizer, grammar(fmt, "get_time"), call), call


GOOD = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]',
    "mistral_args": '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
}
GOOD["generic"] = GOOD["hermes"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_grammar_rejects_wrong_calls(compiler, tokenizer, fmt):
    good, source = GOOD[fmt.name], grammar(fmt)
    assert accepts(compiler, tokenizer, source, good)
    assert accepts(compiler, tokenizer, source, good.replace('"Paris"', '"Paris", "days": 3'))
    for bad in [good.replace('"Paris"', "3"),                          # wrong argument type
                good.replace('"Paris"', '"Paris", "days": "3"'),
                good.replace('{"city": "Paris"}', "{}"),                # a required argument missing
                good.replace("get_weather", "get_news"),                # an unknown function
                "Sure! " + good]:                                       # required: the answer is the call
        assert not accepts(compiler, tokenizer, source, bad), bad


@pytest.mark.parametrize("fmt", FORMATS)
def test_parallel_calls(compiler, tokenizer, fmt):
    second = GOOD[fmt.name].replace("get_weather", "get_time").replace('"city": "Paris"', '"zone": "UTC"')
    if fmt.name == "mistral":
        two = GOOD["mistral"][:-1] + ", " + second[len("[TOOL_CALLS]["):]
    else:
        two = GOOD[fmt.name] + {"mistral_args": ""}.get(fmt.name, "\n") + second
    assert accepts(compiler, tokenizer, grammar(fmt, parallel=True), two)
    assert not accepts(compiler, tokenizer, grammar(fmt, parallel=False), two)
    assert call_pairs(parse_tool_calls(fmt, two)[1]) == [("get_weather", {"city": "Paris"}),
                                                        ("get_time", {"zone": "UTC"})]


def test_a_trigger_token_id_is_the_token_itself(compiler, tokenizer):
    special = tokenizer.token_to_id("<|im_start|>")  # stands for a vocabulary's own <tool_call> token here
    source = grammar(HERMES, trigger_id=special)
    assert f"<[{special}]>" in source
    rest = GOOD["hermes"][len("<tool_call>"):]
    assert accepts(compiler, tokenizer, source, rest, prefix_ids=[special])
    assert not accepts(compiler, tokenizer, source, GOOD["hermes"])


def test_whitespace_between_parts_is_fixed(compiler, tokenizer):
    source = grammar(HERMES)
    assert not accepts(compiler, tokenizer, source, GOOD["hermes"].replace("\n{", "\n\n{"))
    assert not accepts(compiler, tokenizer, source, GOOD["hermes"] + "\n\n" + GOOD["hermes"])


def test_a_schema_llguidance_cannot_enforce_fails_to_compile_not_open(compiler):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}]
    with pytest.raises(GrammarError, match="uniqueItems"):
        compiler.compile(GrammarSpec.lark(grammar(HERMES, tools=tools)))
