"""The fuzz targets: input generators (hypothesis strategies) and the property each input must satisfy.

Property, for every target: any input gives either a result or Lantern's own error (ModelFileError for model
files, TemplateError for chat templates), never another exception. Hangs and unbounded allocations are caught
by the runner (a per-example time bound and a memory cap, see fuzz/__main__.py); a render that only stopped
because it ran out of memory also fails here, since the budget should have refused it first.

Each target is `check(data)` for one generated input plus `strategy()`; `save(data, path)` writes an input in
a form a person can replay (`python -m fuzz replay TARGET FILE`).
"""

from __future__ import annotations

import atexit
import json
import shutil
import struct
import tempfile
from pathlib import Path

from hypothesis import strategies as st

from lanternlm.errors import ModelFileError, TemplateError


class PropertyFailure(AssertionError):
    """An input broke the property in a way that raised no exception (e.g. a render that hit the memory cap)."""


# Values that sit on the edges of integer fields: zero, one, sign bits, all-ones, and sizes that overflow
# products and sums.
BOUNDARY = [0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
            2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def _u64s() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(BOUNDARY), st.integers(0, 64), st.integers(0, 2**64 - 1))


def _mutated(data: bytes, edits: list[tuple[int, int, int]], cut: int | None) -> bytes:
    """Apply (position, width, value) overwrites to `data`, then cut it at `cut` if given."""
    out = bytearray(data)
    for pos, width, value in edits:
        if not out:
            break
        pos %= len(out)
        out[pos : pos + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    if cut is not None and out:
        out = out[: cut % (len(out) + 1)]
    return bytes(out)


def _mostly(good, bad, percent_bad: int = 10) -> st.SearchStrategy:
    """`bad` about `percent_bad` times in a hundred, else `good` (one_of would pick each half of the time):
    inputs that pass the first checks reach the deeper ones."""
    return st.integers(0, 999).flatmap(lambda n: bad if 450 <= n < 450 + 10 * percent_bad else good)


_edits = st.lists(st.tuples(st.integers(0, 2**16), st.sampled_from([1, 4, 8]),
                            st.one_of(st.sampled_from(BOUNDARY), st.integers(0, 255))), min_size=1, max_size=3)
_edits = _mostly(st.just([]), _edits, percent_bad=50)
_cuts = _mostly(st.none(), st.integers(0, 2**16))
_workdir: Path | None = None


def _scratch(name: str) -> Path:
    """A file path in this process's scratch folder (inputs are written there to be opened as files)."""
    global _workdir
    if _workdir is None:
        _workdir = Path(tempfile.mkdtemp(prefix="lantern-fuzz-"))
        atexit.register(shutil.rmtree, _workdir, ignore_errors=True)
    return _workdir / name


# --------------------------------------------------------------------------------------------------- GGUF

_GGUF_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q",
                    12: "<d"}


def _gguf_string(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


_utf8 = _mostly(st.text(max_size=12).map(str.encode), st.binary(max_size=12))  # names and strings, mostly valid
_names = st.one_of(st.sampled_from([b"general.architecture", b"general.alignment", b"tokenizer.ggml.tokens",
                                    b"token_embd.weight", b"blk.0.attn_q.weight", b"", b"\xff\xfe"]), _utf8)


@st.composite
def _gguf_value(draw, depth: int = 0) -> bytes:
    """(type id + encoded value) of one metadata value: mostly well-formed, sometimes not."""
    kind = draw(_mostly(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]), st.integers(0, 2**32 - 1)))
    if kind in _GGUF_SCALAR_FMT:
        size = struct.calcsize(_GGUF_SCALAR_FMT[kind])
        return struct.pack("<I", kind) + draw(st.binary(min_size=size, max_size=size))
    if kind == 8:
        return struct.pack("<I", kind) + _gguf_string(draw(_utf8))
    if kind == 9 and depth < 2:
        elem = draw(_mostly(st.sampled_from([0, 4, 5, 6, 7, 8, 9, 10, 12]), st.integers(0, 2**32 - 1)))
        count = draw(_mostly(st.integers(0, 6), st.sampled_from(BOUNDARY), percent_bad=20))
        if elem == 8:
            body = b"".join(_gguf_string(draw(_utf8)) for _ in range(min(count, 6)))
        elif elem in _GGUF_SCALAR_FMT:
            body = draw(st.binary(max_size=min(count, 6) * struct.calcsize(_GGUF_SCALAR_FMT[elem])))
        else:
            body = draw(st.binary(max_size=16))
        return struct.pack("<IIQ", kind, elem, count) + body
    return struct.pack("<I", kind) + draw(st.binary(max_size=8))


