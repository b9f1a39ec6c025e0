"""The built-in web page (`lantern serve` at /) in real headless Debian Chromium driven by Playwright, against the
real server with a tiny model: the API-key flow, a streamed chat answer equal to the API's, the probability
colours, the token inspector (alternatives, sampling trace, logit lens, keyboard use), the stop button, the
documents page (files uploaded, a question answered beside the chunks retrieved for it, against a second server with
an embedding model), the model page, the tokenizer playground, and a 390px-wide phone layout. Screenshots go to
tests/artifacts/.

Playwright (not Selenium): it is one pip package that drives the system chromium directly over CDP, with no
chromedriver whose version must match the browser's, and its waits on page state keep the test free of sleeps.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import httpx
import pytest
from test_server import KEY, Server, tiny_folder  # noqa: F401  (tiny_folder is a fixture used below)

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT_MS = 30_000


def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError:
        pytest.fail("the web test needs Playwright: pip install playwright (a test extra). Do not run "
                    "'playwright install': the test drives Debian's chromium (scripts/install-browser).")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: run scripts/install-browser (as root) to install Debian's chromium")
    return start()


@pytest.fixture(scope="module")
def server(tiny_folder):  # noqa: F811  (the imported fixture)
    s = Server(str(tiny_folder), "--api-key", KEY)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def rag_server(tmp_path_factory):
    """A server with the tiny chat model (a longer context, so retrieved passages fit its prompt) and the real
    all-MiniLM-L6-v2 for retrieval, over a fresh index in its own LANTERN_HOME."""
    from test_server_embeddings import minilm_folder

    from serving import tiny_chat_folder
    minilm = minilm_folder()
    folder = tiny_chat_folder(tmp_path_factory.mktemp("tiny-rag"), context=1024)
    with pytest.MonkeyPatch.context() as env:  # the server process inherits it; this process keeps its own
        env.setenv("LANTERN_HOME", str(tmp_path_factory.mktemp("lantern-home")))
        s = Server(str(folder), "--api-key", KEY, "--embedding-model", str(minilm))
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")  # screenshots are test output, never committed
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 860}, service_workers="block")
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


class Watch:
    """A page's console errors, uncaught exceptions and every URL it requested."""

    def __init__(self, page):
        self.errors: list[str] = []
        self.urls: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("request", lambda r: self.urls.append(r.url))

    def check(self, origin: str, allow: tuple[str, ...] = ()) -> None:
        errors = [e for e in self.errors if not any(a in e for a in allow)]
        assert errors == [], errors
        foreign = [u for u in self.urls if not (u.startswith(origin + "/") or u.startswith("data:"))]
        assert foreign == [], f"the page fetched outside its server: {foreign}"


def open_page(browser, server, width=1280, height=860, key=KEY):
    page = browser.new_page()
    page.set_viewport_size({"width": width, "height": height})
    watch = Watch(page)
    # Fresh storage with the key, set before the page's own scripts first run in this tab, so it never loads
    # without the key (no 401 on the way in, even on an origin the browser has not seen).
    page.add_init_script(f"""(key => {{
        if (sessionStorage.getItem("test.storage-set")) return;
        sessionStorage.setItem("test.storage-set", "1");
        localStorage.clear();
        if (key) localStorage.setItem("lantern.apiKey", key);
    }})({json.dumps(key)})""")
    page.goto(server.url + "/")
    return page, watch


def api_chat(server, messages, **kw) -> dict:
    body = {"model": "tiny", "messages": messages, "logprobs": True, "top_logprobs": 5,
            "lantern": {"trace": True, "top_k": 5}, **kw}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def api(server, path: str, body: dict) -> dict:
    r = httpx.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def ask(page, text: str, temperature: str = "0", max_tokens: str = "12"):
    """Type a message with these controls, send it, and wait until the answer has finished streaming."""
    page.locator("#composer").get_by_label("Temperature").fill(temperature)  # the Documents page has its own
    page.locator("#composer").get_by_label("Max tokens").fill(max_tokens)
    page.get_by_label("Message", exact=True).fill(text)
    answer = page.locator(".msg.assistant").nth(page.locator(".msg.assistant").count())  # the one about to come
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as response:
        page.get_by_label("Message", exact=True).press("Enter")
    page.wait_for_function("el => el.getAttribute('aria-busy') === 'false'", arg=answer.element_handle())
    return answer, response.value


