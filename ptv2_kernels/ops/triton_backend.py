"""Host side of the Triton backend: launches the kernels of ``kernels/prefix_attention_triton.py``
(:func:`triton_forward`, :func:`triton_backward`, which ``library.py`` calls through the table of
``dispatch.py``). Inputs
arrive validated (``prefix_attention.py``).

q, k, v are either padded ``[B, H, N, D]`` or, with ``cu_seqlens``, packed ``[total_tokens, H, D]``
(then ``options.max_seqlen`` is N, the longest row). DeBERTa's relative terms arrive as ``rel``:
``(pos_key, pos_query, index)`` of a :class:`~ptv2_kernels.ops.disentangled.DisentangledBias` or None.

Tiles: on a GPU the attention kernels are ``triton.autotune``-d over BLOCK_M 64/128, BLOCK_N 32/64/128,
4/8 warps, 2-4 stages, keyed on D, N, P, the dtypes and the feature flags (dropout included); the space is
pruned per kernel (:func:`_prune`: no replicated warps, register/shared-memory budgets for 2 CTAs/SM, no
tile larger than the problem) and ranked by a work model (padding waste, wave quantisation, per-tile
overhead), and the top 4 are benchmarked. Deterministic calls skip the benchmark and take the model's first
config (so a rerun takes the same tiles and reductions); the interpreter takes ``INTERPRETER_TILES``. The
host functions here launch plainly (no graph breaks of their own), so a ``triton_op`` can wrap them.
"""

import functools
from typing import Optional

import torch
import triton

from ..kernels import prefix_attention_triton as kernels
from .common import Dropout, Options

LOG2_E = 1.4426950408889634
INTERPRETER_TILES = {"BLOCK_M": 32, "BLOCK_N": 32}  # CI's small shapes still span several tiles; tests may change it
INTERPRETER_SMS = 2  # SMs assumed under the interpreter (the prefix-gradient chunking; several chunks in CI)
COMPILE_ONLY_SMS = 132  # SMs assumed when compiling for a GPU without one (scripts/kernel_report.py): an H100
SHARED_PER_SM = {80: 167936, 86: 102400, 87: 167936, 89: 102400, 90: 233472}  # bytes, CUDA occupancy tables
TOP_K = 4  # configs benchmarked per autotuning key
FALLBACK_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)  # when no config passes
AUTOTUNE_KEY = ["D", "N", "P", "HAS_MASK", "HAS_TASKS", "HAS_BIAS", "HAS_C2P", "HAS_P2C", "VARLEN", "ATTN_DROPOUT",
                "PREFIX_DROPOUT"]


