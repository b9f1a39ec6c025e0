"""The `lantern` command: argument parsing and printing only; the work is done by the API and the store.

Errors are one line on stderr and a non-zero exit (1 for a problem with the input, 2 for a bad command
line); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from .errors import LanternError
from .store import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL

EXAMPLES = {
    "run": """examples:
  lantern run "What is the capital of France?"
  echo "Tell me a joke" | lantern run -m smollm2-135m-instruct
  lantern run --raw --max-tokens 20 "Once upon a time"
  lantern run -m ./my-hf-folder --temperature 0.7 --seed 1 --stop "\\n\\n" "Write a haiku"
  lantern run --json-schema '{"type": "object", "properties": {"city": {"type": "string"}}}' "Where is the Louvre?"
  lantern run --json-schema schema.json --explain "Extract the person: Ada, 36"   # the grammar is a traced stage
  lantern run --regex '\\d{3}-\\d{4}' "Make up a phone number"
  lantern run -m ./qwen3-folder --thinking-budget 64 "Is 97 prime?"                # thinking shown dimmed
  lantern run --tensor-parallel 2 "What is the capital of France?"   # the model split over 2 processes
""",
    "chat": """examples:
  lantern chat
  lantern chat -m ./model.gguf --system "You are terse."
  inside: /reset clears the conversation, /system TEXT sets the system prompt, /exit (or Ctrl-D) quits;
  Ctrl-C stops the current reply and keeps the conversation.
""",
    "pull": """examples:
  lantern pull                       # the default model, smollm2-135m-instruct
  lantern pull smollm2-135m-instruct
  lantern pull Qwen/Qwen2.5-0.5B-Instruct   (needs the Hugging Face hub to be reachable)
""",
    "list": "examples:\n  lantern list\n  lantern list --json\n",
    "rm": "examples:\n  lantern rm smollm2-135m-instruct\n",
    "serve": """examples:
  lantern serve                                  # the default model on http://127.0.0.1:8000/v1
  lantern serve -m ./model.gguf --port 8080 --api-key secret --max-batch 16
  lantern serve --embedding-model all-minilm-l6-v2   # chat and /v1/embeddings from one server
  lantern serve --tensor-parallel 2              # the model split over 2 processes on this host
  torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --master-addr HOST0 --master-port 29500 \\
      -m lanternlm serve --tensor-parallel 2 --host 0.0.0.0   # on HOST0; --node-rank 1 on the other host
  then: curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
          -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}'
""",
    "inspect": """examples:
  lantern inspect                   # the default model: module tree, parameter counts, config, tokenizer
  lantern inspect -m ./my-hf-folder --json
""",
    "lens": """examples:
  lantern lens "The capital of France is"
  lantern lens --chat --top-k 5 "What is the capital of France?"
  lantern lens --json -m ./model.gguf "1, 2, 3,"
""",
    "embed": """examples:
  lantern embed "first text" "second text"          # one JSON array per line (all-minilm-l6-v2)
  cat lines.txt | lantern embed --json               # one input per stdin line, one JSON document
  lantern embed -m ./bge-small-folder --prompt-name query "what is a lantern?"
  lantern embed -m smollm2-135m-instruct --pooling mean "a decoder embeds too"
""",
    "rag": """examples:
  lantern rag add notes/ manual.pdf       # folders recurse over .txt .md .html .pdf; unchanged files are skipped
  lantern rag ask "How do I reset the router?"
  lantern rag ask --show --k 2 --temperature 0 "How do I reset the router?"   # chunks, scores, prompt, answer
  lantern rag list
  lantern rag rm notes/old.md
  lantern rag add --index work --embedding-model ./bge-small-folder docs/    # another index, another model
""",
    "tokenize": """examples:
  lantern tokenize "Hello world 12345"
  lantern tokenize --chat "What is the capital of France?"
  lantern tokenize --json -m ./model.gguf "日本語"
