"""Structured output end to end on the real default model (SmolLM2-135M-Instruct): every output that stops
matches its JSON schema (checked by jsonschema, formats included), regexes and Lark grammars match exactly,
invalid or unenforceable schemas are refused with the keyword at fault, and the grammar mask shows in traces.

The generation tests push 30+ schemas, greedy and sampled, through the serving engine in one batch (the same
`Chooser` as `LLM.chat`, so the batch is a fair test of the one token path, and faster than one sequence at a
time); a few of them are checked token for token against `LLM.chat`. The lower-level tests drive a `Guide`
directly with the model's tokenizer only (no forward): the forced thinking budget and the lazy trigger.
"""

from __future__ import annotations

import json
import queue
import re
from dataclasses import dataclass

import jsonschema
import pytest
import torch

from lanternlm.generation.grammar import GrammarCompiler
from lanternlm.generation.guide import GuideSpec, Thinking
from lanternlm.generation.sampling import SamplingParams
from lanternlm.loader.gguf import read_gguf
from lanternlm.text.constraint import MAX_SOURCE_BYTES, GrammarError, GrammarSpec
from lanternlm.text.tokenizer import Tokenizer

VOCAB = 49_152  # SmolLM2's vocabulary
MAX_TOKENS = 200  # generous: the grammar bounds whitespace, maxLength bounds free strings
SEED = 1234
STOP_FRACTION = 0.9  # at least this share of the batch's runs must finish on their own ("stop")

# Formats checked for real (jsonschema skips formats unless given a checker; these need no extra package).
FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER


# ----------------------------------------------------------------------------------------------- the schemas

def _obj(properties: dict, required: list[str] | None = None, **extra) -> dict:
    """An object schema; every property required unless `required` says otherwise; no extra properties."""
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required,
            "additionalProperties": False, **extra}


NAME = {"type": "string", "maxLength": 40}
TEXT = {"type": "string", "maxLength": 60}

