"""Triton kernels for fused prefix attention (SPEC §1).

Every kernel reads the prefix keys/values straight from the compact buffer ``[T, H, P, D]`` (T = 1
for a single prefix, the bank size otherwise; row ``b`` uses task ``task_ids[b]``) and never expands
or concatenates it. Columns ``0 .. P-1`` of the attention are the prefix, ``P .. P+N-1`` the sequence.

Layouts
- q, k, v, out, d_out, dq, dk, dv: ``[B, H, N, D]`` with arbitrary batch/head/sequence strides and a
  unit last stride (so views of transformers' ``[B, N, H, D]`` tensors are read in place). With VARLEN
  they are packed ``[total_tokens, H, D]`` (batch stride 0): row ``b`` is tokens ``cu_seqlens[b] ..
  cu_seqlens[b+1]-1`` and N is the longest row.
- prefix_k, prefix_v: contiguous ``[T, H, P, D]``; their gradients: float32 ``[T, H, P, D]``.
- key padding mask: contiguous ``[B, N]`` uint8 (1 = real token).
- lse, delta: float32 ``[B, H, N]``; ``lse`` is the row log-sum-exp in base 2 of the scaled scores,
  ``+inf`` for a row with no visible column (its output is 0 and it contributes no gradient).
- attention bias (optional): ``[B, H, N, N]`` with any strides (0 for broadcast dimensions), added to
  the scaled scores of the sequence columns only (prefix columns get none); its gradient: contiguous
  ``[B, H, N, N]``.
- disentangled relative terms (optional, DeBERTa's c2p/p2c): ``PosK``/``PosQ`` contiguous ``[H, R, D]``
  and ``RelIndex`` int32 ``[2, 2N - 1]``; for query ``i`` and sequence column ``j`` the unscaled score gains
  ``q_i . PosK[h, RelIndex[0, i - j + N - 1]]`` (HAS_C2P) and ``k_j . PosQ[h, RelIndex[1, i - j + N - 1]]``
  (HAS_P2C). A tile of BLOCK_M rows and BLOCK_N columns spans BLOCK_M + BLOCK_N - 1 distances: the kernels
  multiply the tile's rows with that window of embeddings and gather each score's diagonal (window slot
  ``w = m - n + BLOCK_N - 1``). Their gradients are float32 ``[H, 2N - 1, D]`` per *distance* (atomics:
  the slots of one tile are distinct), folded into ``[H, R, D]`` by the host.

Dropout RNG contract (shared with the CUDA backend; one 64-bit ``seed`` per call): a Philox4x32-10
draw with key ``(seed & 0xffffffff, seed >> 32)`` and counter ``(c0, c1, c2, c3)``; the first output
word ``r`` keeps the element iff ``(r >> 8) >= round(p * 2**24)``, and kept values are scaled by
``1 / (1 - p)``.
- attention probability of row ``b``, head ``h``, query ``i``, column ``c``: counter ``(c, i, b*H + h, 0)``
- prefix key element ``(b, h, j, d)``: counter ``(d, j, b*H + h, 1)``; prefix value element: ``(d, j, b*H + h, 2)``
"""

import triton
import triton.language as tl

ATTN_STREAM = tl.constexpr(0)
PREFIX_K_STREAM = tl.constexpr(1)
PREFIX_V_STREAM = tl.constexpr(2)
LOG2_E = tl.constexpr(1.4426950408889634)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b with float32 accumulation; DOT_FP32 computes in exact float32 (fp32 inputs, and bf16
    under the interpreter, whose bf16 ``tl.dot`` is broken)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _keep(seed, c0, c1, bh, stream: tl.constexpr, threshold):
    """Dropout keep-mask of the RNG contract for broadcastable non-negative int counters ``c0``, ``c1``
    and the scalar ``bh`` (= b*H + h)."""
    c0, c1 = tl.broadcast(c0, c1)
    c0 = c0.to(tl.uint32)
    c1 = c1.to(tl.uint32)
    zero = c0 * 0
    r, _, _, _ = tl.random.philox(seed, c0, c1, zero + bh.to(tl.uint32), zero + stream)
    return (r >> 8).to(tl.int32) >= threshold


