"""The input contract of the public op surface: ``prefix_attention``, ``prefix_attention_varlen``, the
concatenation baseline ``concat_prefix_attention`` and ``DisentangledBias``.

- Tables of bad inputs: each asserts the exception type, that the message names the argument, and what it
  says; the op and the baseline run over one shared table (same input, same exception type).
- The sync-free value checks used on CUDA tensors, run on CPU and meta tensors (a meta tensor cannot be
  read back, so any device→host read in them fails the test).
- Strided inputs on the torch and triton backends against the float64 reference (the torch backend once
  read a prefix with a non-unit last stride wrongly), by example and property-based (hypothesis).
- Non-finite inputs: a NaN or Inf in one batch row or one bank task never reaches another row, output or
  gradient.
"""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptv2_kernels import DisentangledBias, concat_prefix_attention, prefix_attention, prefix_attention_varlen
from ptv2_kernels.ops import validation

from .reference import reference_attention
from .test_prefix_attention import DEVICE, real_rows

B, H, N, P, D, T = 2, 3, 5, 4, 16, 3
ON_CPU = DEVICE.type == "cpu"
# On CUDA tensors the value checks are device-side assertions (a failed one ends the CUDA context): those rows
# run on CPU tensors only; test_sync_free_* cover the device path.
VALUES = pytest.mark.skipif(not ON_CPU, reason="value checks are device-side assertions on CUDA tensors")


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def call(bank=False, dtype=torch.float32, **replace):
    """Every argument of a valid padded call (by keyword), with ``replace`` substituted."""
    args = {name: randn(B, H, N, D, dtype=dtype, seed=i) for i, name in enumerate("qkv")}
    shape = (T, H, P, D) if bank else (H, P, D)
    args.update(prefix_k=randn(*shape, dtype=dtype, seed=3), prefix_v=randn(*shape, dtype=dtype, seed=4))
    if bank:
        args["task_ids"] = torch.tensor([0, 2])
    args.update(replace)
    return args


def disentangled(heads=H, dim=D, seq=N, span=3, dtype=torch.float32, **replace):
    """A valid DisentangledBias for q ``[B, H, N, D]`` (relative positions i - j), fields replaced."""
    distance = torch.arange(seq)
    bias = DisentangledBias.from_relative_positions(distance[:, None] - distance[None, :], span,
                                                    randn(heads, 2 * span, dim, dtype=dtype, seed=5),
                                                    randn(heads, 2 * span, dim, dtype=dtype, seed=6))
    fields = dict(pos_key=bias.pos_key, pos_query=bias.pos_query, index=bias.index, rows=bias.rows)
    fields.update(replace)
    return DisentangledBias(**fields)


def transposed(*shape):
    """A tensor of ``shape`` whose last two dimensions are swapped in memory (non-unit last stride)."""
    return randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)


def case(make, error, name, words, *marks):
    return pytest.param(make, error, name, words, marks=marks, id=words)


