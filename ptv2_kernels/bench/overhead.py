"""``overhead`` mode: what a call costs the host, and whether the fused CPU kernel wins at small shapes.

1. ``call-fwd`` / ``call-fwdbwd``: µs per call on tiny tensors (B=1, H=1, N=4, P=2, D=64, float32), where only
   host time is left: ``prefix_attention`` on every backend that runs here, ``concat-sdpa``
   (:func:`~ptv2_kernels.concat_prefix_attention`, validated by the op's own checks), ``concat-sdpa-unchecked``
   (the same ``torch.cat`` + SDPA without checks, as PEFT runs it) and bare SDPA without a prefix. Forward with
   inputs that need no gradient (inference), forward+backward with ``torch.autograd.grad`` of every input.
2. ``layer-eager`` / ``layer-compiled``: a 12-layer BERT with hidden size 64 (compute negligible), B=1, N=8,
   P=4, one inference forward; the cost per layer of patching it (``patch_model``) and of PEFT's prefix tuning,
   over the unpatched model, eager and under ``torch.compile``.
3. ``sweep-fwd`` / ``sweep-fwdbwd``: the fused CPU kernel against ``concat-sdpa`` at B in {1, 2, 8, 32}, N in
   {32, 64, 128, 512} (bert-base heads, P=128, float32, padding mask), at the process's thread count.

Parts 1 and 2 run on one thread and time the calling thread's CPU time (``measure.timings(cpu_time=True)``),
so other processes on a shared machine disturb them little; part 3 times the wall clock. Every part
interleaves its providers (median and spread over the rounds). CPU tensors only: the GPU variant (CUDA
tensors, a patched bert-base under ``mode="reduce-overhead"``) is not written yet.
"""

import contextlib
import json
import shlex
from functools import partial

import torch
import torch.nn.functional as F

from .. import concat_prefix_attention, patch_model, prefix_attention
from ..ops.common import prefix_rows
from ..ops.prefix_attention import resolve_backend
from . import measure, report

TINY = dict(batch=1, heads=1, seq=4, prefix=2, dim=64)
BACKENDS = ("cpu", "torch-ref", "triton", "cuda")
LAYER_CONFIG = dict(hidden_size=64, num_attention_heads=1, num_hidden_layers=12, intermediate_size=64,
                    vocab_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
LAYER_BATCH, LAYER_SEQ, LAYER_PREFIX = 1, 8, 4
SWEEP_BATCHES, SWEEP_SEQS, SWEEP_PREFIX, SWEEP_HEADS, SWEEP_DIM = (1, 2, 8, 32), (32, 64, 128, 512), 128, 12, 64


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _backend_reason(backend: str):
    """Why ``backend`` is not timed here (None if it is)."""
    if backend == "triton":
        return "Triton on CPU runs in the interpreter (a correctness tool, not timed)"
    try:
        resolved = resolve_backend(backend, torch.device("cpu"))
    except (RuntimeError, ValueError) as err:
        return str(err)
    return None if resolved == backend else f"runs as {resolved!r} here"


def _unchecked_concat(q, k, v, prefix_k, prefix_v, mask):
    """Concatenation + SDPA with no argument checks: the work PEFT's path does per layer."""
    batch, heads, num_prefix, dim = q.shape[0], q.shape[1], prefix_k.shape[-2], q.shape[-1]
    keys = torch.cat([prefix_rows(prefix_k, None).expand(batch, heads, num_prefix, dim), k], dim=2)
    values = torch.cat([prefix_rows(prefix_v, None).expand(batch, heads, num_prefix, dim), v], dim=2)
    visible = torch.cat([mask.new_ones(batch, num_prefix), mask], dim=1)[:, None, None, :]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)


def _attention_calls(batch, heads, seq, prefix, dim, backward: bool, providers: dict):
    """name -> timed call of each provider ``name -> fn(q, k, v, prefix_k, prefix_v, mask)`` on fresh seeded
    inputs (a bank ``[1, H, P, D]`` for the unchecked concatenation, ``[H, P, D]`` for the others)."""
    gen = torch.Generator().manual_seed(0)
    lengths = seq - (torch.arange(batch) % 4) * (seq // 8)
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    calls = {}
    for name, fn in providers.items():
        tensors = [torch.randn(batch, heads, seq, dim, generator=gen) for _ in range(3)]
        tensors += [torch.randn(heads, prefix, dim, generator=gen) for _ in range(2)]
        leaves = [t.requires_grad_(backward) for t in tensors]
        if name == "concat-sdpa-unchecked":
            tensors = tensors[:3] + [t.unsqueeze(0) for t in tensors[3:]]
        if name == "sdpa":
            tensors = tensors[:3]
            leaves = leaves[:3]
        grad_out = torch.randn(batch, heads, seq, dim, generator=gen)

        def call(fn=fn, tensors=tensors, leaves=leaves, grad_out=grad_out):
            out = fn(*tensors, mask)
            return torch.autograd.grad(out, leaves, grad_out) if backward else out

        calls[name] = call
    return calls


def call_rows(rounds: int):
    """Part 1: rows of µs per call, and skipped backends."""
    skipped = {b: _backend_reason(b) for b in BACKENDS}
    providers = {f"prefix_attention[{b}]": partial(_fused, b) for b, why in skipped.items() if why is None}
    providers["concat-sdpa"] = partial(_concat, "sdpa")
    providers["concat-sdpa-unchecked"] = _unchecked_concat
    providers["sdpa"] = lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v)
    rows = []
    for bench, backward in (("call-fwd", False), ("call-fwdbwd", True)):
        calls = _attention_calls(**TINY, backward=backward, providers=providers)
        timed = measure.timings(calls, torch.device("cpu"), warmup=20, rounds=rounds, cpu_time=True)
        concat = timed["concat-sdpa"].ms
        rows += [{"bench": bench, "provider": name, "us": t.ms * 1e3, "spread": t.spread, "over_concat": t.ms / concat}
                 for name, t in timed.items()]
    return rows, [{"bench": "call", "provider": f"prefix_attention[{b}]", "reason": why}
                  for b, why in skipped.items() if why]


