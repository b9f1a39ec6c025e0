"""Files to plain text: which files a path names (folders recurse), and the text Lantern indexes from each.

Text and Markdown are indexed as written, so a chunk's character and line positions are positions in the
file. HTML is reduced to its visible text with the standard library's `html.parser` (scripts and styles
are dropped, of the head only the title is kept, block elements become line breaks), and PDF to the text
of its pages with pypdf; their positions are positions in that extracted text (for a PDF, also the page).
The content hash is the sha256 of the file's bytes: it alone decides whether a file changed.
"""

from __future__ import annotations

import hashlib
import html.parser
import os
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LanternError

SUFFIXES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown",
            ".html": "html", ".htm": "html", ".pdf": "pdf"}
MAX_BYTES = 64 << 20  # a single file larger than this is refused, not read into memory


@dataclass(frozen=True)
class Document:
    """A file's indexable text, its kind, and the sha256 and size of the bytes it came from."""
    path: Path
    kind: str
    text: str
    sha256: str
    size: int
    page_starts: tuple[int, ...] = field(default=())   # PDF: the character where each page begins

    def page_of(self, char: int) -> int | None:
        """1-based page of a character offset (PDF only)."""
        return bisect_right(self.page_starts, char) if self.page_starts else None


def find_files(paths: list[str | os.PathLike]) -> list[Path]:
    """Every indexable file the arguments name: files as given, folders recursed for known suffixes
    (hidden files and folders skipped), absolute, in a stable order, without duplicates."""
    found: dict[Path, None] = {}
    for arg in paths:
        path = Path(arg).expanduser().resolve()
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith(".") and Path(name).suffix.lower() in SUFFIXES:
                        found[Path(root) / name] = None
        elif path.is_file():
            kind_of(path)  # an explicit file of an unknown type is an error, not silently skipped
            found[path] = None
        else:
            raise LanternError(f"{arg}: no such file or folder")
    return list(found)


def kind_of(path: Path) -> str:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise LanternError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                           f"Lantern indexes {', '.join(sorted(SUFFIXES))}")
    return kind


def file_sha256(path: Path) -> tuple[str, int]:
    """sha256 and size of a file's bytes (read in 1 MiB pieces)."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
            size += len(piece)
    return digest.hexdigest(), size


def read_document(path: Path) -> Document:
    """The file's text, extracted according to its suffix."""
    kind = kind_of(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise LanternError(f"{path}: {size / 1e6:.0f} MB is more than the {MAX_BYTES >> 20} MiB Lantern indexes "
                           "from one file; split it")
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if kind == "pdf":
        text, starts = pdf_text(path, data)
        return Document(path, kind, text, sha, len(data), starts)
    text = decode_text(data)
    if kind == "html":
        text = html_text(text)
    return Document(path, kind, text, sha, len(data))


def decode_text(data: bytes) -> str:
    """UTF-8 (a BOM is dropped); bytes that are not UTF-8 become U+FFFD rather than failing the whole file."""
    text = data.decode("utf-8", errors="replace")
    return text[1:] if text.startswith("\ufeff") else text


# ---------------------------------------------------------------------- HTML

_BLOCK = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer", "main",
          "nav", "aside", "blockquote", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "dt", "dd", "dl",
          "figure", "figcaption", "form", "title", "td", "th"}
_HIDDEN = {"script", "style", "noscript", "template", "svg"}


class _VisibleText(html.parser.HTMLParser):
    """Collects the text a browser would show, plus the title; entities are decoded by the parser."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0      # depth inside script/style/...
        self.head = False    # inside <head>, where only the <title> is text
        self.title = False
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        self._tag(tag, +1)

    def handle_endtag(self, tag):
        self._tag(tag, -1)

    def _tag(self, tag, step):
        if tag in _HIDDEN:
            self.hidden = max(self.hidden + step, 0)
        elif tag == "head":
            self.head = step > 0
        elif tag == "body":
            self.head = False
        elif tag == "title":
            self.title = step > 0
        elif tag == "pre":
            self.pre = max(self.pre + step, 0)
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.hidden or (self.head and not self.title):
            return
        self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_text(source: str) -> str:
    """Visible text of an HTML page: one line per block element, runs of blank lines collapsed to one."""
    parser = _VisibleText()
    parser.feed(source)
    parser.close()
    lines = [line.strip() for line in "".join(parser.parts).split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


# ---------------------------------------------------------------------- PDF

def pdf_text(path: Path, data: bytes) -> tuple[str, tuple[int, ...]]:
    """The text of each page (pypdf), pages separated by a blank line; and where each page begins."""
    try:
        import pypdf
    except ImportError:
        raise LanternError(f"{path}: reading PDF needs the pypdf package (pip install pypdf)") from None
    import io
    import logging
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # pypdf warns about every quirk of real-world files
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise LanternError(f"{path}: the PDF is encrypted; Lantern cannot read it")
        pages = [page.extract_text() or "" for page in reader.pages]
    except LanternError:
        raise
    except Exception as e:  # pypdf raises many types for malformed files
        raise LanternError(f"{path}: not a readable PDF ({type(e).__name__}: {' '.join(str(e).split())[:200]})") \
            from None
    starts, parts, at = [], [], 0
    for page in pages:
        starts.append(at)
        page = page.strip() + "\n\n"
        parts.append(page)
        at += len(page)
    return "".join(parts), tuple(starts)
