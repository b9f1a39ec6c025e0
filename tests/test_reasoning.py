"""Thinking kept apart from the answer: the format found in real chat templates, whether a rendered prompt leaves
the model inside a thought, the splitter (the same result for every way of cutting a text into pieces, checked
exhaustively and against a plain reference), the CLI's display of a thinking model's reply, and the web page's
folded "Thinking" box (in the browser, fed a canned stream)."""

from __future__ import annotations

import io
import itertools
import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_web import browser, server, tiny_folder  # noqa: F401  (fixtures of the page test below)

from lanternlm import cli
from lanternlm.generation.generate import Step
from lanternlm.text.chat import ChatTemplate
from lanternlm.text.reasoning import ReasoningSplitter, ThinkFormat, detect_thinking, split_reasoning, starts_inside

THINK = ThinkFormat()
SHORT = ThinkFormat("<t>", "</t>")  # the same logic on tags short enough to try every split of a text

THINKING_TEMPLATES = ["Qwen-Qwen3-0.6B", "Qwen-QwQ-32B", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
                      "deepseek-ai-DeepSeek-R1-Distill-Llama-8B", "HuggingFaceTB-SmolLM3-3B"]
PLAIN_TEMPLATES = ["Qwen-Qwen2.5-7B-Instruct", "meta-llama-Llama-3.1-8B-Instruct",
                   "mistralai-Mistral-Nemo-Instruct-2407"]