""",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (not usage + error)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_model(p):
    p.add_argument("-m", "--model", default=None,
                   help=f"catalogue name, HF folder, .gguf file or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16 (default: auto)")
    p.add_argument("--exact", action="store_true",
                   help="compute from weights dequantized or widened to --dtype (the reference path) instead of "
                        "from the weights as stored (a GGUF's blocks, an HF folder's bf16 matrices)")
    p.add_argument("--quantize", default=None, metavar="TYPE",
                   help="quantize an HF folder's (or an F16/BF16 GGUF's) weights at load: q8_0, q4_0 or q4_1")
    p.add_argument("--threads", type=thread_count, default=None, metavar="N",
                   help="CPU threads for the model's compute (default: PyTorch's, one per core), as llama.cpp's -t")


def add_tensor_parallel(p):
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the model over N processes (ranks; this host's cores are shared between them, "
                        "--threads is then per rank); under torchrun, N is its world size (default: 1)")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def thread_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads >= 1, got {text!r}")
    return n


def add_sampling(p):
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=None, help="0 for greedy (default: the model's, else 1.0)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--max-tokens", type=int, default=None, help="default: until the model ends its turn")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_constraints(p):
    g = p.add_argument_group("output constraints (one of them) and thinking")
    g.add_argument("--json-schema", default=None, metavar="SCHEMA",
                   help="the answer is JSON matching this schema (JSON text, or a file holding it)")
    g.add_argument("--regex", default=None, help="the answer matches this regular expression")
    g.add_argument("--grammar", default=None, metavar="FILE",
                   help="the answer matches this Lark grammar (llguidance's dialect)")
    g.add_argument("--thinking-budget", type=int, default=None, metavar="N",
                   help="a thinking model writes at most N tokens of thought before </think> is forced")
    g.add_argument("--no-think", action="store_true",
                   help="ask the template not to think (chat_template_kwargs enable_thinking=false)")


def constraint_options(args):
    """The ChatOptions of --json-schema / --regex / --grammar / --thinking-budget / --no-think."""
    from .generation.chat_plan import ChatOptions
    from .text.constraint import GrammarSpec
    given = [name for name in ("json_schema", "regex", "grammar") if getattr(args, name) is not None]
    if len(given) > 1:
        raise LanternError("give one of --json-schema, --regex and --grammar")
    grammar = None
    if args.json_schema is not None:
        text = args.json_schema
        if not text.lstrip().startswith(("{", "[", "true", "false")):
            text = _read_file(text, "--json-schema")
        grammar = GrammarSpec.json_schema(text)
    elif args.regex is not None:
        grammar = GrammarSpec.regex(args.regex)
    elif args.grammar is not None:
        grammar = GrammarSpec.lark(_read_file(args.grammar, "--grammar"))
    if args.thinking_budget is not None and args.thinking_budget < 0:
        raise LanternError(f"--thinking-budget must be >= 0, got {args.thinking_budget}")
    return ChatOptions(grammar=grammar, thinking_token_budget=args.thinking_budget,
                       chat_template_kwargs={"enable_thinking": False} if args.no_think else None)


def _read_file(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(1 << 20)
    except OSError as e:
        raise LanternError(f"{flag}: cannot read {path!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise LanternError(f"{flag}: {path!r} is not UTF-8 text") from None


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lantern", description="Run, serve and look inside LLMs (HF folders and GGUF).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)

    def command(name, help_):
        p = sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        return p

    p = command("run", "answer one prompt (chat template applied) and stream the answer to stdout")
    add_model(p)
    p.add_argument("prompt", nargs="*", help="the prompt (default: read from stdin)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    p.add_argument("-v", "--verbose", action="store_true", help="timing and token counts on stderr")
    p.add_argument("--explain", nargs="?", type=int, const=3, default=None, metavar="K",
                   help="print a table per token: the chosen token, its probability and K alternatives (default 3)")
    add_tensor_parallel(p)
    add_sampling(p)
    add_constraints(p)

    p = command("lens", "logit lens: what each layer would predict next, for a prompt")
    add_model(p)
    p.add_argument("prompt", nargs="*", help="the text (default: read from stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the text in the chat template (as a user message)")
    p.add_argument("--position", type=int, default=-1, help="which token position to look at (default: last)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true")

    p = command("chat", "talk with a model in the terminal (one message per line when stdin is a pipe)")
    add_model(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("-v", "--verbose", action="store_true", help="timing and token counts on stderr")
    add_sampling(p)
    add_constraints(p)

    p = command("pull", "fetch a model into the cache (verified by sha256)")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL)

    p = command("list", "list the catalogue and what is on this machine")
    p.add_argument("--json", action="store_true")

    p = command("rm", "remove a pulled model from the cache")
    p.add_argument("name")

    p = command("serve", "serve the model over an OpenAI-compatible HTTP API (continuous batching)")
    add_model(p)
    add_tensor_parallel(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 routes (repeatable: any of the keys)")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="more accepted keys, one per line (blank lines and '#' comments ignored)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default: 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait; more get 429")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per sequence (default: the model's, at most 4096; sets KV cache memory)")
    p.add_argument("--served-model-name", default=None, help="the name clients use (default: from -m)")
    p.add_argument("--embedding-model", action="append", default=[], metavar="MODEL",
                   help="also serve this embedding model on /v1/embeddings (repeatable), e.g. all-minilm-l6-v2")
    p.add_argument("--embedding", action="store_true",
                   help="let the main model (-m) answer /v1/embeddings too (a decoder pools its hidden states)")
    p.add_argument("--embedding-pooling", choices=("last", "mean"), default="last",
                   help="how a decoder marked with --embedding pools (default: last token)")
    p.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="the KV cache's budget, e.g. 1GiB or 512MiB (default: max-batch sequences of the full "
                        "context); its memory is used only as blocks fill")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="compute every prompt from its first token (default: reuse cached prompt blocks)")
    p.add_argument("--prefix-cache-per-key", action="store_true",
                   help="share cached prompt blocks only between requests made with the same API key, so one "
                        "tenant cannot time another's prompts (a request's cache_salt partitions further)")
    p.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics without the API key (by default it needs the key when one is set)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="stop a request after this many seconds (408); default: no limit")
    p.add_argument("--shutdown-timeout", type=float, default=30,
                   help="on SIGTERM, seconds in-flight requests may take to finish (default: 30)")
    p.add_argument("--log-level", default="warning")

    p = command("inspect", "show the module tree, parameter counts, config, tokenizer and files")
    add_model(p)
    p.add_argument("--json", action="store_true")

    p = command("embed", f"embed texts: one vector per TEXT (default model: {DEFAULT_EMBEDDING_MODEL})")
    add_model(p)
    p.add_argument("text", nargs="*", help="the texts, one embedding each (default: one per line of stdin)")
    p.add_argument("--json", action="store_true", help="one JSON document with the model, dimensions and vectors")
    p.add_argument("--truncate", action="store_true", help="cut inputs longer than the model's maximum")
    p.add_argument("--pooling", choices=["mean", "cls", "last"], default=None, help="default: the model's")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalise (default: the model's)")
    p.add_argument("--prompt-name", default=None, help="a prompt from the model's config (e.g. query, passage)")

    p = command("tokenize", "show tokens, ids and pieces of a text")
    add_model(p)
    p.add_argument("text", nargs="*", help="the text (default: read from stdin)")
    p.add_argument("--chat", action="store_true", help="render the chat template around TEXT first")
    p.add_argument("--no-special", action="store_true", help="do not add BOS/special tokens")
    p.add_argument("--json", action="store_true")

    add_rag_parser(command("rag", "retrieval: index files, then ask questions answered from them, with sources"))
    return parser


def add_rag_parser(rag):
    """`lantern rag add|rm|list|ask`: each leaf takes --index (and --debug, which only counts when given)."""
    sub = rag.add_subparsers(dest="rag_command", metavar="ACTION", parser_class=ArgumentParser, required=True)

    def action(name, help_):
        p = sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES["rag"],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--index", default="default", help="which index (default: default), under the store's rag/")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        return p

    p = action("add", "index files and folders (new and changed files only; each file is committed whole)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--embedding-model", default=None,
                   help=f"embedding model (default: the index's, else {DEFAULT_EMBEDDING_MODEL})")
    p = action("rm", "remove files (or everything under a folder) from the index")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p = action("list", "list the indexed documents and the embedding model")
    p.add_argument("--json", action="store_true")
    p = action("ask", "answer a question from the indexed documents, then list the sources")
    add_model(p)
    p.add_argument("question", nargs="*", help="the question (default: read from stdin)")
    p.add_argument("--k", type=int, default=4, help="how many chunks to retrieve (default: 4)")
    p.add_argument("--show", action="store_true",
                   help="print every step: the question's tokens, the chunks with scores, the prompt and its size")
    p.add_argument("--json", action="store_true", help="every step and the answer as one JSON document")
    p.add_argument("--embedding-model", default=None, help="default: the model the index was built with")
    add_sampling(p)


# ---------------------------------------------------------------------- helpers


def open_model(args):
    from .api import LLM

    name = pulled(args.model or DEFAULT_MODEL)
    # --threads is set before the load: the kernels' split, PyTorch's ops and threads started later (the
    # Engine's) follow it.
    return LLM(name, dtype=args.dtype, device=args.device, exact=True if args.exact else None,
               quantize=getattr(args, "quantize", None), tensor_parallel=getattr(args, "tensor_parallel", 1),
               threads=getattr(args, "threads", None))


def pulled(name: str) -> str:
    """`name`, fetched first when it is a catalogue model not on this machine yet (as `ollama run` does)."""
    from .store import NotPulledError, pull, resolve

    try:
        resolve(name)
    except NotPulledError:
        print(f"{name} is not on this machine yet: pulling it", file=sys.stderr)
        pull(name)
    return name


def check_tensor_parallel(args) -> None:
    if args.tensor_parallel < 1:
        raise LanternError(f"--tensor-parallel must be at least 1, got {args.tensor_parallel}")


def served_as_worker_rank(args) -> bool:
    """Under torchrun with --tensor-parallel, a rank other than 0 runs rank 0's forwards instead of the command
    (until rank 0 stops); True when this process was such a rank."""
    if args.tensor_parallel == 1:
        return False
    from .distributed.launch import torchrun_rank
    if torchrun_rank() in (None, 0):
        return False
    from .api import serve_rank
    serve_rank(pulled(args.model or DEFAULT_MODEL), args.tensor_parallel, dtype=args.dtype, device=args.device,
               exact=True if args.exact else None, quantize=args.quantize, threads=args.threads)
    return True


def sampling_from(args):
    from .generation.sampling import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, max_tokens=args.max_tokens, seed=args.seed,
                          stop=[unescape(s) for s in args.stop])


def unescape(text: str) -> str:
    """Let a shell user write --stop "\\n\\n" for two newlines; any other character passes as it is."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def read_text(words: list[str], what: str) -> str:
    if words:
        return " ".join(words)
    if sys.stdin.isatty():
        raise LanternError(f"give the {what} as an argument or on stdin")
    return sys.stdin.read()


