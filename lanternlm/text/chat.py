"""Render a model's own Jinja chat template into prompt text, the way transformers'
``apply_chat_template(..., tokenize=False)`` does, inside a sandbox with resource limits.

Facts matched from transformers (see ``transformers/utils/chat_template_utils.py``):

* environment: jinja2 ``ImmutableSandboxedEnvironment`` with ``trim_blocks=True``, ``lstrip_blocks=True``,
  the ``loopcontrols`` extension and a ``{% generation %}`` block tag (which only renders its body here);
* ``tojson`` does not HTML-escape and accepts ``ensure_ascii``/``indent``/``separators``/``sort_keys``;
* globals ``raise_exception(msg)``, ``strftime_now(fmt)``, a ``dict`` with only construction and ``fromkeys``,
  and a ``namespace`` that refuses underscore-prefixed attribute names;
* variables: the special tokens, then the caller's extra context (which may override them), then
  ``messages``, ``tools``, ``documents`` and ``add_generation_prompt``;
* message keys whose value is ``None`` are dropped, and a message's reasoning given as ``reasoning_content``,
  ``thinking`` or ``reasoning`` is also exposed under ``thinking`` and ``reasoning_content``.

Chat templates travel inside downloaded model files, so they are treated as untrusted code. Besides the
jinja sandbox (no access to Python internals, no mutation of the caller's data), every render has a
budget that counts work: loop iterations, calls, total output, characters built, characters and items
scanned, and the size of every value produced by the operations that can multiply size (repetition,
concatenation, padding, replace, join, ...). A template that exceeds the budget raises
:class:`RenderLimitError` (a :class:`~lanternlm.errors.TemplateError`) instead of hanging or exhausting
memory. The budget counts, it does not time: the same template stops at the same point, with the same
error, on any machine and under any load.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import re
import time
import warnings
from collections.abc import Mapping
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.filters
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
from jinja2.compiler import CodeGenerator

from ..errors import LanternError, TemplateError

# --- Render budget. Far above anything a real chat template needs (a long conversation renders with a few
# thousand loop iterations and calls), far below what would hang the process or exhaust memory.
MAX_TEXT_CHARS = 10_000_000  # largest single string/list a template may build, and largest rendered prompt
MAX_TOTAL_OUTPUT_CHARS = 4 * MAX_TEXT_CHARS  # all text emitted, counting macro bodies that are re-emitted
# All text and items built by +, * and ~ and returned by calls: stops quadratic accumulation such as
# appending to a growing string in a long loop (each step copies the whole string).
MAX_BUILT_CHARS = 20 * MAX_TEXT_CHARS
# Work: characters and items read by filters, tests, comparisons, slices and calls, plus big-integer arithmetic,
# in units of about a nanosecond of CPU (a character scanned by C code). Stops loops that each rescan a huge
# value ({% for i in range(N) %}{% if big == other %}...) without building anything. Filters that spend far
# more per character or item (sorting, grouping, word wrapping, ...) are weighted by _FILTER_WORK. A real
# template reads each message a handful of times.
MAX_WORK = 1_000_000_000  # about a second of CPU
ITEM_WORK = 16  # a list or dict item costs a Python-level step; charge it like 16 characters of C-speed scan
CALL_WORK = 1_000  # a filter or test run by name for each item (map, select, ...): a few microseconds
# Per-unit weight of a filter's input, from measuring jinja's filters on this kind of machine (ns per character,
# or per item / ITEM_WORK): e.g. wordwrap goes through textwrap in Python, ~2 us per character.
_FILTER_WORK = {
    "title": 512, "wordwrap": 2048, "urlize": 2048, "wordcount": 256, "indent": 64, "striptags": 64,
    "urlencode": 64, "pprint": 256, "capitalize": 16, "trim": 8, "join": 8, "sum": 8, "tojson": 16,
    "sort": 256, "groupby": 512, "unique": 64, "map": 256, "select": 256, "reject": 256, "selectattr": 512,
    "rejectattr": 512, "batch": 32, "min": 32, "max": 32, "dictsort": 256, "list": 4, "reverse": 4,
}
# Loop iterations and calls. With the real templates of tests/test_chat.py, a 1,000-message conversation with
# 50 tools renders in at most ~2,000 loop iterations, ~2,000 calls and ~17,000,000 units of work, so these
# limits leave 50x or more room. They were 2,000,000 and 1,000,000, where a runaway template ran for seconds
# before being stopped (a macro call costs several microseconds) for no gain: no chat template comes near.
MAX_LOOP_ITERATIONS = 500_000
MAX_CALLS = 200_000
# Not a limit but a backstop: the counted limits above stop every template we know of within a few seconds.
# The clock only guards against work the counters miss, so it sits far above them; no test relies on it.
BACKSTOP_RENDER_SECONDS = 300.0
MAX_INT_BITS = 1 << 16  # integers beyond ~20,000 decimal digits only serve to burn CPU and memory
_MAX_DATA_DEPTH = 64  # nesting depth of messages/tools/documents data

# The budget travels in the render's variables under a name containing a space: jinja expressions can
# only name identifiers, so no template can read or replace it.
_BUDGET_KEY = "lantern render budget"
# jinja names the frames of a template compiled from a string "<template>" in rewritten tracebacks.
_TEMPLATE_FILENAME = "<template>"
# Variables the renderer itself provides; extra context may not replace them.
_RESERVED_NAMES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
# Names under which a message's reasoning text may arrive; the first is the one templates usually read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def no_template_error(model: str) -> TemplateError:
    """The error to raise when a chat request reaches a model that ships no chat template."""
    return TemplateError(
        f"{model}: the model has no chat template, so chat messages cannot be turned into a prompt; "
        "use raw text completion instead, or pass a chat template (Jinja source) explicitly"
    )


class _TemplateRaised(Exception):
    """The template called ``raise_exception(message)``."""


class _LimitExceeded(Exception):
    """The template went over its render budget; the message says which limit, ``limit`` names it."""

    def __init__(self, message: str, limit: str, requested: int = 0):
        super().__init__(message)
        self.limit = limit
        self.requested = requested


class RenderLimitError(TemplateError):
    """A render stopped by its budget.

    ``limit`` names the limit: a key of :data:`LIMITS`, ``"text_chars"`` / ``"int_bits"`` for a single value
    that would be too large, or ``"seconds"`` for the backstop clock. ``counted`` holds the budget's counters
    when it stopped, each at most its limit (the step that would cross a limit is refused, not counted).
    ``requested`` is the refused step: what it would have added to the counter, or the size of the value it
    would have built.
    """

    def __init__(self, message: str, limit: str, counted: dict[str, int], requested: int = 0):
        super().__init__(message)
        self.limit = limit
        self.counted = counted
        self.requested = requested


# Counter name -> its limit, for the budget and for callers of RenderLimitError.
LIMITS = {
    "loop_iterations": MAX_LOOP_ITERATIONS,
    "calls": MAX_CALLS,
    "output_chars": MAX_TOTAL_OUTPUT_CHARS,
    "built_chars": MAX_BUILT_CHARS,
    "work": MAX_WORK,
}


class _RenderBudget:
    """Counters for one render. Lives in the render's variables so concurrent renders never share it.

    Each charge is checked before it is added, so a counter never exceeds its limit: the step that would cross
    it raises instead.
    """

    __slots__ = ("loop_iterations", "calls", "output_chars", "built_chars", "work", "charges", "backstop")

    def __init__(self) -> None:
        self.loop_iterations = 0
        self.calls = 0
        self.output_chars = 0
        self.built_chars = 0
        self.work = 0
        self.charges = 0
        self.backstop = time.monotonic() + BACKSTOP_RENDER_SECONDS

    def counted(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in LIMITS}

    def _limit(self, counter: str, message: str, requested: int) -> None:
        raise _LimitExceeded(message, counter, requested)

    def _backstop(self) -> None:
        # Backstop only (see BACKSTOP_RENDER_SECONDS); reading the clock every 4096th step keeps it cheap.
        self.charges += 1
        if not self.charges & 4095 and time.monotonic() > self.backstop:
            raise _LimitExceeded(f"rendering took longer than {BACKSTOP_RENDER_SECONDS:g} seconds", "seconds")

    # One method per counter (not one generic one): these run on every loop step and call of a render.

    def loop_iteration(self) -> None:
        if self.loop_iterations >= MAX_LOOP_ITERATIONS:
            self._limit("loop_iterations", f"loops ran more than {MAX_LOOP_ITERATIONS:,} iterations", 1)
        self.loop_iterations += 1
        self._backstop()

    def call(self) -> None:
        if self.calls >= MAX_CALLS:
            self._limit("calls", f"more than {MAX_CALLS:,} function, macro or method calls", 1)
        self.calls += 1
        self._backstop()

    def output(self, chars: int) -> None:
        if self.output_chars + chars > MAX_TOTAL_OUTPUT_CHARS:
            self._limit("output_chars", f"the template emitted more than {MAX_TOTAL_OUTPUT_CHARS:,} characters",
                        chars)
        self.output_chars += chars
        self._backstop()

    def built(self, size: int) -> None:
        if self.built_chars + size > MAX_BUILT_CHARS:
            self._limit("built_chars", f"the template built more than {MAX_BUILT_CHARS:,} characters of strings "
                                       "and lists", size)
        self.built_chars += size
        self._backstop()

    def read(self, units: int) -> None:
        if self.work + units > MAX_WORK:
            self._limit("work", f"the template did more than {MAX_WORK:,} units of work (characters and items "
                                "scanned by filters, tests, comparisons and calls)", units)
        self.work += units
        self._backstop()


# --- Size checks run *before* an operation that can multiply size, so the huge value is never built.


def _check_size(size: int, what: str) -> None:
    if size > MAX_TEXT_CHARS:
        raise _LimitExceeded(f"{what} would be {size:,} long (limit {MAX_TEXT_CHARS:,})", "text_chars", size)


def _sized(value) -> int | None:
    """Length of a value whose size a template can grow (text or containers), else None."""
    if isinstance(value, (str, list, tuple, dict)):
        return len(value)
    return None


def _work_of(value) -> int:
    """What reading ``value`` once costs in the budget's work units: its characters, or its items weighted."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return len(value) * ITEM_WORK
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() >> 3  # big integers cost in proportion to their bytes
    return 0