@triton.jit
def _load_rows(ptr, rows, n_rows, stride_row, offs_d, D):
    """Load a ``[len(rows), BLOCK_D]`` tile whose rows are ``stride_row`` apart; zero outside."""
    mask = (rows[:, None] < n_rows) & (offs_d[None, :] < D)
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride_row + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _load_prefix_tile(PK, PV, task, h, bh, offs_p, offs_d, H, P, D, seed, prefix_threshold, prefix_scale,
                      PREFIX_DROPOUT: tl.constexpr):
    """The prefix keys/values of rows ``offs_p`` for task ``task``, head ``h``, with batch row ``bh``'s
    prefix-dropout mask applied (scaled by 1/(1-p)). Returns (keys, values, key keep, value keep)."""
    base = (task.to(tl.int64) * H + h) * P * D
    pk = _load_rows(PK + base, offs_p, P, D, offs_d, D)
    pv = _load_rows(PV + base, offs_p, P, D, offs_d, D)
    keep_k = offs_p[:, None] >= 0
    keep_v = keep_k
    if PREFIX_DROPOUT:
        keep_k = _keep(seed, offs_d[None, :], offs_p[:, None], bh, PREFIX_K_STREAM, prefix_threshold)
        keep_v = _keep(seed, offs_d[None, :], offs_p[:, None], bh, PREFIX_V_STREAM, prefix_threshold)
        pk = tl.where(keep_k, pk * prefix_scale, 0.0).to(pk.dtype)
        pv = tl.where(keep_v, pv * prefix_scale, 0.0).to(pv.dtype)
    return pk, pv, keep_k, keep_v


@triton.jit
def _batch_row(bh, H, N, TaskIds, CuSeqlens, HAS_TASKS: tl.constexpr, VARLEN: tl.constexpr):
    """Of program row ``bh = b*H + h``: (b, h, first token as int64, length, task). The tokens are a
    slice of the packed sequence with VARLEN, else the whole padded row (offset 0, length N)."""
    b = bh // H
    h = bh % H
    task = tl.load(TaskIds + b) if HAS_TASKS else b * 0
    if VARLEN:
        first = tl.load(CuSeqlens + b).to(tl.int64)
        return b, h, first, (tl.load(CuSeqlens + b + 1) - first).to(tl.int32), task
    else:
        return b, h, b.to(tl.int64) * 0, N, task


@triton.jit
def _load_bias(Bias, b, h, rows, cols, N, stride_bb, stride_bh, stride_bm, stride_bn, HAS_BIAS: tl.constexpr):
    """Bias of query ``rows`` and sequence columns ``cols`` (broadcastable index tensors, so both
    orientations work), in base-2 units; 0 outside the sequence or without a bias."""
    if HAS_BIAS:
        ptrs = Bias + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh + rows.to(tl.int64) * stride_bm + cols * stride_bn
        return tl.load(ptrs, mask=(rows < N) & (cols < N), other=0.0).to(tl.float32) * LOG2_E
    else:
        return 0.0


@triton.jit
def _window_rows(Pos, RelIndex, TABLE: tl.constexpr, h, dist0, N, R, offs_d, D, WINDOW: tl.constexpr):
    """Relative embeddings ``[WINDOW, BLOCK_D]`` of head ``h`` for the distances ``dist0 + w``, through
    index table ``TABLE`` (0: c2p, 1: p2c); also each slot's distance-table position and whether it is in
    the table (zero rows outside)."""
    slots = dist0 + tl.arange(0, WINDOW) + N - 1
    ok = (slots >= 0) & (slots < 2 * N - 1)
    rows = tl.load(RelIndex + TABLE * (2 * N - 1) + slots, mask=ok, other=0)
    ptrs = Pos + (h.to(tl.int64) * R + rows)[:, None] * D + offs_d[None, :]
    return tl.load(ptrs, mask=ok[:, None] & (offs_d[None, :] < D), other=0.0), slots, ok