class ReplyPrinter:
    """Prints a streamed reply as it comes, a reasoning model's thinking apart from its answer, and keeps the answer.

    Without a splitter every piece is answer. With one, the thinking is dimmed on a terminal (`styled`) and written
    as "> "-quoted lines otherwise, so that a pipe or a file still tells it from the answer, which follows after a
    blank line. Call `finish` once the reply ends, even when it is interrupted: it writes what the splitter held
    back and resets the terminal's style.
    """

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, out, splitter=None, styled: bool = False):
        self.out = out
        self.splitter = splitter
        self.styled = styled
        self.thinking = False  # inside the printed thought (which can only come before the answer)
        self.pieces: list[str] = []  # the answer, without the thinking

    @property
    def answer(self) -> str:
        return "".join(self.pieces)

    def write(self, text: str) -> None:
        if self.splitter is None:
            self._show("", text)
        else:
            self._show(*self.splitter.push(text))

    def finish(self) -> None:
        if self.splitter is not None:
            self._show(*self.splitter.flush())
        self._end_thought()

    def _show(self, reasoning: str, content: str) -> None:
        if reasoning:
            if not self.thinking:
                self.out.write(self.DIM if self.styled else "> ")
                self.thinking = True
            # The splitter never ends a delta with whitespace, so a newline here always has more thought after it.
            self.out.write(reasoning if self.styled else reasoning.replace("\n", "\n> "))
        if content:
            if self._end_thought():
                self.out.write("\n\n")
            self.out.write(content)
            self.pieces.append(content)
        if reasoning or content:
            self.out.flush()

    def _end_thought(self) -> bool:
        """Close the printed thought, if one is open; whether one was."""
        if not self.thinking:
            return False
        self.thinking = False
        if self.styled:
            self.out.write(self.RESET)
        self.out.flush()
        return True