@st.composite
def _gguf_tensor_info(draw) -> bytes:
    name = draw(_names)
    n_dims = draw(st.one_of(st.integers(0, 4), st.sampled_from([5, 2**31, 2**32 - 1])))
    dims = [draw(st.one_of(st.integers(1, 512), st.sampled_from(BOUNDARY))) for _ in range(min(n_dims, 5))]
    ggml_type = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30]),
                               st.integers(0, 64), st.integers(0, 2**32 - 1)))
    offset = draw(st.one_of(st.integers(0, 64).map(lambda n: n * 32), _u64s()))
    out = _gguf_string(name) + struct.pack("<I", n_dims)
    out += b"".join(struct.pack("<Q", d % 2**64) for d in dims)
    return out + struct.pack("<IQ", ggml_type % 2**32, offset)





# (block size, bytes per block) of the ggml types Lantern dequantizes (F32, F16, BF16, Q4_0 ... Q6_K).
_LAYOUTS = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
            10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210)}


@st.composite
def _valid_tensor(draw, offset: int, alignment: int) -> tuple[bytes, int]:
    """A tensor-table entry whose data fits at `offset`; returns it and the offset after its (aligned) data."""
    ggml_type = draw(st.sampled_from(sorted(_LAYOUTS)))
    block, size = _LAYOUTS[ggml_type]
    dims = [block * draw(st.integers(1, 3))] + [draw(st.integers(1, 3)) for _ in range(draw(st.integers(0, 3)))]
    nbytes = size
    for dim in dims:
        nbytes *= dim
    nbytes //= block
    entry = _gguf_string(draw(_names)) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
    entry += struct.pack("<IQ", ggml_type, offset)
    return entry, -(-(offset + nbytes) // alignment) * alignment


@st.composite
def gguf_files(draw) -> bytes:
    """A GGUF file: header, metadata, tensor table and data, built field by field, then maybe mutated.

    Mostly well-formed (right magic, version and counts, tensors whose data fits) so that inputs get past the
    header into the metadata, the tensor table and dequantization; every field is sometimes wrong.
    """
    version = draw(_mostly(st.sampled_from([3, 2]), st.sampled_from([0, 1, 4, 2**24, 2**32 - 1])))
    alignment = 32
    kvs = []
    if draw(st.integers(0, 3)) == 0:
        alignment = draw(_mostly(st.sampled_from([1, 8, 16, 32, 64]), st.sampled_from([0, 3, 2**31, 2**32 - 1])))
        kvs.append(_gguf_string(b"general.alignment") + struct.pack("<II", 4, alignment))
    kvs += [_gguf_string(draw(_names)) + draw(_gguf_value()) for _ in range(draw(st.integers(0, 5)))]
    tensors = []
    offset = 0
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 4)) == 0:
            tensors.append(draw(_gguf_tensor_info()))
        else:
            entry, offset = draw(_valid_tensor(offset, alignment if alignment and alignment < 2**16 else 32))
            tensors.append(entry)
    n_kv = draw(_mostly(st.just(len(kvs)), _u64s()))
    n_tensors = draw(_mostly(st.just(len(tensors)), _u64s()))
    magic = draw(_mostly(st.just(b"GGUF"), st.binary(min_size=4, max_size=4)))
    head = magic + struct.pack("<IQQ", version, n_tensors % 2**64, n_kv % 2**64) + b"".join(kvs) + b"".join(tensors)
    pad = -len(head) % (alignment if alignment and alignment < 2**16 else 32)
    data = head + b"\0" * pad + draw(st.binary(min_size=offset, max_size=offset + 64))
    return _mutated(data, draw(_edits), draw(_cuts))


def check_gguf(data: bytes) -> None:
    from lanternlm.loader.gguf import read_gguf

    path = _scratch("fuzz.gguf")
    path.write_bytes(data)
    try:
        with read_gguf(path) as f:
            for name in f.tensors:
                f.raw(name)
                f.tensor(name)
                f.release(name)
    except ModelFileError:
        pass


# ------------------------------------------------------------------------------------------- safetensors

_ST_DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL",
              "F8_E4M3", "F8_E5M2", "F4", "E8M0", "C64", "f32", "", "X"]
_ints = st.one_of(st.integers(0, 64), st.sampled_from(BOUNDARY), st.integers(-(2**64), 2**64))
_json_scalars = st.one_of(st.none(), st.booleans(), _ints, st.floats(allow_nan=False), st.text(max_size=8))