# (build the arguments, exception, the argument the message names, words it contains). Shared by the op and
# the baseline: both must refuse each of these the same way.
SHARED = [
    case(lambda: call(q=[1.0]), TypeError, "q", "q must be a torch.Tensor, got list"),
    case(lambda: call(k=None), TypeError, "k", "k must be a torch.Tensor, got NoneType"),
    case(lambda: call(v=3.0), TypeError, "v", "v must be a torch.Tensor, got float"),
    case(lambda: call(q=randn(B, N, D)), ValueError, "q", "q must be [B, H, N, D], got shape (2, 5, 16)"),
    case(lambda: call(k=randn(B, H, N + 1, D)), ValueError, "k", "k must have the shape of q"),
    case(lambda: call(v=randn(B + 1, H, N, D)), ValueError, "v", "v must have the shape of q"),
    case(lambda: call(q=transposed(B, H, N, D)), ValueError, "q", "q must have a unit stride in its last"),
    case(lambda: call(k=transposed(B, H, N, D)), ValueError, "k", "k must have a unit stride in its last"),
    case(lambda: call(v=randn(B, H, N, 2 * D)[..., ::2]), ValueError, "v", "v must have a unit stride"),
    case(lambda: call(**{n: randn(0, H, N, D) for n in "qkv"}), ValueError, "q", "q must have non-empty"),
    case(lambda: call(prefix_k="prefix"), TypeError, "prefix_k", "prefix_k must be a torch.Tensor, got str"),
    case(lambda: call(prefix_v=None), TypeError, "prefix_v", "prefix_v must be a torch.Tensor, got NoneType"),
    case(lambda: call(prefix_k=randn(P, D)), ValueError, "prefix_k", "prefix_k must be [H, P, D] or a bank"),
    case(lambda: call(prefix_k=randn(1, T, H, P, D)), ValueError, "prefix_k", "prefix_k must be [H, P, D] or a"),
    case(lambda: call(prefix_k=randn(H + 1, P, D)), ValueError, "prefix_k",
         "prefix_k must be [H=3, P, D=16] (or [T, 3, P, 16]) to match q, got shape (4, 4, 16)"),
    case(lambda: call(prefix_k=randn(H, P, D + 1)), ValueError, "prefix_k",
         "prefix_k must be [H=3, P, D=16] (or [T, 3, P, 16]) to match q, got shape (3, 4, 17)"),
    case(lambda: call(prefix_v=randn(H, P + 1, D)), ValueError, "prefix_v", "prefix_v must have the shape of"),
    case(lambda: call(prefix_k=randn(0, H, P, D), prefix_v=randn(0, H, P, D), task_ids=torch.tensor([0, 0])),
         ValueError, "prefix_k", "prefix_k is a bank with zero tasks"),
    case(lambda: call(prefix_k=randn(H, P, D, dtype=torch.float64)), TypeError, "prefix_k", "prefix_k has dtype"),
    case(lambda: call(k=randn(B, H, N, D).half()), TypeError, "k", "k has dtype torch.float16 but q has"),
    case(lambda: {n: t.to(torch.int32) for n, t in call().items()}, TypeError, "q", "q has dtype torch.int32"),
    case(lambda: call(prefix_v=randn(H, P, D).to("meta")), ValueError, "prefix_v", "prefix_v is on meta but q"),
    case(lambda: call(key_padding_mask=torch.ones(B, N)), TypeError, "key_padding_mask",
         "key_padding_mask must be a bool tensor (True = real token), got dtype torch.float32"),
    case(lambda: call(key_padding_mask=torch.ones(B, N, dtype=torch.int64)), TypeError, "key_padding_mask",
         "key_padding_mask must be a bool tensor"),
    case(lambda: call(key_padding_mask=torch.zeros(B, N).masked_fill(torch.rand(B, N) > 0.5, float("-inf"))),
         TypeError, "key_padding_mask", "additive float masks are not accepted"),
    case(lambda: call(key_padding_mask=torch.ones(B, N + 1, dtype=torch.bool)), ValueError, "key_padding_mask",
         "key_padding_mask must be [B, N] = (2, 5), got (2, 6)"),
    case(lambda: call(key_padding_mask=torch.ones(N, dtype=torch.bool)), ValueError, "key_padding_mask",
         "key_padding_mask must be [B, N]"),
    case(lambda: call(key_padding_mask=[[True] * N] * B), TypeError, "key_padding_mask",
         "key_padding_mask must be a torch.Tensor or None, got list"),
    case(lambda: call(key_padding_mask=torch.ones(B, N, dtype=torch.bool, device="meta")), ValueError,
         "key_padding_mask", "key_padding_mask is on meta but q is on"),
    case(lambda: call(bank=True, task_ids=None), ValueError, "task_ids", "task_ids ([B] int64) is required"),
    case(lambda: call(bank=True, task_ids=torch.tensor([0, 3])), ValueError, "task_ids",
         "task_ids must lie in [0, 3) for a bank of 3 tasks, got values in [0, 3]", VALUES),
    case(lambda: call(bank=True, task_ids=torch.tensor([-1, 0])), ValueError, "task_ids",
         "task_ids must lie in [0, 3) for a bank of 3 tasks, got values in [-1, 0]", VALUES),
    case(lambda: call(bank=True, task_ids=torch.tensor([0.0, 1.0])), TypeError, "task_ids",
         "task_ids must be an int64 (or int32) tensor, got dtype torch.float32"),
    case(lambda: call(bank=True, task_ids=torch.tensor([True, False])), TypeError, "task_ids",
         "task_ids must be an int64"),
    case(lambda: call(bank=True, task_ids=[0, 1]), TypeError, "task_ids", "task_ids must be a torch.Tensor"),
    case(lambda: call(bank=True, task_ids=torch.tensor([0, 1, 2])), ValueError, "task_ids",
         "task_ids must be [B] = [2], got shape (3,)"),
    case(lambda: call(bank=True, task_ids=torch.tensor([[0, 1]])), ValueError, "task_ids", "task_ids must be [B]"),
    case(lambda: call(bank=True, task_ids=torch.tensor([0, 1], device="meta")), ValueError, "task_ids",
         "task_ids is on meta but q is on"),
    case(lambda: call(task_ids=torch.tensor([0, 1])), ValueError, "task_ids",
         "task_ids was given but prefix_k is a single prefix"),
    case(lambda: call(dropout_p=1.0), ValueError, "dropout_p", "dropout_p must be in [0, 1), got 1.0"),
    case(lambda: call(dropout_p=-0.1), ValueError, "dropout_p", "dropout_p must be in [0, 1)"),
    case(lambda: call(dropout_p=float("nan")), ValueError, "dropout_p", "dropout_p must be in [0, 1), got nan"),
    case(lambda: call(dropout_p="0.1"), TypeError, "dropout_p", "dropout_p must be a float in [0, 1), got str"),
    case(lambda: call(dropout_p=True), TypeError, "dropout_p", "dropout_p must be a float in [0, 1), got bool"),
    case(lambda: call(prefix_dropout_p=1.5), ValueError, "prefix_dropout_p", "prefix_dropout_p must be in [0, 1)"),
    case(lambda: call(prefix_dropout_p=None), TypeError, "prefix_dropout_p", "prefix_dropout_p must be a float"),
    case(lambda: call(scale=0.0), ValueError, "scale", "scale must be a finite positive number, got 0.0"),
    case(lambda: call(scale=-1), ValueError, "scale", "scale must be a finite positive number, got -1"),
    case(lambda: call(scale=float("nan")), ValueError, "scale", "scale must be a finite positive number, got nan"),
    case(lambda: call(scale=float("inf")), ValueError, "scale", "scale must be a finite positive number, got inf"),
    case(lambda: call(scale=torch.tensor(0.25)), TypeError, "scale", "scale must be a float or None, got Tensor"),
    case(lambda: call(attn_bias=randn(B, H, N, N + 1)), ValueError, "attn_bias",
         "attn_bias must be [B, H, N, N] = (2, 3, 5, 5) or broadcastable to it, got (2, 3, 5, 6)"),
    case(lambda: call(attn_bias=randn(B + 1, 1, N, N)), ValueError, "attn_bias",
         "attn_bias must be [B, H, N, N] = (2, 3, 5, 5) or broadcastable to it, got (3, 1, 5, 5)"),
    case(lambda: call(attn_bias=torch.ones(B, H, N, N, dtype=torch.int32)), TypeError, "attn_bias",
         "attn_bias must be a floating-point tensor, got dtype torch.int32"),
    case(lambda: call(attn_bias=0.5), TypeError, "attn_bias", "attn_bias must be a torch.Tensor or None"),
    case(lambda: call(attn_bias=randn(B, H, N, N).to("meta")), ValueError, "attn_bias", "attn_bias is on meta"),
    # disentangled_bias, checked against q at the call
    case(lambda: call(disentangled_bias="c2p"), TypeError, "disentangled_bias",
         "disentangled_bias must be a DisentangledBias or None, got str"),
    case(lambda: call(disentangled_bias=disentangled(seq=N + 1)), ValueError, "disentangled_bias.index",
         "disentangled_bias.index must be an int32 tensor [2, 2N - 1] = [2, 9], got shape (2, 11)"),
    case(lambda: call(disentangled_bias=disentangled(index=disentangled().index.long())), TypeError,
         "disentangled_bias.index", "disentangled_bias.index must be an int32 tensor [2, 2N - 1] = [2, 9], got dtype"),
    case(lambda: call(disentangled_bias=disentangled(index=[[0] * 9] * 2)), TypeError, "disentangled_bias.index",
         "disentangled_bias.index must be an int32 tensor [2, 2N - 1] = [2, 9], got list"),
    case(lambda: call(disentangled_bias=disentangled(pos_key=None, pos_query=None)), ValueError,
         "disentangled_bias", "disentangled_bias needs pos_key (c2p), pos_query (p2c) or both"),
    case(lambda: call(disentangled_bias=disentangled(heads=H + 1)), ValueError, "disentangled_bias.pos_key",
         "disentangled_bias.pos_key must be [H=3, R, D=16] with R >= 1"),
    case(lambda: call(disentangled_bias=disentangled(pos_query=randn(H, 6, D + 1))), ValueError,
         "disentangled_bias.pos_query", "disentangled_bias.pos_query must be [H=3, R, D=16]"),
    case(lambda: call(disentangled_bias=disentangled(pos_key=randn(H, 6, D).numpy())), TypeError,
         "disentangled_bias.pos_key", "disentangled_bias.pos_key must be a torch.Tensor or None, got ndarray"),
    case(lambda: call(disentangled_bias=disentangled(dtype=torch.float64)), TypeError, "disentangled_bias.pos_key",
         "disentangled_bias.pos_key must match q's device and dtype"),
    case(lambda: call(disentangled_bias=disentangled(pos_query=randn(H, 6, D).to("meta"))), ValueError,
         "disentangled_bias.pos_query", "disentangled_bias.pos_query must match q's device and dtype"),
    case(lambda: call(disentangled_bias=disentangled(pos_query=randn(H, 4, D))), ValueError, "disentangled_bias",
         "disentangled_bias.pos_key and pos_query must have the same number of rows R, got [6, 4]"),
    case(lambda: call(disentangled_bias=disentangled(pos_key=randn(H, 4, D), pos_query=None)), ValueError,
         "disentangled_bias", "disentangled_bias embeddings have R=4 rows but its index reaches row 5"),
    case(lambda: call(disentangled_bias=disentangled(rows=None, index=disentangled().index + 5)), ValueError,
         "disentangled_bias.index", "disentangled_bias.index must lie in [0, R=6), got values in [5, 10]", VALUES),
    case(lambda: call(disentangled_bias=disentangled(rows=None, index=disentangled().index - 1)), ValueError,
         "disentangled_bias.index", "disentangled_bias.index must lie in [0, R=6), got values in [-1, 4]", VALUES),
    case(lambda: call(disentangled_bias=disentangled(rows=6.0)), TypeError, "disentangled_bias.rows",
         "disentangled_bias.rows must be an int or None, got float"),
]

