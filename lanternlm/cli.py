"""The `lantern` command: argument parsing and printing only; the work is done by the API and the store.

Errors are one line on stderr and a non-zero exit (1 for a problem with the input, 2 for a bad command
line); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from .errors import LanternError
from .store import DEFAULT_MODEL

EXAMPLES = {
    "run": """examples:
  lantern run "What is the capital of France?"
  echo "Tell me a joke" | lantern run -m smollm2-135m-instruct
  lantern run --raw --max-tokens 20 "Once upon a time"
  lantern run -m ./my-hf-folder --temperature 0.7 --seed 1 --stop "\\n\\n" "Write a haiku"
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
                   help="GGUF: compute from weights dequantized to --dtype (the reference path) instead of "
                        "from the quantized blocks")


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
    add_sampling(p)

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

    p = command("pull", "fetch a model into the cache (verified by sha256)")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL)

    p = command("list", "list the catalogue and what is on this machine")
    p.add_argument("--json", action="store_true")

    p = command("rm", "remove a pulled model from the cache")
    p.add_argument("name")

    p = command("serve", "serve the model over an OpenAI-compatible HTTP API (continuous batching)")
    add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
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

    p = command("tokenize", "show tokens, ids and pieces of a text")
    add_model(p)
    p.add_argument("text", nargs="*", help="the text (default: read from stdin)")
    p.add_argument("--chat", action="store_true", help="render the chat template around TEXT first")
    p.add_argument("--no-special", action="store_true", help="do not add BOS/special tokens")
    p.add_argument("--json", action="store_true")
    return parser


# ---------------------------------------------------------------------- helpers


def open_model(args):
    from .api import LLM
    from .store import NotPulledError, pull, resolve

    name = args.model or DEFAULT_MODEL
    try:
        resolve(name)
    except NotPulledError:  # a catalogue model not fetched yet: fetch it first, as `ollama run` does
        print(f"{name} is not on this machine yet: pulling it", file=sys.stderr)
        pull(name)
    return LLM(name, dtype=args.dtype, device=args.device, quantized=False if args.exact else None)


def sampling_from(args):
    from .sampling import SamplingParams
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


def stream_out(steps, verbose: bool, prompt_len: int, started: float) -> tuple[str, str | None]:
    """Print the steps' text as it comes; return the whole text and the finish reason."""
    pieces, reason, first, count = [], None, None, 0
    for step in steps:
        if first is None:
            first = time.perf_counter()
        count += 1
        if step.text:
            sys.stdout.write(step.text)
            sys.stdout.flush()
            pieces.append(step.text)
        reason = step.finish_reason
    end = time.perf_counter()
    if verbose:
        decode = (count - 1) / (end - first) if first and count > 1 and end > first else 0.0
        ttft = (first - started) if first else 0.0
        print(f"\n[prompt {prompt_len} tokens, generated {count} tokens, finish {reason}, "
              f"time to first token {ttft:.3f} s, decode {decode:.1f} tokens/s]", file=sys.stderr)
    return "".join(pieces), reason


# ---------------------------------------------------------------------- commands


def cmd_run(args) -> int:
    prompt = read_text(args.prompt, "prompt")
    t0 = time.perf_counter()
    llm = open_model(args)
    if args.verbose:
        print(f"[loaded {llm.path} in {time.perf_counter() - t0:.2f} s]", file=sys.stderr)
    params = sampling_from(args)
    if args.raw:
        ids = llm.encode(prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt.strip()}]
        ids = llm.encode_chat(messages)
    if args.explain is not None:
        return print_explained(llm, ids, params, args.explain)
    started = time.perf_counter()
    text, _ = stream_out(llm.generate_stream(ids, params), args.verbose, len(ids), started)
    if not text.endswith("\n"):
        sys.stdout.write("\n")
    return 0


def print_explained(llm, ids, params, k: int) -> int:
    """One row per generated token as it is chosen, then the answer."""
    from .explain import explain_generate
    if k < 0:
        raise LanternError(f"--explain takes a non-negative count, got {k}")
    print(f"{'#':>4}  {'token':18} {'prob':>7}  {'rank':>4}  alternatives (prob)")
    pieces = []
    for step, trace in explain_generate(llm.model, llm.tokenizer, ids, llm._params(params), llm.context,
                                        top_k=k + 1):
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
        ids = llm.encode_chat(messages)
        pieces = []
        try:
            for step in llm.generate_stream(ids, params):
                if step.text:
                    sys.stdout.write(step.text)
                    sys.stdout.flush()
                    pieces.append(step.text)
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(pieces)})
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


def cmd_serve(args) -> int:
    import uvicorn

    from .server.app import ServedModel, ServerConfig, create_app

    for name in ("port", "max_batch", "max_queue", "context", "request_timeout"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise LanternError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.shutdown_timeout < 0:
        raise LanternError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    llm = open_model(args)
    context = min(args.context or 4096, llm.config.max_position_embeddings)
    served = served_name(args.served_model_name or args.model or DEFAULT_MODEL, llm)
    config = ServerConfig(served_name=served, aliases=tuple(a for a in (args.model, str(llm.path)) if a),
                          api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                          context=context, public_metrics=args.public_metrics,
                          request_timeout=args.request_timeout)
    extra = []
    for name in args.embedding_model:
        emb = open_model(argparse.Namespace(model=name, dtype=args.dtype, device=args.device, exact=False))
        extra.append(ServedModel(served_name(name, emb), emb, (name, str(emb.path)), embedding=True))
    app = create_app(llm, config, embed_main=args.embedding, pooling=args.embedding_pooling,
                     embedding_models=tuple(extra))
    names = ", ".join([served] + [m.name for m in extra])
    print(f"serving {names} on http://{args.host}:{args.port}/v1 (batch {args.max_batch}, context {context})",
          file=sys.stderr)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal into the handler that was there
    # before it; a no-op one there makes a graceful stop exit 0, as service managers expect.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0


def cmd_inspect(args) -> int:
    from .inspect import describe, render_text
    llm = open_model(args)
    info = describe(llm)
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else render_text(llm, info))
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


COMMANDS = {"run": cmd_run, "lens": cmd_lens, "chat": cmd_chat, "serve": cmd_serve, "pull": cmd_pull, "list": cmd_list, "rm": cmd_rm,
            "inspect": cmd_inspect, "tokenize": cmd_tokenize}


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