@torch.compiler.assume_constant_result  # a constant for traced code
def interpreting() -> bool:
    """Whether the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernels.prefix_attention_fwd_kernel, InterpretedFunction)


# ----- tile configurations -------------------------------------------------------------------------------------
def _config_space():
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]


def _target_arch() -> int:
    target = triton.runtime.driver.active.get_current_target()
    return target.arch if isinstance(target.arch, int) else 90


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_SMS if interpreting() else COMPILE_ONLY_SMS


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Registers per thread ~ c0 + c_acc * (accumulator elements per thread) + c_score * (score-tile elements per thread),
# plus c_drop * score elements with attention dropout: least squares over the sm_90 bf16 D=64 compiles of every
# config of the space (scripts/kernel_report.py, the "padded" and "dropout" scenarios of issue 17).
REGISTER_MODEL = {"fwd": (22, 1.0, 3.0), "dq": (0, 1.6, 2.9), "dkdv": (35, 1.8, 2.6), "dprefix": (35, 1.8, 2.6)}
REGISTER_MODEL_DROPOUT = {"fwd": 2.5, "dq": 3.0, "dkdv": 0.3, "dprefix": 0.7}
# predicted registers above which a config spills (the model is within ~25 of ptxas on sm_90; sm_80's mma.sync keeps
# more in registers)
REGISTER_LIMIT = {80: 190, 90: 280}
# 8 warps keep 2 CTAs per SM only at <= 128 registers; on sm_80 ptxas lands ~1.6x above the model there
EIGHT_WARP_LIMIT = {80: 80, 90: 128}


def _estimates(kind: str, config, args) -> tuple:
    """(predicted registers per thread, shared bytes, programs, score elements per program with the padding of
    the tiles) of a config of kernel ``kind``."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    stages, threads = config.num_stages, 32 * config.num_warps
    bd, seq, prefix, rows = args["BLOCK_D"], args["N"], args["P"], args["B"] * args["H"]
    elem = 4 if args["DOT_FP32"] else 2
    window = (bm + bn) * bd * elem * (int(args.get("HAS_C2P", False)) + int(args.get("HAS_P2C", False)))
    c0, c_acc, c_score = REGISTER_MODEL[kind]
    c_score += REGISTER_MODEL_DROPOUT[kind] if args.get("ATTN_DROPOUT", False) else 0.0
    if kind in ("dkdv", "dprefix"):  # programs: key tiles (dk, dv accumulators); loop: query tiles
        regs = c0 + c_acc * 2 * bn * bd / threads + c_score * bm * bn / threads
        shared = 2 * bn * bd * elem + stages * (2 * bm * bd * elem + 8 * bm + window)
        if kind == "dkdv":
            programs, work = rows * triton.cdiv(seq, bn), bn * triton.cdiv(seq, bm) * bm
        else:
            runs = args["NUM_RUNS"]
            programs = triton.cdiv(prefix, bn) * args["H"] * runs
            work = triton.cdiv(args["B"], runs) * bn * triton.cdiv(seq, bm) * bm
    else:  # programs: query tiles (output / dq accumulator); loop: key tiles (the prefix, then the sequence)
        regs = c0 + c_acc * bm * bd / threads + c_score * bm * bn / threads
        shared = (3 if kind == "dq" else 1) * bm * bd * elem + stages * (2 * bn * bd * elem + window)
        programs = rows * triton.cdiv(seq, bm)
        split = args["PREFIX_DROPOUT"] or window
        cols = (triton.cdiv(prefix, bn) + triton.cdiv(seq, bn)) * bn if split else triton.cdiv(prefix + seq, bn) * bn
        work = bm * cols
    return regs, shared, programs, work


