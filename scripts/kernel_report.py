"""Compiler report of the Triton kernels, no GPU needed.

Runs the public op (``prefix_attention`` / ``prefix_attention_varlen``, forward and backward) on CPU tensors
with the real (non-interpreted) Triton kernels, captures every kernel launch (its bound arguments, grid and,
for autotuned kernels, the configs left after pruning), then compiles each one through Triton's own launch
path (``JITFunction.run(..., warmup=True)``: the binder computes the specialization a GPU launch gets,
pointer alignment and stride divisibility by 16 included) for a GPU target chosen here (sm_90, sm_80) and
reads the compiled artifacts:

- warps, stages, shared memory: the kernel's metadata;
- registers, stack, spill bytes: ptxas' own ``-v`` log of that compile;
- CTAs/SM: the occupancy those give (registers, shared memory, threads) on the target;
- wgmma / mma.sync, cp.async, atomics and the fences around them: the SASS (``cuobjdump -sass``).

Usage (from the repository root; compiles in a fresh Triton cache unless --cache-dir):
    python scripts/kernel_report.py [--arch 90 80] [--dtype bf16 fp16] [--scenario NAME ...]
        [--configs all|first] [--json FILE] [--markdown FILE]
The test ``tests/test_triton_compile.py`` runs it with ``--json`` and checks the SPEC §4 targets.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # the real compiler (before triton is imported)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import ptv2_kernels  # noqa: E402
from ptv2_kernels.ops import prefix_attention as public_op  # noqa: E402

# Per-SM limits of the targets (CUDA occupancy calculator, compute capability 8.0 / 9.0).
SM_LIMITS = {
    80: dict(regs=65536, smem=167936, threads=2048, ctas=32),
    90: dict(regs=65536, smem=233472, threads=2048, ctas=32),
}
RESERVED_SMEM = 1024  # per CTA, reserved by the driver on sm_80+
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class CompileOnlyDriver(DriverBase):
    """The active Triton driver while capturing and compiling: reports a GPU target of the given compute
    capability, device 0, stream 0; launching or benchmarking is refused (there is no GPU)."""

    def __init__(self, arch: int):
        self.arch = arch

    @staticmethod
    def is_active():
        return False

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch  # one JIT kernel cache per target: a kernel compiled for sm_90 is not reused for sm_80

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_benchmarker(self):
        raise RuntimeError("kernel_report compiles only: no benchmarking without a GPU")

    def get_device_interface(self):
        raise RuntimeError("kernel_report compiles only")

    def get_empty_cache_for_benchmark(self):
        raise RuntimeError("kernel_report compiles only")

    def clear_cache(self, cache):
        pass


@dataclasses.dataclass
class Launch:
    """One captured kernel launch: the JIT function, its bound positional/keyword arguments, the grid
    (a tuple or a function of the meta-parameters) and the autotuner it went through (or None)."""

    fn: JITFunction
    args: tuple
    kwargs: dict
    grid: object
    autotuner: object = None

    def configs(self, which: str):
        """``[(meta-parameters dict, label)]``: the autotuner's configs after its pruning (``which='first'``:
        only the first, the fixed config), or the launch's own arguments."""
        if self.autotuner is None:
            return [({}, "fixed")]
        self.autotuner.nargs = dict(zip(self.autotuner.arg_names, self.args))
        pruned = self.autotuner.prune_configs(self.kwargs)
        self.autotuner.nargs = None
        if which == "first":
            pruned = pruned[:1]
        return [(c.all_kwargs(), "autotune") for c in pruned]


@contextlib.contextmanager
def capturing():
    """Inside: kernel launches are recorded (``list`` of :class:`Launch`) instead of run."""
    launches = []
    jit_run, tune_run = JITFunction.run, Autotuner.run

    def capture_jit(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, grid))

    def capture_tuned(self, *args, grid, warmup=False, **kwargs):
        fn = self.fn
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        launches.append(Launch(fn, args, kwargs, grid, autotuner=self))

    JITFunction.run, Autotuner.run = capture_jit, capture_tuned
    resolve = public_op.resolve_backend
    public_op.resolve_backend = lambda backend, device: "triton"  # CPU tensors, real kernels: capture only
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = jit_run, tune_run
        public_op.resolve_backend = resolve