# Arguments only the op has.
OP_ONLY = [
    case(lambda: call(backend="flash"), ValueError, "backend", "backend must be one of ('auto', 'triton', 'cuda', "
         "'cpu', 'torch-ref') (or the old name 'torch'), got 'flash'"),
    case(lambda: call(backend=None), ValueError, "backend", "), got None"),
    case(lambda: call(backend="cuda"), ValueError, "backend", "backend='cuda' needs CUDA tensors",
         pytest.mark.skipif(not ON_CPU, reason="CUDA tensors are valid input for backend='cuda'")),
    case(lambda: call(dtype=torch.float64, backend="triton"), TypeError, "q",
         "q has dtype torch.float64; backend='triton' supports"),
    case(lambda: call(q=randn(B, H, N, 8), backend="triton"), ValueError, "k", "k must have the shape of q"),
    case(lambda: {**{n: randn(B, H, N, 8) for n in "qkv"}, "prefix_k": randn(H, P, 8), "prefix_v": randn(H, P, 8),
                  "backend": "triton"}, ValueError, "q", "head_dim (last dim of q) must be in 16..128 for"),
    case(lambda: {**{n: randn(B, H, N, 160) for n in "qkv"}, "prefix_k": randn(H, P, 160),
                  "prefix_v": randn(H, P, 160), "backend": "triton"}, ValueError, "q", "must be in 16..128"),
    case(lambda: call(deterministic="yes"), TypeError, "deterministic", "deterministic must be a bool, got str"),
    case(lambda: call(deterministic=None), TypeError, "deterministic", "deterministic must be a bool"),
]