def _fused(backend, q, k, v, prefix_k, prefix_v, mask):
    return prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=mask, backend=backend)


def _concat(impl, q, k, v, prefix_k, prefix_v, mask):
    return concat_prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=mask, impl=impl)


def _tiny_bert():
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    config = BertConfig(**LAYER_CONFIG, num_labels=2)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").eval()


def _peft_model(model):
    """PEFT prefix tuning of ``model``, or the reason it refuses (found by trying a forward)."""
    try:
        from peft import PrefixTuningConfig, TaskType, get_peft_model

        wrapped = get_peft_model(model, PrefixTuningConfig(task_type=TaskType.SEQ_CLS,
                                                            num_virtual_tokens=LAYER_PREFIX)).eval()
        with torch.inference_mode():
            wrapped(**_layer_batch())
        return wrapped, None
    except Exception as err:  # PEFT refuses with its own errors: report them
        return None, f"PEFT prefix tuning failed here: {type(err).__name__}: {str(err)[:200]}"


def _layer_batch():
    return {"input_ids": torch.arange(3, 3 + LAYER_SEQ)[None].repeat(LAYER_BATCH, 1),
            "attention_mask": torch.ones(LAYER_BATCH, LAYER_SEQ, dtype=torch.long)}


def layer_rows(rounds: int, compiled: bool):
    """Part 2: rows of the per-layer cost of patching and of PEFT, eager and (``compiled``) compiled."""
    batch = _layer_batch()
    models = {"unpatched": _tiny_bert()}
    patched = _tiny_bert()
    patch_model(patched, LAYER_PREFIX)
    models["patched"] = patched
    peft_model, refusal = _peft_model(_tiny_bert())
    skipped = []
    if peft_model is None:
        skipped.append({"bench": "layer-eager", "provider": "peft", "reason": refusal})
    else:
        models["peft"] = peft_model
    variants = {"layer-eager": models}
    if compiled:
        variants["layer-compiled"] = {name: torch.compile(m) for name, m in models.items() if name != "peft"}
        skipped.append({"bench": "layer-compiled", "provider": "peft", "reason": "not measured (its cache path is "
                        "not what this bench compares)"})
    rows = []
    for bench, variant in variants.items():
        def forward(model):
            with torch.inference_mode():
                return model(**batch).logits

        calls = {name: partial(forward, m) for name, m in variant.items()}
        timed = measure.timings(calls, torch.device("cpu"), warmup=3, rounds=rounds, cpu_time=True)
        base = timed["unpatched"].ms
        layers = LAYER_CONFIG["num_hidden_layers"]
        for name, t in timed.items():
            rows.append({"bench": bench, "provider": name, "us": t.ms * 1e3, "spread": t.spread,
                         "per_layer_us": (t.ms - base) * 1e3 / layers})
    return rows, skipped


def sweep_rows(rounds: int):
    """Part 3: the fused CPU kernel vs concat-sdpa over the (B, N) sweep."""
    from .kernel import KernelCase, finish_case, prepare_case

    if _backend_reason("cpu"):
        return [], [{"bench": "sweep", "provider": "fused-torch", "reason": _backend_reason("cpu")}]
    rows = []
    for batch in SWEEP_BATCHES:
        for seq in SWEEP_SEQS:
            case = KernelCase("bert-base", batch, SWEEP_HEADS, seq, SWEEP_PREFIX, SWEEP_DIM, torch.float32,
                              torch.device("cpu"))
            for bench in ("kernel-fwd", "kernel-fwdbwd"):
                prepared = {p: prepare_case(case, bench, p) for p in ("concat-sdpa", "fused-torch")}
                timed = measure.timings({p: c for p, (_, c, _) in prepared.items()}, case.device, 1, rounds)
                reference = finish_case(case, bench, "concat-sdpa", prepared["concat-sdpa"], timed["concat-sdpa"],
                                        None)[1]
                metrics, _ = finish_case(case, bench, "fused-torch", prepared["fused-torch"], timed["fused-torch"],
                                         reference)
                rows.append({"bench": bench.replace("kernel", "sweep"), "B": batch, "N": seq,
                             "concat_ms": timed["concat-sdpa"].ms, "fused_ms": metrics["ms"],
                             "spread": max(metrics["spread"], timed["concat-sdpa"].spread),
                             "speedup": timed["concat-sdpa"].ms / metrics["ms"], "max_err": metrics["max_err"]})
                del prepared
    return rows, []