@triton.jit
def _rel_scores(q, k, PosK, PosQ, RelIndex, h, i0, j0, N, R, offs_d, D,
                HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, DOT_FP32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Unscaled c2p + p2c ``[BLOCK_M, BLOCK_N]`` of query rows ``i0 + m`` (``q``) and sequence columns
    ``j0 + n`` (``k``): window products ``q @ PosK_w^T`` / ``k @ PosQ_w^T`` gathered at slot
    ``m - n + BLOCK_N - 1``."""
    slot = tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :] + (BLOCK_N - 1)
    dist0 = i0 - j0 - (BLOCK_N - 1)
    rel = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if HAS_C2P:
        emb, _, _ = _window_rows(PosK, RelIndex, 0, h, dist0, N, R, offs_d, D, BLOCK_M + BLOCK_N)
        rel += tl.gather(_dot(q, tl.trans(emb), DOT_FP32), slot, axis=1)
    if HAS_P2C:
        emb, _, _ = _window_rows(PosQ, RelIndex, 1, h, dist0, N, R, offs_d, D, BLOCK_M + BLOCK_N)
        rel += tl.trans(tl.gather(_dot(k, tl.trans(emb), DOT_FP32), tl.trans(slot), axis=1))
    return rel


@triton.jit
def _rel_grad(ds, x, Pos, DPos, RelIndex, TABLE: tl.constexpr, h, dist0, N, R, offs_d, D, EMB_GRAD: tl.constexpr,
              DOT_FP32: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_N: tl.constexpr,
              WINDOW: tl.constexpr):
    """Backward of one relative term of a tile. TABLE 0 (c2p): ``ds`` ``[BLOCK_M, BLOCK_N]`` and ``x = q``;
    TABLE 1 (p2c): ``ds`` transposed ``[BLOCK_N, BLOCK_M]`` and ``x = k``. The score gradient is moved to
    window slots (``dsw[a, w]``, zero where no score has that slot), with EMB_GRAD its product with ``x`` is
    added to the per-distance ``DPos`` with atomics, and ``dsw @ embeddings`` (x's gradient, unscaled) is
    returned."""
    a = tl.arange(0, ROWS)[:, None]
    w = tl.arange(0, WINDOW)[None, :]
    if TABLE == 0:
        col = a - w + (BLOCK_N - 1)  # c2p: slot w of query row m is column n = m + BLOCK_N - 1 - w
    else:
        col = a + w - (BLOCK_N - 1)  # p2c: slot w of key column n is row m = w + n - BLOCK_N + 1
    ok = (col >= 0) & (col < COLS)
    dsw = tl.where(ok, tl.gather(ds, tl.where(ok, col, 0), axis=1), 0.0)
    emb, slots, slot_ok = _window_rows(Pos, RelIndex, TABLE, h, dist0, N, R, offs_d, D, WINDOW)
    if EMB_GRAD:  # off for frozen relative embeddings (prefix tuning of a frozen backbone)
        d_emb = _dot(tl.trans(dsw).to(x.dtype), x, DOT_FP32)
        ptrs = DPos + (h.to(tl.int64) * (2 * N - 1) + slots)[:, None] * D + offs_d[None, :]
        tl.atomic_add(ptrs, d_emb, mask=slot_ok[:, None] & (offs_d[None, :] < D))
    return _dot(dsw.to(emb.dtype), emb, DOT_FP32)


@triton.jit
def _sequence_bias(Bias, PosK, PosQ, RelIndex, q, k, b, h, i0, j0, N, R, offs_d, D,
                   stride_bb, stride_bh, stride_bm, stride_bn, scale_log2,
                   HAS_BIAS: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, DOT_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Base-2 score bias ``[BLOCK_M, BLOCK_N]`` of query rows ``i0 + m`` (tile ``q``) and sequence columns
    ``j0 + n`` (tile ``k``): the attention bias plus the scaled c2p/p2c terms (0 without either)."""
    rows = i0 + tl.arange(0, BLOCK_M)
    cols = j0 + tl.arange(0, BLOCK_N)
    bias = _load_bias(Bias, b, h, rows[:, None], cols[None, :], N, stride_bb, stride_bh, stride_bm, stride_bn,
                      HAS_BIAS)
    if HAS_C2P or HAS_P2C:
        bias = bias + _rel_scores(q, k, PosK, PosQ, RelIndex, h, i0, j0, N, R, offs_d, D, HAS_C2P, HAS_P2C,
                                  DOT_FP32, BLOCK_M, BLOCK_N) * scale_log2
    return bias


@triton.jit
def _column_valid(Mask, b, offs_n, n, N, HAS_MASK: tl.constexpr):
    """Which sequence columns ``offs_n`` of batch row ``b`` (length ``n``, mask row stride ``N``) are
    real: in range and not padding."""
    valid = offs_n < n
    if HAS_MASK:
        valid &= tl.load(Mask + b.to(tl.int64) * N + offs_n, mask=offs_n < n, other=0) != 0
    return valid


@triton.jit
def _fwd_block(q, k, v, bias, col_valid, cols, rows, bh, m_i, l_i, acc, scale_log2, seed, threshold, drop_scale,
               ATTN_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr):
    """One online-softmax step of the forward over a tile of columns (prefix or sequence); ``bias`` is
    the base-2 score bias of the tile (0 for the prefix)."""
    s = _dot(q, tl.trans(k), DOT_FP32) * scale_log2 + bias
    s = tl.where(col_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if ATTN_DROPOUT:
        keep = _keep(seed, cols[None, :], rows[:, None], bh, ATTN_STREAM, threshold)
        p = tl.where(keep, p * drop_scale, 0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
    return m_new, l_i, acc


@triton.jit
def prefix_attention_fwd_kernel(
    Q, K, V, PK, PV, TaskIds, Mask, Bias, PosK, PosQ, RelIndex, CuSeqlens, Out, Lse,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, N, P, D, R, scale_log2, seed, threshold, drop_scale, prefix_threshold, prefix_scale,
    HAS_MASK: tl.constexpr, HAS_TASKS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_C2P: tl.constexpr,
    HAS_P2C: tl.constexpr, VARLEN: tl.constexpr,
    ATTN_DROPOUT: tl.constexpr, PREFIX_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), B*H): one query tile against the prefix tiles, then the sequence tiles."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, tok0, n, task = _batch_row(bh, H, N, TaskIds, CuSeqlens, HAS_TASKS, VARLEN)
    if pid_m * BLOCK_M >= n:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + tok0 * stride_qn + h * stride_qh, rows, n, stride_qn, offs_d, D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, P, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        pk, pv, _, _ = _load_prefix_tile(PK, PV, task, h, bh, cols, offs_d, H, P, D, seed, prefix_threshold,
                                         prefix_scale, PREFIX_DROPOUT)
        m_i, l_i, acc = _fwd_block(q, pk, pv, 0.0, cols < P, cols, rows, bh, m_i, l_i, acc, scale_log2, seed,
                                   threshold, drop_scale, ATTN_DROPOUT, DOT_FP32)
    k_base = K + b.to(tl.int64) * stride_kb + tok0 * stride_kn + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + tok0 * stride_vn + h * stride_vh
    for start in range(0, n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, n, stride_kn, offs_d, D)
        v = _load_rows(v_base, offs_n, n, stride_vn, offs_d, D)
        valid = _column_valid(Mask, b, offs_n, n, N, HAS_MASK)
        bias = _sequence_bias(Bias, PosK, PosQ, RelIndex, q, k, b, h, pid_m * BLOCK_M, start, N, R, offs_d, D,
                              stride_bb, stride_bh, stride_bm, stride_bn, scale_log2,
                              HAS_BIAS, HAS_C2P, HAS_P2C, DOT_FP32, BLOCK_M, BLOCK_N)
        m_i, l_i, acc = _fwd_block(q, k, v, bias, valid, P + offs_n, rows, bh, m_i, l_i, acc, scale_log2, seed,
                                   threshold, drop_scale, ATTN_DROPOUT, DOT_FP32)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    row_ok = rows < n
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + h * stride_oh + (tok0 + rows[:, None]) * stride_on
              + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    tl.store(Lse + bh.to(tl.int64) * N + rows, lse, mask=row_ok)


@triton.jit
def prefix_attention_bwd_preprocess_kernel(
    Out, DOut, Delta, CuSeqlens, stride_ob, stride_oh, stride_on, stride_gb, stride_gh, stride_gn,
    H, N, D, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d out * d_out (the softmax-backward row term; unchanged by dropout)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, tok0, n, _ = _batch_row(bh, H, N, CuSeqlens, CuSeqlens, False, VARLEN)  # no task needed
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out + b.to(tl.int64) * stride_ob + tok0 * stride_on + h * stride_oh, rows, n, stride_on, offs_d, D)
    do = _load_rows(DOut + b.to(tl.int64) * stride_gb + tok0 * stride_gn + h * stride_gh, rows, n, stride_gn, offs_d,
                    D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * N + rows, delta, mask=rows < n)


@triton.jit
def _ds_block(q, do, k, v, bias, lse, delta, col_valid, cols, rows, bh, scale_log2, seed, threshold, drop_scale,
              ATTN_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr):
    """Score gradient ``[BLOCK_M, BLOCK_N]`` (of the scaled scores) of one tile of columns."""
    s = _dot(q, tl.trans(k), DOT_FP32) * scale_log2 + bias
    p = tl.where(col_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), DOT_FP32)
    if ATTN_DROPOUT:
        keep = _keep(seed, cols[None, :], rows[:, None], bh, ATTN_STREAM, threshold)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    return p * (dp - delta[:, None])


@triton.jit
def prefix_attention_bwd_dq_kernel(
    Q, K, V, PK, PV, TaskIds, Mask, Bias, PosK, PosQ, RelIndex, CuSeqlens, DOut, Lse, Delta, DQ, DPosK,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_gb, stride_gh, stride_gn,
    stride_dqb, stride_dqh, stride_dqn, stride_bb, stride_bh, stride_bm, stride_bn,
    H, N, P, D, R, scale, scale_log2, seed, threshold, drop_scale, prefix_threshold, prefix_scale,
    HAS_MASK: tl.constexpr, HAS_TASKS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_C2P: tl.constexpr,
    HAS_P2C: tl.constexpr, C2P_GRAD: tl.constexpr, VARLEN: tl.constexpr,
    ATTN_DROPOUT: tl.constexpr, PREFIX_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), B*H): dq of one query tile, over the prefix tiles then the sequence tiles;
    with C2P_GRAD also the tile's share of the c2p embeddings' gradient (per distance, unscaled, in DPosK)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, tok0, n, task = _batch_row(bh, H, N, TaskIds, CuSeqlens, HAS_TASKS, VARLEN)
    if pid_m * BLOCK_M >= n:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + tok0 * stride_qn + h * stride_qh, rows, n, stride_qn, offs_d, D)
    do = _load_rows(DOut + b.to(tl.int64) * stride_gb + tok0 * stride_gn + h * stride_gh, rows, n, stride_gn, offs_d,
                    D)
    lse = tl.load(Lse + bh.to(tl.int64) * N + rows, mask=rows < n, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * N + rows, mask=rows < n, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, P, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        pk, pv, _, _ = _load_prefix_tile(PK, PV, task, h, bh, cols, offs_d, H, P, D, seed, prefix_threshold,
                                         prefix_scale, PREFIX_DROPOUT)
        ds = _ds_block(q, do, pk, pv, 0.0, lse, delta, cols < P, cols, rows, bh, scale_log2, seed, threshold,
                       drop_scale, ATTN_DROPOUT, DOT_FP32)
        dq += _dot(ds.to(pk.dtype), pk, DOT_FP32)
    k_base = K + b.to(tl.int64) * stride_kb + tok0 * stride_kn + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + tok0 * stride_vn + h * stride_vh
    for start in range(0, n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, n, stride_kn, offs_d, D)
        v = _load_rows(v_base, offs_n, n, stride_vn, offs_d, D)
        valid = _column_valid(Mask, b, offs_n, n, N, HAS_MASK)
        bias = _sequence_bias(Bias, PosK, PosQ, RelIndex, q, k, b, h, pid_m * BLOCK_M, start, N, R, offs_d, D,
                              stride_bb, stride_bh, stride_bm, stride_bn, scale_log2,
                              HAS_BIAS, HAS_C2P, HAS_P2C, DOT_FP32, BLOCK_M, BLOCK_N)
        ds = _ds_block(q, do, k, v, bias, lse, delta, valid, P + offs_n, rows, bh, scale_log2, seed, threshold,
                       drop_scale, ATTN_DROPOUT, DOT_FP32)
        dq += _dot(ds.to(k.dtype), k, DOT_FP32)
        if HAS_C2P:
            dq += _rel_grad(ds, q, PosK, DPosK, RelIndex, 0, h, pid_m * BLOCK_M - start - (BLOCK_N - 1), N, R,
                            offs_d, D, C2P_GRAD, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_N, BLOCK_M + BLOCK_N)

    dq_ptrs = (DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh + (tok0 + rows[:, None]) * stride_dqn
               + offs_d[None, :])
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=(rows[:, None] < n) & (offs_d[None, :] < D))