def _int_op_work(left, right) -> int:
    # Multiplying or dividing big integers is quadratic in their size (in CPython's 30-bit digits).
    if _is_int(left) and _is_int(right):
        return (left.bit_length() // 30 + 1) * (right.bit_length() // 30 + 1)
    return 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise _LimitExceeded(f"an integer would need about {bits:,} bits (limit {MAX_INT_BITS:,})", "int_bits",
                             bits)


def _check_format_string(fmt: str, values) -> None:
    """Refuse ``%``/``str.format`` specs whose field width or precision would build a huge string.

    Widths can be written in the format string (``'%999999999s'``, ``'{:>999999999}'``) or passed as
    arguments (``'%*s'``, ``'{:>{}}'``), so both are checked: every number in the format string and, when
    the string takes widths from arguments, every integer argument.
    """
    for digits in re.findall(r"\d{8,}", fmt):
        _check_size(int(digits), "a formatted field")
    if "*" in fmt or "{" in fmt:
        for value in values:
            if _is_int(value):
                _check_size(value, "a formatted field")


def _joined_size(items, separator_len: int, to_text=str) -> None:
    """Check the length of ``separator.join(to_text(i) for i in items)`` without building it."""
    total = separator_len * max(len(items) - 1, 0)
    _check_size(total, "a joined string")
    for item in items:
        total += len(to_text(item))
        _check_size(total, "a joined string")


def _replaced_size(text: str, old: str, new: str, count) -> None:
    # str.replace with an empty `old` inserts `new` between every character.
    occurrences = len(text) + 1 if old == "" else text.count(old)
    if _is_int(count) and count >= 0:
        occurrences = min(occurrences, count)
    _check_size(len(text) + occurrences * max(len(new) - len(old), 0), "a replaced string")


def _precheck_str_method(name: str, text: str, args: tuple, kwargs: dict) -> tuple:
    """Size-check a call to a method of a str; returns the arguments to call it with."""
    if name in ("ljust", "rjust", "center", "zfill") and args and _is_int(args[0]):
        _check_size(args[0], f"str.{name}()")
    elif name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        if _is_int(tabsize):
            _check_size(len(text) + text.count("\t") * tabsize, "str.expandtabs()")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        _replaced_size(text, args[0], args[1], count)
    elif name == "join" and len(args) == 1:
        # Materialise the iterable once so checking it does not consume a generator.
        items = list(args[0])
        _joined_size(items, len(text), lambda item: item if isinstance(item, str) else "")
        args = (items,)
    elif name in ("format", "format_map"):
        values = list(args) + list(kwargs.values())
        if name == "format_map" and args and isinstance(args[0], Mapping):
            values = list(args[0].values())
        _check_format_string(text, values)
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        _check_size(len(text) * longest, "str.translate()")
    return args


# --- Filters and globals.


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """JSON without jinja's HTML escaping (templates feed it to a model, not a browser)."""
    if indent is not None:
        # Each item lands on its own line, indented by at most depth * indent; bound that before dumping.
        compact = json.dumps(value, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
        step = len(indent) if isinstance(indent, str) else indent if _is_int(indent) else 0
        _check_size(len(compact) * (1 + max(step, 0) * _nesting_depth(value)), "tojson output")
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    _check_size(len(text), "tojson output")
    return text


def _nesting_depth(value, depth: int = 0) -> int:
    if depth > 1000:  # json.dumps itself gives up (RecursionError) well before this
        return depth
    if isinstance(value, Mapping):
        return max((_nesting_depth(v, depth + 1) for v in value.values()), default=depth + 1)
    if isinstance(value, (list, tuple)):
        return max((_nesting_depth(v, depth + 1) for v in value), default=depth + 1)
    return depth


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 - jinja's own parameter names
    # Up to `max` words of ~12 characters per paragraph.
    if _is_int(n) and _is_int(max):
        _check_size(n * max * 12, "lipsum() output")
    return jinja2.utils.generate_lorem_ipsum(n=n, html=html, min=min, max=max)


class _TemplateDict:
    """``dict`` for templates: constructing and ``fromkeys`` only, no reachable type object."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _refuse_private_name(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"a namespace attribute may not start with an underscore (got {name!r})"
        )


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's ``namespace`` minus underscore-prefixed attributes, which could shadow Python internals."""

    def __init__(*args, **kwargs):  # noqa: N805 - jinja's signature: ``self`` may also be an attribute name
        self, positional = args[0], args[1:]
        attrs = dict(*positional, **kwargs)
        for name in attrs:
            _refuse_private_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _refuse_private_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _guard_filter(func, precheck):
    """Wrap a jinja filter so ``precheck(arguments)`` can refuse (or rewrite) its arguments first.

    ``precheck`` gets the arguments bound to the filter's parameter names and may replace them (to
    materialise a generator it had to inspect). The wrapper keeps ``func``'s ``pass_*`` marker.
    """
    signature = inspect.signature(func)
    # jinja's async_variant filters (slice, ...) take an eval context first that the signature of the sync filter
    # they wrap does not show (found while writing the fuzzer: slice()'s check saw the eval context as the value).
    wrapped = getattr(func, "__wrapped__", None)
    skip = int(wrapped is not None and getattr(func, "jinja_pass_arg", None) is not None
               and getattr(wrapped, "jinja_pass_arg", None) is None)

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        try:
            bound = signature.bind(*args[skip:], **kwargs)
        except TypeError:
            return func(*args, **kwargs)  # let the filter report its own bad-arguments error
        bound.apply_defaults()
        precheck(bound.arguments)
        return func(*args[:skip], *bound.args, **bound.kwargs)

    return guarded


def _center_check(a) -> None:
    if _is_int(a["width"]):
        _check_size(a["width"], "center output")


def _indent_check(a) -> None:
    width = a["width"]
    step = len(width) if isinstance(width, str) else width if _is_int(width) else 0
    text = str(a["s"])
    _check_size(len(text) + (text.count("\n") + 1) * max(step, 0), "indent output")


def _wordwrap_check(a) -> None:
    wrap = a["wrapstring"]
    wrap_len = len(wrap) if isinstance(wrap, str) else 1
    text = str(a["s"])
    _check_size(len(text) * (1 + wrap_len), "wordwrap output")


def _join_check(a) -> None:
    items = a["value"] = list(a["value"])
    to_text = str
    if a["attribute"] is not None:
        getter = jinja2.filters.make_attrgetter(a["eval_ctx"].environment, a["attribute"])

        def to_text(item):
            return str(getter(item))

    _joined_size(items, len(str(a["d"])), to_text)


def _replace_check(a) -> None:
    if isinstance(a["old"], str) and isinstance(a["new"], str):
        _replaced_size(str(a["s"]), a["old"], a["new"], a["count"])


def _format_check(a) -> None:
    if isinstance(a["value"], str):
        _check_format_string(a["value"], list(a["args"]) + list(a["kwargs"].values()))


def _slice_check(a) -> None:
    # slice() yields `slices` lists even when the value has fewer items; each list costs like 64 characters.
    if _is_int(a["slices"]):
        _check_size(a["slices"] * 64, "slice() output (64 per slice)")


def _batch_check(a) -> None:
    # The last batch is padded up to `linecount` items.
    if _is_int(a["linecount"]):
        _check_size(a["linecount"], "a batch")


def _sum_check(a) -> None:
    # Summing lists concatenates them; bound the total length.
    items = a["iterable"] = list(a["iterable"])
    if a["attribute"] is not None:
        getter = jinja2.filters.make_attrgetter(a["environment"], a["attribute"])
        values = [getter(item) for item in items]
    else:
        values = items
    total = _sized(a["start"]) or 0
    for value in values:
        total += _sized(value) or 0
        _check_size(total, "a sum of sequences")


# --- The sandbox: jinja's immutable sandbox plus the budget hooks.


class _GuardedCodeGenerator(CodeGenerator):
    """jinja's compiler, adjusted so loops, ``~`` and literal output report to the render budget.

    Jinja has no runtime hook for these, so they are rewritten at compile time:
    * ``{% for x in it %}`` iterates ``environment.guard_loop(context, it)`` (counts iterations);
    * ``a ~ b`` calls ``environment.guarded_concat`` (checks and charges the joined length first);
    * each block of literal template text first charges its length to the budget;
    * filter inputs and results, test inputs, comparison operands and slices pass through
      ``environment.charged(context, value)``, which charges their size as work.
    """

    def visit_For(self, node, frame):
        guarded = copy.copy(node)
        guarded.iter = jinja2.nodes.Call(
            jinja2.nodes.EnvironmentAttribute("guard_loop"),
            [jinja2.nodes.ContextReference(), node.iter],
            [],
            None,
            None,
        )
        super().visit_For(guarded, frame)

    def visit_Concat(self, node, frame):
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            super().visit_Concat(node, frame)  # never the case for chat templates (no autoescape)
            return
        self.write("environment.guarded_concat(context, (")
        for part in node.nodes:
            self.visit(part, frame)
            self.write(", ")
        self.write("))")

    # Filters, tests and comparisons read their operands and build their result: both are charged as work.
    # An operand is marked (by id) before jinja's own visitor runs, and visit() wraps it when it gets there:
    # jinja allows no custom node types, and a Call node would count as a template call in the sandbox.

    def visit(self, node, *args, **kwargs):
        weight = self._charge_nodes.pop(id(node), None) if hasattr(self, "_charge_nodes") else None
        if weight is None:
            return super().visit(node, *args, **kwargs)
        self.write("environment.charged(context, ")
        super().visit(node, *args, **kwargs)
        self.write(f", {weight})")

    def _charge(self, node, weight: int = 1) -> None:
        if not hasattr(self, "_charge_nodes"):
            self._charge_nodes = {}
        self._charge_nodes[id(node)] = weight

    def visit_Filter(self, node, frame):
        if node.node is not None:
            self._charge(node.node, _FILTER_WORK.get(node.name, 1))
        self.write("environment.charged(context, ")
        super().visit_Filter(node, frame)
        self.write(")")

    def visit_Test(self, node, frame):
        self._charge(node.node)
        super().visit_Test(node, frame)

    def visit_Compare(self, node, frame):
        self._charge(node.expr)
        for op in node.ops:
            self._charge(op.expr)
        super().visit_Compare(node, frame)

    def visit_Getitem(self, node, frame):
        # A slice copies (jinja compiles it to a plain obj[a:b], not through the sandbox): charge the copy.
        if not isinstance(node.arg, jinja2.nodes.Slice):
            super().visit_Getitem(node, frame)
            return
        self.write("environment.charged(context, ")
        super().visit_Getitem(node, frame)
        self.write(")")

    def visit_Output(self, node, frame):
        literal = sum(len(child.data) for child in node.nodes if isinstance(child, jinja2.nodes.TemplateData))
        if literal:
            self.writeline(f"environment.charge_output(context, {literal})")
        super().visit_Output(node, frame)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: marks assistant text for training masks in transformers.

    Rendering only needs the body, wrapped in a call block so its variable scoping matches transformers.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _budget_of(context) -> _RenderBudget | None:
    budget = context.get(_BUDGET_KEY)
    return budget if isinstance(budget, _RenderBudget) else None


class _ChatSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The environment chat templates run in (one per :class:`ChatTemplate`)."""

    code_generator_class = _GuardedCodeGenerator
    # Operators that can build huge strings, lists or integers; routed through call_binop for a size check.
    # "//" only to charge big-integer division, which is quadratic in the integers' size.
    intercepted_binops = frozenset({"+", "*", "**", "%", "//"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationTag, jinja2.ext.loopcontrols],
            finalize=self._count_expression_output,
        )
        guards = {
            "center": _center_check,
            "indent": _indent_check,
            "wordwrap": _wordwrap_check,
            "join": _join_check,
            "replace": _replace_check,
            "format": _format_check,
            "batch": _batch_check,
            "slice": _slice_check,
            "sum": _sum_check,
        }
        for name, precheck in guards.items():
            self.filters[name] = _guard_filter(self.filters[name], precheck)
        self.filters["tojson"] = _tojson
        self.globals.update(
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
            dict=_TemplateDict(),
            namespace=_TemplateNamespace,
            lipsum=_lipsum,
        )

    # Hooks called from compiled template code.

    @jinja2.pass_context
    def _count_expression_output(self, context, value):
        # Every ``{{ ... }}`` passes through here (also inside macros, whose output may be discarded or
        # re-emitted), so the total work is bounded, not only the final prompt. Returning the text is
        # what jinja would do next anyway.
        text = str(value)
        budget = _budget_of(context)
        if budget is not None:
            budget.output(len(text))
        return text

    def charge_output(self, context, chars: int) -> None:
        budget = _budget_of(context)
        if budget is not None:
            budget.output(chars)

    def charged(self, context, value, weight: int = 1):
        budget = _budget_of(context)
        if budget is not None:
            budget.read(_work_of(value) * weight)
        return value

    def _charge_read(self, context, *values, extra: int = 0) -> None:
        budget = _budget_of(context)
        if budget is not None:
            budget.read(extra + sum(_work_of(value) for value in values))

    def call_filter(self, name, value, args=None, kwargs=None, context=None, eval_ctx=None):
        # Filters and tests run by name from other filters (map, select, ...) are charged like compiled ones.
        self._charge_read(context, value, *(args or ()), extra=CALL_WORK)
        return self.charged(context, super().call_filter(name, value, args, kwargs, context, eval_ctx))

    def call_test(self, name, value, args=None, kwargs=None, context=None, eval_ctx=None):
        self._charge_read(context, value, *(args or ()), extra=CALL_WORK)
        return super().call_test(name, value, args, kwargs, context, eval_ctx)

    def guard_loop(self, context, iterable):
        budget = _budget_of(context)
        if budget is None:
            return iterable
        return self._counted(iterable, budget)

    @staticmethod
    def _counted(iterable, budget: _RenderBudget):
        for item in iterable:
            budget.loop_iteration()
            yield item

    def guarded_concat(self, context, parts) -> str:
        texts = [str(part) for part in parts]
        size = sum(len(text) for text in texts)
        _check_size(size, "a ~ concatenation")
        self._charge_built(context, size)
        return "".join(texts)

    @staticmethod
    def _charge_built(context, size: int) -> None:
        budget = _budget_of(context)
        if budget is not None:
            budget.built(size)

    def call_binop(self, context, operator, left, right):
        # + and * are charged below as built; % formatting reads its format and arguments, and big-integer
        # *, // and % cost work quadratic in the integers' size.
        budget = _budget_of(context)
        if budget is not None and operator in ("*", "//", "%"):
            budget.read(_int_op_work(left, right) + (_work_of(left) + _work_of(right) if operator == "%" else 0))
        if operator == "*":
            if _is_int(left) and _is_int(right):
                _check_int_bits(left.bit_length() + right.bit_length())
            else:
                sequence, times = (left, right) if _is_int(right) else (right, left)
                if _is_int(times) and _sized(sequence) is not None:
                    _check_size(len(sequence) * max(times, 0), "a repeated value")
                    self._charge_built(context, len(sequence) * max(times, 0))
        elif operator == "**":
            if _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
                _check_int_bits(left.bit_length() * right)
                if budget is not None:  # repeated squaring: about log2(right) big multiplications
                    budget.read((left.bit_length() * right // 30 + 1) ** 2 // 4)
        elif operator == "+":
            if _sized(left) is not None and _sized(right) is not None:
                _check_size(len(left) + len(right), "a concatenation")
                self._charge_built(context, len(left) + len(right))
        elif operator == "%" and isinstance(left, str):
            _check_format_string(left, right if isinstance(right, tuple) else (right,))
            result = super().call_binop(context, operator, left, right)
            if budget is not None:
                budget.read(_work_of(result))
            return result
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, /, *args, **kwargs):
        budget = _budget_of(context)
        if budget is not None:
            budget.call()
        # The sandbox hands out str.format wrapped; look through the wrapper to the bound str method.
        method = getattr(obj, "__wrapped__", obj)
        owner = getattr(method, "__self__", None)
        if isinstance(owner, str):
            args = _precheck_str_method(getattr(method, "__name__", ""), owner, args, kwargs)
        # A method reads its object (str.count, list.index, dict.items, ...) and its arguments.
        if budget is not None:
            budget.read(_work_of(owner) + sum(_work_of(arg) for arg in args)
                        + sum(_work_of(arg) for arg in kwargs.values()))
        result = super().call(context, obj, *args, **kwargs)
        size = _sized(result)
        if size is not None:
            _check_size(size, "a call's result")
            if budget is not None:
                budget.built(size)
                budget.read(_work_of(result))
        return result


# --- Input checking.


def _plain(value, where: str, depth: int = 0):
    """A copy of ``value`` built only from JSON-like types, so a template never sees rich objects.

    Objects with methods (numpy arrays, custom classes, ...) are refused rather than exposed: the sandbox
    cannot know which of their methods are dangerous.
    """
    if depth > _MAX_DATA_DEPTH:
        raise LanternError(f"{where}: data is nested more than {_MAX_DATA_DEPTH} levels deep")
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # str subclasses (enums, ...) may carry extra methods
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise LanternError(f"{where}: key {key!r} is not a string or number")
            out[_plain(key, where, depth + 1)] = _plain(item, f"{where}[{key!r}]", depth + 1)
        return out
    if isinstance(value, list):
        return [_plain(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_plain(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
    raise LanternError(
        f"{where}: a value of type {type(value).__name__} cannot be passed to a chat template "
        "(use strings, numbers, booleans, None, lists and dicts)"
    )


def _check_content(content, where: str) -> None:
    if isinstance(content, str):
        return
    if isinstance(content, (list, tuple)):
        for i, part in enumerate(content):
            part_where = f"{where}[{i}]"
            if not isinstance(part, Mapping):
                raise LanternError(f"{part_where} must be a content part dict like {{'type': 'text', 'text': ...}}, "
                                   f"got {type(part).__name__}")
            if not isinstance(part.get("type"), str):
                raise LanternError(f"{part_where} has no string 'type' (e.g. 'text')")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise LanternError(f"{part_where} is a text part but its 'text' is not a string")
        return
    raise LanternError(
        f"{where} must be a string or a list of content parts, got {type(content).__name__}"
    )


def validate_messages(messages) -> list[dict]:
    """Check a chat and return a clean copy for rendering.

    Each message must be a dict with a non-empty string ``role`` and a ``content`` that is a string or a
    list of content parts (dicts with a string ``type``; ``text`` parts need a string ``text``). Content may
    be missing only on a message carrying ``tool_calls``. Keys whose value is ``None`` are dropped, as
    transformers does (templates test for a key's presence, and would otherwise print "None").
    Raises :class:`LanternError` naming the first problem found.
    """
    if not isinstance(messages, (list, tuple)):
        raise LanternError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise LanternError("messages is empty: a chat needs at least one message")
    cleaned = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise LanternError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
        message = {key: value for key, value in message.items() if value is not None}
        role = message.get("role")
        if role is None:
            raise LanternError(f"{where} has no 'role'")
        if not isinstance(role, str) or not role:
            raise LanternError(f"{where}['role'] must be a non-empty string, got {role!r}")
        if "content" in message:
            _check_content(message["content"], f"{where}['content']")
        elif "tool_calls" not in message:
            raise LanternError(f"{where} (role {role!r}) has no 'content'")
        if "tool_calls" in message and not isinstance(message["tool_calls"], (list, tuple)):
            raise LanternError(f"{where}['tool_calls'] must be a list, got {type(message['tool_calls']).__name__}")
        cleaned.append(_plain(message, where))
    return cleaned


def _with_reasoning_aliases(message: dict) -> dict:
    # Templates differ in which name they read reasoning from; transformers fills `thinking` (kept first in
    # key order unless the message already has it) and `reasoning_content` (last) from whichever is given.
    reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _dict_list(value, name: str):
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise LanternError(f"{name} must be a list of dicts, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise LanternError(f"{name}[{i}] must be a dict, got {type(item).__name__}")
    return _plain(list(value), name)


def _template_line(error: BaseException) -> int | None:
    """The template line being executed when ``error`` was raised (jinja rewrites tracebacks to show it)."""
    line = None
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class ChatTemplate:
    """A compiled chat template. Compile once per model; :meth:`render` is safe to call concurrently."""

    def __init__(
        self,
        source: str,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        origin: str = "chat template",
    ):
        self.origin = origin
        self.source = source
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
            if token is not None and not isinstance(token, str):
                raise TemplateError(f"{origin}: {name} must be a string or None, got {type(token).__name__}")
        self.bos_token = bos_token
        self.eos_token = eos_token
        if not isinstance(source, str):
            raise TemplateError(f"{origin}: the template must be text, got {type(source).__name__}")
        if not source.strip():
            raise TemplateError(f"{origin}: the template is empty")
        try:
            with warnings.catch_warnings():
                # Python's compiler warns about odd constant expressions ({{ true[0] }}) in jinja's generated code;
                # they fail (or not) at render time like any template error, so the warnings are only noise.
                warnings.simplefilter("ignore", SyntaxWarning)
                self._template = _ChatSandbox().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{origin}, line {e.lineno}: template syntax error: {e.message}") from None
        except (jinja2.TemplateError, RecursionError, MemoryError) as e:
            raise TemplateError(f"{origin}: cannot compile the template: {e}") from None
        except SyntaxError as e:
            # jinja passes some invalid templates on as invalid Python, e.g. {% break %} outside a loop
            # (found by fuzzing); Python's compiler then rejects its generated code.
            raise TemplateError(f"{origin}: cannot compile the template: {e.msg}") from None

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        extra_context: dict | None = None,
    ) -> str:
        """The prompt text for ``messages``, identical to transformers' ``apply_chat_template(...,
        tokenize=False)`` with the same template, special tokens and arguments."""
        variables: dict = {}
        if self.bos_token is not None:
            variables["bos_token"] = self.bos_token
        if self.eos_token is not None:
            variables["eos_token"] = self.eos_token
        if extra_context is not None:
            if not isinstance(extra_context, Mapping):
                raise LanternError(f"extra_context must be a dict, got {type(extra_context).__name__}")
            for key in extra_context:
                if not isinstance(key, str) or not key.isidentifier():
                    raise LanternError(f"extra_context key {key!r} is not a valid template variable name")
                if key in _RESERVED_NAMES:
                    raise LanternError(f"extra_context may not set {key!r}; pass it as its own argument")
            variables.update(_plain(dict(extra_context), "extra_context"))
        variables.update(
            messages=[_with_reasoning_aliases(m) for m in validate_messages(messages)],
            tools=_dict_list(tools, "tools"),
            documents=_dict_list(documents, "documents"),
            add_generation_prompt=bool(add_generation_prompt),
        )
        variables[_BUDGET_KEY] = budget = _RenderBudget()

        pieces: list[str] = []
        length = 0
        stream = self._template.generate(variables)
        try:
            for piece in stream:
                length += len(piece)
                if length > MAX_TEXT_CHARS:
                    raise _LimitExceeded(f"the rendered prompt is longer than {MAX_TEXT_CHARS:,} characters",
                                         "text_chars", length)
                pieces.append(piece)
        except _TemplateRaised as e:
            raise TemplateError(f"{self._where(e)}: {e}") from None
        except _LimitExceeded as e:
            raise RenderLimitError(f"{self._where(e)}: render stopped: {e}", e.limit, budget.counted(),
                                   e.requested) from None
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"{self._where(e)}: blocked by the sandbox: {e}") from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"{self._where(e)}: {e}") from None
        except RecursionError:
            raise TemplateError(f"{self.origin}: the template recursed too deeply") from None
        except MemoryError:
            raise TemplateError(f"{self.origin}: the template ran out of memory") from None
        except Exception as e:  # TypeError, ZeroDivisionError, ... raised by template expressions
            raise TemplateError(f"{self._where(e)}: {type(e).__name__}: {e}") from None
        finally:
            stream.close()
        return "".join(pieces)

    def _where(self, error: BaseException) -> str:
        line = _template_line(error)
        return self.origin if line is None else f"{self.origin}, line {line}"
