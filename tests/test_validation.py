"""Every bad argument of prefix_attention gives a ValueError/TypeError/RuntimeError naming it."""

import pytest
import torch

from ptv2_kernels import prefix_attention

from .test_prefix_attention import DEVICE

B, H, N, P, D = 2, 3, 5, 4, 16


def args(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen, dtype=dtype) for _ in range(3))
    return [q, k, v, torch.randn(H, P, D, generator=gen, dtype=dtype), torch.randn(H, P, D, generator=gen, dtype=dtype)]


def bank():
    q, k, v, _, _ = args()
    return [q, k, v, torch.randn(3, H, P, D), torch.randn(3, H, P, D)]


def replace(tensors, index, value):
    return tensors[:index] + [value] + tensors[index + 1:]


CASES = [
    # (positional tensors, keyword arguments, exception, words the message must contain)
    (replace(args(), 0, [1.0]), {}, TypeError, "q must be a torch.Tensor"),
    (replace(args(), 0, torch.randn(B, N, D)), {}, ValueError, "q must be [B, H, N, D]"),
    (replace(args(), 1, torch.randn(B, H, N + 1, D)), {}, ValueError, "k must have the shape of q"),
    (replace(args(), 2, torch.randn(B + 1, H, N, D)), {}, ValueError, "v must have the shape of q"),
    (replace(args(), 0, torch.randn(B, H, D, N).transpose(-1, -2)), {}, ValueError, "q must have a unit stride"),
    (replace(args(), 3, torch.randn(H + 1, P, D)), {}, ValueError, "prefix_k must be [H=3, P, D=16]"),
    (replace(args(), 3, torch.randn(H, P, D + 1)), {}, ValueError, "prefix_k must be [H=3, P, D=16]"),
    (replace(args(), 4, torch.randn(H, P + 1, D)), {}, ValueError, "prefix_v must have the shape of prefix_k"),
    (replace(args(), 3, torch.randn(P, D)), {}, ValueError, "prefix_k must be [H, P, D] or a bank"),
    (replace(args(), 3, torch.randn(H, P, D, dtype=torch.float64)), {}, TypeError, "prefix_k has dtype"),
    (replace(args(), 1, torch.randn(B, H, N, D).half()), {}, TypeError, "k has dtype"),
    (args(torch.float64), {"backend": "triton"}, TypeError, "backend='triton' supports"),
    ([t.to(torch.int32) for t in args()], {}, TypeError, "q has dtype torch.int32"),
    (replace(args(), 0, torch.randn(B, H, N, 8)), {"backend": "triton"}, ValueError, "k must have the shape of q"),
    ([torch.randn(B, H, N, 8) for _ in range(3)] + [torch.randn(H, P, 8)] * 2, {"backend": "triton"}, ValueError,
     "head_dim (last dim of q) must be in 16..128"),
    ([torch.randn(B, H, N, 160) for _ in range(3)] + [torch.randn(H, P, 160)] * 2, {"backend": "triton"},
     ValueError, "head_dim (last dim of q) must be in 16..128"),
    (args(), {"key_padding_mask": torch.ones(B, N)}, TypeError, "key_padding_mask must be a bool tensor"),
    (args(), {"key_padding_mask": torch.ones(B, N + 1, dtype=torch.bool)}, ValueError, "key_padding_mask must be [B, N]"),
    (args(), {"key_padding_mask": [[True] * N] * B}, TypeError, "key_padding_mask must be a torch.Tensor"),
    (bank(), {}, ValueError, "task_ids ([B] int64) is required"),
    (bank(), {"task_ids": torch.tensor([0, 3])}, ValueError, "task_ids must lie in [0, 3)"),
    (bank(), {"task_ids": torch.tensor([-1, 0])}, ValueError, "task_ids must lie in [0, 3)"),
    (bank(), {"task_ids": torch.tensor([0.0, 1.0])}, TypeError, "task_ids must be an int64"),
    (bank(), {"task_ids": torch.tensor([0, 1, 2])}, ValueError, "task_ids must be [B]"),
    (args(), {"task_ids": torch.tensor([0, 1])}, ValueError, "task_ids was given but prefix_k is a single prefix"),
    (args(), {"dropout_p": 1.0}, ValueError, "dropout_p must be in [0, 1)"),
    (args(), {"dropout_p": -0.1}, ValueError, "dropout_p must be in [0, 1)"),
    (args(), {"prefix_dropout_p": 1.5}, ValueError, "prefix_dropout_p must be in [0, 1)"),
    (args(), {"dropout_p": "0.1"}, TypeError, "dropout_p must be a float"),
    (args(), {"scale": 0.0}, ValueError, "scale must be a finite positive number"),
    (args(), {"scale": float("nan")}, ValueError, "scale must be a finite positive number"),
    (args(), {"backend": "flash"}, ValueError, "backend must be one of"),
    (args(), {"backend": "cuda"}, ValueError, "backend='cuda' needs CUDA tensors"),
    ([torch.randn(0, H, N, D) for _ in range(3)] + args()[3:], {}, ValueError, "q must have non-empty"),
    (args(), {"attn_bias": torch.randn(B, H, N, N + 1)}, ValueError, "attn_bias must be [B, H, N, N]"),
    (args(), {"attn_bias": torch.ones(B, H, N, N, dtype=torch.int32)}, TypeError, "attn_bias must be a floating"),
    (args(), {"attn_bias": 0.5}, TypeError, "attn_bias must be a torch.Tensor"),
]


@pytest.mark.parametrize("tensors,kwargs,error,words", CASES, ids=[c[3][:40] for c in CASES])
def test_bad_input(tensors, kwargs, error, words):
    if kwargs.get("backend") == "cuda" and DEVICE.type == "cuda":
        pytest.skip("CUDA tensors are valid input for backend='cuda'")

    def on_device(x):
        return x.to(DEVICE) if isinstance(x, torch.Tensor) else x

    with pytest.raises(error) as info:
        prefix_attention(*map(on_device, tensors), **{k: on_device(v) for k, v in kwargs.items()})
    assert words in str(info.value)


def test_mixed_devices_named():
    tensors = args()
    tensors[3] = tensors[3].to("meta")
    with pytest.raises(ValueError, match="prefix_k is on meta but q is on cpu"):
        prefix_attention(*tensors)