@triton.jit
def _dkdv_tile(Q, DOut, Lse, Delta, Bias, DBias, PosK, PosQ, RelIndex, DPosQ, b, h, bh, tok0, n, k, v, col_valid, cols,
               seq_cols, seq0, stride_qb, stride_qh, stride_qn, stride_gb, stride_gh, stride_gn,
               stride_bb, stride_bh, stride_bm, stride_bn,
               N, D, R, scale_log2, seed, threshold, drop_scale,
               HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr,
               P2C_GRAD: tl.constexpr, ATTN_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk (before the softmax scale) and dv of one tile of columns of batch row ``b``, head ``h``, summed
    over all query tiles (the row's ``n`` queries start at token ``tok0``; ``N`` is the lse/bias row
    stride); ``[BLOCK_N, *]`` (transposed) orientation. ``cols`` index the joint columns
    (dropout counters), ``seq_cols`` the sequence (bias; only read with HAS_BIAS). With BIAS_GRAD the
    score gradient of the tile is the bias gradient and is written to ``DBias``. With HAS_C2P/HAS_P2C the
    sequence tile starting at column ``seq0`` has the relative terms; with P2C_GRAD its share of the p2c
    embeddings' gradient goes to ``DPosQ`` (per distance, unscaled)."""
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b.to(tl.int64) * stride_qb + tok0 * stride_qn + h * stride_qh
    do_base = DOut + b.to(tl.int64) * stride_gb + tok0 * stride_gn + h * stride_gh
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, n, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, rows, n, stride_qn, offs_d, D)
        do = _load_rows(do_base, rows, n, stride_gn, offs_d, D)
        lse = tl.load(Lse + bh.to(tl.int64) * N + rows, mask=rows < n, other=float("inf"))
        delta = tl.load(Delta + bh.to(tl.int64) * N + rows, mask=rows < n, other=0.0)
        bias_t = _load_bias(Bias, b, h, rows[None, :], seq_cols[:, None], N, stride_bb, stride_bh, stride_bm,
                            stride_bn, HAS_BIAS)
        if HAS_C2P or HAS_P2C:
            rel = _rel_scores(q, k, PosK, PosQ, RelIndex, h, start, seq0, N, R, offs_d, D, HAS_C2P,
                              HAS_P2C, DOT_FP32, BLOCK_M, BLOCK_N)
            bias_t = bias_t + tl.trans(rel) * scale_log2
        s_t = _dot(k, tl.trans(q), DOT_FP32) * scale_log2 + bias_t
        p_t = tl.where(col_valid[:, None], tl.exp2(s_t - lse[None, :]), 0.0)
        dp_t = _dot(v, tl.trans(do), DOT_FP32)
        pd_t = p_t
        if ATTN_DROPOUT:
            keep = _keep(seed, cols[:, None], rows[None, :], bh, ATTN_STREAM, threshold)
            pd_t = tl.where(keep, p_t * drop_scale, 0.0)
            dp_t = tl.where(keep, dp_t * drop_scale, 0.0)
        dv += _dot(pd_t.to(do.dtype), do, DOT_FP32)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, DOT_FP32)
        if HAS_P2C:
            dk += _rel_grad(ds_t, k, PosQ, DPosQ, RelIndex, 1, h, start - seq0 - (BLOCK_N - 1), N, R,
                            offs_d, D, P2C_GRAD, DOT_FP32, BLOCK_N, BLOCK_M, BLOCK_N, BLOCK_M + BLOCK_N)
        if BIAS_GRAD:
            ptrs = DBias + (bh.to(tl.int64) * N + rows[None, :]) * N + seq_cols[:, None]
            tl.store(ptrs, ds_t.to(DBias.dtype.element_ty), mask=(rows[None, :] < N) & (seq_cols[:, None] < N))
    return dk, dv


