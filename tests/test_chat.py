"""Chat templates: Lantern's rendering must equal transformers' apply_chat_template(tokenize=False), and
untrusted templates must be contained (sandbox, bounded work) with clear errors."""

import copy
from datetime import datetime

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from lanternlm.errors import LanternError, TemplateError
from lanternlm.text.chat import (
    LIMITS,
    MAX_INT_BITS,
    MAX_TEXT_CHARS,
    ChatTemplate,
    RenderLimitError,
    no_template_error,
    validate_messages,
)

# --- Real-world templates (as published with the models; Lantern must render them exactly like transformers).

# SmolLM2-135M-Instruct (ChatML with a default system prompt); the GGUF test below checks it is the real one.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Gemma 2: refuses a system message and non-alternating roles with raise_exception.
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Gemma 3: folds a system message into the first user turn; content may be a list of parts.
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# Exercises the remaining features real templates use (Qwen3 / SmolLM3 / Command-R style): namespace,
# break/continue, dict(), {% generation %}, reasoning fields, documents, extra context, tojson options.
FEATURES = """{%- set ns = namespace(last_user=-1, count=0) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- if documents %}<docs>{% for d in documents %}[{{ loop.index }}] {{ d.title }}: {{ d.text }}
{% endfor %}</docs>
{% endif %}
{%- if tools %}<tools>{{ tools | tojson(indent=2, sort_keys=true) }}|{{ tools | tojson(ensure_ascii=true) }}</tools>
{% endif %}
{%- for m in messages %}
  {%- if m.role == 'skip' %}{% continue %}{% endif %}
  {%- if m.role == 'stop' %}{% break %}{% endif %}
  {%- set ns.count = ns.count + 1 %}
  {%- set meta = dict(n=ns.count, role=m.role) %}
<{{ meta.role }} n={{ meta.n }}{% if loop.index0 > ns.last_user %} after-last-user{% endif %}>
  {%- if m.role == 'assistant' %}{% generation %}
    {%- if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}|{{ m.thinking }}</think>{% endif %}
    {{- m.content }}{% endgeneration %}
  {%- else %}{{ m.content }}{% endif %}
  {%- if 'extra' in m %} extra={{ m.extra | tojson }}{% endif %}
</{{ m.role }}>
{%- endfor %}
{%- if add_generation_prompt %}
<assistant>{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}
{%- endif %}"""

SYSTEM = {"role": "system", "content": "You are terse. Réponds en français — «oui» & 'non' <b>bold</b>"}
CHAT = [
    {"role": "user", "content": 'Is 2 < 3 && "quoted" \'single\'? 日本語 😀 \\n literal'},
    {"role": "assistant", "content": "  Yes: 2 < 3 & <tag> ✓ {{ not jinja }} {% raw %}  \n"},
    {"role": "user", "content": 'Now as JSON: {"a": [1, 2], "b": "<&>"}\nThanks!'},
]
ONE_TURN = [{"role": "user", "content": "Bonjour, ça va ? <&>"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city <b> & \"quotes\"",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "e.g. Zürich or 東京"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,  # dropped, as transformers drops None-valued keys
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
    },
    {"role": "tool", "content": '{"temp_c": 21, "sky": "clear <sunny>"}'},
    {"role": "user", "content": "And is that warm?"},
]