R1_TOKENS = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}
QWEN_TOKENS = {"eos_token": "<|im_end|>"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def template(name: str) -> str:
    from llama_cpp_data import template as llama_cpp_template  # downloads llama.cpp's templates once, or skips
    return llama_cpp_template(name)


def rendered(name: str, tokens: dict, messages=QUESTION, **context) -> str:
    return ChatTemplate(template(name), **tokens).render(messages, add_generation_prompt=True,
                                                         extra_context=context or None)


# ---------------------------------------------------------------------- the format, from real templates


@pytest.mark.parametrize("name", THINKING_TEMPLATES)
def test_thinking_templates_are_detected(name):
    assert detect_thinking(template(name)) == ThinkFormat("<think>", "</think>")


@pytest.mark.parametrize("name", PLAIN_TEMPLATES)
def test_templates_without_thinking_are_not(name):
    assert detect_thinking(template(name)) is None


def test_no_template_means_no_thinking():
    assert detect_thinking(None) is None and detect_thinking("") is None


def test_qwen3_opens_no_thought_itself_and_closes_an_empty_one_when_thinking_is_off():
    on = rendered("Qwen-Qwen3-0.6B", QWEN_TOKENS, enable_thinking=True)
    off = rendered("Qwen-Qwen3-0.6B", QWEN_TOKENS, enable_thinking=False)
    assert on.endswith("<|im_start|>assistant\n") and not starts_inside(THINK, on)  # the model writes <think>
    assert off.endswith("<think>\n\n</think>\n\n") and not starts_inside(THINK, off)


def test_deepseek_r1_distills_open_the_thought_in_the_prompt():
    assert rendered("deepseek-ai-DeepSeek-R1-Distill-Llama-8B", R1_TOKENS).endswith("<think>\n")
    assert starts_inside(THINK, rendered("deepseek-ai-DeepSeek-R1-Distill-Llama-8B", R1_TOKENS))
    # llama.cpp's copy of the Qwen-32B distill's template closes the thought unless thinking is asked for.
    assert starts_inside(THINK, rendered("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", R1_TOKENS,
                                         enable_thinking=True))
    assert not starts_inside(THINK, rendered("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", R1_TOKENS,
                                             enable_thinking=False))


def test_qwq_and_smollm3_follow_their_enable_thinking_switch():
    assert starts_inside(THINK, rendered("Qwen-QwQ-32B", QWEN_TOKENS, enable_thinking=True))
    assert not starts_inside(THINK, rendered("Qwen-QwQ-32B", QWEN_TOKENS, enable_thinking=False))
    smol_on = rendered("HuggingFaceTB-SmolLM3-3B", QWEN_TOKENS, enable_thinking=True)
    smol_off = rendered("HuggingFaceTB-SmolLM3-3B", QWEN_TOKENS, enable_thinking=False)
    assert not starts_inside(THINK, smol_on)  # SmolLM3 writes <think> itself
    assert smol_off.endswith("<think>\n\n</think>\n") and not starts_inside(THINK, smol_off)


def test_an_opening_tag_in_a_users_message_does_not_start_a_thought():
    asked = [{"role": "user", "content": "What does <think> mean in your output?"}]
    prompt = rendered("Qwen-Qwen3-0.6B", QWEN_TOKENS, asked, enable_thinking=True)
    assert "<think>" in prompt and not starts_inside(THINK, prompt)


def test_a_past_answer_kept_without_its_thinking_renders_as_the_template_expects():
    reasoning, content = split_reasoning(THINK, "<think>\nFrance's capital.\n</think>\n\nParis.", inside=False)
    assert (reasoning, content) == ("France's capital.", "Paris.")
    history = [*QUESTION, {"role": "assistant", "content": content}, {"role": "user", "content": "And Italy?"}]
    prompt = rendered("Qwen-Qwen3-0.6B", QWEN_TOKENS, history, enable_thinking=True)
    assert "<|im_start|>assistant\nParis.<|im_end|>" in prompt and "France's capital" not in prompt


# ---------------------------------------------------------------------- the splitter


def reference(fmt: ThinkFormat, text: str, inside: bool) -> tuple[str | None, str]:
    """The split as the docstring states it, on the whole text at once."""
    head = text.lstrip()
    if head.startswith(fmt.open):
        rest = head[len(fmt.open):]
    elif inside:
        rest = head
    else:
        return None, text
    reasoning, closed, content = rest.partition(fmt.close)
    return reasoning.strip() or None, content.lstrip() if closed else ""


def streamed(fmt: ThinkFormat, pieces, inside: bool) -> tuple[str, str]:
    splitter = ReasoningSplitter(fmt, inside)
    deltas = [splitter.push(piece) for piece in pieces] + [splitter.flush()]
    return "".join(r for r, _ in deltas), "".join(c for _, c in deltas)


def all_splits(text: str):
    """Every way of cutting `text` into non-empty pieces (2 ** (len - 1) of them)."""
    for cuts in itertools.product((False, True), repeat=max(len(text) - 1, 0)):
        pieces, start = [], 0
        for i, cut in enumerate(cuts, 1):
            if cut:
                pieces.append(text[start:i])
                start = i
        yield [*pieces, text[start:]]


@pytest.mark.parametrize("inside, text, expected", [
    (False, "<think>\nThe capital is Paris.\n</think>\n\nParis.", ("The capital is Paris.", "Paris.")),
    (False, "\n <think>a</think>b", ("a", "b")),
    (False, "Paris.", (None, "Paris.")),
    (False, "  Paris.", (None, "  Paris.")),  # an answer keeps its own leading whitespace
    (False, "<think>\n\n</think>\n\nParis.", (None, "Paris.")),  # an empty thought is no thinking
    (False, "Paris. <think>no</think> more", (None, "Paris. <think>no</think> more")),  # only at the start
    (False, "<thinking>x", (None, "<thinking>x")),
    (False, "<thi", (None, "<thi")),  # cut before the tag was whole: that was the answer
    (False, "<think>Half a thought, cut by max_tokens\n</thi", ("Half a thought, cut by max_tokens\n</thi", "")),
    (False, "<think>a</think>b</think>c", ("a", "b</think>c")),
    (True, "The user asks for a capital.\n</think>\n\nParis.", ("The user asks for a capital.", "Paris.")),
    (True, "<think>\nagain</think>x", ("again", "x")),  # an opening tag written again is dropped
    (True, "</think>Paris.", (None, "Paris.")),
    (True, "Still thinking", ("Still thinking", "")),
    (True, "", (None, "")),
    (False, "", (None, "")),
])
def test_split_examples(inside, text, expected):
    assert split_reasoning(THINK, text, inside) == expected == reference(THINK, text, inside)


SHORT_TEXTS = ["<t>a</t>b", " <t> x </t>\n\ny ", "<t>ab</", "<t></t>", " <", "<", "</t>x", "<t><t>a</t>",
               "a<t>b</t>", "<t>a</<t/t>b", "<t>a\n\n", "\n</t></t>", "<tt>x", "<t>a </ </t>"]


@pytest.mark.parametrize("inside", [False, True])
@pytest.mark.parametrize("text", SHORT_TEXTS)
def test_every_split_of_a_short_text_gives_the_same_result(text, inside):
    whole = split_reasoning(SHORT, text, inside)
    assert whole == reference(SHORT, text, inside)
    expected = (whole[0] or "", whole[1])
    for pieces in all_splits(text):
        assert streamed(SHORT, pieces, inside) == expected, pieces


@pytest.mark.parametrize("inside", [False, True])
def test_every_split_into_up_to_four_pieces_of_a_real_reply(inside):
    text = "<think>\nHmm. </thin\n</think>\n\nParis."
    whole = split_reasoning(THINK, text, inside)
    assert whole == ("Hmm. </thin", "Paris.")
    for n in range(4):
        for cuts in itertools.combinations(range(1, len(text)), n):
            bounds = (0, *cuts, len(text))
            pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
            assert streamed(THINK, pieces, inside) == whole, pieces


ATOMS = ["<think>", "</think>", "<", "</", "<th", "think>", "ink>", ">", "/", "\n", " ", "\n\n", "a", "b c", "é"]


@settings(max_examples=300, deadline=None)
@given(atoms=st.lists(st.sampled_from(ATOMS), max_size=12), cuts=st.sets(st.integers(1, 200)), inside=st.booleans())
def test_any_split_equals_the_whole_and_the_reference(atoms, cuts, inside):
    text = "".join(atoms)
    bounds = (0, *sorted(c for c in cuts if c < len(text)), len(text))
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    reasoning, content = reference(THINK, text, inside)
    assert split_reasoning(THINK, text, inside) == (reasoning, content)
    assert streamed(THINK, pieces, inside) == (reasoning or "", content)


def test_text_comes_out_as_soon_as_it_cannot_be_a_tag():
    splitter = ReasoningSplitter(THINK, inside=False)
    assert splitter.push(" <thi") == ("", "")
    assert splitter.push("nk>\n") == ("", "")
    assert splitter.push("Hel") == ("Hel", "")
    assert splitter.push("lo \n") == ("lo", "")  # whitespace waits: before the closing tag it is dropped
    assert splitter.push("there </") == (" \nthere", "")
    assert splitter.push("think>\n") == ("", "")
    assert splitter.push("\nPar") == ("", "Par")
    assert splitter.push("is <think>") == ("", "is <think>")
    assert splitter.flush() == ("", "")


def test_an_answer_without_thinking_streams_through_at_once():
    splitter = ReasoningSplitter(THINK, inside=False)
    assert splitter.push("Par") == ("", "Par")
    assert splitter.push("is.") == ("", "is.")


def test_empty_tags_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        ReasoningSplitter(ThinkFormat("", "</think>"), inside=False)


# ---------------------------------------------------------------------- the CLI's display


REPLY = "<think>\nThe capital\nof France.\n</think>\n\nParis."


def printed(pieces, styled: bool, fmt=THINK, inside=False) -> tuple[str, str]:
    out = io.StringIO()
    printer = cli.ReplyPrinter(out, ReasoningSplitter(fmt, inside), styled)
    for piece in pieces:
        printer.write(piece)
    printer.finish()
    return out.getvalue(), printer.answer


def test_a_terminal_shows_the_thinking_dimmed_then_the_answer():
    assert printed([REPLY], styled=True) == ("\x1b[2mThe capital\nof France.\x1b[0m\n\nParis.", "Paris.")


def test_a_pipe_shows_the_thinking_as_quoted_lines():
    assert printed([REPLY], styled=False) == ("> The capital\n> of France.\n\nParis.", "Paris.")


def test_the_display_is_the_same_for_any_split():
    whole = printed([REPLY], styled=False)
    for cuts in itertools.combinations(range(1, len(REPLY)), 2):
        bounds = (0, *cuts, len(REPLY))
        assert printed([REPLY[a:b] for a, b in itertools.pairwise(bounds)], styled=False) == whole


def test_a_thought_cut_short_still_resets_the_terminal():
    assert printed(["<think>still going"], styled=True) == ("\x1b[2mstill going\x1b[0m", "")


def test_without_a_splitter_everything_is_answer():
    out = io.StringIO()
    printer = cli.ReplyPrinter(out)
    for piece in ["<think>", "a</think>b"]:
        printer.write(piece)
    printer.finish()
    assert out.getvalue() == printer.answer == "<think>a</think>b"


class FakeThinkingLLM:
    """Just what `lantern run` and `lantern chat` use of an LLM, replying with a thought and an answer."""

    def __init__(self, replies, thinking=THINK, inside=False):
        self.replies = list(replies)
        self.thinking = thinking
        self.inside = inside
        self.conversations = []

    def thinking_starts_inside(self, ids):
        return self.inside

    def close(self):  # no other ranks to stop
        pass

    def plan_chat(self, messages, options):
        self.conversations.append(messages)
        return SimpleNamespace(prompt_ids=[1, 2, 3], guide=None)

    def stream_ids(self, ids, params, guide):
        reply = self.replies.pop(0)
        for i in range(0, len(reply), 3):  # three characters a step, cutting the tags
            yield Step(token_id=0, text=reply[i:i + 3])
        yield Step(token_id=0, text="", finish_reason="stop")


def test_lantern_run_prints_the_thought_apart_from_the_answer(monkeypatch, capsys):
    monkeypatch.setattr(cli, "open_model", lambda args: FakeThinkingLLM(["Capital of France.</think>\n\nParis."],
                                                                        inside=True))
    assert cli.main(["run", "What is the capital of France?"]) == 0
    assert capsys.readouterr().out == "> Capital of France.\n\nParis.\n"  # captured: not a terminal


def test_lantern_chat_keeps_only_the_answers_in_the_history(monkeypatch, capsys):
    llm = FakeThinkingLLM([REPLY, "<think>Rome.</think>Rome."])
    monkeypatch.setattr(cli, "open_model", lambda args: llm)
    monkeypatch.setattr("sys.stdin", io.StringIO("Capital of France?\nAnd of Italy?\n"))
    assert cli.main(["chat"]) == 0
    assert capsys.readouterr().out == "> The capital\n> of France.\n\nParis.\n> Rome.\n\nRome.\n"
    assert llm.conversations[1] == [{"role": "user", "content": "Capital of France?"},
                                    {"role": "assistant", "content": "Paris."},
                                    {"role": "user", "content": "And of Italy?"}]


def test_a_model_without_thinking_streams_unchanged(monkeypatch, capsys):
    llm = FakeThinkingLLM(["<think>a</think>b"], thinking=None)
    del llm.thinking  # an LLM from before the attribute existed
    monkeypatch.setattr(cli, "open_model", lambda args: llm)
    assert cli.main(["run", "hi"]) == 0
    assert capsys.readouterr().out == "<think>a</think>b\n"


# ---------------------------------------------------------------------- the web page


def canned_stream(pieces: list[tuple[str, str]]) -> str:
    """A streamed chat completion that says (field, text) piece by piece, one token each, then stops."""
    def event(delta: dict, token: str | None = None, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        if token is not None:
            choice["logprobs"] = {"content": [{"token": token, "logprob": -0.5, "top_logprobs": []}]}
        return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [choice]}) + "\n\n"

    events = [event({"role": "assistant"})]
    for field, text in pieces:
        delta = {"reasoning_content": text, "reasoning": text} if field == "reasoning" else \
                {"content": text} if field == "content" else {}
        events.append(event(delta, token=text or field))
    events.append(event({}, finish="stop"))
    return "".join(events) + "data: [DONE]\n\n"