def sse_chunks(response) -> list[dict]:
    """The `data: {json}` events of a streamed response the page received."""
    out = []
    for event in response.text().split("\n\n"):
        if event.startswith("data: {"):
            out.append(json.loads(event[6:]))
    return out


def answer_text(answer) -> str:
    return answer.locator(".body").evaluate("el => el.textContent")


# ---------------------------------------------------------------------------------------------------------------


def test_page_asks_for_the_api_key_then_finds_the_model(browser, server):
    page, watch = open_page(browser, server, key=None)
    notice = page.locator("#notice")
    notice.wait_for(state="visible")
    assert "API key" in notice.inner_text()
    assert page.locator("#settings").evaluate("el => el.open")  # settings opened to the key field
    key = page.get_by_label("API key")
    assert key.evaluate("el => el === document.activeElement")
    page.screenshot(path=str(ARTIFACTS / "web-api-key.png"))
    key.fill(KEY)
    key.press("Enter")
    page.wait_for_function("document.getElementById('model-name').textContent === 'tiny'")
    assert notice.is_hidden()
    assert page.evaluate("localStorage.getItem('lantern.apiKey')") == KEY
    # The key rides on the API calls now.
    with page.expect_request(lambda r: r.url.endswith("/tokenize")) as req:
        page.get_by_role("tab", name="Tokenizer").click()
    assert req.value.headers.get("authorization") == f"Bearer {KEY}"
    watch.check(server.url, allow=("401",))
    page.close()


def test_chat_streams_the_api_answer_colours_tokens_and_keeps_the_conversation(browser, server):
    page, watch = open_page(browser, server)
    question = "Hello world! The quick brown fox"
    answer, response = ask(page, question)
    assert response.headers["content-type"].startswith("text/event-stream")
    sent = json.loads(response.request.post_data)
    assert sent["stream"] is True and sent["temperature"] == 0 and sent["max_tokens"] == 12
    assert sent["messages"] == [{"role": "user", "content": question}]

    # What the page shows is what the API answers (greedy, same prompt), token for token.
    reference = api_chat(server, [{"role": "user", "content": question}], temperature=0, max_tokens=12)
    content = reference["choices"][0]["logprobs"]["content"]
    assert answer_text(answer) == reference["choices"][0]["message"]["content"]
    tokens = answer.locator(".tok")
    assert tokens.count() == len(content) == reference["usage"]["completion_tokens"]
    assert f"{len(content)} tokens" in answer.locator(".msg-status").inner_text()

    # The probability view: each token is painted with the hue of exp(logprob).
    assert tokens.first.evaluate("el => getComputedStyle(el).backgroundColor") == "rgba(0, 0, 0, 0)"
    page.get_by_label("Colour by probability").check()
    page.locator("#prob-legend").wait_for(state="visible")
    shown = tokens.evaluate_all("""els => els.map(el => ({p: Number(el.dataset.p),
        hue: Number(el.style.getPropertyValue('--h')), bg: getComputedStyle(el).backgroundColor}))""")
    for entry, lp in zip(shown, content):
        p = math.exp(lp["logprob"])
        assert abs(entry["p"] - p) < 1e-9
        assert entry["hue"] == round(120 * p)
        assert entry["bg"] != "rgba(0, 0, 0, 0)"
    hues = {e["hue"]: e["bg"] for e in shown}
    assert len(set(hues.values())) == len(hues)  # different probabilities, different colours
    page.screenshot(path=str(ARTIFACTS / "web-chat-desktop.png"))

    # A second message carries the whole conversation.
    answer2, response2 = ask(page, "And then?")
    sent2 = json.loads(response2.request.post_data)
    assert sent2["messages"] == [{"role": "user", "content": question},
                                 {"role": "assistant", "content": answer_text(answer)},
                                 {"role": "user", "content": "And then?"}]
    assert page.locator(".msg").count() == 4 and answer_text(answer2)
    # The first turn's prompt blocks came from the prefix cache, and the status line says how many.
    status = answer2.locator(".msg-status").inner_text()
    shown = re.search(r"(\d+) of (\d+) prompt tokens from the cache", status)
    prompt = api(server, "/tokenize", {"messages": sent2["messages"], "add_generation_prompt": True})
    assert shown and int(shown[2]) == len(prompt["tokens"]) and 0 < int(shown[1]) < int(shown[2]), status
    assert "from the cache" not in answer.locator(".msg-status").inner_text()  # the first turn had none
    assert page.evaluate("localStorage.getItem('lantern.showProbs')") == "1"  # the view is remembered
    watch.check(server.url)
    page.close()