@st.composite
def _st_entry(draw):
    if draw(st.integers(0, 9)) == 0:  # a value of the wrong shape altogether
        return draw(st.one_of(_json_scalars, st.lists(_json_scalars, max_size=3),
                              st.dictionaries(st.text(max_size=6), _json_scalars, max_size=3)))
    entry = {
        "dtype": draw(st.one_of(st.sampled_from(_ST_DTYPES), _json_scalars)),
        "shape": draw(st.one_of(st.lists(st.one_of(st.integers(0, 8), _ints), max_size=4), _json_scalars)),
        "data_offsets": draw(st.one_of(st.lists(st.one_of(st.integers(0, 256), _ints), min_size=2, max_size=2),
                                       st.lists(_ints, max_size=3), _json_scalars)),
    }
    for key in draw(st.lists(st.sampled_from(["dtype", "shape", "data_offsets"]), max_size=1)):
        del entry[key]
    return entry


_ST_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4,
             "I64": 8, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}


@st.composite
def safetensors_files(draw) -> bytes:
    """A .safetensors file: 8-byte header length, JSON header, data.

    Mostly consistent (known dtypes, offsets that tile the data exactly) so inputs reach tensor loading; entries,
    the length and the bytes are sometimes wrong, and fields are drawn near and past their limits.
    """
    header: dict = {}
    offset = 0
    for index in range(draw(st.integers(0, 4))):
        name = draw(_mostly(st.sampled_from(["w", "model.embed_tokens.weight", f"t{index}"]),
                            st.one_of(st.text(max_size=8), st.just("__metadata__"))))
        if draw(st.integers(0, 4)) == 0:
            header[name] = draw(_st_entry())
            continue
        dtype = draw(st.sampled_from(sorted(_ST_SIZES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        nbytes = _ST_SIZES[dtype]
        for dim in shape:
            nbytes *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = draw(_mostly(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
                                              _json_scalars))
    text = json.dumps(header).encode()
    choice = draw(st.integers(0, 9))
    if choice == 0:
        text = draw(st.binary(max_size=64))  # not JSON at all
    elif choice == 1:
        text = text + b" " * draw(st.integers(0, 16))  # padding, as writers align the header
    length = draw(_mostly(st.just(len(text)), _u64s()))
    data = struct.pack("<Q", length % 2**64) + text
    data += draw(_mostly(st.binary(min_size=offset, max_size=offset), st.binary(max_size=offset + 64)))
    return _mutated(data, draw(_edits), draw(_cuts))


def check_safetensors(data: bytes) -> None:
    import torch

    from lanternlm.loader import hf

    folder = _scratch("safetensors")
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(data)
    try:
        hf.load_tensors(hf.weight_files(folder), torch.float32, "cpu")
    except ModelFileError:
        pass


# ------------------------------------------------------------------------------------------ chat templates

_BIG = st.sampled_from([0, 1, 2, 7, 60, 1000, 10**5, 10**6, 10**7, 10**9, 2**31, 2**63, 10**30, -1, -(10**9)])
_SMALL = st.integers(-3, 20)
_STRINGS = st.sampled_from(["''", "'x'", "'ab'", "' a b '", "'\\n'", "'%s'", "'%d'", "'%*s'", "'{}'", "'{:>9}'",
                            "'{0.__class__}'", "'<think>'", "'\\t'", "'%999999999s'", "'é✓'", "'{:>{}}'"])
_NAMES = ["x", "y", "s", "ns.v", "messages", "m", "loop.index", "loop.length", "bos_token", "eos_token", "tools",
          "add_generation_prompt", "m.content", "m['role']", "messages[0]", "messages[-1].content", "cycler",
          "joiner", "range", "undefined_name", "self", "caller", "varargs", "kwargs", "loop", "namespace"]
_FILTERS = ["length", "upper", "lower", "trim", "list", "sort", "unique", "reverse", "first", "last", "tojson",
            "string", "int", "float", "abs", "round", "sum", "max", "min", "count", "title", "capitalize",
            "wordcount", "striptags", "e", "safe", "items", "dictsort", "pprint", "urlize", "filesizeformat",
            "default('d')", "join", "join(',')", "join('{s}')", "replace('a', {s})", "replace('', {s})",
            "center({n})", "indent({n})", "indent({s})", "wordwrap({n})", "batch({n})", "slice({n})",
            "truncate({n})", "tojson(indent={n})", "format({s}, {n})", "map('upper')", "map(attribute='role')",
            "select('odd')", "reject('none')", "selectattr('role', 'equalto', 'user')", "groupby('role')",
            "sum(start=[])", "xmlattr", "random", "attr('content')", "map('string')|join", "int(base={n})",
            "forceescape", "urlencode", "center({s})", "batch({n}, {s})"]
_METHODS = ["split({s})", "split()", "strip()", "startswith({s})", "endswith({s})", "ljust({n})", "rjust({n})",
            "zfill({n})", "format({s}, {n})", "replace({s}, {s})", "count({s})", "join({x})", "items()",
            "get({s})", "upper()", "expandtabs({n})", "center({n}, {s})", "splitlines()", "partition({s})",
            "index({s})", "find({s})", "__class__", "append(1)", "update({{}})", "keys()", "values()",
            "format_map({{'a': {n}}})", "translate({{97: {s}}})", "encode()", "isdigit()", "title()"]


@st.composite
def _expr(draw, depth: int = 0) -> str:
    n = draw(st.one_of(_SMALL, _BIG))
    s = draw(_STRINGS)
    leaf = draw(st.sampled_from(["n", "s", "name", "list", "dict", "call"]))
    if leaf == "n":
        e = str(n)
    elif leaf == "s":
        e = s
    elif leaf == "name":
        e = draw(st.sampled_from(_NAMES))
    elif leaf == "list":
        e = "[" + ", ".join(str(draw(_SMALL)) for _ in range(draw(st.integers(0, 3)))) + "]"
    elif leaf == "dict":
        e = "{'role': " + s + ", 'content': " + str(n) + "}"
    else:
        e = draw(st.sampled_from([f"range({n})", f"lipsum({n})", "namespace(v=1)", f"dict(a={n})",
                                  "strftime_now('%Y')", f"raise_exception({s})", "f(1)", "f(x)", "caller()",
                                  "cycler(1, 2)", "joiner()", f"range({n}, {draw(_SMALL)}, {draw(_SMALL)})"]))
    if depth >= 3:
        return e
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["filter", "method", "binop", "compare", "test", "slice", "index", "cond",
                                   "not", "neg"]))
        other = draw(_expr(depth + 1))
        n2 = str(draw(st.one_of(_SMALL, _BIG)))
        if op == "filter":
            e = f"({e})|" + draw(st.sampled_from(_FILTERS)).format(n=n2, s=draw(_STRINGS))
        elif op == "method":
            e = f"({e})." + draw(st.sampled_from(_METHODS)).format(n=n2, s=draw(_STRINGS), x=other)
        elif op == "binop":
            e = f"({e}) {draw(st.sampled_from(['+', '-', '*', '/', '//', '%', '**', '~', 'and', 'or']))} ({other})"
        elif op == "compare":
            e = f"({e}) {draw(st.sampled_from(['==', '!=', '<', '>=', 'in', 'not in']))} ({other})"
        elif op == "test":
            e = f"({e}) is " + draw(st.sampled_from(["defined", "none", "string", "mapping", "iterable",
                                                     f"divisibleby({n2})", "sameas(1)", "odd", "in([1])",
                                                     "number", "callable", "lower", "eq(1)"]))
        elif op == "slice":
            e = f"({e})[{draw(_SMALL)}:{n2}:{draw(st.sampled_from(['', '1', '-1', '2', '0']))}]"
        elif op == "index":
            e = f"({e})[{draw(st.sampled_from([n2, s, other]))}]"
        elif op == "cond":
            e = f"({e}) if ({other}) else {s}"
        elif op == "not":
            e = f"not ({e})"
        else:
            e = f"-({e})"
    return e


@st.composite
def _statements(draw, depth: int = 0) -> str:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["output", "text", "set", "for", "if", "macro", "ns", "filterblock",
                                     "generation", "call", "control", "junk", "raw"]
                                    if depth < 3 else ["output", "text", "set", "ns", "control"]))
        e = draw(_expr())
        if kind == "output":
            out.append("{{ " + e + " }}")
        elif kind == "text":
            out.append(draw(st.sampled_from(["<|im_start|>", "\n", "  ", "x" * 100, "{#c#}", "{{-' '-}}"])))
        elif kind == "set":
            out.append("{% set " + draw(st.sampled_from(["x", "y", "s", "m"])) + " = " + e + " %}")
        elif kind == "for":
            body = draw(_statements(depth + 1))
            target = draw(st.sampled_from(["m", "x", "x, y", "i"]))
            tail = draw(st.sampled_from(["", " if x", " recursive"]))
            out.append("{% for " + target + " in " + e + tail + " %}" + body
                       + draw(st.sampled_from(["", "{% else %}e"])) + "{% endfor %}")
        elif kind == "if":
            out.append("{% if " + e + " %}" + draw(_statements(depth + 1)) + "{% elif " + draw(_expr()) + " %}"
                       + draw(_statements(depth + 1)) + "{% else %}" + draw(_statements(depth + 1)) + "{% endif %}")
        elif kind == "macro":
            out.append("{% macro f(x, y=1) %}" + draw(_statements(depth + 1)) + "{% endmacro %}{{ f(" + e + ") }}")
        elif kind == "ns":
            out.append("{% set ns = namespace(v=" + e + ") %}{% set ns.v = " + draw(_expr()) + " %}")
        elif kind == "filterblock":
            out.append("{% filter " + draw(st.sampled_from(["upper", "trim", "indent(4)", "replace('a','bb')"]))
                       + " %}" + draw(_statements(depth + 1)) + "{% endfilter %}")
        elif kind == "generation":
            out.append("{% generation %}" + draw(_statements(depth + 1)) + "{% endgeneration %}")
        elif kind == "call":
            out.append("{% macro f(x, y=1) %}" + draw(_statements(depth + 1)) + "{% endmacro %}"
                       "{% call(a) f(" + e + ") %}" + draw(_statements(depth + 1)) + "{% endcall %}")
        elif kind == "control":
            out.append(draw(st.sampled_from(["{% break %}", "{% continue %}", "{{ loop.cycle(1, 2) }}",
                                             "{{ loop(x) }}", "{{ loop.previtem }}"])))
        elif kind == "junk":
            out.append(draw(st.text(alphabet="{}%#-+~|()[]'\"xa1 \n", max_size=12)))
        else:
            out.append("{% raw %}{{ x }}{% endraw %}")
    return "".join(out)