@triton.jit
def prefix_attention_bwd_dkdv_kernel(
    Q, K, V, PK, PV, TaskIds, Mask, Bias, PosK, PosQ, RelIndex, CuSeqlens, DOut, Lse, Delta, DK, DV, DPK, DPV, DBias,
    DPosQ,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_gb, stride_gh, stride_gn,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    B, H, N, P, D, R, scale, scale_log2, seed, threshold, drop_scale, prefix_threshold, prefix_scale,
    PREFIX_BLOCKS,
    HAS_MASK: tl.constexpr, HAS_TASKS: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, P2C_GRAD: tl.constexpr,
    VARLEN: tl.constexpr, ATTN_DROPOUT: tl.constexpr,
    PREFIX_DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Key/value gradients, one program per column tile.

    Grid (PREFIX_BLOCKS + cdiv(N, BLOCK_N), B*H). Program ``j < PREFIX_BLOCKS`` handles prefix tile ``j``
    and adds its (prefix-dropout-masked) gradient to the float32 ``DPK``/``DPV`` of its row's task with
    atomics; the others write dk, dv of a sequence tile. With DETERMINISTIC the prefix programs instead
    run on grid axis 1 = H only (launched separately, PREFIX_BLOCKS programs on axis 0) and each sums
    over the batch rows in order, so the reduction is bitwise reproducible.
    """
    pid_n = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    if pid_n < PREFIX_BLOCKS:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_valid = cols < P
        if DETERMINISTIC:
            h = tl.program_id(1)
            b_first = 0
            b_last = B
        else:
            h = tl.program_id(1) % H
            b_first = tl.program_id(1) // H
            b_last = b_first + 1
        for b_index in range(b_first, b_last):
            b = b_index + tl.zeros([], tl.int32)  # a tensor also when the loop yields Python ints
            bh = b * H + h
            b, h, tok0, n, task = _batch_row(bh, H, N, TaskIds, CuSeqlens, HAS_TASKS, VARLEN)
            pk, pv, keep_k, keep_v = _load_prefix_tile(PK, PV, task, h, bh, cols, offs_d, H, P, D, seed,
                                                       prefix_threshold, prefix_scale, PREFIX_DROPOUT)
            dk, dv = _dkdv_tile(Q, DOut, Lse, Delta, Bias, DBias, PosK, PosQ, RelIndex, DPosQ, b, h, bh, tok0, n, pk,
                                pv, col_valid, cols, cols, 0, stride_qb, stride_qh, stride_qn, stride_gb, stride_gh,
                                stride_gn, stride_bb, stride_bh, stride_bm, stride_bn,
                                N, D, R, scale_log2, seed, threshold, drop_scale,
                                False, False, False, False, False, ATTN_DROPOUT, DOT_FP32, BLOCK_M, BLOCK_N,
                                BLOCK_D)
            dk = dk * scale
            if PREFIX_DROPOUT:
                dk = tl.where(keep_k, dk * prefix_scale, 0.0)
                dv = tl.where(keep_v, dv * prefix_scale, 0.0)
            offs = (task.to(tl.int64) * H + h) * P * D + cols[:, None] * D + offs_d[None, :]
            ok = col_valid[:, None] & d_ok
            if DETERMINISTIC:
                tl.store(DPK + offs, tl.load(DPK + offs, mask=ok, other=0.0) + dk, mask=ok)
                tl.store(DPV + offs, tl.load(DPV + offs, mask=ok, other=0.0) + dv, mask=ok)
            else:
                tl.atomic_add(DPK + offs, dk, mask=ok)
                tl.atomic_add(DPV + offs, dv, mask=ok)
    else:
        bh = tl.program_id(1)
        b, h, tok0, n, _ = _batch_row(bh, H, N, TaskIds, CuSeqlens, HAS_TASKS, VARLEN)
        cols0 = (pid_n - PREFIX_BLOCKS) * BLOCK_N
        cols = cols0 + tl.arange(0, BLOCK_N)
        k = _load_rows(K + b.to(tl.int64) * stride_kb + tok0 * stride_kn + h * stride_kh, cols, n, stride_kn, offs_d, D)
        v = _load_rows(V + b.to(tl.int64) * stride_vb + tok0 * stride_vn + h * stride_vh, cols, n, stride_vn, offs_d, D)
        valid = _column_valid(Mask, b, cols, n, N, HAS_MASK)
        dk, dv = _dkdv_tile(Q, DOut, Lse, Delta, Bias, DBias, PosK, PosQ, RelIndex, DPosQ, b, h, bh, tok0, n, k, v,
                            valid, P + cols, cols, cols0, stride_qb, stride_qh, stride_qn, stride_gb, stride_gh,
                            stride_gn, stride_bb, stride_bh, stride_bm, stride_bn,
                            N, D, R, scale_log2, seed, threshold, drop_scale,
                            HAS_BIAS, BIAS_GRAD, HAS_C2P, HAS_P2C, P2C_GRAD, ATTN_DROPOUT, DOT_FP32, BLOCK_M, BLOCK_N,
                            BLOCK_D)
        ok = (cols[:, None] < n) & d_ok
        row = tok0 + cols[:, None]
        tl.store(DK + b.to(tl.int64) * stride_dkb + h * stride_dkh + row * stride_dkn + offs_d[None, :],
                 (dk * scale).to(DK.dtype.element_ty), mask=ok)
        tl.store(DV + b.to(tl.int64) * stride_dvb + h * stride_dvh + row * stride_dvn + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=ok)
