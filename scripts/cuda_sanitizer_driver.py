"""A few forward+backward calls of the CUDA backend's kernels, small enough for compute-sanitizer:
odd N, P = 0, padding, a bank, dropout, the deterministic reduction, fp16/bf16/fp32, head_dim 32..128."""

import math

import torch

from ptv2_kernels.ops.common import Dropout, Options
from ptv2_kernels.ops.cuda_backend import CudaPrefixAttention

CASES = [
    # batch, heads, seq, prefix, dim, tasks, dtype
    (2, 2, 37, 20, 64, None, torch.float16),
    (2, 2, 70, 0, 64, None, torch.bfloat16),
    (3, 2, 129, 65, 128, 3, torch.bfloat16),
    (2, 3, 9, 45, 32, None, torch.float32),
    (2, 1, 33, 7, 24, 2, torch.float16),
]

for batch, heads, seq, num_prefix, dim, tasks, dtype in CASES:
    q, k, v = (torch.randn(batch, heads, seq, dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    pk, pv = (torch.randn(tasks or 1, heads, num_prefix, dim, device="cuda", dtype=dtype, requires_grad=True)
              for _ in range(2))
    mask = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
    mask[0, seq // 2:] = False
    task_ids = None if tasks is None else torch.arange(batch, device="cuda") % tasks
    for deterministic in (False, True):
        options = Options(scale=1 / math.sqrt(dim), dropout=Dropout(0.1, 0.1, 1234), deterministic=deterministic)
        out = CudaPrefixAttention.apply(q, k, v, pk, pv, mask, task_ids, options)
        out.sum().backward()
torch.cuda.synchronize()
print("cuda sanitizer driver: all cases ran")