def test_token_inspector_shows_alternatives_trace_and_logit_lens(browser, server):
    page, watch = open_page(browser, server)
    messages = [{"role": "user", "content": "Tell me about the brown fox"}]
    answer, _ = ask(page, messages[0]["content"], max_tokens="8")
    reference = api_chat(server, messages, temperature=0, max_tokens=8)
    content = reference["choices"][0]["logprobs"]["content"]
    traces = reference["choices"][0]["lantern"]["trace"]
    k = 3
    answer.locator(".tok").nth(k).click()
    panel = page.locator("#inspector")
    panel.wait_for(state="visible")
    assert panel.locator("#inspector-title").inner_text() == f"Token {k + 1} of {len(content)}"

    # Alternatives: the API's top_logprobs for this token, in order, the chosen one marked.
    alts = panel.locator(".alts .alt .tokstr")
    assert [json.loads(t) for t in alts.evaluate_all("els => els.map(e => e.title)")] == \
        [alt["token"] for alt in content[k]["top_logprobs"]]
    assert panel.locator(".alts .alt.chosen").count() == 1  # greedy: the top token is the chosen one
    assert panel.locator(".alts .alt").first.get_attribute("class") == "alt chosen"

    # The trace: the same stages and the chosen token's ranks; greedy has no random draw.
    stage_names = panel.locator(".stages .stage strong").all_inner_texts()
    assert stage_names == [s["name"] for s in traces[k]["stages"]]
    assert f"raw rank #{traces[k]['chosen']['raw_rank']}" in panel.locator(".chosen-line").inner_text()
    assert "Greedy" in panel.locator(".insp-trace .draw").inner_text()

    # The logit lens at this token's position: the page must send the prompt ids plus the ids generated before
    # it, so an independent lens call over those ids shows the same per-layer predictions.
    depths = panel.locator(".lens .depth")
    depths.first.wait_for()
    prompt_ids = api(server, "/tokenize", {"messages": messages, "add_generation_prompt": True})["tokens"]
    lens = api(server, "/v1/lantern/lens", {"ids": prompt_ids + [t["chosen"]["id"] for t in traces[:k]],
                                            "position": -1, "top_k": 5})
    assert depths.count() == lens["num_layers"] + 1
    shown = depths.evaluate_all(
        "els => els.map(d => [...d.querySelectorAll('.chip')].map(c => Number(c.title.match(/id (\\d+)/)[1])))")
    assert shown == [[t["id"] for t in d["top"]] for d in lens["depths"]]
    # Greedy: the last layer's top prediction is exactly the token that was generated, and it is highlighted.
    assert lens["depths"][-1]["top"][0]["id"] == traces[k]["chosen"]["id"]
    assert "chosen" in depths.last.locator(".chip").first.get_attribute("class")
    page.screenshot(path=str(ARTIFACTS / "web-inspector-desktop.png"))

    # Keyboard: Escape closes and returns focus to the token; arrows move; Enter and Space open.
    page.keyboard.press("Escape")
    assert panel.is_hidden()
    assert page.evaluate("document.activeElement.dataset.i") == str(k)
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.i") == str(k + 1)
    page.keyboard.press("Enter")
    panel.wait_for(state="visible")
    assert panel.locator("#inspector-title").inner_text() == f"Token {k + 2} of {len(content)}"
    page.keyboard.press("Escape")
    page.keyboard.press("Home")
    page.keyboard.press("Space")
    panel.wait_for(state="visible")
    assert panel.locator("#inspector-title").inner_text() == f"Token 1 of {len(content)}"
    watch.check(server.url)
    page.close()