# ----- scenarios: the public op's real launches ------------------------------------------------------------
SHAPE = dict(B=64, H=16, N=256, P=64, D=64)  # the shape of issue 17's review (BERT-base-like, H=16)


def _qkv(batch, heads, seq, dim, dtype):
    """q, k, v as views of one ``[B, N, 3, H, D]`` projection (transformers' layout), requiring grad."""
    qkv = torch.empty(batch, seq, 3, heads, dim, dtype=dtype).normal_().requires_grad_()
    return [qkv[:, :, i].transpose(1, 2) for i in range(3)]


def _prefix(heads, num_prefix, dim, dtype, tasks=None):
    shape = (heads, num_prefix, dim) if tasks is None else (tasks, heads, num_prefix, dim)
    return [torch.empty(shape, dtype=dtype).normal_().requires_grad_() for _ in range(2)]


def _right_padded_mask(batch, seq):
    """The benchmark's masks: row b keeps n - (b % 4) * n / 8 tokens."""
    lengths = seq - (torch.arange(batch) % 4) * (seq // 8)
    return torch.arange(seq)[None, :] < lengths[:, None]


def _backward(out):
    out.backward(torch.empty_like(out).normal_())


def scenario_padded(dtype, **kw):
    B, H, N, P, D = (SHAPE[k] for k in "BHNPD")
    q, k, v = _qkv(B, H, N, D, dtype)
    _backward(ptv2_kernels.prefix_attention(q, k, v, *_prefix(H, P, D, dtype),
                                            key_padding_mask=_right_padded_mask(B, N), backend="triton", **kw))


def scenario_plain(dtype):
    B, H, N, P, D = (SHAPE[k] for k in "BHNPD")
    q, k, v = _qkv(B, H, N, D, dtype)
    _backward(ptv2_kernels.prefix_attention(q, k, v, *_prefix(H, P, D, dtype), backend="triton"))


def scenario_dropout(dtype):
    scenario_padded(dtype, dropout_p=0.1, prefix_dropout_p=0.1)


def scenario_prefix_dropout(dtype):
    scenario_padded(dtype, prefix_dropout_p=0.1)


def scenario_deterministic(dtype):
    scenario_padded(dtype, deterministic=True)


def scenario_dropout_deterministic(dtype):
    scenario_padded(dtype, dropout_p=0.1, prefix_dropout_p=0.1, deterministic=True)


def scenario_bank(dtype):
    B, H, N, P, D = (SHAPE[k] for k in "BHNPD")
    q, k, v = _qkv(B, H, N, D, dtype)
    task_ids = torch.arange(B) % 4
    _backward(ptv2_kernels.prefix_attention(q, k, v, *_prefix(H, P, D, dtype, tasks=4), task_ids=task_ids,
                                            key_padding_mask=_right_padded_mask(B, N), backend="triton"))


def scenario_varlen(dtype):
    B, H, N, P, D = (SHAPE[k] for k in "BHNPD")
    lengths = _right_padded_mask(B, N).sum(1)
    total = int(lengths.sum())
    qkv = torch.empty(total, 3, H, D, dtype=dtype).normal_().requires_grad_()
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    out = ptv2_kernels.prefix_attention_varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], *_prefix(H, P, D, dtype),
                                               cu_seqlens=cu_seqlens, max_seqlen=N, backend="triton")
    _backward(out)


