"""The `loraplex` command: the composition root, and the only reader of flags and LORAPLEX_* vars."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

DEFAULT_DEMO_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loraplex" / "demo"
)


def _demo_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_DEMO_DIR", DEFAULT_DEMO_DIR))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex",
        description="Serve one base LLM with many LoRA adapters in one in-flight batch.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="build the demo checkpoint and adapters (cached; no download)",
        description="Write a tiny Llama checkpoint and three PEFT LoRA adapters (ranks 8, 16, 32) "
        "trained on this machine so that each answers in its own voice. Cached: a second call "
        "returns at once.",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"where to write the assets (default: $LORAPLEX_DEMO_DIR or {DEFAULT_DEMO_DIR})",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    gen = sub.add_parser(
        "generate",
        help="generate text with the base model and any number of adapters in one batch",
        description="Run PROMPT once per --adapter (and once on the base model with --with-base "
        "or when no adapter is given), all in one in-flight batch, and print each answer.",
    )
    gen.add_argument(
        "prompt", metavar="PROMPT", nargs="?", default="Who are you?", help="the prompt"
    )
    gen.add_argument("--model", type=Path, help="a Hugging Face checkpoint directory")
    gen.add_argument(
        "--adapter",
        type=Path,
        action="append",
        default=[],
        help="a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors); repeatable",
    )
    gen.add_argument(
        "--with-base", action="store_true", help="also answer with the base model alone"
    )
    gen.add_argument(
        "--chat", action="store_true", help="wrap PROMPT in the model's chat template"
    )
    gen.add_argument(
        "--demo",
        action="store_true",
        help="use the demo checkpoint with all its adapters and the base (implies --chat --with-base)",
    )
    gen.add_argument(
        "--max-tokens", type=int, default=48, help="tokens to generate (default 48)"
    )
    gen.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default)"
    )
    gen.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)"
    )
    gen.add_argument("--seed", type=int, default=None, help="sampling seed")
    gen.add_argument(
        "--max-lora-rank",
        type=int,
        default=64,
        help="largest adapter rank (default 64)",
    )
    gen.add_argument(
        "--max-loras", type=int, default=8, help="adapter slots (default 8)"
    )
    gen.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights and activations (default: the checkpoint's)",
    )
    gen.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (default)"
    )
    _add_serve(sub)
    _add_adapters(sub)
    from loraplex.build_command import add_build_parser

    add_build_parser(sub)
    from loraplex.loadgen.commands import add_bench_parser

    add_bench_parser(sub)
    return parser


def _add_serve(sub) -> None:
    from loraplex.serve_settings import ServeSettings

    serve = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible server (no MODEL: the demo, with a demo tenant)",
        description="Serve MODEL and its tenants' adapters over an OpenAI-compatible API. "
        "Every option is also the environment variable LORAPLEX_<OPTION> and a key of the "
        "--config file; precedence: command line > environment > file > defaults. "
        "The admin key comes from LORAPLEX_ADMIN_KEY (never a flag), or is generated at "
        "first start, printed once and stored hashed.",
    )
    serve.add_argument(
        "model",
        nargs="?",
        type=Path,
        default=None,
        help="a Hugging Face checkpoint directory (default: the demo checkpoint)",
    )
    for name, field in ServeSettings.model_fields.items():
        if name in ("model", "admin_key"):
            continue
        flag = "--" + name.replace("_", "-")
        help_text = (
            f"{field.description} (default: {field.default}; "
            f"env LORAPLEX_{name.upper()})"
        )
        if field.annotation is bool:  # --x and --no-x, as vLLM spells its switches
            serve.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        kind = {int: int, float: float}.get(field.annotation, str)
        serve.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)


def _add_adapters(sub) -> None:
    adapters = sub.add_parser(
        "adapters",
        help="check or clean a data directory's adapters",
        description="verify: hash every stored adapter and mark changed ones corrupt (safe "
        "while a server runs). gc: the startup sweep on demand (fails stuck uploads, "
        "removes temp files and orphans; needs the server stopped).",
    )
    adapters.add_argument("action", choices=["verify", "gc"], help="verify or gc")
    adapters.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".loraplex/data"),
        help="the server's data directory (default: .loraplex/data)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LORAPLEX_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "demo":
        return _demo(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "adapters":
        return _adapters(args)
    if args.command == "build":
        from loraplex.build_command import run_build

        return run_build(args)
    if args.command == "bench":
        from loraplex.loadgen.commands import run_bench

        return run_bench(args)
    return _generate(args)


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from loraplex.serve_settings import load_settings

    options = {k: v for k, v in vars(args).items() if k != "command"}
    if options.get("model") is None:
        options.pop("model", None)  # absent, so the environment or the file may set it
    try:
        settings = load_settings(options, dict(os.environ))
    except (ValidationError, ValueError) as exc:
        print(f"loraplex serve: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("loraplex").setLevel(logging.INFO)
    from loraplex import serve

    demo = None
    model = settings.model
    if model is None:
        from loraplex.demo import build_demo

        demo = build_demo(_demo_dir(), log=lambda m: print(m, file=sys.stderr))
        model = demo.model
    try:
        if settings.uses_replicas:
            server = _replica_server(settings, model)
        else:
            server = serve.build_server(settings, model)
    except Exception as exc:  # noqa: BLE001 - a startup error ends the command with its reason
        print(f"loraplex serve: {exc}", file=sys.stderr)
        return 1
    lines = list(server.banner)
    if demo is not None:
        key = serve.bootstrap_demo(server, demo.adapters)
        lines += serve.usage_banner(server, key, next(iter(demo.adapters)))
    print("\n".join(lines), flush=True)
    serve.run(server)
    return 0


def _replica_server(settings, model: Path):
    try:
        from loraplex.replicas import build_replica_server
    except ImportError as exc:  # Ray is the `ray` extra, not a dependency
        raise RuntimeError(
            f"--replicas needs Ray Serve: pip install 'loraplex[ray]' ({exc})"
        ) from None
    return build_replica_server(
        settings, model, say=lambda m: print(m, file=sys.stderr)
    )


def _adapters(args: argparse.Namespace) -> int:
    from loraplex.adapters_registry import RegistryError, gc, verify

    try:
        report = verify(args.data_dir) if args.action == "verify" else gc(args.data_dir)
    except RegistryError as exc:
        print(f"loraplex adapters {args.action}: {exc}", file=sys.stderr)
        return 1
    print(report)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from loraplex.demo import build_demo

    started = time.perf_counter()
    assets = build_demo(args.out or _demo_dir(), progress=not args.quiet)
    print(f"demo assets ready in {time.perf_counter() - started:.1f} s")
    print(f"  model:   {assets.model}")
    for name, path in assets.adapters.items():
        print(f"  adapter: {path}  ({name})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from loraplex.adapters_registry import AdapterInvalid
    from loraplex.platform import EngineError, SamplingParams

    if args.demo:
        from loraplex.demo import build_demo

        assets = build_demo(
            _demo_dir(), progress=True, log=lambda m: print(m, file=sys.stderr)
        )
        args.model, args.adapter = assets.model, list(assets.adapters.values())
        args.chat = args.with_base = True
    if args.model is None:
        print("loraplex generate: --model DIR (or --demo) is required", file=sys.stderr)
        return 2
    try:
        sampling = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
        from loraplex import LLM

        llm = LLM(
            args.model,
            max_lora_rank=args.max_lora_rank,
            max_loras=args.max_loras,
            dtype=args.dtype,
            device=args.device,
        )
        adapters: list[Path | None] = list(args.adapter)
        if args.with_base or not adapters:
            adapters.insert(0, None)
        started = time.perf_counter()
        if args.chat:
            conversation = [{"role": "user", "content": args.prompt}]
            outputs = llm.chat([conversation] * len(adapters), sampling, adapters)
        else:
            outputs = llm.generate([args.prompt] * len(adapters), sampling, adapters)
        elapsed = time.perf_counter() - started
    except (EngineError, AdapterInvalid, ValueError, OSError) as exc:
        print(f"loraplex generate: {exc}", file=sys.stderr)
        return 1
    print(f"prompt: {args.prompt!r}")
    for adapter, out in zip(adapters, outputs, strict=True):
        label = "base" if adapter is None else Path(adapter).name
        print(
            f"[{label}] {out.text!r} ({len(out.token_ids)} tokens, {out.finish_reason.value})"
        )
    tokens = sum(len(o.token_ids) for o in outputs)
    print(
        f"{len(outputs)} requests over {len(args.adapter)} adapters in one batch: "
        f"{tokens} tokens in {elapsed:.2f} s on {llm.engine.device}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