def test_a_sampled_token_shows_its_draw_as_the_stream_reported(browser, server):
    page, watch = open_page(browser, server)
    answer, response = ask(page, "Sample something", temperature="0.7", max_tokens="6")
    traces = [c["choices"][0]["lantern"]["trace"][0] for c in sse_chunks(response)
              if c["choices"] and "lantern" in c["choices"][0]]
    assert len(traces) == answer.locator(".tok").count()
    answer.locator(".tok").nth(1).click()
    panel = page.locator("#inspector")
    trace = traces[1]
    assert [s["name"] for s in trace["stages"]][:2] == ["input", "temperature"]
    assert panel.locator(".stages .stage strong").all_inner_texts() == [s["name"] for s in trace["stages"]]
    draw = panel.locator(".insp-trace .draw").inner_text()
    assert f"u = {trace['draw']['uniform']:.4f}" in draw and f"{trace['draw']['low']:.4f}" in draw
    assert f"rank #{trace['chosen']['rank']}" in panel.locator(".chosen-line").inner_text()
    panel.locator(".lens .depth").first.wait_for()
    watch.check(server.url)
    page.close()


def test_stop_button_aborts_the_stream_and_the_chat_goes_on(browser, server):
    page, watch = open_page(browser, server)
    # Slow the browser's network so the answer is still arriving when Stop is pressed.
    cdp = browser.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": 4000,
                                                  "uploadThroughput": -1})
    page.locator("#composer").get_by_label("Temperature").fill("0")
    page.locator("#composer").get_by_label("Max tokens").fill("200")
    page.get_by_label("Message", exact=True).fill("Write a long story")
    page.get_by_role("button", name="Send").click()
    answer = page.locator(".msg.assistant").first
    answer.locator(".tok").nth(1).wait_for()
    assert page.get_by_role("button", name="Send").is_disabled()
    page.get_by_role("button", name="Stop").click()
    page.wait_for_function("el => el.getAttribute('aria-busy') === 'false'", arg=answer.element_handle())
    status = answer.locator(".msg-status").inner_text()
    n = answer.locator(".tok").count()
    assert status == f"stopped after {n} tokens" and 2 <= n < 200
    assert page.get_by_role("button", name="Stop").is_disabled()
    assert page.get_by_role("button", name="Send").is_enabled()

    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": -1})
    _, response = ask(page, "Go on", max_tokens="4")
    sent = json.loads(response.request.post_data)["messages"]
    assert sent[1] == {"role": "assistant", "content": answer_text(answer)}  # the partial answer is kept
    watch.check(server.url)
    page.close()


def test_model_page_shows_parameters_config_and_module_tree(browser, server):
    page, watch = open_page(browser, server)
    page.get_by_role("tab", name="Model").click()
    info = httpx.get(f"{server.url}/v1/lantern/inspect", headers=AUTH).json()
    total = info["parameters"]["total"]
    page.locator(".param-total").wait_for()
    assert f"{total:,}" in page.locator(".param-total").inner_text()
    assert page.locator(".params-table tfoot tr.total td").inner_text() == f"{total:,}"
    rows = dict(zip(page.locator(".card-config th").all_inner_texts(),
                    page.locator(".card-config td").all_inner_texts()))
    assert rows["hidden_size"] == f"{info['config']['hidden_size']:,}"
    assert rows["layers"] == str(info["config"]["layers"])
    assert page.locator(".module-tree").inner_text().strip() == info["module_tree"].strip()
    assert page.evaluate("location.hash") == "#model"
    page.screenshot(path=str(ARTIFACTS / "web-model-desktop.png"), full_page=True)
    # Tabs work from the keyboard too (arrow keys move between them).
    page.get_by_role("tab", name="Model").focus()
    page.keyboard.press("ArrowRight")
    assert page.get_by_role("tab", name="Tokenizer").get_attribute("aria-selected") == "true"
    assert page.locator("#page-tokenizer").is_visible() and page.locator("#page-model").is_hidden()
    watch.check(server.url)
    page.close()