def _deberta(dtype, trained_embeddings, **kw):
    """DeBERTa-v3-base-like: H=12, c2p|p2c, log buckets 256 over max position 512, span 256."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    B, N, P, D, H = SHAPE["B"], SHAPE["N"], SHAPE["P"], SHAPE["D"], 12
    x = torch.empty(1, N, 1)
    rel = build_relative_position(x, x, bucket_size=256, max_position=512)[0]
    span = 256
    emb = [torch.empty(H, 2 * span, D, dtype=dtype).normal_().requires_grad_(trained_embeddings) for _ in range(2)]
    bias = ptv2_kernels.DisentangledBias.from_relative_positions(rel, span, *emb)
    q, k, v = _qkv(B, H, N, D, dtype)
    _backward(ptv2_kernels.prefix_attention(q, k, v, *_prefix(H, P, D, dtype),
                                            key_padding_mask=_right_padded_mask(B, N), scale=(3 * D) ** -0.5,
                                            disentangled_bias=bias, backend="triton", **kw))


def scenario_deberta(dtype):
    _deberta(dtype, trained_embeddings=False)


def scenario_deberta_trained(dtype):
    _deberta(dtype, trained_embeddings=True)


def scenario_deberta_dropout(dtype):
    _deberta(dtype, trained_embeddings=False, dropout_p=0.1)


SCENARIOS = {
    "padded": scenario_padded,  # the plain path: single prefix, right-padded mask
    "unpadded": scenario_plain,
    "dropout": scenario_dropout,  # attention and prefix dropout
    "prefix-dropout": scenario_prefix_dropout,
    "deterministic": scenario_deterministic,
    "dropout-deterministic": scenario_dropout_deterministic,
    "bank": scenario_bank,
    "varlen": scenario_varlen,
    "deberta": scenario_deberta,  # frozen relative embeddings (prefix tuning)
    "deberta-trained": scenario_deberta_trained,
    "deberta-dropout": scenario_deberta_dropout,
}
PLAIN_PATH = ("padded", "unpadded", "bank", "varlen")


# ----- compiling and reading the artifacts -----------------------------------------------------------------
def occupancy(arch: int, regs: int, shared: int, warps: int) -> int:
    """Resident CTAs per SM: the least of the register (per-warp allocation in units of 256), shared-memory
    (plus the 1 KB the driver reserves per CTA), thread and CTA-count limits."""
    limits = SM_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (limits["regs"] // regs_per_warp) // warps
    by_smem = limits["smem"] // (shared + RESERVED_SMEM) if shared + RESERVED_SMEM <= limits["smem"] else 0
    by_threads = limits["threads"] // (warps * 32)
    return min(by_regs, by_smem, by_threads, limits["ctas"])


PTXAS_RESOURCES = re.compile(r"Used (\d+) registers")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_resources(log: str) -> dict:
    regs = PTXAS_RESOURCES.search(log)
    frame = PTXAS_FRAME.search(log)
    if regs is None or frame is None:
        raise RuntimeError(f"unexpected ptxas log:\n{log}")
    stores, loads = int(frame.group(2)), int(frame.group(3))
    return dict(registers=int(regs.group(1)), stack=int(frame.group(1)), spill_stores=stores, spill_loads=loads,
                spill_bytes=stores + loads)


def rerun_ptxas(kernel, arch: int) -> str:
    """ptxas -v on the kernel's PTX (when Triton's compile came from its cache and logged nothing)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp, "k.ptx")
        ptx.write_text(kernel.asm["ptx"])
        fmad = [] if kernel.metadata.enable_fp_fusion else ["--fmad=false"]
        cmd = [get_ptxas(arch).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", str(ptx), "-o", str(Path(tmp, "k.o"))]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


SASS_OPS = re.compile(r"\b(HGMMA|HMMA|MEMBAR\.[A-Z.]+|CCTL\.[A-Z.]+|ATOMG?\.[A-Z0-9.x_]+|REDG?\.[A-Z0-9.x_]+|"
                      r"LDGSTS|UTMALDG|STL|LDL)\b")


def sass_counts(cubin: bytes) -> dict:
    """Counts of the instructions the targets are about, from ``cuobjdump -sass``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    ops = SASS_OPS.findall(sass)

    def count(prefixes):
        return sum(op.startswith(prefixes) for op in ops)

    atomics = [op for op in ops if op.startswith(("ATOM", "RED"))]
    return dict(
        wgmma=count("HGMMA"), mma_sync=count("HMMA"), cp_async=count("LDGSTS"), tma=count("UTMALDG"),
        atomics=len(atomics), fences=sum(op.startswith("MEMBAR") and not op.endswith(".CTA") for op in ops),
        local_memory=count(("STL", "LDL")), atomic_kinds=sorted(set(atomics)),
    )


def compile_launch(launch: Launch, meta: dict, arch: int) -> dict:
    """Compile one launch with meta-parameters ``meta`` through ``JITFunction.run(warmup=True)`` and read
    its resources."""
    kwargs = {**launch.kwargs, **meta}
    grid = launch.grid(kwargs) if callable(launch.grid) else launch.grid
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    start = time.time()
    with contextlib.redirect_stdout(log):
        kernel = launch.fn.run(*launch.args, grid=launch.grid, warmup=True, **kwargs)
    seconds = time.time() - start
    text = log.getvalue()
    if "Used" not in text:
        text = rerun_ptxas(kernel, arch)
    res = ptxas_resources(text)
    md = kernel.metadata
    sass = sass_counts(kernel.asm["cubin"])
    constexprs = {k: v for k, v in kwargs.items() if k.isupper() and isinstance(v, (bool, int))}
    return dict(
        kernel=launch.fn.__name__, grid=list(grid), warps=md.num_warps, stages=md.num_stages, shared=md.shared,
        **res, ctas_per_sm=occupancy(arch, res["registers"], md.shared, md.num_warps), **sass,
        tiles={k: constexprs[k] for k in ("BLOCK_M", "BLOCK_N") if k in constexprs}, compile_s=round(seconds, 1),
    )


def report(archs, dtypes, scenarios, which_configs, progress=None) -> list:
    rows = []
    seen = {}
    for arch in archs:
        driver.set_active(CompileOnlyDriver(arch))
        for dtype in dtypes:
            for name in scenarios:
                with capturing() as launches:
                    SCENARIOS[name](DTYPES[dtype])
                for launch in launches:
                    for meta, label in launch.configs(which_configs):
                        key = (arch, launch.fn.__name__, repr(sorted(launch.kwargs.items(), key=str)),
                               repr(sorted(meta.items())), dtype,
                               tuple(getattr(a, "dtype", None) for a in launch.args))
                        row = seen.get(key)
                        if row is None:
                            row = seen[key] = compile_launch(launch, meta, arch)
                        rows.append(dict(row, arch=arch, dtype=dtype, scenario=name, config=label))
                        if progress:
                            progress(rows[-1])
    driver.reset_active() if torch.cuda.is_available() else None
    return rows


COLUMNS = [("scenario", "scenario"), ("kernel", "kernel"), ("tiles", "BLOCK_M×N"), ("warps", "warps"),
           ("stages", "stages"), ("registers", "regs"), ("spill_bytes", "spill st+ld B"), ("stack", "stack B"),
           ("shared", "smem B"), ("ctas_per_sm", "CTAs/SM"), ("mma", "mma"), ("atomics", "atomics"),
           ("fences", "fences"), ("grid", "grid")]


def _cell(row, key):
    if key == "tiles":
        return "×".join(str(v) for v in row["tiles"].values()) or "-"
    if key == "mma":
        kinds = [f"{name}×{row[field]}" for name, field in (("wgmma", "wgmma"), ("mma.sync", "mma_sync"))
                 if row[field]]
        return " ".join(kinds) or "none"
    if key == "kernel":
        return row["kernel"].replace("prefix_attention_", "").replace("_kernel", "")
    if key == "grid":
        return "×".join(map(str, row["grid"]))
    return str(row[key])


def summary_markdown(rows) -> str:
    """One line per kernel launch (arch, dtype, scenario, kernel): its first config (the autotuner's first
    candidate, which the deterministic path and the interpreter-free fixed launches run), and over all the
    configs compiled for it the most spilled bytes and the fewest CTAs/SM."""
    groups = {}
    for r in rows:
        groups.setdefault((r["arch"], r["dtype"], r["scenario"], r["kernel"]), []).append(r)
    head = ["sm", "dtype", "scenario", "kernel", "first config", "regs", "spill B", "smem B", "CTAs/SM", "mma",
            "atomics", "fences", "configs", "worst spill B", "min CTAs/SM"]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (arch, dtype, scenario, _), group in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1:])):
        r = group[0]
        config = f"{_cell(r, 'tiles')}/{r['warps']}w/{r['stages']}s"
        out.append("| " + " | ".join(map(str, [
            arch, dtype, scenario, _cell(r, "kernel"), config, r["registers"], r["spill_bytes"], r["shared"],
            r["ctas_per_sm"], _cell(r, "mma"), r["atomics"], r["fences"], len(group),
            max(g["spill_bytes"] for g in group), min(g["ctas_per_sm"] for g in group)])) + " |")
    return "\n".join(out) + "\n"


def markdown(rows) -> str:
    out = []
    for arch in sorted({r["arch"] for r in rows}, reverse=True):
        for dtype in sorted({r["dtype"] for r in rows}):
            sel = [r for r in rows if r["arch"] == arch and r["dtype"] == dtype]
            if not sel:
                continue
            out.append(f"\n### sm_{arch}, {dtype}\n")
            out.append("| " + " | ".join(h for _, h in COLUMNS) + " |")
            out.append("|" + " --- |" * len(COLUMNS))
            for r in sel:
                out.append("| " + " | ".join(_cell(r, k) for k, _ in COLUMNS) + " |")
    return "\n".join(out) + "\n"


# elementwise helpers: no MMA to expect (the last is the backward preprocessing of the kernels before issue 17)
MATMUL_FREE = ("prefix_dropout_mask_kernel", "prefix_grad_reduce_kernel", "prefix_attention_bwd_preprocess_kernel")


def targets(rows) -> list:
    """SPEC §4's compiler-evidence targets (sm_90, D=64) and issue 17's DeBERTa ones over the rows:
    ``[(target, met, offending rows)]``."""
    sm90 = [r for r in rows if r["arch"] == 90]
    deberta = [r for r in rows if r["scenario"].startswith("deberta")]
    checks = [
        ("sm_90: 0 B spills in every kernel, with or without dropout",
         [r for r in sm90 if r["spill_bytes"] and not r["scenario"].startswith("deberta")]),
        ("sm_90: no fenced atomics in the non-deterministic backward",
         [r for r in sm90 if r["fences"] and "deterministic" not in r["scenario"]]),
        ("sm_90: wgmma in every attention kernel", [r for r in sm90 if not r["wgmma"] and r["kernel"] not in MATMUL_FREE]),
        ("sm_90: >= 2 CTAs/SM for every kernel of the plain path",
         [r for r in sm90 if r["scenario"] in PLAIN_PATH and r["ctas_per_sm"] < 2]),
        ("DeBERTa: 0 B spills on sm_90", [r for r in deberta if r["arch"] == 90 and r["spill_bytes"]]),
        ("DeBERTa: < 1 KB spills on sm_80", [r for r in deberta if r["arch"] == 80 and r["spill_bytes"] >= 1024]),
    ]
    return [(name, not bad, bad) for name, bad in checks]


def targets_markdown(rows) -> str:
    lines = ["| target | met | where not |", "| --- | --- | --- |"]
    for name, met, bad in targets(rows):
        dtypes = {}
        for r in bad:  # one entry per kernel and config, its dtypes together
            key = (f"sm_{r['arch']} {r['scenario']} {_cell(r, 'kernel')} {_cell(r, 'tiles')}/{r['warps']}w/"
                   f"{r['stages']}s: {r['spill_bytes']} B spills, {r['ctas_per_sm']} CTAs/SM, {r['fences']} fences")
            dtypes.setdefault(key, set()).add(r["dtype"])
        where = "; ".join(f"{key} ({'/'.join(sorted(d))})" for key, d in sorted(dtypes.items()))
        lines.append(f"| {name} | {'yes' if met else 'no'} | {where or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SM_LIMITS))
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp16"], choices=sorted(DTYPES))
    parser.add_argument("--scenario", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--configs", default="all", choices=["all", "first"],
                        help="autotuned kernels: every config left after pruning, or only the first")
    parser.add_argument("--cache-dir", help="Triton cache (default: a fresh temporary one)")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--markdown", help="write the tables as Markdown here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        knobs.cache.dir = args.cache_dir or tmp

        def progress(row):
            if not args.quiet:
                print(f"sm_{row['arch']} {row['dtype']:4} {row['scenario']:16} " +
                      " ".join(f"{h}={_cell(row, k)}" for k, h in COLUMNS[1:]), flush=True)

        rows = report(args.arch, args.dtype, args.scenario, args.configs, progress)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.markdown:
        Path(args.markdown).write_text("## Targets\n\n" + targets_markdown(rows) + "\n## Per launch\n\n"
                                       + summary_markdown(rows) + "\n## Every compiled config\n" + markdown(rows))
    return rows


if __name__ == "__main__":
    main()