# (id, prompt, schema): realistic extraction and classification requests, each exercising some keywords.
CASES: list[tuple[str, str, dict]] = [
    ("person", "Extract the person: Alice Smith is 34 years old and lives in Paris.",
     _obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 150}, "city": NAME})),
    ("nested_address", "Extract the contact: Bob Lee, 12 Baker Street, London, postcode 20500.",
     _obj({"name": NAME, "address": _obj({"street": TEXT, "city": NAME,
                                          "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})),
    ("tags_min_max", "Give 1 to 3 tags for this article: 'Scientists discover water on Mars.'",
     _obj({"tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3}})),
    ("sentiment_enum", "Classify the sentiment of this review: 'The food was cold and the waiter was rude.'",
     _obj({"sentiment": {"enum": ["positive", "negative", "neutral"]}})),
    ("anyof_scalar", "What is the answer to 'how many legs does a spider have'? Reply with a number or a word.",
     _obj({"answer": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 20}]}})),
    ("phone_pattern", "Extract the phone number: call me at 555-0199 after six.",
     _obj({"phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}})),
    ("date_format", "Extract the event: the product launch happens on March 14, 2025.",
     _obj({"event": TEXT, "date": {"type": "string", "format": "date"}})),
    ("email_format", "Extract the email address: write to jane.doe@example.com for details.",
     _obj({"email": {"type": "string", "format": "email", "maxLength": 60}})),
    ("exclusive_bounds", "Rate the movie 'Inception' from 0 to 10 (both excluded).",
     _obj({"movie": NAME, "rating": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}})),
    ("number_range", "Extract the temperature: it was 21.5 degrees Celsius in Rome today.",
     _obj({"city": NAME, "celsius": {"type": "number", "minimum": -60, "maximum": 60}})),
    ("optional_fields", "Extract the book: 'Dune' by Frank Herbert.",
     _obj({"title": NAME, "author": NAME, "year": {"type": "integer", "minimum": 1000, "maximum": 2100}},
          required=["title"])),
    ("no_extra_properties", "Extract the product: a red T-shirt, size M, costs 15 dollars.",
     _obj({"product": NAME, "color": NAME, "size": {"enum": ["S", "M", "L", "XL"]}})),
    ("defs_ref", "Extract the order: two apples and three pears.",
     {"$defs": {"item": _obj({"name": NAME, "quantity": {"type": "integer", "minimum": 1, "maximum": 100}})},
      **_obj({"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 4}})}),
    ("const", "Write a status report saying that the build passed.",
     _obj({"version": {"const": 2}, "kind": {"const": "report"}, "status": {"enum": ["passed", "failed"]}})),
    ("nullable", "Extract the person: John Smith (no middle name given).",
     _obj({"first_name": NAME, "middle_name": {"type": ["string", "null"], "maxLength": 40}, "last_name": NAME})),
    ("booleans", "Is this product in stock and on sale? 'Blue mug: available now, 20% off.'",
     _obj({"in_stock": {"type": "boolean"}, "on_sale": {"type": "boolean"}})),
    ("array_of_objects", "List the people: Ann is 31, Ben is 25.",
     _obj({"people": {"type": "array", "maxItems": 3,
                      "items": _obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}})}})),
    ("matrix", "Write the 2x2 identity matrix.",
     _obj({"matrix": {"type": "array", "minItems": 2, "maxItems": 2,
                      "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                "items": {"type": "integer", "minimum": -9, "maximum": 9}}}})),
    ("top_level_array", "List the first five prime numbers.",
     {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000}, "minItems": 3, "maxItems": 5}),
    ("top_level_enum", "What colour is the sky on a clear day? Answer red, green or blue.",
     {"enum": ["red", "green", "blue"]}),
    ("ipv4_format", "Extract the server address: the server answers at 192.168.1.20 on port 8080.",
     _obj({"ip": {"type": "string", "format": "ipv4"}, "port": {"type": "integer", "minimum": 1, "maximum": 65535}})),
    ("uuid_format", "Extract the id: request 123e4567-e89b-12d3-a456-426614174000 failed.",
     _obj({"request_id": {"type": "string", "format": "uuid"}})),
    # A $ref to a $ref, two levels deep. A self-referencing node is valid too, but nothing in a schema bounds
    # its depth, and this small model opens "children" inside "children" until max_tokens, greedy or not.
    ("ref_chain", "Write a tree with root 1 and children 2 and 3.",
     {"$defs": {"leaf": _obj({"value": {"type": "integer", "minimum": 0, "maximum": 99}}),
                "node": _obj({"value": {"type": "integer", "minimum": 0, "maximum": 99},
                              "children": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/leaf"}}})},
      "$ref": "#/$defs/node"}),
    ("prefix_items", "Give the name and population of the largest city in Japan.",
     _obj({"city": {"type": "array", "prefixItems": [NAME, {"type": "integer", "minimum": 0}],
                    "items": False, "minItems": 2}})),
    ("string_lengths", "Give the three-letter IATA code of the main airport of Paris.",
     _obj({"code": {"type": "string", "minLength": 3, "maxLength": 3, "pattern": "^[A-Z]+$"}})),
    ("anyof_objects", "Describe a circle of radius 2 as a shape.",
     _obj({"shape": {"anyOf": [_obj({"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0}}),
                               _obj({"kind": {"const": "square"}, "side": {"type": "number", "minimum": 0}})]}})),
    ("year_range", "When did the first person walk on the Moon?",
     _obj({"event": TEXT, "year": {"type": "integer", "minimum": 1900, "maximum": 2100}})),
    ("integer_enum", "Set the priority of 'server is down' (1 high, 3 low).",
     _obj({"task": TEXT, "priority": {"enum": [1, 2, 3]}})),
    ("type_list", "Extract the ticket id: ticket 4521 was closed.",
     _obj({"ticket": {"type": ["integer", "string"], "maxLength": 20}, "closed": {"type": "boolean"}})),
    ("three_levels", "Extract: Acme Corp's CEO is Dana White, email dana@acme.com.",
     _obj({"company": _obj({"name": NAME, "ceo": _obj({"name": NAME, "contact": _obj(
         {"email": {"type": "string", "format": "email", "maxLength": 60}})})})})),
    ("array_of_enums", "On which days is the shop open? 'Open Monday to Wednesday.'",
     _obj({"days": {"type": "array", "minItems": 1, "maxItems": 7,
                    "items": {"enum": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]}}})),
    ("exclusive_number", "Extract the price: the lamp costs 19.99 euros.",
     _obj({"item": NAME, "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 100000},
           "currency": {"enum": ["EUR", "USD", "GBP"]}})),
    ("map_of_integers", "Count the fruits: apple, apple, banana.",
     {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 100}}),
    ("ipv6_format", "Extract the IPv6 address: the host is reachable at 2001:db8::1.",
     _obj({"address": {"type": "string", "format": "ipv6"}})),
]

MESSAGES_SYSTEM = "You extract information and answer in JSON."


def _messages(prompt: str) -> list[dict]:
    return [{"role": "system", "content": MESSAGES_SYSTEM}, {"role": "user", "content": prompt}]


def _response_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}


def _check_valid(text: str, schema: dict) -> None:
    """The output parses and validates, formats included (date, email, ipv4, ipv6, uuid)."""
    jsonschema.validate(json.loads(text), schema, format_checker=FORMATS)


def test_schema_list_is_broad_and_valid():
    """The list covers at least 30 schemas, each valid under its metaschema (so a failure below is the output's
    fault, never the schema's)."""
    assert len(CASES) >= 30
    assert len({name for name, _, _ in CASES}) == len(CASES)
    for _, _, schema in CASES:
        jsonschema.Draft202012Validator.check_schema(schema)


# ----------------------------------------------------------------------------------------------- the model

@pytest.fixture(scope="module")
def llm(default_gguf):
    from lanternlm import LLM
    return LLM(str(default_gguf))


@dataclass
class Run:
    name: str
    schema: dict
    greedy: bool
    text: str
    token_ids: list[int]
    finish_reason: str | None


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS)


def _sampled() -> SamplingParams:
    return SamplingParams(temperature=0.8, seed=SEED, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def batch(llm) -> list[Run]:
    """Every schema twice (greedy and sampled at temperature 0.8 with a seed), all submitted to one engine
    with a GuideSpec each and run as one continuous batch."""
    from lanternlm.engine.engine import Engine
    from lanternlm.generation.chat_plan import ChatOptions

    jobs = []
    for name, prompt, schema in CASES:
        plan = llm.plan_chat(_messages(prompt), ChatOptions(response_format=_response_format(schema)))
        for greedy in (True, False):
            jobs.append((name, schema, greedy, plan))
    # A short context keeps the slotted KV cache small; prompts are < 150 tokens, outputs <= MAX_TOKENS.
    engine = Engine(llm.model, llm.tokenizer, context=512, max_batch=16, max_queue=len(jobs)).start()
    events: queue.Queue = queue.Queue()
    try:
        ids = {}
        for i, (name, schema, greedy, plan) in enumerate(jobs):
            params = (_greedy() if greedy else _sampled()).with_defaults(llm.generation_config)
            request = engine.submit(plan.prompt_ids, params, events.put, guide=plan.guide)
            ids[request] = i
        outputs = {i: ([], []) for i in range(len(jobs))}
        reasons: dict[int, str | None] = {}
        while len(reasons) < len(jobs):
            event = events.get(timeout=600)  # a bound for a wedged engine, not a timing assertion
            assert event.error is None, event.error
            i = ids[event.request_id]
            outputs[i][0].append(event.step.text)
            outputs[i][1].append(event.step.token_id)
            if event.step.finish_reason is not None:
                reasons[i] = event.step.finish_reason
    finally:
        engine.shutdown()
    return [Run(name, schema, greedy, "".join(outputs[i][0]), outputs[i][1], reasons[i])
            for i, (name, schema, greedy, _) in enumerate(jobs)]


@pytest.mark.slow
def test_every_stopped_output_matches_its_schema(batch):
    """Each run that finished on its own ("stop") parses as JSON and validates against its schema, formats
    included; and at least STOP_FRACTION of the runs do finish on their own within MAX_TOKENS (free strings are
    bounded by maxLength, whitespace by the grammar), so the check above is not vacuous."""
    stopped = [run for run in batch if run.finish_reason == "stop"]
    failures = []
    for run in stopped:
        try:
            _check_valid(run.text, run.schema)
        except (json.JSONDecodeError, jsonschema.ValidationError) as e:
            failures.append(f"{run.name} ({'greedy' if run.greedy else 'sampled'}): {run.text!r}: {e}")
    assert not failures, "\n".join(failures)
    cut = [(run.name, run.greedy) for run in batch if run.finish_reason != "stop"]
    assert len(stopped) >= STOP_FRACTION * len(batch), f"{len(stopped)}/{len(batch)} stopped; cut: {cut}"
    assert {run.finish_reason for run in batch} <= {"stop", "length"}


@pytest.mark.slow
@pytest.mark.parametrize("name, greedy", [("person", True), ("defs_ref", True), ("nullable", True),
                                          ("top_level_array", True), ("ipv4_format", False)])
def test_engine_equals_chat(llm, batch, name, greedy):
    """The engine (batched) and LLM.chat (one sequence) choose tokens through the same Chooser and grammar:
    greedy (and seeded sampling: one draw per token from the sequence's own generator) they produce the same
    tokens, and chat's message content is the same valid JSON."""
    _, prompt, schema = next(case for case in CASES if case[0] == name)
    engine_run = next(run for run in batch if run.name == name and run.greedy == greedy)
    reply = llm.chat(_messages(prompt), _greedy() if greedy else _sampled(),
                     response_format=_response_format(schema))
    assert reply.token_ids == engine_run.token_ids
    assert reply.finish_reason == engine_run.finish_reason == "stop"
    assert reply.message["content"] == reply.text == engine_run.text
    _check_valid(reply.message["content"], schema)


@pytest.mark.slow
def test_max_tokens_cut_reports_length(llm):
    """A schema cut short by max_tokens ends with finish_reason "length" (and its partial text is not
    claimed to be valid)."""
    name, prompt, schema = CASES[0]
    reply = llm.chat(_messages(prompt), SamplingParams(temperature=0, max_tokens=5),
                     response_format=_response_format(schema))
    assert reply.finish_reason == "length"
    assert len(reply.token_ids) == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply.text)


@pytest.mark.slow
def test_json_object_output_is_an_object(llm):
    """response_format json_object: every output that stops parses as a JSON object (greedy and sampled, two
    prompts); at least 3 of the 4 stop (an open object has no schema bounding it, so one may run long)."""
    replies = [llm.chat(_messages(prompt), params, response_format={"type": "json_object"})
               for prompt in ("Extract the person: Alice Smith is 34 years old and lives in Paris.",
                              "Give the city and country of the Eiffel Tower.")
               for params in (_greedy(), _sampled())]
    stopped = [reply for reply in replies if reply.finish_reason == "stop"]
    for reply in stopped:
        assert isinstance(json.loads(reply.message["content"]), dict), reply.text
    assert len(stopped) >= 3, [(reply.finish_reason, reply.text) for reply in replies]
    assert all(reply.text.lstrip().startswith("{") for reply in replies)


@pytest.mark.slow
@pytest.mark.parametrize("spec, pattern, prompt", [
    (GrammarSpec.regex(r"\d{3}-\d{4}"), r"\d{3}-\d{4}", "The phone number of the office is "),
    (GrammarSpec.lark('start: "yes" | "no"'), r"yes|no", "Question: is the Earth round? Answer: "),
])
def test_regex_and_lark_match_exactly(llm, spec, pattern, prompt):
    """A regex or Lark grammar given to generate(): the whole output matches it exactly, greedy and sampled,
    and the run stops by itself once the grammar is complete."""
    for params in (SamplingParams(temperature=0, max_tokens=20), SamplingParams(temperature=0.8, seed=SEED,
                                                                                max_tokens=20)):
        out = llm.generate(prompt, params, grammar=spec)
        assert out.finish_reason == "stop", out
        assert re.fullmatch(pattern, out.text), out.text


@pytest.mark.slow
def test_trace_shows_the_grammar_stage(llm):
    """trace=True: every step's stages include the grammar mask ("grammar"), which keeps at least one token and
    fewer than the whole vocabulary; the traced greedy tokens equal the untraced ones (tracing only records)."""
    spec = GrammarSpec.json_schema(CASES[0][2])
    params = SamplingParams(temperature=0, max_tokens=8)
    prompt = "Alice Smith, 34, lives in Paris. As JSON: "
    traced = llm.generate(prompt, params, trace=True, grammar=spec)
    plain = llm.generate(prompt, params, grammar=spec)
    assert traced.token_ids == plain.token_ids
    assert len(traced.trace) == len(traced.token_ids) > 0
    for step in traced.trace:
        grammar = [stage for stage in step["stages"] if stage["name"] == "grammar"]
        assert len(grammar) == 1, step["stages"]
        assert 1 <= grammar[0]["kept"] < VOCAB
        assert step["chosen"]["id"] == grammar[0]["top"][0]["id"]  # greedy: the best token the grammar allows


# ----------------------------------------------------------------------------------------------- refusals

@pytest.fixture(scope="module")
def tokenizer(default_gguf) -> Tokenizer:
    """The default model's tokenizer from its GGUF metadata, without loading the weights."""
    with read_gguf(default_gguf) as gguf:
        metadata = gguf.metadata
        tokenizer = Tokenizer.from_gguf_metadata(metadata, source=str(default_gguf))
    assert len(metadata["tokenizer.ggml.tokens"]) == VOCAB
    return tokenizer.with_end_ids({int(metadata["tokenizer.ggml.eos_token_id"])})


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, VOCAB)


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "if": {"required": ["a"]},
      "then": {"required": ["b"]}}, "if"),
    ({"type": "object", "properties": {"x": {"not": {"type": "string"}}}}, "not"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}, "dependentSchemas"),
    # llguidance words these two refusals differently from its "Unimplemented keys" message.
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),
    ({"type": "string", "format": "credit-card"}, "format"),
])
def test_unenforceable_keywords_are_refused_by_name(compiler, schema, keyword):
    """A keyword llguidance cannot enforce while generating is refused (never silently ignored), and the error's
    `keyword` names it so a client can fix the schema."""
    spec = GrammarSpec.json_schema(schema)  # a valid schema: the refusal comes from compiling
    with pytest.raises(GrammarError) as caught:
        compiler.compile(spec)
    assert caught.value.keyword == keyword
    assert keyword in str(caught.value)


@pytest.mark.parametrize("schema, keyword, place", [
    ({"type": "foo"}, "type", "type"),
    ({"minLength": -1}, "minLength", "minLength"),
    ({"type": "object", "properties": {"name": {"type": "string", "maxLength": -3}}}, "maxLength",
     "properties/name/maxLength"),
    ({"type": "array", "minItems": "two"}, "minItems", "minItems"),
])
def test_invalid_schemas_are_refused_naming_the_place(schema, keyword, place):
    """A schema that breaks its metaschema is an error at once (before any compiling), naming the keyword and
    the path to it."""
    with pytest.raises(GrammarError) as caught:
        GrammarSpec.json_schema(schema)
    assert caught.value.keyword == keyword
    assert place in str(caught.value)


def test_a_deeply_nested_schema_is_a_grammar_error():
    """A schema nested thousands of levels deep (small in bytes) is refused as a GrammarError, not a
    RecursionError escaping from the API."""
    schema: dict = {"type": "array"}
    for _ in range(3000):
        schema = {"type": "array", "items": schema}
    # ~28 bytes a level: about 84 KB, under the size limit, so depth is what must be refused.
    with pytest.raises(GrammarError):
        GrammarSpec.json_schema(schema)


def test_a_huge_schema_is_refused_by_size_before_compiling(compiler):
    """A 1 MB schema is refused for its size (as a dict and as text) before it is checked or compiled: the
    compile counter does not move."""
    before = compiler.compiled
    huge = {"type": "object", "properties": {f"field_{i:06d}": {"type": "string", "description": "x" * 80}
                                             for i in range(10_000)}}
    text = json.dumps(huge)
    assert len(text) > 1_000_000
    for schema in (huge, text):
        with pytest.raises(GrammarError, match="bytes"):
            GrammarSpec.json_schema(schema)
    with pytest.raises(GrammarError, match="bytes"):
        GrammarSpec.regex("a" * (MAX_SOURCE_BYTES + 1))
    with pytest.raises(GrammarError, match="bytes"):
        GrammarSpec.lark('start: "' + "a" * MAX_SOURCE_BYTES + '"')
    assert compiler.compiled == before


def test_the_compile_cache_hits(compiler):
    """Compiling the same spec twice compiles once: the second call (an equal spec built again from the same
    schema) returns the cached Grammar and the `compiled` counter (cache misses) does not move; another spec
    is a miss."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    first = compiler.compile(GrammarSpec.json_schema(schema))
    count = compiler.compiled
    again = compiler.compile(GrammarSpec.json_schema(json.loads(json.dumps(schema))))
    assert again is first
    assert compiler.compiled == count
    compiler.compile(GrammarSpec.regex(r"[0-9]+"))
    assert compiler.compiled == count + 1


def test_properties_follow_the_schema_order(compiler):
    """Properties are generated in the order the schema lists them (llguidance's rule, and what OpenAI does):
    an extraction schema puts "name" before "age" so the model writes the name first. Sorting them by name
    instead forces outputs like {"age": 34, "city": "Paris", "name": "Alice Smith"} and puts a tree node's
    "children" before its "value" (SmolLM2 then labels the tree's root wrongly)."""
    schema = _obj({"name": NAME, "age": {"type": "integer"}})
    grammar = compiler.compile(GrammarSpec.json_schema(schema))
    matcher = grammar.matcher()
    assert matcher.accept_many(grammar.tokenize('{"name": "Ann", "age": 31}'))
    assert matcher.accepting


# ----------------------------------------------------------------------------------------------- the guide

def _allowed_ids(mask) -> set[int]:
    return set(torch.nonzero(mask).flatten().tolist())


def test_thinking_budget_forces_the_close_then_the_grammar(tokenizer, compiler):
    """Inside a thought with a budget of 3: no mask during the 3 thinking tokens (a grammar never applies inside
    the thought); then the mask allows exactly the close ids ("\\n</think>\\n\\n"), one after the other; then
    the grammar's mask begins, in its start state."""
    grammar = compiler.compile(GrammarSpec.json_schema(CASES[0][2]))
    close_ids = tuple(tokenizer.encode("\n</think>\n\n", add_special_tokens=False))
    assert len(close_ids) > 1  # not one token in SmolLM2's vocabulary: the forcing walks a sequence
    thinking = Thinking("<think>", "</think>", None, close_ids, inside=True, budget=3)
    guide = GuideSpec(grammar=grammar, thinking=thinking).start(tokenizer, VOCAB)

    for token in tokenizer.encode("Let me think about", add_special_tokens=False)[:3]:
        assert guide.mask() is None
        guide.accept(token)
    for token in close_ids:
        name, allowed = guide.mask()
        assert name == "thinking_budget"
        assert _allowed_ids(allowed) == {token}
        guide.accept(token)
    name, allowed = guide.mask()
    assert name == "grammar"
    assert torch.equal(allowed, grammar.matcher().allowed())
    assert not allowed[close_ids[0]]


def test_thinking_closed_by_the_model_is_not_forced(tokenizer, compiler):
    """A thought the model closes itself within its budget is never cut: after the model's own close tag the
    grammar begins at once, with no forced tokens."""
    grammar = compiler.compile(GrammarSpec.json_schema(CASES[0][2]))
    close_ids = tuple(tokenizer.encode("\n</think>\n\n", add_special_tokens=False))
    guide = GuideSpec(grammar=grammar, thinking=Thinking("<think>", "</think>", None, close_ids, inside=True,
                                                         budget=50)).start(tokenizer, VOCAB)
    for token in tokenizer.encode("Easy.</think>", add_special_tokens=False):
        assert guide.mask() is None
        guide.accept(token)
    name, allowed = guide.mask()
    assert name == "grammar"
    assert torch.equal(allowed, grammar.matcher().allowed())


def test_lazy_trigger_starts_the_grammar_inside_a_token(tokenizer, compiler):
    """GuideSpec(grammar, trigger="<tool_call>"): free text has no mask; the trigger, split over several tokens
    and completed by a token carrying more text ('>"'), starts the grammar, and that extra text already counts
    as the grammar's first input: the mask is then the grammar's after '"'."""
    grammar = compiler.compile(GrammarSpec.lark('start: "\\"" NAME "\\""\nNAME: /[a-z]{1,12}/'))
    guide = GuideSpec(grammar=grammar, trigger="<tool_call>").start(tokenizer, VOCAB)
    free = tokenizer.encode("Sure, calling it: <tool_call", add_special_tokens=False)
    closing = tokenizer.token_to_id('>"')  # the trigger's last character and the grammar's first
    assert closing is not None and tokenizer.decode([closing]) == '>"'
    for token in free:
        assert guide.mask() is None  # free text, even once the trigger is half written
        guide.accept(token)
    guide.accept(closing)
    name, allowed = guide.mask()
    assert name == "grammar"
    expected = grammar.matcher()
    assert expected.accept_many(grammar.tokenize('"'))
    assert torch.equal(allowed, expected.allowed())
    letters = tokenizer.encode("abc", add_special_tokens=False)[0]
    assert allowed[letters] and not allowed[tokenizer.token_to_id('"')]
    assert not torch.equal(allowed, grammar.matcher().allowed())  # not the start state: '"' was consumed


class _FailingGuide:
    """A guide whose grammar gives up at its third token, as an llguidance matcher does when a step runs out of
    fuel (the real one raises the same GrammarError from Guide.mask)."""

    def __init__(self):
        self.accepted = 0

    def start(self, tokenizer, vocab_size):
        return self

    def mask(self):
        if self.accepted >= 2:
            raise GrammarError("the output's grammar stopped: out of fuel")
        return None

    def accept(self, token_id):
        self.accepted += 1


def test_a_grammar_that_gives_up_ends_only_its_own_request(tmp_path):
    """A request whose grammar fails mid-generation gets an error event marked as its own (the server answers
    400, not 500) and nothing else: the engine stays alive and a request decoded beside it finishes."""
    import threading

    from lanternlm.api import LLM
    from lanternlm.engine import Engine

    from serving import tiny_chat_folder

    llm = LLM(str(tiny_chat_folder(tmp_path / "tiny")))
    engine = Engine(llm.model, llm.tokenizer, context=256, max_batch=4).start()
    events: dict[str, list] = {"bad": [], "good": []}
    done = {name: threading.Event() for name in events}

    def collector(name):
        def on_event(event):
            events[name].append(event)
            if event.error or (event.step and event.step.finish_reason):
                done[name].set()
        return on_event

    try:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        engine.submit([1, 2, 3], params, collector("bad"), guide=_FailingGuide())
        engine.submit([1, 2, 3], params, collector("good"), guide=None)
        assert done["bad"].wait(60) and done["good"].wait(60)
        assert events["bad"][-1].error and events["bad"][-1].request_error
        assert len([e for e in events["bad"] if e.step]) == 2
        assert events["good"][-1].step.finish_reason == "length" and not any(e.error for e in events["good"])
        assert engine.dead is None
    finally:
        engine.shutdown()