def test_tokenizer_playground_shows_the_servers_ids_and_pieces(browser, server):
    page, watch = open_page(browser, server)
    page.goto(server.url + "/#tokenizer")
    text = "Hello world! café 🙂 東京\n\tThe quick brown fox"
    box = page.get_by_label("Text to tokenize")
    with page.expect_response(lambda r: r.url.endswith("/tokenize") and
                              json.loads(r.request.post_data).get("prompt") == text):
        box.fill(text)
    expected = api(server, "/tokenize", {"prompt": text})
    page.wait_for_function("n => document.querySelectorAll('#tok-tokens .tchip').length === n",
                           arg=expected["count"])
    chips = page.locator("#tok-tokens .tchip")
    assert [int(i) for i in chips.evaluate_all("els => els.map(e => e.dataset.id)")] == expected["tokens"]
    assert chips.locator(".tid").all_inner_texts() == [str(i) for i in expected["tokens"]]
    pieces = chips.locator(".tokstr").evaluate_all("els => els.map(e => JSON.parse(e.title))")
    assert pieces == expected["token_strs"]
    assert page.locator("#tok-count").inner_text().startswith(f"{expected['count']} tokens")
    assert page.get_by_label("Token ids").input_value() == ", ".join(map(str, expected["tokens"]))
    page.screenshot(path=str(ARTIFACTS / "web-tokenizer-desktop.png"), full_page=True)

    # Through the chat template: the ids of one user message with the generation prompt.
    with page.expect_response(lambda r: r.url.endswith("/tokenize") and "messages" in r.request.post_data):
        page.get_by_label("As a chat message (apply the chat template)").check()
    chat = api(server, "/tokenize", {"messages": [{"role": "user", "content": text}], "add_generation_prompt": True})
    page.wait_for_function("n => document.querySelectorAll('#tok-tokens .tchip').length === n", arg=chat["count"])
    assert [int(i) for i in chips.evaluate_all("els => els.map(e => e.dataset.id)")] == chat["tokens"]
    watch.check(server.url)
    page.close()


def test_phone_width_layout_chat_inspector_and_model_page(browser, server):
    page, watch = open_page(browser, server, width=390, height=844)
    overflow = "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    assert page.evaluate(overflow) == 0
    answer, _ = ask(page, "Hello from a phone", max_tokens="20")
    page.get_by_label("Colour by probability").check()
    assert page.evaluate(overflow) == 0
    page.screenshot(path=str(ARTIFACTS / "web-chat-phone.png"))
    answer.locator(".tok").nth(2).click()
    panel = page.locator("#inspector")
    panel.locator(".lens .depth").first.wait_for()
    box = panel.bounding_box()
    assert box["x"] == 0 and box["width"] == 390 and box["y"] + box["height"] <= 844 + 1  # a bottom sheet
    assert page.evaluate(overflow) == 0
    page.screenshot(path=str(ARTIFACTS / "web-inspector-phone.png"))
    page.get_by_role("button", name="Close the token details").click()
    assert panel.is_hidden()
    page.get_by_role("tab", name="Model").click()
    page.locator(".param-total").wait_for()
    assert page.evaluate(overflow) == 0
    page.screenshot(path=str(ARTIFACTS / "web-model-phone.png"))
    page.get_by_role("tab", name="Tokenizer").click()
    page.locator("#tok-tokens .tchip").first.wait_for()
    assert page.evaluate(overflow) == 0
    page.screenshot(path=str(ARTIFACTS / "web-tokenizer-phone.png"))
    watch.check(server.url)
    page.close()