def _prune(configs, named_args, kind: str, **kwargs):
    """The configs worth benchmarking for kernel ``kind`` ("fwd", "dq", "dkdv", "dprefix") at these arguments,
    best first by the work model, at most TOP_K:
    - every MMA's M tile is >= 64 rows per warpgroup, so that no warp repeats another's product (wgmma is 64
      rows per 4 warps): 4 warps need 64-row tiles (queries for fwd/dq; keys, and for their products queries,
      for dk/dv), 8 warps 128;
    - predicted registers (``REGISTER_MODEL``) do not spill and, with 8 warps, leave 2 CTAs per SM (<= 128);
      shared memory leaves room for 2 CTAs per SM on the target (1 with DeBERTa's windows; scripts/kernel_report.py
      checks the compiled result);
    - no tile beyond the problem (64 rows / 32 columns at least); DeBERTa's windows take 64 x 64 tiles (larger
      ones spill kilobytes more). They also run on 8 warps although warps 4-7 then repeat the 64-row products of warps 0-3: its
      window gathers spill 2-3x less there than on 4 warps (scripts/kernel_report.py), which one is faster
      needs a GPU to tell, so both are benchmarked (8 warps first);
    - model: score elements computed (padding waste included) plus a per-tile-step overhead, divided by the
      fraction of the last wave of CTAs that is busy, slightly favouring deeper pipelines."""
    args = {**named_args, **kwargs}
    arch = _target_arch()
    seq, prefix = args["N"], args["P"]
    rel = args.get("HAS_C2P", False) or args.get("HAS_P2C", False)
    # 2 CTAs per SM; DeBERTa's window tiles fill an SM with one CTA whatever the config: 1
    budget = SHARED_PER_SM.get(arch, 102400) // (1 if rel else 2) - 1024
    sms = _sm_count(args["Q"].device) if "Q" in args else COMPILE_ONLY_SMS
    scored = []
    for config in configs:
        bm, bn, warps = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps
        mma_rows = min(bm, bn) if kind in ("dkdv", "dprefix") else bm
        replicated_ok = rel and bm == bn == 64 and kind != "dprefix"  # see below
        if (mma_rows < 64 * warps // 4 and not replicated_ok) or (rel and not bm == bn == 64):
            continue
        if bm > max(64, triton.next_power_of_2(seq)) or bn > max(64 if mma_rows == bn else 32,
                                                                   triton.next_power_of_2(seq + prefix)):
            continue
        regs, shared, programs, work = _estimates(kind, config, args)
        limit = REGISTER_LIMIT.get(arch, 190) if warps == 4 or rel else EIGHT_WARP_LIMIT.get(arch, 80)
        if regs > limit or shared > budget:
            continue
        waves = triton.cdiv(programs, sms * 2)
        busy = programs / (waves * sms * 2)
        steps = work / (bm * bn)
        cost = (programs * (work + 4096 * steps)) / busy / config.num_stages ** 0.25
        scored.append((cost, -bm * bn, -warps, config))
    scored.sort(key=lambda entry: entry[:3])
    return [entry[-1] for entry in scored[:TOP_K]] or [FALLBACK_CONFIG]


def _autotuned(kernel, kind: str, reset=()):
    key = [name for name in AUTOTUNE_KEY if name in kernel.arg_names]
    return triton.autotune(configs=_config_space(), key=key, reset_to_zero=list(reset) or None,
                           prune_configs_by={"early_config_prune": functools.partial(_prune, kind=kind)})(kernel)


FWD = _autotuned(kernels.prefix_attention_fwd_kernel, "fwd")
DQ = _autotuned(kernels.prefix_attention_bwd_dq_kernel, "dq", reset=["DPosK"])
DKDV = _autotuned(kernels.prefix_attention_bwd_dkdv_kernel, "dkdv", reset=["DPosQ"])
DPREFIX = _autotuned(kernels.prefix_attention_bwd_dprefix_kernel, "dprefix", reset=["DPrefix"])
KINDS = {FWD: "fwd", DQ: "dq", DKDV: "dkdv", DPREFIX: "dprefix"}


def _launch(tuned, grid, fixed: bool, **kwargs):
    """Launch an autotuned kernel with those of ``kwargs`` that it takes; ``fixed`` (deterministic calls) or
    under the interpreter: with one config, without benchmarking. ``grid``: a function of the meta-parameters."""
    kwargs = {name: value for name, value in kwargs.items() if name in tuned.arg_names}
    if interpreting():
        tuned.fn[grid](**kwargs, **INTERPRETER_TILES)
    elif fixed:
        config = _prune(tuned.configs, {}, KINDS[tuned], **kwargs)[0]
        tuned.fn[grid](**kwargs, **config.all_kwargs())
    else:
        tuned[grid](**kwargs)


# ----- arguments -----------------------------------------------------------------------------------------------
def _dropout_args(dropout: Dropout, num_prefix: int) -> dict:
    """Kernel arguments of the RNG contract: keep iff ``(philox >> 8) >= round(p * 2**24)``. The sequence
    tiles of the joint-column layout start at ``P - SEQ_SHIFT`` so that their dropout counters are 4-aligned."""
    return dict(
        seed=dropout.seed,
        threshold=round(dropout.p * (1 << 24)),
        drop_scale=1.0 / (1.0 - dropout.p),
        prefix_scale=1.0 / (1.0 - dropout.prefix_p),
        SEQ_SHIFT=num_prefix % 4 if dropout.p > 0 else 0,
        ATTN_DROPOUT=dropout.p > 0,
        PREFIX_DROPOUT=dropout.prefix_p > 0,
    )


def _strides(**tensors: torch.Tensor) -> dict:
    """Kernel arguments ``stride_<name>b/h/n`` of padded ``[B, H, N, D]`` or packed ``[total, H, D]``
    (batch stride 0, token stride as sequence stride) tensors passed by name."""
    def bhn(t):
        return t.stride()[:3] if t.dim() == 4 else (0, t.stride(1), t.stride(0))

    return {f"stride_{name}{axis}": s for name, t in tensors.items() for axis, s in zip("bhn", bhn(t))}


def _empty_like_qkv(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like q: padded ``[B, H, N, D]`` stored as ``[B, N, H, D]`` (what
    transformers reshapes back to hidden states without a copy), or contiguous packed ``[total, H, D]``."""
    if q.dim() == 3:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    batch, heads, seq, dim = q.shape
    return q.new_empty(batch, seq, heads, dim).transpose(1, 2)


def _sizes(q, cu_seqlens, options: Options):
    """(B, H, N, D) of a padded or packed call."""
    if cu_seqlens is None:
        return tuple(q.shape)
    return cu_seqlens.shape[0] - 1, q.shape[1], options.max_seqlen, q.shape[2]


def row_lengths(mask: torch.Tensor) -> torch.Tensor:
    """int32 ``[B]``: 1 + the position of the last real token of each row of a ``[B, N]`` bool mask (0 for a
    fully padded row): the kernels stop there. Device ops only (no synchronisation)."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device, dtype=torch.int32)
    return torch.where(mask, positions, 0).amax(1).to(torch.int32)


def _common_args(q, prefix_k, mask, seqlens, task_ids, bias, rel, cu_seqlens, options: Options):
    dummy = q.new_empty(0, dtype=torch.int64)
    batch, heads, seq, dim = _sizes(q, cu_seqlens, options)
    bias_strides = bias.stride() if bias is not None else (0, 0, 0, 0)
    pos_key, pos_query, rel_index = rel if rel is not None else (None, None, None)
    block_d = max(16, triton.next_power_of_2(dim))
    interp = interpreting()
    return dict(
        PosK=dummy if pos_key is None else pos_key,
        PosQ=dummy if pos_query is None else pos_query,
        RelIndex=dummy if rel_index is None else rel_index,
        R=0 if rel is None else (pos_key if pos_key is not None else pos_query).shape[1],
        HAS_C2P=pos_key is not None, HAS_P2C=pos_query is not None,
        TaskIds=dummy if task_ids is None else task_ids,
        SeqLens=dummy if seqlens is None else seqlens,
        Mask=dummy if mask is None else mask.view(torch.uint8),
        Bias=dummy if bias is None else bias,
        CuSeqlens=dummy if cu_seqlens is None else cu_seqlens,
        **dict(zip(("stride_bb", "stride_bh", "stride_bm", "stride_bn"), bias_strides)),
        B=batch, H=heads, N=seq, P=prefix_k.shape[2], D=dim, T=prefix_k.shape[0],
        TOTAL=q.shape[0] if cu_seqlens is not None else 0,
        HAS_MASK=mask is not None, HAS_TASKS=task_ids is not None, HAS_BIAS=bias is not None,
        VARLEN=cu_seqlens is not None,
        DOT_FP32=q.dtype == torch.float32 or (interp and q.dtype == torch.bfloat16),
        BLOCK_D=block_d, WORDS=triton.cdiv(block_d, 32),
    )


def _prefix_keep_bits(common: dict, dropout: Dropout, device) -> torch.Tensor:
    """The transient prefix-dropout bitmask ``[2, B*H, P, WORDS]`` (one Philox draw per element per pass), or
    an empty placeholder without prefix dropout."""
    if dropout.prefix_p == 0:
        return torch.empty(0, device=device, dtype=torch.int32)
    rows, num_prefix, words = common["B"] * common["H"], common["P"], common["WORDS"]
    keep = torch.empty(2, rows, num_prefix, words, device=device, dtype=torch.int32)
    block_p = 32
    if num_prefix:
        kernels.prefix_dropout_mask_kernel[(2 * rows * triton.cdiv(num_prefix, block_p),)](
            keep, dropout.seed, round(dropout.prefix_p * (1 << 24)), rows, num_prefix, WORDS=words, BLOCK_P=block_p)
    return keep


def triton_forward(q, k, v, prefix_k, prefix_v, mask, task_ids, bias, rel, cu_seqlens, options: Options):
    """``(out, lse)``: out like q (padded ``[B, H, N, D]`` stored as ``[B, N, H, D]``, or packed ``[total, H,
    D]``), lse ``[B, H, N]`` float32 (+inf on padded query rows). Inputs: q, k, v ``[B, H, N, D]`` or packed
    ``[total, H, D]`` (unit last stride); prefix_k, prefix_v contiguous ``[T, H, P, D]``; bool mask ``[B, N]``
    (contiguous) or None; task_ids ``[B]`` or None; attention bias ``[B, H, N, N]`` (any strides) or None;
    ``rel`` = DeBERTa's (pos_key, pos_query, index) (contiguous ``[H, R, D]`` or None, int32 ``[2, 2N - 1]``)
    or None; cu_seqlens ``[B + 1]`` (packed rows) or None."""
    batch, heads, seq, _ = _sizes(q, cu_seqlens, options)
    seqlens = row_lengths(mask) if mask is not None else None
    out = _empty_like_qkv(q)
    lse = torch.empty(batch, heads, seq, device=q.device, dtype=torch.float32)
    common = _common_args(q, prefix_k, mask, seqlens, task_ids, bias, rel, cu_seqlens, options)
    _launch(FWD, lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]) * batch * heads,), options.deterministic,
            Q=q, K=k, V=v, PK=prefix_k, PV=prefix_v, PrefixKeep=_prefix_keep_bits(common, options.dropout, q.device),
            Out=out, Lse=lse, **_strides(q=q, k=k, v=v, o=out), scale_log2=options.scale * LOG2_E, **common,
            **_dropout_args(options.dropout, prefix_k.shape[2]))
    return out, lse