BASELINE_ONLY = [
    case(lambda: call(impl="flash"), ValueError, "impl", "impl must be 'sdpa' or 'eager', got 'flash'"),
]


def packed(total=10, lengths=(4, 6), bank=False, **replace):
    """Every argument of a valid varlen call, with ``replace`` substituted."""
    args = {name: randn(total, H, D, seed=i) for i, name in enumerate("qkv")}
    shape = (T, H, P, D) if bank else (H, P, D)
    args.update(prefix_k=randn(*shape, seed=3), prefix_v=randn(*shape, seed=4),
                cu_seqlens=torch.tensor((0,) + lengths).cumsum(0))
    if bank:
        args["task_ids"] = torch.tensor([2, 0])
    args.update(replace)
    return args


VARLEN = [
    case(lambda: packed(q=randn(1, 10, H, D)), ValueError, "q", "q must be [total_tokens, H, D], got shape"),
    case(lambda: packed(v=randn(11, H, D)), ValueError, "v", "v must have the shape of q (10, 3, 16)"),
    case(lambda: packed(k=transposed(10, H, D)), ValueError, "k", "k must have a unit stride in its last"),
    case(lambda: packed(prefix_k=randn(H + 1, P, D)), ValueError, "prefix_k", "prefix_k must be [H=3, P, D=16]"),
    case(lambda: packed(prefix_v=randn(H, P, D).half()), TypeError, "prefix_v", "prefix_v has dtype torch.float16"),
    case(lambda: packed(cu_seqlens=[0, 4, 10]), TypeError, "cu_seqlens", "cu_seqlens must be a torch.Tensor"),
    case(lambda: packed(cu_seqlens=torch.tensor([0.0, 10.0])), TypeError, "cu_seqlens",
         "cu_seqlens must be an int32 or int64 tensor, got dtype torch.float32"),
    case(lambda: packed(cu_seqlens=torch.tensor([10])), ValueError, "cu_seqlens", "cu_seqlens must be [B + 1] with"),
    case(lambda: packed(cu_seqlens=torch.tensor([[0, 10]])), ValueError, "cu_seqlens", "cu_seqlens must be [B + 1]"),
    case(lambda: packed(cu_seqlens=torch.tensor([0, 10], device="meta")), ValueError, "cu_seqlens",
         "cu_seqlens is on meta but q is on"),
    case(lambda: packed(cu_seqlens=torch.tensor([0, 5, 3, 10])), ValueError, "cu_seqlens",
         "cu_seqlens must rise from 0 to total_tokens = 10 without decreasing, got [0, 5, 3, 10]", VALUES),
    case(lambda: packed(cu_seqlens=torch.tensor([0, 5, 9])), ValueError, "cu_seqlens",
         "cu_seqlens must rise from 0 to total_tokens = 10", VALUES),
    case(lambda: packed(cu_seqlens=torch.tensor([1, 5, 10])), ValueError, "cu_seqlens",
         "cu_seqlens must rise from 0", VALUES),
    case(lambda: packed(max_seqlen=5), ValueError, "max_seqlen", "max_seqlen must be an int >= the longest row (6)",
         VALUES),
    case(lambda: packed(max_seqlen=0), ValueError, "max_seqlen", "max_seqlen must be an int >= the longest row"),
    case(lambda: packed(max_seqlen=6.0), TypeError, "max_seqlen", "max_seqlen must be an int or None, got float"),
    case(lambda: packed(bank=True, task_ids=None), ValueError, "task_ids", "task_ids ([B] int64) is required"),
    case(lambda: packed(bank=True, task_ids=torch.tensor([0, 1, 2])), ValueError, "task_ids",
         "task_ids must be [B] = [2]"),
    case(lambda: packed(bank=True, task_ids=torch.tensor([0, 7])), ValueError, "task_ids",
         "task_ids must lie in [0, 3)", VALUES),
    case(lambda: packed(scale="big"), TypeError, "scale", "scale must be a float or None"),
    case(lambda: packed(prefix_dropout_p=1.0), ValueError, "prefix_dropout_p", "prefix_dropout_p must be in [0, 1)"),
    case(lambda: packed(backend="cuda"), ValueError, "backend", "backend='cuda' needs CUDA tensors",
         pytest.mark.skipif(not ON_CPU, reason="CUDA tensors are valid input for backend='cuda'")),
]

# DisentangledBias.from_relative_positions: (arguments, exception, argument, words)
CONSTRUCTOR = [
    case(lambda: ([[0, 1], [-1, 0]], 2), TypeError, "relative_pos", "relative_pos must be a torch.Tensor, got list"),
    case(lambda: (torch.zeros(3, 3), 2), TypeError, "relative_pos", "relative_pos must be an integer tensor"),
    case(lambda: (torch.zeros(3, 4, dtype=torch.long), 2), ValueError, "relative_pos",
         "relative_pos must be [N, N] or [1, N, N] with N >= 1, got shape (3, 4)"),
    case(lambda: (torch.zeros(2, 3, 3, dtype=torch.long), 2), ValueError, "relative_pos",
         "relative_pos must be [N, N] or [1, N, N]"),
    case(lambda: (torch.zeros(0, 0, dtype=torch.long), 2), ValueError, "relative_pos", "with N >= 1, got shape (0, 0)"),
    case(lambda: (torch.tensor([[0, -1, -2], [1, 0, 5], [2, 1, 0]]), 2), ValueError, "relative_pos",
         "relative_pos must depend on i - j only"),
    case(lambda: (torch.zeros(3, 3, dtype=torch.long), 2.0), TypeError, "span", "span must be an int, got float"),
    case(lambda: (torch.zeros(3, 3, dtype=torch.long), 0), ValueError, "span", "span must be >= 1, got 0"),
]