def test_the_page_folds_the_thinking_above_the_answer_and_sends_back_only_the_answer(browser, server):  # noqa: F811
    from test_web import answer_text, ask, open_page
    page, watch = open_page(browser, server)
    reply = [("tag", ""), ("reasoning", "The user"), ("reasoning", " greets me."), ("tag", ""),
             ("content", "Hello"), ("content", " there!")]
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=canned_stream(reply)))
    answer, _ = ask(page, "Hi")
    thought = answer.locator("details.thought")
    assert thought.locator("summary").inner_text() == "Thinking"
    assert thought.locator(".thought-text").evaluate("el => el.textContent") == "The user greets me."
    assert not thought.evaluate("el => el.open")  # folded once the answer started
    assert answer_text(answer) == "Hello there!"
    # Every token is a span, in the order it came: the tags' (no text) with the thinking.
    spans = answer.locator(".tok")
    assert spans.evaluate_all("els => els.map(e => Number(e.dataset.i))") == list(range(len(reply)))
    assert thought.locator(".tok").count() == 4

    # The arrow keys walk from the answer back into the thinking, which opens.
    answer.locator(".body .tok").first.focus()
    page.keyboard.press("ArrowLeft")
    assert thought.evaluate("el => el.open")
    assert page.evaluate("document.activeElement.dataset.i") == "3"

    _, response = ask(page, "And?")
    sent = json.loads(response.request.post_data)["messages"]
    assert sent[1] == {"role": "assistant", "content": "Hello there!"}
    watch.check(server.url)
    page.close()
