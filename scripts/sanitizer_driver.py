"""A few forward+backward calls of the fused kernels, small enough for compute-sanitizer: odd N,
P = 0, padding, a bank, dropout, the deterministic reduction, fp16/bf16/fp32, head_dim 24..128, and on
Triton DeBERTa's c2p/p2c (spans shorter and longer than N).

    python scripts/sanitizer_driver.py triton|cuda
"""

import sys

import torch

from ptv2_kernels import DisentangledBias, prefix_attention

CASES = [
    # batch, heads, seq, prefix, dim, tasks, dtype
    (2, 2, 37, 20, 64, None, torch.float16),
    (2, 2, 70, 0, 64, None, torch.bfloat16),
    (3, 2, 129, 65, 128, 3, torch.bfloat16),
    (2, 3, 9, 45, 32, None, torch.float32),
    (2, 1, 33, 7, 24, 2, torch.float16),
]

backend = sys.argv[1]
for batch, heads, seq, num_prefix, dim, tasks, dtype in CASES:
    q, k, v = (torch.randn(batch, heads, seq, dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    bank = () if tasks is None else (tasks,)
    pk, pv = (torch.randn(*bank, heads, num_prefix, dim, device="cuda", dtype=dtype, requires_grad=True)
              for _ in range(2))
    mask = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
    mask[0, seq // 2:] = False
    task_ids = None if tasks is None else torch.arange(batch, device="cuda") % tasks
    for deterministic in (False, True):
        out = prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, task_ids=task_ids, dropout_p=0.1,
                               prefix_dropout_p=0.1, backend=backend, deterministic=deterministic)
        out.sum().backward()
    if backend == "triton":
        positions = torch.arange(seq, device="cuda")
        for span in (4, 2 * seq):
            pos_key, pos_query = (torch.randn(heads, 2 * span, dim, device="cuda", dtype=dtype, requires_grad=True)
                                  for _ in range(2))
            bias = DisentangledBias.from_relative_positions(positions[:, None] - positions[None, :], span, pos_key,
                                                            pos_query)
            out = prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, task_ids=task_ids, dropout_p=0.1,
                                   disentangled_bias=bias, backend=backend)
            out.sum().backward()
torch.cuda.synchronize()
print(f"sanitizer driver ({backend}): all cases ran")