def on_device(args: dict) -> dict:
    """Tensors on the test device (meta tensors stay meta: they test the device check)."""
    def move(x):
        return x.to(DEVICE) if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x

    moved = {name: move(x) for name, x in args.items()}
    bias = moved.get("disentangled_bias")
    if isinstance(bias, DisentangledBias):
        moved["disentangled_bias"] = DisentangledBias(move(bias.pos_key), move(bias.pos_query), move(bias.index),
                                                      bias.rows)
    return moved


def assert_refused(fn, args, error, name, words):
    with pytest.raises(error) as info:
        fn(**on_device(args))
    message = str(info.value)
    assert info.type is error, f"{info.type.__name__} is not {error.__name__}: {message}"
    assert name in message and words in message, message


@pytest.mark.parametrize("fn", [prefix_attention, concat_prefix_attention], ids=["op", "baseline"])
@pytest.mark.parametrize("make,error,name,words", SHARED)
def test_op_and_baseline_refuse_alike(fn, make, error, name, words):
    assert_refused(fn, make(), error, name, words)


@pytest.mark.parametrize("make,error,name,words", OP_ONLY)
def test_op_refuses(make, error, name, words):
    assert_refused(prefix_attention, make(), error, name, words)


@pytest.mark.parametrize("make,error,name,words", BASELINE_ONLY)
def test_baseline_refuses(make, error, name, words):
    assert_refused(concat_prefix_attention, make(), error, name, words)


@pytest.mark.parametrize("make,error,name,words", VARLEN)
def test_varlen_refuses(make, error, name, words):
    assert_refused(prefix_attention_varlen, make(), error, name, words)


@pytest.mark.parametrize("make,error,name,words", CONSTRUCTOR)
def test_disentangled_bias_constructor_refuses(make, error, name, words):
    relative_pos, span = make()
    assert_refused(DisentangledBias.from_relative_positions, dict(relative_pos=relative_pos, span=span), error, name,
                   words)


def test_tables_are_large_and_distinct():
    """At least 35 distinct bad inputs in all (the issue's bar), every id unique."""
    tables = (SHARED, OP_ONLY, BASELINE_ONLY, VARLEN, CONSTRUCTOR)
    for table in tables:
        ids = [p.id for p in table]
        assert len(ids) == len(set(ids)), sorted(ids)
    assert sum(map(len, tables)) >= 35