def _distance_grad(rel_emb: Optional[torch.Tensor], heads: int, seq: int, dim: int) -> Optional[torch.Tensor]:
    """Float32 ``[H, 2N - 1, D]`` per-distance gradient accumulator of a relative embedding (None if absent)."""
    if rel_emb is None:
        return None
    return torch.zeros(heads, 2 * seq - 1, dim, device=rel_emb.device, dtype=torch.float32)


def _fold_distances(grad: Optional[torch.Tensor], rel_emb: Optional[torch.Tensor], index: torch.Tensor,
                    scale: float) -> Optional[torch.Tensor]:
    """Per-distance gradient ``[H, 2N - 1, D]`` summed into the embedding rows each distance reads, times
    the score scale, in the embedding's dtype."""
    if grad is None:
        return None
    rows = torch.zeros(rel_emb.shape, device=grad.device, dtype=torch.float32)
    return rows.index_add_(1, index.long().clamp(0, rel_emb.shape[1] - 1), grad).mul_(scale).to(rel_emb.dtype)


def prefix_chunk(batch: int, heads: int, num_prefix: int, device: torch.device) -> int:
    """Batch rows per run of the prefix-gradient kernel: as many rows as still leave 2 programs per SM
    (``cdiv(P, 64) * H * cdiv(B, chunk)`` programs), so that the reduction over the batch costs one atomic (or
    one partial) per chunk instead of one per row without leaving SMs idle."""
    programs = max(1, triton.cdiv(num_prefix, 64)) * heads
    return triton.cdiv(batch, max(1, min(batch, triton.cdiv(2 * _sm_count(device), programs))))


