"""Command line of ``ptv2-bench`` / ``python -m ptv2_kernels.bench``."""

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import torch

from . import kernel, mixed_tasks, model, overhead, report, serve_http
from .configs import DEFAULT_MODEL, DEFAULT_SIZES, MODEL_CONFIGS, QUICK_SIZES, heads_and_dim

MODES = ("kernel", "train", "serve", "all", "serve-http", "overhead")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROVIDERS = tuple(dict.fromkeys((*kernel.PROVIDERS, *model.PROVIDERS)))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _providers(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown provider(s) {', '.join(unknown) or '(none given)'}; "
                                         f"choose from {', '.join(PROVIDERS)}")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ptv2-bench",
        description="Time and peak memory of fused prefix attention vs concatenation (P-Tuning v2). "
                    "The last line printed is 'fused/concat: time <X>x, peak memory <Y>x' (concat over "
                    "fused for the headline case; >1 means fused is better).")
    p.add_argument("--mode", choices=MODES, default="kernel",
                   help="kernel: one attention layer fwd and fwd+bwd; train: one prefix-training step of a "
                        "whole model; serve: inference sequences/s incl. a mixed-task batch; all: every mode "
                        "above; serve-http: the HTTP server under load vs the in-process engine; overhead: host "
                        "cost per call and per patched layer, and the fused CPU kernel over a (B, N) sweep "
                        "(default: kernel)")
    p.add_argument("--model", choices=sorted(MODEL_CONFIGS), default=DEFAULT_MODEL,
                   help=f"embedded config, random weights (default: {DEFAULT_MODEL})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("-B", "--batch", type=_positive, help="batch size (default: 32 on cuda, 8 on cpu)")
    p.add_argument("-N", "--seq-len", type=_positive, nargs="+",
                   help="sequence lengths; the first is the headline, the rest sweep N at the headline P")
    p.add_argument("-P", "--prefix-len", type=_positive, nargs="+",
                   help="prefix lengths; the first is the headline, the rest sweep P at the headline N")
    p.add_argument("--providers", type=_providers, default=list(PROVIDERS),
                   help=f"comma-separated subset of {', '.join(PROVIDERS)} (default: all; unavailable ones "
                        "are reported as skipped with the reason)")
    p.add_argument("--warmup", type=_positive, help="warm-up calls before timing")
    p.add_argument("--repeats", type=_positive,
                   help="timing rounds; the providers are interleaved, each round one torch.utils.benchmark "
                        "(CPU) or do_bench (GPU) measurement, the median over the rounds is reported")
    p.add_argument("--quick", action="store_true", help="small CPU-sized shapes, under a minute")
    p.add_argument("--compile", action="store_true",
                   help="train/serve modes: also run every provider's model under torch.compile (+compile rows)")
    p.add_argument("--out", type=Path, help="write results.json, results.md and PNG plots here")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    serve_http.add_arguments(p)
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ptv2-bench: error: --device cuda but no CUDA GPU is available "
                         f"(torch {torch.__version__}); use --device cpu")
    return torch.device(name)


def _sizes(args, device: torch.device):
    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES[device.type]
    overrides = {"batch": args.batch, "seq_lens": args.seq_len and tuple(args.seq_len),
                 "prefix_lens": args.prefix_len and tuple(args.prefix_len), "warmup": args.warmup,
                 "repeats": args.repeats}
    return replace(sizes, **{k: v for k, v in overrides.items() if v})


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmarks; print the table (and write ``--out``); the last line is the headline."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    device = _device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.mode == "serve-http":
        return serve_http.main(args, device, dtype, argv)
    if args.mode == "overhead":
        return overhead.main(args, device, argv)
    sizes = _sizes(args, device)
    max_positions = MODEL_CONFIGS[args.model]["max_position_embeddings"]
    seq, prefix = sizes.seq_lens[0], sizes.prefix_lens[0]  # the model modes' case
    if args.mode != "kernel" and seq + prefix > max_positions:
        raise SystemExit(f"ptv2-bench: error: N + P must be at most {max_positions} for {args.model} "
                         f"(positions are shifted by P), got N={seq}, P={prefix}")
    heads, dim = heads_and_dim(args.model)
    progress = report.Progress(enabled=not args.no_progress)
    rows, skipped = [], []
    if args.mode in ("kernel", "all"):
        r, s = kernel.run(args.model, heads, dim, sizes, dtype, device, args.providers, progress)
        rows += r
        skipped += s
    for mode in ("train", "serve"):
        if args.mode in (mode, "all"):
            r, s = model.run(mode, args.model, sizes, dtype, device, args.providers, progress, quick=args.quick,
                             compiled=args.compile)
            rows += r
            skipped += s
    if args.mode in ("serve", "all"):  # 16-task mixed batches, the PEFT adapter loop, PrefixServer on one batch
        r, s = mixed_tasks.run(args.model, sizes, dtype, device, args.providers, progress, args.quick)
        rows += r
        skipped += s
    progress.close()
    doc = report.results(device, "ptv2-bench " + shlex.join(argv), rows, skipped)
    print(f"device: {doc['device']}, torch {doc['torch']}, commit {doc['commit']}")
    print(report.table(rows))
    for s in skipped:
        print(f"skipped {s['bench']} / {s['provider']}: {s['reason']}")
    bad = [r for r in rows if r["max_err"] is not None and r["max_err"] > kernel.TOLERANCE.get(dtype, 1e-4)]
    for r in bad:
        print(f"WARNING: {r['bench']} {r['provider']} N={r['N']} P={r['P']} disagrees with concat-sdpa "
              f"(max relative error {r['max_err']:.3g})")
    if args.out:
        for path in report.write(doc, args.out):
            print(f"wrote {path}")
    print(report.headline_line(doc))
    return 1 if bad else 0