def hf_render(template, messages, *, bos="<s>", eos="</s>", add_generation_prompt=True, **kwargs):
    """The reference: transformers' apply_chat_template on a tokenizer built offline from a tiny vocabulary."""
    vocab = {"<unk>": 0, bos: 1, eos: 2}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), bos_token=bos, eos_token=eos
    )
    tokenizer.chat_template = template
    return tokenizer.apply_chat_template(
        copy.deepcopy(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def assert_same(template, messages, *, bos="<s>", eos="</s>", add_generation_prompt=True, tools=None,
                documents=None, extra_context=None, same_message=True):
    """Lantern's output equals transformers', or both refuse; with ``same_message`` Lantern's error must carry
    the reference's message (true for messages written by the template via raise_exception)."""
    extra = dict(extra_context or {})
    try:
        expected = hf_render(template, messages, bos=bos, eos=eos, add_generation_prompt=add_generation_prompt,
                             tools=tools, documents=documents, **extra)
    except Exception as reference_error:  # the template itself refused the conversation
        with pytest.raises(TemplateError) as caught:
            ChatTemplate(template, bos_token=bos, eos_token=eos).render(
                messages, add_generation_prompt=add_generation_prompt, tools=tools, documents=documents,
                extra_context=extra_context)
        if same_message:
            assert str(reference_error) in str(caught.value)
        return None
    original = copy.deepcopy(messages)
    got = ChatTemplate(template, bos_token=bos, eos_token=eos).render(
        messages, add_generation_prompt=add_generation_prompt, tools=tools, documents=documents,
        extra_context=extra_context)
    assert got == expected
    assert messages == original  # rendering never modifies the caller's messages
    return got


TEMPLATES = {
    "smollm2": (SMOLLM2, "<|im_start|>", "<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "qwen2.5": (QWEN25, None, "<|im_end|>"),
    "gemma2": (GEMMA2, "<bos>", "<eos>"),
    "gemma3": (GEMMA3, "<bos>", "<eos>"),
    "mistral": (MISTRAL, "<s>", "</s>"),
    "features": (FEATURES, "<s>", "</s>"),
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", ["one_turn", "multi_turn", "with_system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(name, conversation, add_generation_prompt):
    template, bos, eos = TEMPLATES[name]
    messages = {"one_turn": ONE_TURN, "multi_turn": CHAT, "with_system": [SYSTEM, *CHAT]}[conversation]
    got = assert_same(template, messages, bos=bos or "<unused_bos>", eos=eos,
                      add_generation_prompt=add_generation_prompt)
    if got is not None:
        # Nothing is HTML-escaped and non-ASCII survives.
        assert "<&>" in got and "&amp;" not in got and "&lt;" not in got
        if conversation != "one_turn":
            assert "日本語 😀" in got and '"quoted"' in got and "'single'" in got


def test_gemma2_refuses_system_role_like_transformers():
    # raise_exception's message reaches the user as a TemplateError naming the template.
    with pytest.raises(TemplateError, match="System role not supported") as caught:
        ChatTemplate(GEMMA2, bos_token="<bos>", origin="gemma.gguf chat template").render([SYSTEM, *CHAT])
    assert "gemma.gguf chat template" in str(caught.value)
    with pytest.raises(Exception, match="System role not supported"):
        hf_render(GEMMA2, [SYSTEM, *CHAT])


@pytest.mark.parametrize("template", [GEMMA2, MISTRAL])
def test_non_alternating_roles_refused_like_transformers(template):
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert assert_same(template, messages) is None  # both raise, with the same message


def test_gemma3_content_parts():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "  What is this? <&>  "}]},
    ]
    assert "<start_of_image>" in assert_same(GEMMA3, messages, bos="<bos>", eos="<eos>")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_qwen_tools_and_tool_calls(add_generation_prompt):
    got = assert_same(QWEN25, TOOL_CHAT, eos="<|im_end|>", tools=TOOLS, add_generation_prompt=add_generation_prompt)
    assert '"description": "e.g. Zürich or 東京"' in got  # tojson keeps non-ASCII and does not escape <, &
    assert "<b> & \\\"quotes\\\"" in got
    assert_same(QWEN25, [SYSTEM, *TOOL_CHAT], eos="<|im_end|>", tools=TOOLS)


def test_llama3_date_and_tools():
    got = assert_same(LLAMA3, [SYSTEM, *CHAT], bos="<|begin_of_text|>", eos="<|eot_id|>")
    assert got.startswith("<|begin_of_text|>")
    today = datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {today}" in got  # strftime_now is the real clock
    # A date passed as extra context wins over strftime_now, as with transformers' keyword arguments.
    got = assert_same(LLAMA3, CHAT, bos="<|begin_of_text|>", extra_context={"date_string": "01 Jan 2030"})
    assert "Today Date: 01 Jan 2030" in got
    got = assert_same(LLAMA3, TOOL_CHAT, bos="<|begin_of_text|>", tools=TOOLS)
    assert '    "type": "function"' in got  # tojson(indent=4)
    assert_same(LLAMA3, TOOL_CHAT, tools=TOOLS, extra_context={"tools_in_user_message": False})