def prefix_runs(task_ids: Optional[torch.Tensor], batch: int, num_tasks: int, chunk: int, rows: range,
                per_row: bool, device) -> tuple:
    """The runs of the prefix-gradient reduction over positions ``rows`` of the visiting order (device ops, no
    synchronisation): ``(order, run_range, slot_range, num_runs)``. The order is the batch sorted by task (stable)
    with a bank, else None (the batch order). A run (``run_range[r] = [first, end)`` positions) shares one task:
    chunks of ``chunk`` positions split where the task changes, or single rows (``per_row``: prefix dropout).
    Run ``r`` is also deterministic partial slot ``r``; with a bank a task's runs have consecutive slots,
    ``slot_range[t] = [first, end)`` (None without a bank: one task, every slot). ``num_runs`` bounds the runs
    from the sizes alone (runs past the last are empty)."""
    order = sorted_tasks = None
    if task_ids is not None:
        sorted_tasks, order = torch.sort(task_ids.clamp(0, num_tasks - 1), stable=True)
        order = order.to(torch.int32)
    lo, hi = rows.start, rows.stop
    if per_row:
        starts = torch.arange(lo, hi, device=device, dtype=torch.int32)
        run_range = torch.stack([starts, starts + 1], 1)
        num_runs = hi - lo
        slot_of = None
    else:
        positions = torch.arange(batch, device=device)
        slot_of = positions // chunk
        num_runs = triton.cdiv(batch, chunk)
        if task_ids is not None:
            changes = torch.zeros(batch, device=device, dtype=torch.int64)
            changes[1:] = (sorted_tasks[1:] != sorted_tasks[:-1]).cumsum(0)
            slot_of = slot_of + changes
            num_runs += min(num_tasks, batch) - 1
        runs = torch.arange(num_runs, device=device)
        run_range = torch.stack([torch.searchsorted(slot_of, runs), torch.searchsorted(slot_of, runs, right=True)], 1)
    slot_range = None
    if task_ids is not None:
        tasks = torch.arange(num_tasks, device=device, dtype=sorted_tasks.dtype)
        first = torch.searchsorted(sorted_tasks, tasks)
        end = torch.searchsorted(sorted_tasks, tasks, right=True)
        if per_row:
            slot_range = torch.stack([first.clamp(lo, hi) - lo, end.clamp(lo, hi) - lo], 1)
        else:
            present = end > first
            slot_range = torch.stack([torch.where(present, slot_of[first.clamp(max=batch - 1)], 0),
                                      torch.where(present, slot_of[(end - 1).clamp(min=0)] + 1, 0)], 1)
        slot_range = slot_range.to(torch.int32)
    return order, run_range.to(torch.int32), slot_range, num_runs