DOCUMENTS = {
    "bridge.md": "# The old bridge\n\nThe stone bridge over the river Wend was built in 1742 by the mason Tobias "
                 "Hartl.\nIt has seven arches and carried the mail coach until 1911.\n",
    "bees.txt": "Honeybees tell each other where flowers are with the waggle dance.\nThe angle of the dance "
                "points the way relative to the sun, and its length tells the distance.\n",
}
QUESTION = "When was the stone bridge over the Wend built?"


def test_documents_tab_uploads_files_and_shows_the_chunks_beside_the_answer(browser, rag_server):
    page, watch = open_page(browser, rag_server)
    page.get_by_role("tab", name="Documents").click()
    assert page.evaluate("location.hash") == "#documents"
    page.get_by_text("No documents yet").wait_for()

    # Asking an empty index shows the server's reason.
    page.get_by_label("Question").fill(QUESTION)
    page.get_by_role("button", name="Ask").click()
    page.locator("#rag-answer .error-text").wait_for()
    assert "has no documents" in page.locator("#rag-answer .error-text").inner_text()
    assert page.get_by_role("button", name="Ask").is_enabled()
    assert watch.errors == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]
    watch.errors.clear()

    # Two files through the file input, uploaded one by one, then listed with their chunk counts.
    files = [{"name": name, "mimeType": "text/plain", "buffer": text.encode()} for name, text in DOCUMENTS.items()]
    page.get_by_label("Add files").set_input_files(files)
    rows = page.locator(".docs-table tbody tr")
    page.wait_for_function("document.querySelectorAll('.docs-table tbody tr').length === 2")
    listed = httpx.get(f"{rag_server.url}/v1/lantern/rag/documents", params={"index": "default"}, headers=AUTH).json()
    chunks = {Path(d["path"]).name: d["chunks"] for d in listed["documents"]}
    assert set(chunks) == set(DOCUMENTS) and all(n >= 1 for n in chunks.values())
    shown = dict(zip(rows.locator("th").all_inner_texts(), rows.locator(".doc-chunks").all_inner_texts()))
    assert shown == {name: str(n) for name, n in chunks.items()}
    log = page.locator("#rag-upload-log li").all_inner_texts()
    assert log == [f"{name}: added, {chunks[name]} chunk{'' if chunks[name] == 1 else 's'}" for name in DOCUMENTS]
    assert f"{len(DOCUMENTS)} documents" in page.locator("#rag-index-info").inner_text()

    # The same file again changes nothing.
    page.get_by_label("Add files").set_input_files(files[:1])
    page.wait_for_function("() => /unchanged/.test(document.getElementById('rag-upload-log').textContent)")

    # Ask: the answer streams; the chunks found and the prompt show beside it.
    page.get_by_label("Question").fill(QUESTION)
    page.get_by_label("Passages").fill("2")
    page.locator("#rag-form").get_by_label("Max tokens").fill("12")
    page.locator("#rag-form").get_by_label("Temperature").fill("0")
    with page.expect_response(lambda r: r.url.endswith("/v1/lantern/rag/ask")) as response:
        page.get_by_label("Question").press("Enter")
    page.wait_for_function("document.getElementById('rag-results').getAttribute('aria-busy') === 'false'")
    assert response.value.headers["content-type"].startswith("text/event-stream")
    sent = json.loads(response.value.request.post_data)
    assert sent == {"index": "default", "question": QUESTION, "k": 2, "max_tokens": 12, "temperature": 0,
                    "stream": True}
    events = sse_chunks(response.value)
    plan = events[0]["choices"][0]["plan"]
    reference = api(rag_server, "/v1/lantern/rag/ask", {k: v for k, v in sent.items() if k != "stream"})
    assert plan == reference["plan"]

    # The first chunk shown is from the document that holds the answer; the scores are the API's.
    hits = page.locator("#rag-hits .hit")
    assert hits.count() == len(reference["plan"]["hits"]) == 2
    assert Path(hits.first.get_attribute("data-source")).name == "bridge.md"
    assert hits.first.locator(".hit-file").inner_text() == "bridge.md"
    assert "Tobias Hartl" in hits.first.locator(".hit-text").inner_text()
    scores = hits.locator(".score-num")
    assert [float(s) for s in scores.evaluate_all("els => els.map(e => e.dataset.score)")] == \
        [h["score"] for h in reference["plan"]["hits"]]
    assert scores.all_inner_texts() == [f"{h['score']:.3f}" for h in reference["plan"]["hits"]]
    widths = hits.locator(".score .bar-fill").evaluate_all("els => els.map(e => parseFloat(e.style.width))")
    assert widths == pytest.approx([max(0, min(1, h["score"])) * 100 for h in reference["plan"]["hits"]], abs=1e-3)

    # The answer is exactly the text that arrived (and, greedy, the API's answer); its sources are listed.
    streamed = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert streamed and page.locator("#rag-answer").evaluate("el => el.textContent") == streamed
    assert streamed == reference["answer"]
    assert events[-1]["choices"][0]["sources"] == reference["sources"]
    sources = page.locator("#rag-sources li")
    assert len(reference["sources"]) == 2
    assert [t.split(" · ")[0] for t in sources.all_inner_texts()] == \
        [f"[{s['n']}] {Path(s['source']).name}, {s['position']}" for s in reference["sources"]]
    assert page.locator("#rag-status").inner_text().startswith(
        {"length": "hit the token limit", "stop": "finished"}[reference["finish_reason"]])

    # The question's tokens and the exact prompt, each behind a disclosure.
    assert f"({len(plan['query']['tokens'])} tokens)" in page.locator("#rag-query summary").inner_text()
    prompt = page.locator("#rag-prompt")
    assert prompt.locator("summary").inner_text() == f"Prompt ({plan['prompt_tokens']} tokens)"
    assert page.locator("#rag-prompt-text").is_hidden()
    prompt.locator("summary").click()
    assert page.locator("#rag-prompt-text").evaluate("el => el.textContent") == reference["plan"]["prompt"]
    page.locator("main").evaluate("el => el.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "web-documents-desktop.png"))

    # Keyboard: a source takes the focus to its chunk; Enter on a chunk's heading folds it.
    sources.nth(1).get_by_role("button").focus()
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement === document.querySelector('#rag-hit-2 > summary')")
    page.keyboard.press("Enter")
    assert not page.locator("#rag-hit-2").evaluate("el => el.open")
    page.keyboard.press("Enter")
    assert page.locator("#rag-hit-2").evaluate("el => el.open")

    # A 390px phone: nothing wider than the screen, the chunks below the answer.
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth") == 0
    answer_box, chunks_box = page.evaluate("""() => ['.rag-answer', '.rag-evidence'].map(s => {
        const r = document.querySelector(s).getBoundingClientRect();  // both at once: the page may be scrolling
        return {top: r.top, bottom: r.bottom, left: r.left, right: r.right};
    })""")
    assert chunks_box["top"] >= answer_box["bottom"] and chunks_box["left"] >= 0 and chunks_box["right"] <= 390
    page.locator(".rag-answer").evaluate("el => el.scrollIntoView({block: 'start', behavior: 'instant'})")
    page.screenshot(path=str(ARTIFACTS / "web-documents-phone.png"))
    watch.check(rag_server.url)
    page.close()


def test_documents_tab_says_how_to_turn_retrieval_on(browser, server):
    page, watch = open_page(browser, server)
    page.get_by_role("tab", name="Chat").focus()
    page.keyboard.press("ArrowRight")  # the tabs from the keyboard: Chat, then Documents
    assert page.get_by_role("tab", name="Documents").get_attribute("aria-selected") == "true"
    error = page.locator("#rag-docs-error")
    error.wait_for(state="visible")
    r = httpx.get(f"{server.url}/v1/lantern/rag/documents", params={"index": "default"}, headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["message"] in error.inner_text()
    assert "--embedding-model all-minilm-l6-v2" in error.inner_text()
    assert page.get_by_role("button", name="Ask").is_disabled()
    assert page.get_by_label("Add files").is_disabled()
    page.screenshot(path=str(ARTIFACTS / "web-documents-off.png"))
    watch.check(server.url, allow=("status of 400",))
    page.close()