def test_features_template_with_documents_reasoning_and_extra_context():
    messages = [
        SYSTEM,
        {"role": "user", "content": "Q1", "extra": {"k": ["<v>", 1.5, None, True]}},
        {"role": "skip", "content": "not shown"},
        {"role": "assistant", "content": "A1", "reasoning_content": "because <x>"},
        {"role": "assistant", "content": "A1b", "reasoning": "old name"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2", "thinking": "t", "name": None},
        {"role": "stop", "content": "x"},
        {"role": "user", "content": "never rendered"},
    ]
    documents = [{"title": "Doc <1>", "text": "Text & more"}, {"title": "Zwei", "text": "Zürich"}]
    for add_generation_prompt in (True, False):
        for extra in (None, {"enable_thinking": False}, {"enable_thinking": True}):
            got = assert_same(FEATURES, messages, tools=TOOLS, documents=documents, extra_context=extra,
                              add_generation_prompt=add_generation_prompt)
            assert "never rendered" not in got and "not shown" not in got
    assert "<think>because <x>|because <x></think>" in got


# Jinja constructs touched by Lantern's compile-time guards (loops, ~, output) and common filters.
CONSTRUCTS = """{%- macro show(m, sep='|') -%}{{ m.role|upper ~ sep ~ m.content|trim }}{%- endmacro -%}
{%- macro wrap() -%}[{{ caller() }}]{%- endmacro -%}
{%- set tree = [{'name': 'a', 'kids': [{'name': 'b', 'kids': []}, {'name': 'c', 'kids': [{'name': 'd', 'kids': []}]}]}] -%}
{%- for node in tree recursive %}{{ node.name }}({{ loop(node.kids) }}){% endfor %}
{% for m in messages if m.role != 'system' %}{{ loop.index }}/{{ loop.length }}{{ ' last' if loop.last }} {{ loop.cycle('odd', 'even') }}: {{ show(m) }}
{% else %}no messages
{% endfor %}
{%- for x in [] %}never{% else %}empty-else{% endfor %}
{% call wrap() %}{{ messages|map(attribute='role')|join(', ') }}{% endcall %}
{% filter upper %}{{ messages[-1].content[:10] }} {{ messages|length }}{% endfilter %}
{%- set a, b = 1, 'two' %}
{% with c = a + 1 %}{{ a }}{{ b }}{{ c }}{% endwith %} {{ '%s-%03d'|format('x', 7) }} {{ '{}+{}'.format(1, 2) }}
{{ messages|selectattr('role', 'equalto', 'user')|map(attribute='content')|map('length')|list }}
{{ {'b': 2, 'a': 1}|dictsort }} {{ {'k': 'v'}|items|list }} {{ [3, 1, 3]|unique|list }} {{ [1, 2, 3]|reverse|list }}
{{ messages[0].content.split(' ')[:3] }} {{ 'a,b'.split(',')|first }}{{ undefined_thing|default('dflt') }}
{{ (1, 2) ~ none ~ true ~ 1.5 }} {{ 'yes' if messages[0] is mapping else 'no' }} {{ messages[0].role is string }}
{%- set out %}captured {{ a }}{% endset %} {{ out }} {{ 2 ** 10 }} {{ 7 // 2 }} {{ 7 % 3 }} {{ 'ab' * 3 }} {{ [1] + [2] }}
"""


@pytest.mark.parametrize("messages", [CHAT, [SYSTEM, *CHAT], ONE_TURN])
def test_jinja_constructs_match_transformers(messages):
    got = assert_same(CONSTRUCTS, messages)
    assert "a(b()c(d()))" in got and "empty-else" in got


def test_extra_context_overrides_special_tokens_like_transformers():
    assert_same("{{ bos_token }}|{{ eos_token }}|{{ messages[0].content }}", ONE_TURN,
                extra_context={"bos_token": "<B>"})


def test_real_smollm2_template_from_gguf(default_gguf):
    path = default_gguf
    from gguf import GGUFReader

    field = GGUFReader(path).fields["tokenizer.chat_template"]
    source = bytes(field.parts[field.data[0]]).decode("utf-8")
    assert source == SMOLLM2
    assert_same(source, [SYSTEM, *CHAT], bos="<|im_start|>", eos="<|im_end|>")


# --- Errors.


def test_syntax_error_names_origin_and_line():
    source = "{% for m in messages %}\n{{ m.content }}\n{% if %}\n{% endfor %}"
    with pytest.raises(TemplateError, match=r"^model\.gguf chat template, line 3: template syntax error"):
        ChatTemplate(source, origin="model.gguf chat template")
    with pytest.raises(TemplateError, match="line 2.*no_such_filter"):
        ChatTemplate("ok\n{{ x | no_such_filter }}")


@pytest.mark.parametrize("source, problem", [
    ("{% break %}", "'break' outside loop"),
    ("{% for x in [1] %}{% macro f() %}{% continue %}{% endmacro %}{% endfor %}", "'continue' not properly in loop"),
    ("{% if 1 %}" * 120 + "{% endif %}" * 120, "too many levels of indentation"),
])
def test_templates_jinja_compiles_to_invalid_python_are_template_errors(source, problem):
    # jinja compiles these to Python that Python's compiler rejects (SyntaxError); the first found by fuzz/.
    with pytest.raises(TemplateError, match=rf"^t: cannot compile the template: {problem}"):
        ChatTemplate(source, origin="t")


@pytest.mark.parametrize("source", [None, 42, "", "   \n"])
def test_bad_template_source(source):
    with pytest.raises(TemplateError, match="my template"):
        ChatTemplate(source, origin="my template")


def test_runtime_error_names_line():
    with pytest.raises(TemplateError, match=r"^t, line 3: .*'undefined_function' is undefined"):
        ChatTemplate("a\nb\n{{ undefined_function() }}", origin="t").render(ONE_TURN)
    with pytest.raises(TemplateError, match=r"line 2: ZeroDivisionError"):
        ChatTemplate("a\n{{ 1 // 0 }}", origin="t").render(ONE_TURN)


def test_no_template_error_message():
    error = no_template_error("/models/base.gguf")
    assert isinstance(error, TemplateError)
    text = str(error)
    assert "/models/base.gguf" in text and "completion" in text and "template" in text


@pytest.mark.parametrize(
    "messages, problem",
    [
        ("hello", "messages must be a list"),
        ({"role": "user", "content": "x"}, "messages must be a list"),
        ([], "empty"),
        (["hi"], r"messages\[0\] must be a dict"),
        ([{"content": "x"}], r"messages\[0\] has no 'role'"),
        ([{"role": "", "content": "x"}], r"messages\[0\]\['role'\] must be a non-empty string"),
        ([{"role": 3, "content": "x"}], r"messages\[0\]\['role'\]"),
        ([{"role": "user", "content": "x"}, {"role": "user"}], r"messages\[1\] \(role 'user'\) has no 'content'"),
        ([{"role": "user", "content": None}], r"messages\[0\] \(role 'user'\) has no 'content'"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\] must be a string or a list of content parts"),
        ([{"role": "user", "content": ["text"]}], r"messages\[0\]\['content'\]\[0\] must be a content part dict"),
        ([{"role": "user", "content": [{"text": "x"}]}], r"\[0\]\['content'\]\[0\] has no string 'type'"),
        ([{"role": "user", "content": [{"type": "text", "text": 1}]}], "text part but its 'text' is not a string"),
        ([{"role": "assistant", "tool_calls": "f()"}], r"\['tool_calls'\] must be a list"),
        ([{"role": "user", "content": "x", "meta": object()}], r"messages\[0\]\['meta'\]: a value of type object"),
    ],
)
def test_validate_messages_errors(messages, problem):
    with pytest.raises(LanternError, match=problem):
        validate_messages(messages)
    with pytest.raises(LanternError, match=problem):
        ChatTemplate(SMOLLM2).render(messages)


def test_validate_messages_returns_clean_copy():
    messages = [{"role": "user", "content": "x", "name": None},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]
    cleaned = validate_messages(messages)
    assert cleaned == [{"role": "user", "content": "x"}, messages[1]]
    assert cleaned[1] is not messages[1] and "name" in messages[0]


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"tools": {"name": "f"}}, "tools must be a list"),
        ({"tools": ["f"]}, r"tools\[0\] must be a dict"),
        ({"documents": [1]}, r"documents\[0\] must be a dict"),
        ({"extra_context": ["x"]}, "extra_context must be a dict"),
        ({"extra_context": {"messages": []}}, "may not set 'messages'"),
        ({"extra_context": {"not valid": 1}}, "not a valid template variable name"),
        ({"extra_context": {"x": {1, 2}}}, "type set"),
    ],
)
def test_render_argument_errors(kwargs, problem):
    with pytest.raises(LanternError, match=problem):
        ChatTemplate(SMOLLM2).render(ONE_TURN, **kwargs)