def _prefix_grad(q, prefix_k, prefix_v, d_out, lse, delta, keep, task_ids, common: dict, dropout: dict, scales: dict,
                 options: Options) -> torch.Tensor:
    """float32 ``[2, T, H, P, D]`` gradient of the prefix keys and values, reduced over the batch: relaxed
    atomics per run, or (deterministic) per-run partials summed in a fixed order. Deterministic runs under prefix
    dropout (one row each) go in groups of as many rows as the chunked mode has runs, so that the partials never
    exceed that (no per-row ``[B, ...]`` buffer)."""
    batch, heads, num_prefix, dim, num_tasks = (common[name] for name in ("B", "H", "P", "D", "T"))
    grad_shape = (2, num_tasks, heads, num_prefix, dim)
    chunk = prefix_chunk(batch, heads, num_prefix, q.device)
    per_row = dropout["PREFIX_DROPOUT"]
    deterministic = options.deterministic
    dprefix = (torch.empty if deterministic else torch.zeros)(grad_shape, device=q.device, dtype=torch.float32)
    dummy = q.new_empty(0, dtype=torch.int32)
    group = triton.cdiv(batch, chunk) if deterministic and per_row else batch
    for lo in range(0, batch if num_prefix else 0, group):
        order, run_range, slot_range, num_runs = prefix_runs(task_ids, batch, num_tasks, chunk,
                                                             range(lo, min(lo + group, batch)), per_row, q.device)
        target = dprefix
        if deterministic:  # the partials (each program writes every element of its slot, empty runs zeros)
            target = torch.empty((num_runs, 2) + grad_shape[2:], device=q.device, dtype=torch.float32)
        _launch(DPREFIX, lambda meta: (triton.cdiv(num_prefix, meta["BLOCK_N"]) * heads * num_runs,), deterministic,
                Q=q, PK=prefix_k, PV=prefix_v, PrefixKeep=keep, DOut=d_out, Lse=lse, Delta=delta, DPrefix=target,
                RowOrder=dummy if order is None else order, RunRange=run_range, **_strides(q=q, g=d_out),
                NUM_RUNS=num_runs, DETERMINISTIC=deterministic, **scales, **common, **dropout)
        if deterministic:
            per_task, block = heads * num_prefix * dim, 1024
            kernels.prefix_grad_reduce_kernel[(triton.cdiv(per_task, block) * 2 * num_tasks,)](
                target, dummy if slot_range is None else slot_range, dprefix, num_tasks, per_task, num_runs,
                HAS_TASKS=task_ids is not None, ACCUMULATE=lo > 0, BLOCK=block)
    if not num_prefix and deterministic:
        dprefix.zero_()
    return dprefix