def test_baseline_validates_what_it_used_to_accept_silently():
    """The three silent misuses of the old baseline, compared with what the op does on the same input."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    bank = [torch.randn(T, H, P, D, generator=gen) for _ in range(2)]
    float_mask = torch.ones(B, N)
    float_mask[1, 3:] = 0.0
    for fn in (prefix_attention, concat_prefix_attention):
        with pytest.raises(ValueError, match="task_ids"):  # used task 0 before
            fn(q, k, v, *bank)
        with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\)"):  # IndexError before
            fn(q, k, v, *bank, task_ids=torch.tensor([1, 5]))
        with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):  # an additive bias before
            fn(q, k, v, *bank, task_ids=torch.tensor([1, 2]), key_padding_mask=float_mask)


# ----- the sync-free value checks (CUDA tensors), exercised on CPU and meta tensors -------------------------------

def test_sync_free_task_ids_assert_on_the_device():
    prefix = torch.randn(T, H, P, D)
    q = torch.randn(4, H, N, D)
    good = torch.tensor([0, 2, 1, 2])
    assert torch.equal(validation.check_task_ids(q, 4, prefix, good, sync_free=True), good)
    for bad in ([0, 3, 1, 1], [-1, 0, 0, 0]):
        with pytest.raises(RuntimeError, match=r"task_ids must lie in \[0, 3\) for a bank of 3 tasks"):
            validation.check_task_ids(q, 4, prefix, torch.tensor(bad), sync_free=True)
        with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\).*got values in"):  # the host check
            validation.check_task_ids(q, 4, prefix, torch.tensor(bad), sync_free=False)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\)"):  # CPU tensors default to the host check
        validation.check_task_ids(q, 4, prefix, torch.tensor([0, 3, 1, 1]))
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\)"):  # what models call once per forward
        validation.check_task_id_values(torch.tensor([0, 2]), 2, sync_free=False)


def test_sync_free_cu_seqlens_assert_on_the_device():
    q = torch.randn(10, H, D)
    cu, _ = validation.check_cu_seqlens(q, torch.tensor([0, 4, 10], dtype=torch.int32), 6, sync_free=True)
    assert cu.dtype == torch.int64 and cu.tolist() == [0, 4, 10]
    for bad, max_seqlen in (([0, 5, 3, 10], 7), ([0, 5, 9], 5), ([2, 5, 10], 5), ([0, 4, 10], 5)):
        with pytest.raises(RuntimeError, match="cu_seqlens must rise from 0 to total_tokens = 10 without decreasing, "
                                               f"and max_seqlen={max_seqlen} must be >= the longest row"):
            validation.check_cu_seqlens(q, torch.tensor(bad), max_seqlen, sync_free=True)
    # max_seqlen=None reads the longest row back (the one sync left), with host errors
    assert validation.check_cu_seqlens(q, torch.tensor([0, 4, 10]), None, sync_free=True)[1] == 6
    with pytest.raises(ValueError, match="without decreasing"):
        validation.check_cu_seqlens(q, torch.tensor([0, 5, 3, 10]), None, sync_free=True)


def test_sync_free_disentangled_index_asserts_on_the_device():
    q = torch.randn(B, H, N, D)
    assert validation.check_disentangled(q, disentangled(rows=None), sync_free=True) is not None
    with pytest.raises(RuntimeError, match=r"disentangled_bias.index must lie in \[0, R=6\)"):
        validation.check_disentangled(q, disentangled(rows=None, index=disentangled().index + 1), sync_free=True)


def test_checks_off_the_cpu_never_read_tensors_back():
    """Meta tensors stand for CUDA ones: they have a device but no data, so any .item()/.tolist()/bool() in the
    checks raises. A whole padded call (bank, mask, bias, relative terms without ``rows``) and a varlen call with
    ``max_seqlen`` validate without one; ``max_seqlen=None`` is the one read (documented)."""
    meta = torch.device("meta")
    args = {name: (x.to(meta) if isinstance(x, torch.Tensor) else x) for name, x in call(bank=True).items()}
    bias = disentangled(rows=None)
    bias = DisentangledBias(bias.pos_key.to(meta), bias.pos_query.to(meta), bias.index.to(meta), None)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    validation.check_qkv(q, k, v)
    checked = validation.check_padded_call(
        q, k, v, args["prefix_k"], args["prefix_v"], key_padding_mask=torch.ones(B, N, dtype=torch.bool, device=meta),
        task_ids=args["task_ids"], attn_bias=torch.randn(1, H, N, N, device=meta), disentangled_bias=bias, scale=None,
        dropout_p=0.1, prefix_dropout_p=0.0, support=validation.Support(validation.TORCH_DTYPES, None, "test"))
    assert checked.prefix_k.shape == (T, H, P, D) and checked.task_ids.device == meta
    tokens = torch.randn(10, H, D, device=meta)
    cu_seqlens = torch.tensor([0, 4, 10], device=meta)
    validation.check_cu_seqlens(tokens, cu_seqlens, 6)
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        validation.check_cu_seqlens(tokens, cu_seqlens, None)


# ----- strided inputs against the float64 reference -------------------------------------------------------------

BACKENDS = ["torch", "triton"]


def grads_of(fn, leaves, views, d_out, **kwargs):
    """``[out, grad of every leaf]`` of ``fn(*views(leaves))``."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*views(leaves), **kwargs)
    out.backward(d_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def assert_strided_matches_reference(backend, leaves, views, d_out, mask=None, task_ids=None):
    """Padded query rows may output any finite value and their output gradient is zero in a model (SPEC §1):
    their outputs are not compared and their output gradient is zeroed."""
    d_out = real_rows(d_out, mask)
    got = grads_of(prefix_attention, leaves, views, d_out, key_padding_mask=mask, task_ids=task_ids, backend=backend)
    ref = grads_of(reference_attention, [t.double() for t in leaves], views, d_out.double(), mask=mask,
                   task_ids=task_ids)
    got[0], ref[0] = real_rows(got[0], mask), real_rows(ref[0], mask)
    for i, (g, r) in enumerate(zip(got, ref)):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=2e-5, msg=f"output/grad {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_with_a_non_unit_last_stride(backend):
    """The issue's case: ``torch.randn(H, D, P).transpose(1, 2)``. The torch backend once passed it straight
    to PyTorch's CPU flash-attention kernel, which assumes a unit last stride (max error 1.5)."""
    seq = 7
    leaves = [randn(B, H, seq, D, seed=i).to(DEVICE) for i in range(3)]
    leaves += [randn(H, D, P, seed=3 + i).to(DEVICE) for i in range(2)]
    d_out = randn(B, H, seq, D, seed=9).to(DEVICE)
    assert_strided_matches_reference(backend, leaves, lambda t: t[:3] + [p.transpose(1, 2) for p in t[3:]], d_out)


# Layouts of a q/k/v ``[B, H, N, D]`` view over a base tensor: (base shape, view).
QKV_LAYOUTS = {
    "contiguous": (lambda b, h, n, d: (b, h, n, d), lambda t: t),
    "bnhd": (lambda b, h, n, d: (b, n, h, d), lambda t: t.transpose(1, 2)),
    "every-other-token": (lambda b, h, n, d: (b, h, 2 * n, d), lambda t: t[:, :, ::2]),
    "padded-head-dim": (lambda b, h, n, d: (b, h, n, d + 8), lambda t: t[..., :-8]),
    "broadcast-batch": (lambda b, h, n, d: (1, h, n, d), lambda t: t),  # expanded over the batch in the test
    "transposed-head-dim": (lambda b, h, n, d: (b, h, d, n), lambda t: t.transpose(-1, -2)),  # refused
}
# Layouts of a prefix ``[H, P, D]`` (or bank ``[T, H, P, D]``) view: (base shape from (lead, h, p, d), view).
PREFIX_LAYOUTS = {
    "contiguous": (lambda lead, h, p, d: (*lead, h, p, d), lambda t: t),
    "transposed-head-dim": (lambda lead, h, p, d: (*lead, h, d, p), lambda t: t.transpose(-1, -2)),
    "phd": (lambda lead, h, p, d: (*lead, p, h, d), lambda t: t.transpose(-3, -2)),
    "slice-of-a-kv-buffer": (lambda lead, h, p, d: (*lead, 2, h, p, d), lambda t: t.select(-4, 1)),
    "every-other-position": (lambda lead, h, p, d: (*lead, h, 2 * p, d), lambda t: t[..., ::2, :]),
}


@settings(max_examples=50, deadline=None, database=None, print_blob=True)  # the Triton interpreter is slow
@given(data=st.data(), backend=st.sampled_from(BACKENDS))
def test_strided_inputs_property(data, backend):
    """Any q/k/v view with a unit last stride, any prefix view and any output-gradient layout give the float64
    reference's output and gradients; a q/k/v view with another last stride is refused with a ValueError naming
    it."""
    batch, heads = data.draw(st.integers(1, 2), "B"), data.draw(st.integers(1, 2), "H")
    seq, num_prefix = data.draw(st.integers(1, 9), "N"), data.draw(st.integers(0, 5), "P")
    dim = data.draw(st.sampled_from([16, 24]), "D")
    tasks = data.draw(st.sampled_from([None, 2]), "T")
    layouts = [data.draw(st.sampled_from(sorted(QKV_LAYOUTS)), name) for name in "qkv"]
    prefix_layouts = [data.draw(st.sampled_from(sorted(PREFIX_LAYOUTS)), name) for name in ("prefix_k", "prefix_v")]
    padded = data.draw(st.booleans(), "padded")
    lead = () if tasks is None else (tasks,)
    leaves = [randn(*QKV_LAYOUTS[lay][0](batch, heads, seq, dim), seed=i).to(DEVICE) for i, lay in enumerate(layouts)]
    leaves += [randn(*PREFIX_LAYOUTS[lay][0](lead, heads, num_prefix, dim), seed=3 + i).to(DEVICE)
               for i, lay in enumerate(prefix_layouts)]

    def views(t):
        qkv = [QKV_LAYOUTS[lay][1](x) for lay, x in zip(layouts, t[:3])]
        qkv = [x.expand(batch, *x.shape[1:]) for x in qkv]  # broadcast-batch: a stride-0 batch dimension
        return qkv + [PREFIX_LAYOUTS[lay][1](x) for lay, x in zip(prefix_layouts, t[3:])]

    mask = None
    if padded:
        mask = torch.arange(seq)[None, :] < torch.randint(0, seq + 1, (batch,), generator=torch.Generator())[:, None]
        mask = mask.to(DEVICE)
    task_ids = None if tasks is None else (torch.arange(batch) % tasks).to(DEVICE)
    d_out = {  # the output gradient autograd hands the backward comes in any layout too
        "contiguous": lambda: randn(batch, heads, seq, dim, seed=9),
        "transposed-head-dim": lambda: transposed(batch, heads, seq, dim),
        "broadcast": lambda: randn(dim, seed=9).expand(batch, heads, seq, dim),
    }[data.draw(st.sampled_from(["contiguous", "transposed-head-dim", "broadcast"]), "d_out")]().to(DEVICE)
    refused = [name for name, x in zip("qkv", views(leaves)) if x.stride(-1) != 1]  # N = 1 transposes stay unit
    if refused:
        with pytest.raises(ValueError, match=f"{refused[0]} must have a unit stride in its last"):
            prefix_attention(*views(leaves), key_padding_mask=mask, task_ids=task_ids, backend=backend)
        return
    assert_strided_matches_reference(backend, leaves, views, d_out, mask, task_ids)


# ----- argument validation, property-based -------------------------------------------------------------------

# One corruption of a valid call: (name, function(args, draw) -> args, exception, argument named in the message).
def _wrong_rank(name):
    return lambda a, draw: {**a, name: a[name][0]}


def _task_out_of_range(a, draw):
    tasks = a["prefix_k"].shape[0]
    bad = draw(st.one_of(st.integers(-100, -1), st.integers(tasks, tasks + 100)))
    ids = a["task_ids"].clone()
    ids[draw(st.integers(0, ids.shape[0] - 1))] = bad
    return {**a, "task_ids": ids}


CORRUPTIONS = {
    "q-rank": (_wrong_rank("q"), ValueError, "q"),
    "k-shape": (lambda a, draw: {**a, "k": a["k"][:, :, :-1] if a["k"].shape[2] > 1 else a["k"][:0]}, ValueError, "k"),
    "v-last-stride": (lambda a, draw: {**a, "v": torch.stack([a["v"]] * 2, -1)[..., 0]}, ValueError, "v"),
    "prefix_k-heads": (lambda a, draw: {**a, "prefix_k": torch.cat([a["prefix_k"]] * 2, -3)}, ValueError, "prefix_k"),
    "prefix_v-dtype": (lambda a, draw: {**a, "prefix_v": a["prefix_v"].double()}, TypeError, "prefix_v"),
    "mask-float": (lambda a, draw: {**a, "key_padding_mask": a["key_padding_mask"].float()}, TypeError,
                   "key_padding_mask"),
    "mask-length": (lambda a, draw: {**a, "key_padding_mask": torch.cat([a["key_padding_mask"]] * 2, 1)},
                    ValueError, "key_padding_mask"),
    "task_ids-range": (_task_out_of_range, ValueError, "task_ids"),
    "task_ids-missing": (lambda a, draw: {**a, "task_ids": None}, ValueError, "task_ids"),
    "task_ids-float": (lambda a, draw: {**a, "task_ids": a["task_ids"].float()}, TypeError, "task_ids"),
    "dropout_p": (lambda a, draw: {**a, "dropout_p": draw(st.one_of(
        st.floats(max_value=-1e-9), st.floats(min_value=1.0), st.just(float("nan"))))}, ValueError, "dropout_p"),
    "scale": (lambda a, draw: {**a, "scale": draw(st.one_of(st.floats(max_value=0.0), st.just(float("inf"))))},
              ValueError, "scale"),
    "attn_bias-shape": (lambda a, draw: {**a, "attn_bias": torch.zeros(a["q"].shape[2] + 1)}, ValueError, "attn_bias"),
}


@settings(max_examples=60, deadline=None, database=None, print_blob=True)
@given(data=st.data(), fn=st.sampled_from([prefix_attention, concat_prefix_attention]),
       corruption=st.sampled_from(sorted(CORRUPTIONS)))
def test_argument_validation_property(data, fn, corruption):
    """A valid call (random shapes, a bank, a padding mask) passes and matches the float64 reference; the same
    call with any one corruption raises the corruption's exception naming its argument, on the op and the
    baseline alike."""
    batch, heads = data.draw(st.integers(1, 3), "B"), data.draw(st.integers(1, 3), "H")
    seq, num_prefix, dim = data.draw(st.integers(1, 6), "N"), data.draw(st.integers(0, 4), "P"), 4
    tasks = data.draw(st.integers(1, 3), "T")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), "seed"))
    args = {name: torch.randn(batch, heads, seq, dim, generator=gen) for name in "qkv"}
    args.update({name: torch.randn(tasks, heads, num_prefix, dim, generator=gen) for name in ("prefix_k", "prefix_v")})
    args["task_ids"] = torch.randint(0, tasks, (batch,), generator=gen)
    args["key_padding_mask"] = torch.rand(batch, seq, generator=gen) > 0.3
    args = {name: x.to(DEVICE) for name, x in args.items()}
    out = fn(**args)
    ref = reference_attention(*(args[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")),
                              mask=args["key_padding_mask"], task_ids=args["task_ids"])
    # SDPA (the baseline) gives NaN on rows with no visible column, the op and the reference zeros
    torch.testing.assert_close(out.double().nan_to_num(0.0), ref, rtol=1e-4, atol=2e-5)
    if corruption == "task_ids-range" and not ON_CPU:
        return  # a device-side assertion on CUDA tensors (test_sync_free_task_ids_assert_on_the_device)
    corrupt, error, name = CORRUPTIONS[corruption]
    bad = corrupt(args, data.draw)
    with pytest.raises(error) as info:
        fn(**bad)
    assert info.type is error and name in str(info.value), str(info.value)


# ----- non-finite inputs stay in their row ----------------------------------------------------------------------

def _cuda_backend_available():
    if DEVICE.type != "cuda":
        return False
    from ptv2_kernels.ops.cuda_backend import cuda_status

    return cuda_status()[0]


NONFINITE_BACKENDS = BACKENDS + [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not _cuda_backend_available(), reason="needs CUDA tensors (PTV2_TEST_DEVICE=cuda) and the CUDA extension")])]


