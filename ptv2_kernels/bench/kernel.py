"""``kernel`` mode: one attention layer, forward (``kernel-fwd``) and forward+backward
(``kernel-fwdbwd``, prefix gradients reduced over the batch), per provider.

Inputs are seeded random ``[B, H, N, D]`` tensors with a key padding mask (row b keeps
``N - (b % 4)·N/8`` tokens) and a compact ``[H, P, D]`` prefix; no dropout, so every provider computes
the same function and its outputs (and gradients) are checked against ``concat-sdpa`` on the very inputs
it was timed on. Padded query rows are excluded from the check and get a zero output gradient (their
outputs are never read, SPEC §1).

DeBERTa configs add the disentangled terms: random projected relative embeddings ``[H, 2·span, D]`` for
c2p and p2c over the config's relative positions (log buckets for v2/v3). Fused providers take them as a
:class:`~ptv2_kernels.DisentangledBias` (the Triton kernels gather them per tile); the concatenation
providers materialise c2p + p2c ``[B, H, N, N]`` as transformers does, inside the timed call.
"""

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import DisentangledBias, concat_prefix_attention, prefix_attention
from ..ops.prefix_attention import resolve_backend
from . import measure
from .configs import relative_attention

FUSED_BACKENDS = {"fused-triton": "triton", "fused-cuda": "cuda", "fused-torch": "torch"}
CONCAT_IMPLS = {"concat-sdpa": "sdpa", "concat-eager": "eager"}
FLASH = "flash-attn-noconcat"
PROVIDERS = (*FUSED_BACKENDS, *CONCAT_IMPLS, FLASH)
REFERENCE = "concat-sdpa"
BENCHES = ("kernel-fwd", "kernel-fwdbwd")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class KernelCase:
    """One benchmarked shape."""

    model: str
    batch: int
    heads: int
    seq: int
    prefix: int
    dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def relative(self):
        """``(span, bucket_size, max_position)`` of a DeBERTa config, else None."""
        return relative_attention(self.model)


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    mask: torch.Tensor
    grad_out: torch.Tensor
    disentangled: Optional[DisentangledBias] = None

    @property
    def leaves(self):
        relative = () if self.disentangled is None else (self.disentangled.pos_key, self.disentangled.pos_query)
        return (self.q, self.k, self.v, self.prefix_k, self.prefix_v, *relative)


def make_inputs(case: KernelCase, requires_grad: bool) -> Inputs:
    """Seeded inputs of ``case`` (same values for every provider)."""
    gen = torch.Generator().manual_seed(0)
    b, h, n, p, d = case.batch, case.heads, case.seq, case.prefix, case.dim

    def rand(*shape):
        x = torch.randn(shape, generator=gen).to(case.device, case.dtype)
        return x.requires_grad_(requires_grad)

    q, k, v = rand(b, h, n, d), rand(b, h, n, d), rand(b, h, n, d)
    prefix_k, prefix_v = rand(h, p, d), rand(h, p, d)
    lengths = n - (torch.arange(b) % 4) * (n // 8)
    mask = (torch.arange(n)[None, :] < lengths[:, None]).to(case.device)
    grad_out = torch.randn((b, h, n, d), generator=gen).to(case.device, case.dtype)
    grad_out = grad_out * mask[:, None, :, None]
    disentangled = None
    if case.relative is not None:
        from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

        span, buckets, max_position = case.relative
        x = torch.empty(1, n, 1)
        positions = build_relative_position(x, x, bucket_size=buckets, max_position=max_position)
        pos_key, pos_query = rand(h, 2 * span, d), rand(h, 2 * span, d)
        disentangled = DisentangledBias.from_relative_positions(positions.to(case.device), span, pos_key, pos_query)
    return Inputs(q, k, v, prefix_k, prefix_v, mask, grad_out, disentangled)


def skip_reason(provider: str, bench: str, device: torch.device, relative: bool = False) -> Optional[str]:
    """Why ``provider`` cannot run ``bench`` here (None if it can); ``relative``: with DeBERTa's terms."""
    if relative and provider == "fused-cuda":
        return "backend='cuda' has no disentangled (c2p/p2c) bias yet"
    if relative and provider == FLASH:
        return "flash_attn has no DeBERTa relative-position terms"
    if provider in FUSED_BACKENDS:
        if provider == "fused-triton" and device.type == "cpu":
            return "Triton on CPU runs in the interpreter (a correctness tool, far too slow to time)"
        try:
            resolve_backend(FUSED_BACKENDS[provider], device)
        except (RuntimeError, ValueError) as err:  # no GPU, no build, or CPU tensors
            return str(err)
    if provider == FLASH:
        if bench != "kernel-fwd":
            return "the FlashAttention-2 limit of SPEC §4 is forward-only"
        if device.type != "cuda":
            return "flash_attn needs a CUDA GPU"
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "flash_attn is not installed"
    return None


def _flash_noconcat(x: Inputs) -> Tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """FlashAttention-2 varlen on K/V concatenated (and unpadded) ahead of time: the same attention
    without the concatenation. Returns (the timed call, packed output -> ``[B, H, N, D]``)."""
    from flash_attn import flash_attn_varlen_func

    batch, heads, seq, dim = x.q.shape
    num_prefix = x.prefix_k.shape[1]
    lengths = x.mask.sum(1).tolist()
    tokens = [slice(0, n) for n in lengths]
    q = torch.cat([x.q[b, :, t].transpose(0, 1) for b, t in enumerate(tokens)])
    k = torch.cat([torch.cat([x.prefix_k, x.k[b, :, t]], 1).transpose(0, 1) for b, t in enumerate(tokens)])
    v = torch.cat([torch.cat([x.prefix_v, x.v[b, :, t]], 1).transpose(0, 1) for b, t in enumerate(tokens)])
    q, k, v = (t.detach().contiguous() for t in (q, k, v))
    lengths_t = torch.tensor(lengths, device=q.device)
    cu_q = F.pad(lengths_t.cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad((lengths_t + num_prefix).cumsum(0), (1, 0)).to(torch.int32)

    def call():
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, seq, seq + num_prefix)

    def unpack(packed):
        dense = packed.new_zeros(batch, seq, heads, dim)
        dense[x.mask] = packed
        return dense.transpose(1, 2)

    return call, unpack


def make_call(provider: str, x: Inputs, backward: bool):
    """(the timed call, its result -> tensors to check). A backward call returns the output and the
    gradients of q, k, v, prefix_k, prefix_v."""
    if provider == FLASH:
        call, unpack = _flash_noconcat(x)
        return call, lambda out: (unpack(out),)
    if provider in FUSED_BACKENDS:
        attend = partial(prefix_attention, backend=FUSED_BACKENDS[provider])
    else:
        attend = partial(concat_prefix_attention, impl=CONCAT_IMPLS[provider])

    def forward():
        return attend(x.q, x.k, x.v, x.prefix_k, x.prefix_v, key_padding_mask=x.mask,
                      disentangled_bias=x.disentangled)

    if not backward:
        return (lambda: forward().detach()), lambda out: (out,)

    def forward_backward():
        out = forward()
        return (out.detach(), *torch.autograd.grad(out, x.leaves, x.grad_out))

    return forward_backward, lambda outs: outs


def max_error(tensors, reference, mask: torch.Tensor) -> float:
    """Largest error over all tensors, each relative to its reference's largest magnitude; ``[B, H, N, D]``
    tensors are compared on real (unpadded) query rows only."""
    worst = 0.0
    for got, ref in zip(tensors, reference):
        got, ref = got.float(), ref.float()
        if got.dim() == 4:
            keep = mask[:, None, :, None]
            got, ref = got * keep, ref * keep
        worst = max(worst, float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-6))
    return worst


