"""DeBERTa's disentangled relative-position terms (c2p, p2c) as an input of :func:`prefix_attention`.

For query ``i`` and sequence column ``j`` of head ``h`` (prefix columns get nothing), inside the score
scale::

    score[i, P + j] = scale * (q_i . k_j  +  q_i . pos_key[h, c2p_index[i - j + N - 1]]
                                          +  k_j . pos_query[h, p2c_index[i - j + N - 1]])

``pos_key``/``pos_query`` are the projected relative embeddings ``[H, R, D]`` (either may be None) and the
index tables map a distance ``i - j`` to an embedding row. This is transformers' ``disentangled_att_bias``
(v1) / ``disentangled_attention_bias`` (v2/v3) for relative positions that depend on ``i - j`` only: both
divide c2p and p2c by the content score's ``sqrt(D * scale_factor)``, so one ``scale`` covers all three.
The fused Triton kernels gather the terms per tile from these ``[H, R, D]`` tensors (no ``[B, H, N, N]``
tensor), the fused CPU kernel from distance tables (``cpu_backend.relative_tables``); :func:`bias_matrix`
materialises them for ``backend="torch-ref"`` and Triton's deterministic reductions.
The checks against q live with the op's others (``ops/validation.py: check_disentangled``).
"""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class DisentangledBias:
    """c2p/p2c of one attention call: ``pos_key`` (c2p) and ``pos_query`` (p2c) ``[H, R, D]`` in q's dtype
    (differentiable), ``index`` int32 ``[2, 2N - 1]``: row 0 maps ``i - j + N - 1`` to a ``pos_key`` row,
    row 1 to a ``pos_query`` row. ``rows``: an upper bound of ``index`` known when it was built (then the
    call checks ``R >= rows`` instead of reading the index back from the device). Build it with
    :meth:`from_relative_positions`."""

    pos_key: Optional[torch.Tensor]
    pos_query: Optional[torch.Tensor]
    index: torch.Tensor
    rows: Optional[int] = None

    @staticmethod
    def from_relative_positions(relative_pos: torch.Tensor, span: int, pos_key: Optional[torch.Tensor] = None,
                                pos_query: Optional[torch.Tensor] = None) -> "DisentangledBias":
        """From transformers' relative positions ``[N, N]`` (or ``[1, N, N]``; ``rel[i, j]`` a function of
        ``i - j``: plain distances or log buckets) and the attention span: c2p reads row
        ``clamp(rel[i, j] + span, 0, 2 span - 1)``, p2c row ``clamp(-rel[j, i] + span, 0, 2 span - 1)``,
        exactly as transformers gathers them. The embeddings are checked against q when the op is
        called (``ptv2_kernels.ops.validation.check_disentangled``)."""
        if not isinstance(relative_pos, torch.Tensor):
            raise TypeError(f"relative_pos must be a torch.Tensor, got {type(relative_pos).__name__}")
        if relative_pos.is_floating_point() or relative_pos.is_complex() or relative_pos.dtype == torch.bool:
            raise TypeError(f"relative_pos must be an integer tensor, got dtype {relative_pos.dtype}")
        if not isinstance(span, int) or isinstance(span, bool):
            raise TypeError(f"span must be an int, got {type(span).__name__}")
        if span < 1:
            raise ValueError(f"span must be >= 1, got {span}")
        shape = tuple(relative_pos.shape)
        if len(shape) not in (2, 3) or shape[-1] != shape[-2] or shape[-1] == 0 or (len(shape) == 3 and shape[0] != 1):
            raise ValueError(f"relative_pos must be [N, N] or [1, N, N] with N >= 1, got shape {shape}")
        rel = relative_pos.reshape(shape[-2:])
        seq = rel.shape[0]
        # rel_of_distance[d + N - 1] = rel[i, j] for i - j = d: first row (d <= 0) then first column (d >= 0)
        rel_of_distance = torch.cat([rel[0].flip(0)[:-1], rel[:, 0]]).long()
        distance = torch.arange(seq, device=rel.device)
        toeplitz = rel_of_distance[distance[:, None] - distance[None, :] + seq - 1]
        message = "relative_pos must depend on i - j only (transformers' build_relative_position)"
        if torch.compiler.is_compiling():  # a traced graph cannot read the answer back: asserted where it runs
            torch._assert_async((toeplitz == rel.long()).all(), message)
        elif not torch.equal(toeplitz, rel.long()):
            raise ValueError(message)
        c2p = (rel_of_distance + span).clamp(0, 2 * span - 1)
        p2c = (span - rel_of_distance.flip(0)).clamp(0, 2 * span - 1)  # -rel[j, i]: distance j - i = -(i - j)
        return DisentangledBias(pos_key, pos_query, torch.stack([c2p, p2c]).to(torch.int32), 2 * span)

    def with_embeddings(self, pos_key: Optional[torch.Tensor],
                        pos_query: Optional[torch.Tensor]) -> "DisentangledBias":
        """The same index tables over other embeddings (e.g. each layer's)."""
        return DisentangledBias(pos_key, pos_query, self.index, self.rows)

    @property
    def tensors(self) -> tuple:
        """``(pos_key, pos_query, index)``, the autograd inputs of the backends."""
        return self.pos_key, self.pos_query, self.index


def bias_matrix(q: torch.Tensor, k: torch.Tensor, bias: DisentangledBias, scale: float) -> torch.Tensor:
    """``scale * (c2p + p2c)`` ``[B, H, N, N]`` for :func:`prefix_attention`'s ``attn_bias`` (differentiable;
    the torch backend's path and the fused backends' deterministic one)."""
    seq = q.shape[2]
    distance = torch.arange(seq, device=q.device)
    slot = distance[:, None] - distance[None, :] + seq - 1  # [i, j] -> i - j + N - 1
    index = bias.index.long()
    out = 0
    if bias.pos_key is not None:  # c2p[i, j] = (q_i . pos_key)[index0[i - j]]
        scores = torch.matmul(q, bias.pos_key.transpose(-1, -2))
        out = out + scores.gather(-1, index[0][slot].expand(*scores.shape[:2], seq, seq))
    if bias.pos_query is not None:  # p2c[i, j] = (k_j . pos_query)[index1[i - j]]
        scores = torch.matmul(k, bias.pos_query.transpose(-1, -2))
        out = out + scores.gather(-1, index[1][slot].T.expand(*scores.shape[:2], seq, seq)).transpose(-1, -2)
    return out * scale