def verdicts(calls, layers, sweep) -> dict:
    """The issue's targets against this run (None where a part was not measured)."""
    def ratio(bench):
        fused = [r["over_concat"] for r in calls if r["bench"] == bench and r["provider"] == "prefix_attention[cpu]"]
        return fused[0] if fused else None

    def per_layer(bench, name):
        rows = [r["per_layer_us"] for r in layers if r["bench"] == bench and r["provider"] == name]
        return rows[0] if rows else None

    patched, peft = per_layer("layer-eager", "patched"), per_layer("layer-eager", "peft")
    out = {"call-fwd over concat": ratio("call-fwd"), "call-fwdbwd over concat": ratio("call-fwdbwd"),
           "layer-eager patched over peft": patched / peft if patched is not None and peft else None,
           "layer-compiled patched us": per_layer("layer-compiled", "patched"),
           "sweep worst speedup": min((r["speedup"] for r in sweep), default=None)}
    limits = {"call-fwd over concat": ("<=", 0.7), "call-fwdbwd over concat": ("<=", 0.7),
              "layer-eager patched over peft": ("<=", 0.5), "layer-compiled patched us": ("<=", 10.0),
              "sweep worst speedup": (">=", 1.0)}
    return {name: {"value": value, "target": f"{limits[name][0]} {limits[name][1]}",
                   "met": None if value is None else (value <= limits[name][1] if limits[name][0] == "<="
                                                      else value >= limits[name][1])}
            for name, value in out.items()}


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(rows, columns) -> list:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    return lines + ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]


def markdown(doc) -> str:
    lines = ["# ptv2-bench --mode overhead", "", f"- device: {doc['device']} (one thread for calls and layers)",
             f"- torch {doc['torch']}, transformers {doc['transformers']}, peft {doc['peft']}",
             f"- commit: `{doc['commit']}`", f"- command: `{doc['command']}`", "",
             "## Host cost of one call (B=1, H=1, N=4, P=2, D=64, float32; CPU time of the calling thread)", ""]
    lines += _table(doc["calls"], ("bench", "provider", "us", "spread", "over_concat"))
    lines += ["", "## Per-layer cost of a patched 12-layer BERT (hidden 64, B=1, N=8, P=4, inference)", ""]
    lines += _table(doc["layers"], ("bench", "provider", "us", "spread", "per_layer_us"))
    if doc["sweep"]:
        lines += ["", f"## Fused CPU kernel vs concat-sdpa (bert-base heads, P={SWEEP_PREFIX}, float32, "
                      "wall clock)", ""]
        lines += _table(doc["sweep"], ("bench", "B", "N", "concat_ms", "fused_ms", "speedup", "spread", "max_err"))
    lines += ["", "## Targets", "", "| target | value | limit | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {_fmt(v['value'])} | {v['target']} | {_fmt(v['met'])} |" for name, v in doc["targets"].items()]
    if doc["skipped"]:
        lines += ["", "Skipped:", ""] + [f"- {s['bench']} / {s['provider']}: {s['reason']}" for s in doc["skipped"]]
    return "\n".join(lines) + "\n"


def main(args, device, argv) -> int:
    """Run the overhead mode on the CPU; print the Markdown report (and write ``--out``)."""
    if device.type != "cpu":
        raise SystemExit("ptv2-bench: error: --mode overhead measures CPU tensors only so far; use --device cpu")
    rounds = args.repeats or (3 if args.quick else 7)
    with _threads(1):
        calls, skipped = call_rows(rounds)
        layers, more = layer_rows(rounds, compiled=not args.quick)
    skipped += more
    sweep = []
    if not args.quick:
        sweep, more = sweep_rows(args.repeats or 3)
        skipped += more
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    doc = {"device": report.describe_device(device), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft_version, "commit": report.git_commit(),
           "command": "ptv2-bench " + shlex.join(argv), "calls": calls, "layers": layers, "sweep": sweep,
           "skipped": skipped}
    doc["targets"] = verdicts(calls, layers, sweep)
    text = markdown(doc)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        (args.out / "results.md").write_text(text)
        print(f"wrote {args.out / 'results.json'}\nwrote {args.out / 'results.md'}")
    return 0