def triton_backward(d_out, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, rel, cu_seqlens, out, lse,
                    options: Options, bias_grad: bool, emb_grads=(False, False)):
    """(dq, dk, dv, float32 dprefix_k, float32 dprefix_v, dbias or None, dpos_key or None, dpos_query or None)
    of :func:`triton_forward`'s call; ``emb_grads``: whether pos_key / pos_query need their gradients."""
    if d_out.stride(-1) != 1:
        d_out = d_out.contiguous()
    seqlens = row_lengths(mask) if mask is not None else None
    batch, heads, seq, dim = _sizes(q, cu_seqlens, options)
    num_tasks, _, num_prefix, _ = prefix_k.shape
    common = _common_args(q, prefix_k, mask, seqlens, task_ids, bias, rel, cu_seqlens, options)
    pos_key, pos_query, rel_index = rel if rel is not None else (None, None, None)
    dist_key, dist_query = (_distance_grad(t if wanted else None, heads, seq, dim)
                            for t, wanted in zip((pos_key, pos_query), emb_grads))
    dropout = _dropout_args(options.dropout, num_prefix)
    scales = dict(scale=options.scale, scale_log2=options.scale * LOG2_E)
    keep = _prefix_keep_bits(common, options.dropout, q.device)
    fixed = options.deterministic

    delta = torch.empty_like(lse)
    dummy = q.new_empty(0, dtype=torch.float32)
    dq = _empty_like_qkv(q)
    _launch(DQ, lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]) * batch * heads,), fixed,
            Q=q, K=k, V=v, PK=prefix_k, PV=prefix_v, PrefixKeep=keep, Out=out, DOut=d_out, Lse=lse, Delta=delta,
            DQ=dq, DPosK=dummy if dist_key is None else dist_key, C2P_GRAD=dist_key is not None,
            **_strides(q=q, k=k, v=v, o=out, g=d_out, dq=dq), **scales, **common, **dropout)

    dprefix = _prefix_grad(q, prefix_k, prefix_v, d_out, lse, delta, keep, task_ids, common, dropout, scales, options)
    dk, dv = _empty_like_qkv(k), _empty_like_qkv(v)
    dbias = torch.zeros(batch, heads, seq, seq, device=q.device, dtype=bias.dtype) if bias_grad else None
    shift = dropout["SEQ_SHIFT"]
    _launch(DKDV, lambda meta: (triton.cdiv(seq + shift, meta["BLOCK_N"]) * batch * heads,), fixed,
            Q=q, K=k, V=v, DOut=d_out, Lse=lse, Delta=delta, DK=dk, DV=dv, DBias=dummy if dbias is None else dbias,
            BIAS_GRAD=bias_grad, DPosQ=dummy if dist_query is None else dist_query, P2C_GRAD=dist_query is not None,
            **_strides(q=q, k=k, v=v, g=d_out, dk=dk, dv=dv), **scales, **common, **dropout)
    index = (None, None) if rel is None else rel_index
    return (dq, dk, dv, dprefix[0], dprefix[1], dbias, _fold_distances(dist_key, pos_key, index[0], options.scale),
            _fold_distances(dist_query, pos_query, index[1], options.scale))