_content = st.one_of(st.text(max_size=30), st.sampled_from(["", "a" * 1000, "<think>r</think>x", "%s{}\t\n"]))


@st.composite
def _message(draw) -> dict:
    message = {"role": draw(st.sampled_from(["user", "assistant", "system", "tool", "x"]))}
    if draw(st.integers(0, 4)) == 0:
        message["content"] = [{"type": "text", "text": draw(_content)}, {"type": "image"}]
    else:
        message["content"] = draw(_content)
    if draw(st.integers(0, 5)) == 0:
        message["tool_calls"] = [{"type": "function", "function": {"name": "f", "arguments": {"a": draw(_SMALL)}}}]
    if draw(st.integers(0, 5)) == 0:
        message["reasoning_content"] = draw(_content)
    return message


@st.composite
def templates(draw) -> dict:
    """A chat template source built from jinja fragments, and the messages to render it with."""
    return {
        "source": draw(_statements()),
        "messages": draw(st.lists(_message(), min_size=1, max_size=4)),
        "add_generation_prompt": draw(st.booleans()),
        "tools": draw(st.one_of(st.none(), st.just([{"type": "function", "function": {"name": "t"}}]))),
    }


def check_template(case: dict) -> None:
    from lanternlm.text.chat import MAX_TEXT_CHARS, ChatTemplate

    try:
        prompt = ChatTemplate(case["source"], bos_token="<s>", eos_token="</s>").render(
            case["messages"], add_generation_prompt=case["add_generation_prompt"], tools=case["tools"])
    except TemplateError as e:
        # The budget must stop a template before memory runs out or the backstop clock fires.
        if "ran out of memory" in str(e) or "took longer than" in str(e):
            raise PropertyFailure(f"the render budget did not stop it: {e}") from None
        return
    if not isinstance(prompt, str) or len(prompt) > MAX_TEXT_CHARS:
        raise PropertyFailure(f"render returned {type(prompt).__name__} of length {len(prompt)}")


# ---------------------------------------------------------------------------------------------- registry


def _save_bytes(data: bytes, path: Path) -> None:
    path.write_bytes(data)


def _save_json(case: dict, path: Path) -> None:
    path.write_text(json.dumps(case, indent=1, ensure_ascii=False))


TARGETS = {
    "gguf": (gguf_files, check_gguf, _save_bytes, lambda path: path.read_bytes(), ".gguf"),
    "safetensors": (safetensors_files, check_safetensors, _save_bytes, lambda path: path.read_bytes(),
                    ".safetensors"),
    "template": (templates, check_template, _save_json, lambda path: json.loads(path.read_text()), ".json"),
}