def reply_printer(llm, prompt_ids) -> ReplyPrinter:
    """A printer for the reply to `prompt_ids` on stdout, splitting out the thinking if the model thinks in tags."""
    fmt = getattr(llm, "thinking", None)  # set from the chat template by LLM; None for a model that does not think
    if fmt is None:
        return ReplyPrinter(sys.stdout)
    from .text.reasoning import ReasoningSplitter
    styled = sys.stdout.isatty() and not os.environ.get("NO_COLOR")  # https://no-color.org
    return ReplyPrinter(sys.stdout, ReasoningSplitter(fmt, llm.thinking_starts_inside(prompt_ids)), styled)


def stream_out(steps, verbose: bool, prompt_len: int, started: float,
               printer: ReplyPrinter | None = None) -> tuple[str, str | None]:
    """Print the steps' text as it comes; return the answer's text (without any thinking) and the finish reason."""
    printer = printer or ReplyPrinter(sys.stdout)
    reason, first, count = None, None, 0
    try:
        for step in steps:
            if first is None:
                first = time.perf_counter()
            count += 1
            if step.text:
                printer.write(step.text)
            reason = step.finish_reason
    finally:
        printer.finish()
    end = time.perf_counter()
    if verbose:
        decode = (count - 1) / (end - first) if first and count > 1 and end > first else 0.0
        ttft = (first - started) if first else 0.0
        print(f"\n[prompt {prompt_len} tokens, generated {count} tokens, finish {reason}, "
              f"time to first token {ttft:.3f} s, decode {decode:.1f} tokens/s on {torch_threads()} threads]",
              file=sys.stderr)
    return printer.answer, reason