def finish_case(case: KernelCase, bench: str, provider: str, prepared, timing, reference: Optional[tuple]):
    """Peak memory of one more call of a timed provider, whose results are checked against ``reference``;
    ``prepared``: its ``(inputs, call, checked)``. Returns (metrics dict, the checked tensors)."""
    x, call, checked = prepared
    result, peak = measure.peak_mb(call, case.device)
    tensors = checked(result)
    del result
    backward = bench == "kernel-fwdbwd"
    shape = (case.batch, case.heads, case.seq, case.prefix, case.dim)
    itemsize = torch.empty((), dtype=case.dtype).element_size()
    tflops, frac = measure.roofline(measure.attention_flops(*shape, backward),
                                    measure.attention_bytes(*shape, itemsize, backward), timing.ms, case.device)
    err = 0.0 if reference is None else max_error(tensors, reference, x.mask)
    return {"ms": timing.ms, "spread": timing.spread, "peak_mb": peak, "tflops": tflops, "roofline_frac": frac,
            "max_err": err}, tensors


def prepare_case(case: KernelCase, bench: str, provider: str):
    """``(inputs, the timed call, its result -> checked tensors)`` of one provider on one case."""
    x = make_inputs(case, requires_grad=bench == "kernel-fwdbwd")
    return (x, *make_call(provider, x, bench == "kernel-fwdbwd"))


def reference_outputs(case: KernelCase, bench: str):
    """The tensors ``concat-sdpa`` computes for ``case`` (untimed)."""
    backward = bench == "kernel-fwdbwd"
    x = make_inputs(case, requires_grad=backward)
    call, checked = make_call(REFERENCE, x, backward)
    return checked(call())


def run(model: str, heads: int, dim: int, sizes, dtype, device, providers, progress):
    """All kernel benches for every (N, P) case of ``sizes``: (rows, skipped)."""
    from .report import make_row

    selected = [p for p in PROVIDERS if p in providers]
    relative = relative_attention(model) is not None
    reasons = {(bench, p): skip_reason(p, bench, device, relative) for bench in BENCHES for p in selected}
    skipped = [{"bench": bench, "provider": p, "reason": reason} for (bench, p), reason in reasons.items() if reason]
    runnable = {bench: sorted((p for p in selected if reasons[bench, p] is None), key=lambda p: p != REFERENCE)
                for bench in BENCHES}
    cases = [KernelCase(model, sizes.batch, heads, n, p, dim, dtype, device) for n, p in sizes.cases()]
    progress.extend(len(cases) * sum(map(len, runnable.values())))
    rows = []
    for case in cases:
        for bench in BENCHES:
            reference = None if REFERENCE in runnable[bench] else reference_outputs(case, bench)
            prepared = {p: prepare_case(case, bench, p) for p in runnable[bench]}
            timed = measure.timings({p: call for p, (_, call, _) in prepared.items()}, device, sizes.warmup,
                                    sizes.repeats)  # the providers interleaved
            for provider in runnable[bench]:
                progress.step(f"{bench} {provider} N={case.seq} P={case.prefix}")
                metrics, tensors = finish_case(case, bench, provider, prepared[provider], timed[provider], reference)
                if provider == REFERENCE:
                    reference = tensors
                rows.append(make_row(bench, provider, case.model, case.batch, case.heads, case.seq, case.prefix,
                                     case.dim, case.dtype, **metrics))
    return rows, skipped
