"""`loraplex build`: its arguments and its run; cli.py, the composition root, calls both."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# (flag, argparse options, help); the defaults are EngineConfig's.
_OPTIONS = (
    ("--quantization", {"choices": ["fp8"], "default": "fp8"}, "weight format"),
    ("--max-num-seqs", {"type": int, "default": 64}, "requests in one batch at most"),
    (
        "--max-model-len",
        {"type": int, "default": 0},
        "context length (0 = the model's own limit)",
    ),
    ("--max-lora-rank", {"type": int, "default": 64}, "largest adapter rank"),
    (
        "--dtype",
        {"default": "auto", "choices": ["auto", "float32", "float16", "bfloat16"]},
        "activations, norms, embeddings and LM head (auto = the checkpoint's)",
    ),
    ("--device", {"default": "auto"}, "cpu, cuda, cuda:N or auto"),
    (
        "--load-format",
        {"default": "auto", "choices": ["auto", "dummy"]},
        "dummy: random weights of the model's shapes, for benchmarks",
    ),
    ("--seed", {"type": int, "default": 0}, "seed of the dummy weights"),
)


def add_build_parser(sub) -> None:
    """The `build` subcommand on the CLI's subparsers."""
    build = sub.add_parser(
        "build",
        help="quantize a checkpoint once into an FP8 engine directory",
        description="Quantize MODEL's linear layers to FP8 (e4m3, per-channel weight scales, "
        "per-token activation scales) on the device and write an engine directory: FP8 "
        "safetensors, config and tokenizer files, and engine.json with the limits it was "
        "built for, the GPU, and a quality gate (top-1 agreement and KL of the FP8 logits "
        "against the unquantized model on fixed prompts). `loraplex serve DIR` loads it "
        "without re-quantizing. Written atomically: DIR appears only when complete.",
    )
    build.add_argument(
        "model", metavar="MODEL", type=Path, help="a Hugging Face checkpoint directory"
    )
    build.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the engine directory to write (must not exist yet)",
    )
    for flag, options, text in _OPTIONS:
        build.add_argument(
            flag, **options, help=f"{text} (default: {options['default']})"
        )
    build.add_argument("--quiet", action="store_true", help="no progress output")


def run_build(args: argparse.Namespace) -> int:
    """Build the engine; print the quality gate; 1 with the reason on stderr on failure."""
    from loraplex.platform import ModelLoadError
    from loraplex.platform.engine_build import BuildOptions, build_engine

    def say(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    options = BuildOptions(
        model=args.model,
        out=args.out,
        quantization=args.quantization,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_lora_rank=args.max_lora_rank,
        dtype=args.dtype,
        device=args.device,
        load_format=args.load_format,
        seed=args.seed,
        progress=not args.quiet,
    )
    try:
        record = build_engine(options, say)
    except (ModelLoadError, FileExistsError, ValueError, OSError) as exc:
        print(f"loraplex build: {exc}", file=sys.stderr)
        return 1
    gate, engine, gpu = record["quality_gate"], record["engine"], record["gpu"]
    print(f"engine written to {args.out}")
    print(
        f"  {engine['quantization']} weights, {engine['dtype']} activations, "
        f"max {engine['max_num_seqs']} sequences of {engine['max_model_len']} tokens, "
        f"LoRA rank up to {engine['max_lora_rank']}, built for {gpu['name']}"
    )
    print(
        f"  quality gate vs {gate['reference_dtype']} over {gate['positions']} positions: "
        f"top-1 agreement {100 * gate['top1_agreement']:.2f}%, "
        f"mean KL {gate['mean_kl']:.3e}, max KL {gate['max_kl']:.3e}"
    )
    return 0