# ---------------------------------------------------------------------- commands


def cmd_run(args) -> int:
    check_tensor_parallel(args)
    if served_as_worker_rank(args):
        return 0
    prompt = read_text(args.prompt, "prompt")
    t0 = time.perf_counter()
    llm = open_model(args)
    try:
        return run_prompt(args, llm, prompt, t0)
    finally:
        llm.close()  # the other tensor-parallel ranks, if any


def run_prompt(args, llm, prompt: str, t0: float) -> int:
    if args.verbose:
        print(f"[loaded {llm.path} in {time.perf_counter() - t0:.2f} s]", file=sys.stderr)
    params = sampling_from(args)
    options = constraint_options(args)
    if args.raw:
        ids = llm.encode(prompt)
        guide = llm.guide_for(options.grammar)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt.strip()}]
        plan = llm.plan_chat(messages, options)
        ids, guide = plan.prompt_ids, plan.guide
    if args.explain is not None:
        return print_explained(llm, ids, params, args.explain, guide)
    started = time.perf_counter()
    printer = ReplyPrinter(sys.stdout) if args.raw else reply_printer(llm, ids)
    text, _ = stream_out(llm.stream_ids(ids, params, guide), args.verbose, len(ids), started, printer)
    if not text.endswith("\n"):
        sys.stdout.write("\n")
    return 0


def print_explained(llm, ids, params, k: int, guide=None) -> int:
    """One row per generated token as it is chosen, then the answer."""
    from .explain import explain_generate
    if k < 0:
        raise LanternError(f"--explain takes a non-negative count, got {k}")
    print(f"{'#':>4}  {'token':18} {'prob':>7}  {'rank':>4}  alternatives (prob)")
    pieces = []
    for step, trace in explain_generate(llm.model, llm.tokenizer, ids, llm._params(params), llm.context,
                                        top_k=k + 1, guide=guide, kv_dtype=llm.kv_dtype):
        constraint = next((st for st in trace["stages"][1:2] if st["name"] in ("grammar", "thinking_budget")), None)
        if constraint is not None:  # the constraint is the first stage after the raw logits
            print(f"      {constraint['name']}: kept {constraint['kept']:,} of {trace['stages'][0]['kept']:,}")
        chosen = trace["chosen"]
        alts = [c for c in trace["candidates"] if c["id"] != chosen["id"]][:k]
        alt_text = "  ".join(f"{c['text']!r} {c['prob']:.3f}" for c in alts)
        print(f"{trace['index']:>4}  {chosen['text']!r:18} {chosen['raw_prob']:>7.4f}  {chosen['raw_rank']:>4}  "
              f"{alt_text}", flush=True)
        pieces.append(step.text)
    print("\n" + "".join(pieces))
    return 0


def cmd_lens(args) -> int:
    text = read_text(args.prompt, "prompt")
    llm = open_model(args)
    ids = llm.encode_chat([{"role": "user", "content": text.strip()}]) if args.chat else llm.encode(text)
    lens = llm.logit_lens(ids, position=args.position, top_k=args.top_k)
    if args.json:
        print(json.dumps(lens, ensure_ascii=False, indent=2))
        return 0
    print(f"position {lens['position']} (token {lens['token']['text']!r}); the model's next token: "
          f"{lens['final_token']['text']!r}")
    print(f"{'layer':>14}  {'p(final)':>8}  top {args.top_k} (prob)")
    for depth in lens["depths"]:
        top = "  ".join(f"{t['text']!r} {t['prob']:.3f}" for t in depth["top"])
        print(f"{depth['name']:>14}  {depth['final_token_prob']:>8.4f}  {top}")
    return 0