# --- Sandbox: templates are untrusted code from model files.


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ namespace.__init__ }}",
        "{{ dict.__class__ }}",
        "{{ messages.append({'role': 'x'}) }}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{% set ns = namespace(__class__=1) %}",
        "{% set ns = namespace() %}{% set ns._private = 1 %}",
        "{{ ''.format.__globals__ }}",
        "{{ '{0.__class__}'.format('') }}",
    ],
)
def test_sandbox_blocks_python_internals(source):
    # Either the template fails with a TemplateError (as transformers fails) or the unsafe access yields an
    # empty undefined value (as with transformers); never Python objects, never a mutation.
    messages = [{"role": "user", "content": "x"}]
    got = assert_same(source, messages, same_message=False)
    assert got is None or "<" not in got
    try:
        hf_render(source, messages)
    except Exception:
        return
    assert got == ""


@pytest.mark.parametrize(
    "source, limit",
    [
        ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "iterations"),
        ("{% set a = range(100000)|list %}{% for i in a %}{% for j in a %}{% for k in a %}{% endfor %}"
         "{% endfor %}{% endfor %}", "iterations"),
        ("{{ 'x' * 10**9 }}", "repeated value"),
        ("{{ [0] * 10**9 }}", "repeated value"),
        ("{{ 2 ** 1000000000 }}", "integer"),  # jinja's ** is left-associative
        ("{% set n = 7 ** 5000 %}{{ n * n * n * n * n }}", "integer"),  # 5 x 14,037 bits > MAX_INT_BITS
        ("{% set s = 'x' * 1000 %}{% for i in range(20) %}{% set s = s ~ s %}{% endfor %}"
         "{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}"
         "{{ d(s, 40) }}", "concatenation"),
        ("{% set ns = namespace(s='xx') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
         "concatenation"),
        ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}", "calls"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deeply"),
        ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "rendered prompt is longer"),
        ("{% macro m() %}{% for i in range(100000) %}{% for j in range(100) %}" + "z" * 100
         + "{% endfor %}{% endfor %}{% endmacro %}{% set x = m() %}", "emitted more than"),
        ("{% macro m() %}{% for i in range(100000) %}{% for j in range(10) %}{{ 'z' * 100 }}{% endfor %}"
         "{% endfor %}{% endmacro %}{% set x = m() %}", "emitted more than"),
        # Quadratic accumulation: each step copies the whole growing string or list.
        ("{% set ns = namespace(s='') %}{% for i in range(100000) %}{% set ns.s = ns.s ~ ('x' * 1000) %}"
         "{% endfor %}", "built more than"),
        ("{% set ns = namespace(s=[]) %}{% for i in range(100000) %}{% set ns.s = ns.s + [i] %}{% endfor %}",
         "built more than"),
        ("{{ '%999999999s' % 'x' }}", "formatted field"),
        ("{{ '{:>999999999}'.format('x') }}", "formatted field"),
        ("{{ 'x'|center(10**9) }}", "center"),
        ("{{ 'ab'.ljust(10**9) }}", "ljust"),
        ("{{ ('a' * 1000000)|replace('a', 'bbbbbbbbbbbb') }}", "replaced"),
        ("{{ range(100000)|join('x' * 1000) }}", "joined"),
        ("{{ ('\\n' * 100000)|indent(1000) }}", "indent"),
        ("{{ lipsum(10**7) }}", "lipsum"),
        ("{{ [[[[1]]]]|tojson(indent=10**8) }}", "tojson"),
        # Loops that rescan a huge value without building anything: stopped by counting what they read.
        ("{% set s = 'x' * 5000000 %}{% set t = 'x' * 5000000 %}{% for i in range(100000) %}{% if s == t %}{% endif %}"
         "{% endfor %}",
         "units of work"),
        ("{% set s = 'x' * 5000000 %}{% for i in range(100000) %}{% set t = s|upper %}{% endfor %}",
         "units of work"),
        ("{% set s = 'x' * 5000000 %}{% for i in range(100000) %}{% set n = s.count('y') %}{% endfor %}",
         "units of work"),
        ("{% set s = 'x' * 5000000 %}{% for i in range(100000) %}{% set t = s[1:] %}{% endfor %}",
         "units of work"),
        ("{% set s = ('x' * 1000000)|list %}{% for i in range(100000) %}{% if 'y' in s %}{% endif %}{% endfor %}",
         "units of work"),
        ("{% set n = 7 ** 10000 %}{% for i in range(100000) %}{% set m = n // 3 ** 9000 %}{% endfor %}",
         "units of work"),
        # Filters that spend microseconds per character or item are weighted accordingly.
        ("{{ ('a b ' * 1000000)|title|length }}", "units of work"),
        ("{{ ('a b ' * 1000000)|wordwrap(3)|length }}", "units of work"),
        ("{{ (('ab' * 1000000)|list)|groupby('x')|length }}", "units of work"),
        ("{{ (('ab' * 1000000)|list)|map('upper')|list|length }}", "units of work"),
        ("{{ ([1]|slice(10**7))|list|length }}", "slice"),
    ],
)
def test_runaway_templates_are_stopped(source, limit):
    # Behaviour, not time: the named limit stops the render, and the work counted when it stopped is within
    # every limit (the budget refuses the step that would cross one), so the outcome is the same on any machine.
    with pytest.raises(TemplateError, match=limit) as caught:
        ChatTemplate(source, origin="evil.gguf chat template").render(ONE_TURN)
    if limit in BUDGET_LIMITS:
        error = caught.value
        assert isinstance(error, RenderLimitError)
        assert error.limit == BUDGET_LIMITS[limit]
        assert set(error.counted) == set(LIMITS)
        assert all(error.counted[name] <= LIMITS[name] for name in LIMITS), error.counted
        if error.limit in LIMITS:  # a counter stopped it: the refused step would have taken it over its limit
            assert error.counted[error.limit] + error.requested > LIMITS[error.limit]
        else:  # a single value would have been too large: it was refused before being built
            assert error.requested > {"text_chars": MAX_TEXT_CHARS, "int_bits": MAX_INT_BITS}[error.limit]
    else:  # stopped before the budget: jinja's own range limit, or Python's recursion limit
        assert not isinstance(caught.value, RenderLimitError)


# The message fragment of each case above -> the limit RenderLimitError names.
BUDGET_LIMITS = {
    "iterations": "loop_iterations", "calls": "calls", "emitted more than": "output_chars",
    "built more than": "built_chars", "rendered prompt is longer": "text_chars", "repeated value": "text_chars",
    "integer": "int_bits", "concatenation": "text_chars", "formatted field": "text_chars", "center": "text_chars",
    "ljust": "text_chars", "replaced": "text_chars", "joined": "text_chars", "indent": "text_chars",
    "lipsum": "text_chars", "tojson": "text_chars", "units of work": "work", "slice": "text_chars",
}


def test_limits_leave_normal_work_alone():
    # Loops, joins and output of ordinary size render normally under the budget.
    source = ("{% for m in messages %}{{ m.content|replace('a', 'AA') }}{% endfor %}"
              "{{ range(1000)|join(',') }}{{ 'ab' * 100 }}{{ '%5s|%-4d' % ('x', 7) }}{{ '{:>6}'.format('r') }}")
    messages = [{"role": "user", "content": "banana " * 1000}] * 50
    assert_same(source, messages)