NONFINITE_TASKS = [0, 1, 2, 1]  # row 0 is the only row of task 0, row 2 the only one of task 2


def _nonfinite_case():
    """(q, k, v, prefix_k bank, prefix_v bank), task_ids, mask (the last token padded), d_out."""
    gen = torch.Generator().manual_seed(7)
    batch, heads, seq, tasks = len(NONFINITE_TASKS), 2, 6, 3
    tensors = [torch.randn(batch, heads, seq, D, generator=gen) for _ in range(3)]
    tensors += [torch.randn(tasks, heads, P, D, generator=gen) for _ in range(2)]
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[:, 5:] = False
    d_out = torch.randn(batch, heads, seq, D, generator=gen)
    return tensors, torch.tensor(NONFINITE_TASKS), mask, d_out


@functools.lru_cache(maxsize=None)
def _nonfinite_run(backend, where=None, value=None):
    """``[out, dq, dk, dv, dprefix_k, dprefix_v]`` of the case with ``value`` written into row 0 (head 1, a real
    token) of q/k/v, or into task 2 of the prefix bank; the clean run with ``where=None``."""
    tensors, task_ids, mask, d_out = _nonfinite_case()
    if where is not None:
        index = ["q", "k", "v", "prefix_k", "prefix_v"].index(where)
        tensors[index][(0, 1, 2, 3) if index < 3 else (2, 1, 1, 3)] = value
    return grads_of(prefix_attention, [t.to(DEVICE) for t in tensors], lambda t: t, d_out.to(DEVICE),
                    key_padding_mask=mask.to(DEVICE), task_ids=task_ids.to(DEVICE), backend=backend)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
@pytest.mark.parametrize("backend", NONFINITE_BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["q", "k", "v", "prefix_k", "prefix_v"])
def test_non_finite_values_stay_in_their_row(backend, value, where):
    """A NaN or Inf in one row's q, k or v (a real token), or in the prefix of one bank task, leaves every other
    row's output and q/k/v gradients, and the other tasks' prefix gradients, as in the clean call."""
    row, task = (0, 0) if where in "qkv" else (2, 2)
    got, clean = _nonfinite_run(backend, where, value), _nonfinite_run(backend)
    assert not torch.isfinite(got[0][row]).all(), "the poisoned row should be non-finite (as in SDPA)"
    other_rows = [r for r in range(len(NONFINITE_TASKS)) if r != row]
    other_tasks = [t for t in range(3) if t != task]
    names = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]
    for i, (name, g, c) in enumerate(zip(names, got, clean)):
        others = other_rows if i < 4 else other_tasks
        assert torch.isfinite(g[others]).all(), f"{name}: a non-finite value reached another row or task"
        torch.testing.assert_close(g[others], c[others], rtol=1e-5, atol=1e-6, msg=name)