def cmd_chat(args) -> int:
    llm = open_model(args)
    params = sampling_from(args)
    options = constraint_options(args)
    interactive = sys.stdin.isatty()
    system = args.system
    history: list[dict] = []
    if interactive:
        print("Lantern chat: /reset, /system TEXT, /exit (Ctrl-D); Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if not interactive and line == "":
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit", "/bye"):
            break
        if line == "/reset":
            history = []
            print("[conversation cleared]", file=sys.stderr)
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            history = []
            print(f"[system prompt {'set' if system else 'cleared'}; conversation cleared]", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"[unknown command {line.split()[0]}; try /reset, /system TEXT, /exit]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        plan = llm.plan_chat(messages, options)
        printer, stopped = reply_printer(llm, plan.prompt_ids), False
        try:
            for step in llm.stream_ids(plan.prompt_ids, params, plan.guide):
                if step.text:
                    printer.write(step.text)
        except KeyboardInterrupt:
            stopped = True
        finally:
            printer.finish()  # also resets a dimmed terminal before anything else is printed
        if stopped:
            print("\n[stopped]", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()
        # Only the answer: chat templates expect past turns without their thinking (most drop it anyway).
        history.append({"role": "assistant", "content": printer.answer})
    return 0


def cmd_pull(args) -> int:
    from .store import pull
    path = pull(args.name)
    print(path)
    return 0


def cmd_list(args) -> int:
    from .store import cache_dir, listing
    rows = listing()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NAME':28} {'SIZE':>9}  WHERE")
    for r in rows:
        where = r["path"] or "not pulled (lantern pull " + r["name"] + ")"
        mark = " (default)" if r["default"] else ""
        print(f"{r['name'] + mark:28} {r['size'] / 1e6:7.1f}MB  {where}")
    print(f"cache: {cache_dir()}", file=sys.stderr)
    return 0


def cmd_rm(args) -> int:
    from .store import remove
    if remove(args.name):
        print(f"removed {args.name} from the cache")
        return 0
    raise LanternError(f"{args.name} is not in the cache")


def served_name(name: str, llm) -> str:
    """The name clients use: a catalogue name as given, a path as its file or folder name."""
    if "/" in name or name.endswith(".gguf"):
        return llm.path.stem if llm.path.is_file() else llm.path.name
    return name


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_size(text: str) -> int:
    """'1GiB', '512MiB', '2GB', '1000000' -> bytes."""
    import re
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise LanternError(f"cannot read the size {text!r}: write e.g. 1GiB, 512MiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def api_keys(args) -> tuple[str, ...]:
    """--api-key values and the keys in --api-key-file, in that order, without repeats."""
    keys = list(args.api_key)
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise LanternError(f"cannot read --api-key-file {args.api_key_file}: {e}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    for key in keys:
        if not key or any(c.isspace() or not c.isprintable() for c in key):
            raise LanternError("an API key must be printable text without spaces")
    if args.prefix_cache_per_key and not keys:
        raise LanternError("--prefix-cache-per-key needs API keys (--api-key or --api-key-file)")
    return tuple(dict.fromkeys(keys))


def cmd_serve(args) -> int:
    for name in ("port", "max_batch", "max_queue", "context", "request_timeout"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise LanternError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.shutdown_timeout < 0:
        raise LanternError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    check_tensor_parallel(args)
    if args.tensor_parallel > 1 and args.embedding:
        raise LanternError("--embedding needs the model's hidden states on one process: not with --tensor-parallel")
    if served_as_worker_rank(args):
        return 0
    check_port(args.host, args.port)  # before the load (and the ranks): uvicorn would find it only after
    llm = open_model(args) if args.tensor_parallel > 1 else _open_on_a_passing_thread(args)
    try:
        return serve(args, llm)
    finally:
        llm.close()  # the other tensor-parallel ranks, if any


def _open_on_a_passing_thread(args):
    """open_model on a thread that ends when the model is loaded. PyTorch's OpenMP (libgomp) keeps a team of
    threads for every thread that ran a parallel op, and once a process has more such threads than cores it cuts
    every team's spinning to almost nothing: loaded on the main thread, the load's team stayed beside the
    serving Engine's own, and each op of the Engine's thread then waited for a sleeping worker. A team ends with
    its thread, so the Engine's is the only one. bf16 folder on the project's 2-core VM, fresh servers,
    alternating: a 56-token chat prompt's first token 150-154 -> 81-103 ms, one stream 60 -> 61-67 tokens/s.
    (Tensor-parallel serving keeps the main thread: its ranks are started from there.)"""
    import threading

    loaded: dict = {}

    def load():
        try:
            loaded["llm"] = open_model(args)
        except BaseException as e:  # noqa: BLE001 - raised again on the main thread
            loaded["error"] = e

    thread = threading.Thread(target=load, name="lantern-load", daemon=True)  # daemon: Ctrl-C still exits
    thread.start()
    thread.join()
    if "error" in loaded:
        raise loaded["error"]
    return loaded["llm"]


# Seconds a server whose tensor-parallel rank failed goes on answering 503 before it exits, unless a client was
# told sooner (/health, a request): so a probe or a client sees why, and the server still never lingers dead.
DEAD_LINGER = 10.0


def serve(args, llm) -> int:
    import uvicorn

    from .server.app import ServedModel, ServerConfig, create_app

    context = min(args.context or 4096, llm.config.max_position_embeddings)
    served = served_name(args.served_model_name or args.model or DEFAULT_MODEL, llm)
    config = ServerConfig(served_name=served, aliases=tuple(a for a in (args.model, str(llm.path)) if a),
                          api_keys=api_keys(args), max_batch=args.max_batch, max_queue=args.max_queue,
                          context=context, public_metrics=args.public_metrics,
                          request_timeout=args.request_timeout,
                          kv_cache_bytes=None if args.kv_cache_memory is None else parse_size(args.kv_cache_memory),
                          prefix_caching=not args.no_prefix_caching,
                          prefix_cache_per_key=args.prefix_cache_per_key)
    extra = []
    for name in args.embedding_model:
        emb = open_model(argparse.Namespace(model=name, dtype=args.dtype, device=args.device, exact=False))
        extra.append(ServedModel(served_name(name, emb), emb, (name, str(emb.path)), embedding=True))
    app = create_app(llm, config, embed_main=args.embedding, pooling=args.embedding_pooling,
                     embedding_models=tuple(extra))
    names = ", ".join([served] + [m.name for m in extra])
    kv = (f"KV cache {config.kv_cache_bytes / 2**30:.2f} GiB" if config.kv_cache_bytes is not None
          else f"KV cache for {args.max_batch} x {context} tokens")
    ranks = llm.ranks
    tp = "" if ranks is None else (f", tensor parallel {ranks.world} over {ranks.backend}"
                                   + (f", worker pids {' '.join(map(str, ranks.pids))}" if ranks.pids else ""))
    prefix = 'off' if args.no_prefix_caching else 'per API key' if args.prefix_cache_per_key else 'on'
    print(f"serving {names} on http://{args.host}:{args.port}/v1 (batch {args.max_batch}, context {context}, {kv}, "
          f"prefix caching {prefix}{tp})", file=sys.stderr)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal into the handler that was there
    # before it; a no-op one there makes a graceful stop exit 0, as service managers expect.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    if ranks is not None:
        state = app.state.lantern

        def failed(reason: str) -> None:  # on a thread of its own: /health turns 503, then the server stops
            state.engine_failed(reason)
            state.dead_reported.wait(DEAD_LINGER)
            server.should_exit = True

        ranks.watch(failed)
    server.run()
    if ranks is not None and ranks.failed:
        raise LanternError(ranks.failed)
    return 0


def check_port(host: str, port: int) -> None:
    """One line when the address cannot be listened on (taken, not this machine's), as uvicorn binds it."""
    import socket
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closing socket is no obstacle
            s.bind(address)
    except OSError as e:
        raise LanternError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_inspect(args) -> int:
    from .inspect import describe, render_text
    llm = open_model(args)
    info = describe(llm)
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else render_text(llm, info))
    return 0


def cmd_embed(args) -> int:
    if args.text:
        texts = args.text
    elif sys.stdin.isatty():
        raise LanternError("give the texts as arguments or on stdin, one per line")
    else:
        texts = [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    args.model = args.model or DEFAULT_EMBEDDING_MODEL
    llm = open_model(args)
    vectors = llm.embed(texts, normalize=args.normalize, truncate=args.truncate, pooling=args.pooling,
                        prompt_name=args.prompt_name)
    if args.json:
        print(json.dumps({"model": args.model, "dimensions": llm.embedding_dimensions,
                          "data": [{"index": i, "text": t, "embedding": v}
                                   for i, (t, v) in enumerate(zip(texts, vectors))]}, ensure_ascii=False))
    else:
        for v in vectors:
            print(json.dumps(v))
    return 0


def cmd_tokenize(args) -> int:
    text = read_text(args.text, "text")
    llm = open_model(args)
    tok = llm.tokenizer
    if args.chat:
        text = llm.apply_chat_template([{"role": "user", "content": text.strip()}])
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(text, add_special_tokens=not args.no_special)
    pieces = tok.tokens(ids)
    texts = [tok.decode([i]) for i in ids]
    if args.json:
        print(json.dumps({"text": text, "count": len(ids), "ids": ids, "tokens": pieces, "texts": texts},
                         ensure_ascii=False, indent=2))
        return 0
    if args.chat:
        print(text)
        print("-" * 40)
    print(f"{len(ids)} tokens")
    print(f"{'#':>4}  {'id':>7}  {'piece':24} text")
    for n, (i, p, t) in enumerate(zip(ids, pieces, texts)):
        special = " (special)" if i in tok.special_ids else ""
        print(f"{n:>4}  {i:>7}  {p!r:24} {t!r}{special}")
    return 0


def cmd_rag(args) -> int:
    from .retrieval import Rag

    def load(name):  # the CLI's way to open a model: pulls a catalogue model on first use
        return open_model(argparse.Namespace(model=name, dtype=getattr(args, "dtype", None),
                                             device=getattr(args, "device", None), exact=False))
    chat = getattr(args, "model", None)
    rag = Rag(args.index, embedding_model=getattr(args, "embedding_model", None), chat_model=chat, load=load)
    try:
        return RAG_ACTIONS[args.rag_command](rag, args)
    finally:
        rag.close()


def rag_add(rag, args) -> int:
    failed = 0

    def progress(r):
        nonlocal failed
        if r["status"] == "failed":
            failed += 1
            print(f"skipped {r['path']}: {' '.join(r['error'].split())}", file=sys.stderr, flush=True)
        else:
            print(f"{r['status']:9} {r['path']} ({r['chunks']} chunks)", flush=True)
    rag.add(args.paths, progress=progress)
    info = rag.list()
    print(f"index {info['index']}: {len(info['documents'])} documents, {info['chunks']} chunks ({info['path']})",
          file=sys.stderr)
    return 1 if failed else 0


def rag_rm(rag, args) -> int:
    for path in rag.remove(args.paths):
        print(f"removed {path}")
    return 0


def rag_list(rag, args) -> int:
    info = rag.list()
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    model = info["embedding_model"]
    described = f"{model['name']} ({model['dimensions']} dimensions)" if model else "none yet"
    print(f"index {info['index']} ({info['path']}): {len(info['documents'])} documents, {info['chunks']} chunks, "
          f"embedding model {described}")
    print(f"{'CHUNKS':>6}  {'KIND':8}  PATH")
    for d in info["documents"]:
        print(f"{d['chunks']:>6}  {d['kind']:8}  {d['path']}")
    return 0


def rag_ask(rag, args) -> int:
    from .retrieval import sources_text
    question = read_text(args.question, "question").strip()
    params = sampling_from(args)
    if args.json:
        result = rag.ask(question, args.k, params, show=True)
        result.pop("prompt_token_ids", None)
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    plan = rag.plan(question, args.k, params.max_tokens)
    if args.show:
        print_rag_plan(plan)
        print("== answer")
    text, _ = stream_out(rag.answer_stream(plan, params), False, plan["prompt_tokens"], time.perf_counter())
    if not text.endswith("\n"):
        sys.stdout.write("\n")
    print("\nSources:" if not args.show else "== sources")
    print(sources_text(plan["sources"]))
    return 0


def print_rag_plan(plan: dict) -> None:
    """The steps before the answer, as `lantern rag ask --show` prints them."""
    query = plan["query"]
    prefix = f", query prefix {query['prefix']!r}" if query["prefix"] else ""
    print(f"== question, as the embedding model {plan['embedding_model']} reads it: {len(query['token_ids'])} "
          f"tokens{prefix}")
    print(" ".join(query["tokens"]))
    print(f"== {len(plan['hits'])} chunks found (score = cosine similarity)")
    for hit in plan["hits"]:
        where = f"lines {hit['lines'][0]}-{hit['lines'][1]}, chars {hit['chars'][0]}-{hit['chars'][1]}"
        print(f"[{hit['rank']}] score {hit['score']:.4f}  {hit['source']}  ({where}, {hit['tokens']} tokens)")
        snippet = " ".join(hit["text"].split())
        print(f"    {snippet[:300]}{'...' if len(snippet) > 300 else ''}")
    dropped = f"; {plan['dropped_passages']} passages dropped to fit the context" if plan["dropped_passages"] else ""
    print(f"== prompt ({plan['chat_model']}'s chat template): {plan['prompt_tokens']} tokens{dropped}")
    print(plan["prompt"], end="" if plan["prompt"].endswith("\n") else "\n")


RAG_ACTIONS = {"add": rag_add, "rm": rag_rm, "list": rag_list, "ask": rag_ask}


COMMANDS = {"run": cmd_run, "lens": cmd_lens, "chat": cmd_chat, "serve": cmd_serve, "pull": cmd_pull, "list": cmd_list, "rm": cmd_rm,
            "inspect": cmd_inspect, "tokenize": cmd_tokenize, "embed": cmd_embed, "rag": cmd_rag}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (LanternError, ValueError, OSError) as e:
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"lantern {args.command}: error: {message}", file=sys.stderr)
        return 1
    except Exception as e:  # an internal error: still one line, with the way to the details
        if args.debug:
            raise
        print(f"lantern {args.command}: internal error: {type(e).__name__}: {' '.join(str(e).split())} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
