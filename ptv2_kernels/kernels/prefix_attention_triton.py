"""Triton kernels for fused prefix attention (SPEC §1), FlashAttention-2 structure.

Every kernel reads the prefix keys/values straight from the compact buffer ``[T, H, P, D]`` (T = 1 for a
single prefix, the bank size otherwise; row ``b`` uses task ``task_ids[b]``) and never expands or
concatenates it. Columns ``0 .. P-1`` of the attention are the prefix ("joint" column ``c``), ``P .. P+N-1``
the sequence (sequence column ``j = c - P``).

Layouts
- q, k, v, out, d_out, dq, dk, dv: ``[B, H, N, D]`` with arbitrary batch/head/sequence strides and a unit
  last stride (views of transformers' ``[B, N, H, D]`` tensors are read in place). With VARLEN they are
  packed ``[total_tokens, H, D]`` (batch stride 0): row ``b`` is tokens ``cu_seqlens[b] .. cu_seqlens[b+1]-1``
  and N is the longest row.
- prefix_k, prefix_v: contiguous ``[T, H, P, D]``; their gradients: float32 ``[2, T, H, P, D]`` (keys, values).
- row lengths: with a padding mask, ``seqlens[b]`` (int32 ``[B]``) = 1 + the last real token of row ``b``
  (0 for a fully padded row). Tokens at or past it are padding for certain, so the kernels stop there:
  query tiles past it only write their (zero) output and key tiles past it are never loaded. The mask
  (contiguous ``[B, N]`` uint8, 1 = real) still excludes padded keys before that point (any mask works).
- Padded query rows (mask 0, or past the row length) output 0, get ``lse = +inf`` and so contribute to no
  gradient (SPEC §1: they must not affect any gradient); their dq is 0.
- lse, delta: float32 ``[B, H, N]``; ``lse`` is the row log-sum-exp in base 2 of the scaled scores, ``+inf``
  for a row with no visible column or a padded row (output 0, no gradient).
- attention bias (optional): ``[B, H, N, N]`` with any strides (0 for broadcast dimensions), added to the
  scaled scores of the sequence columns only; its gradient: contiguous ``[B, H, N, N]`` (zero-initialised).
- disentangled relative terms (optional, DeBERTa's c2p/p2c): ``PosK``/``PosQ`` contiguous ``[H, R, D]`` and
  ``RelIndex`` int32 ``[2, 2N - 1]``; for query ``i`` and sequence column ``j`` the unscaled score gains
  ``q_i . PosK[h, RelIndex[0, i - j + N - 1]]`` (HAS_C2P) and ``k_j . PosQ[h, RelIndex[1, i - j + N - 1]]``
  (HAS_P2C). A tile of BLOCK_M rows and BLOCK_N (= BLOCK_M) columns spans BLOCK_M + BLOCK_N - 1 distances:
  the kernels multiply the tile's rows with that window of embeddings and gather each score's diagonal
  (window slot ``w = m - n + BLOCK_N - 1``). Their gradients are float32 ``[H, 2N - 1, D]`` per *distance*
  (relaxed atomics: the slots of one tile are distinct), folded into ``[H, R, D]`` by the host.

Every index read from memory (task ids, cu_seqlens, row lengths, row order, reduction slots, relative-index
table) is clamped into its valid range, so no input can make a kernel access memory out of bounds.

Dropout RNG contract v2 (shared with the CUDA backend and the torch backend; one 63-bit ``seed`` per call):
Philox4x32-10 with key ``(seed & 0xffffffff, seed >> 32)``; all four output words of a call are used.
- attention probability (row b, head h, query i, joint column c): word ``c & 3`` of counter
  ``(c >> 2, i, b*H + h, 0)``;
- prefix key element (b, h, j, d): word ``d & 3`` of counter ``(d >> 2, j, b*H + h, 1)``; values: stream 2;
- keep iff ``(word >> 8) >= round(p * 2**24)``; kept values are scaled by ``1 / (1 - p)``.
Varlen rows use positions within the row for i and c. The prefix masks are drawn once per (row, layer) and
pass: ``prefix_dropout_mask_kernel`` packs them into a transient bitmask ``[2, B*H, P, WORDS]`` int32 (bit
``d % 32`` of word ``d // 32``; 1/16 of a bf16 ``[B, H, P, D]`` tensor, freed after the pass, never saved for
the backward) that every q-tile program reads instead of re-running Philox.
"""

import triton
import triton.language as tl

ATTN_STREAM = tl.constexpr(0)
PREFIX_K_STREAM = tl.constexpr(1)
PREFIX_V_STREAM = tl.constexpr(2)
LOG2_E = tl.constexpr(1.4426950408889634)
NO_SPECIALIZE = ["seed", "threshold", "prefix_threshold", "TOTAL"]  # per-call values: one compiled variant


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b with float32 accumulation; DOT_FP32 computes in exact float32 (fp32 inputs, and bf16
    under the interpreter, whose bf16 ``tl.dot`` is broken)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _clamp(x, lo, hi):
    """``x`` limited to ``[lo, hi]`` (integers)."""
    return tl.minimum(tl.maximum(x, lo), hi)


# ----- RNG contract v2 ----------------------------------------------------------------------------------------
@triton.jit
def _philox_keep4(seed, c0, c1, bh, stream: tl.constexpr, threshold):
    """Keep decisions from the four output words of the Philox calls with counters ``(c0, c1, bh, stream)``
    (``c0``, ``c1`` broadcastable non-negative ints, ``bh`` scalar)."""
    c0, c1 = tl.broadcast(c0, c1)
    c0 = c0.to(tl.uint32)
    zero = c0 * 0
    w0, w1, w2, w3 = tl.random.philox(seed, c0, c1.to(tl.uint32), zero + bh.to(tl.uint32), zero + stream)
    return ((w0 >> 8).to(tl.int32) >= threshold, (w1 >> 8).to(tl.int32) >= threshold,
            (w2 >> 8).to(tl.int32) >= threshold, (w3 >> 8).to(tl.int32) >= threshold)


@triton.jit
def _attention_keep(seed, rows, col0, bh, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` attention-dropout keep mask of query rows ``rows`` and joint columns
    ``col0 + n`` (``col0 % 4 == 0``): column ``c`` reads word ``c & 3`` of the counter ``(c >> 2, i, bh, 0)``,
    one Philox call per four columns."""
    groups = col0 // 4 + tl.arange(0, BLOCK_N // 4)
    k0, k1, k2, k3 = _philox_keep4(seed, groups[None, :], rows[:, None], bh, ATTN_STREAM, threshold)
    # [M, N/4, 2, 2] with element [m, g, a, b] = word 2a + b of group g: row-major flattening is column 4g + 2a + b
    keep = tl.join(tl.join(k0.to(tl.int8), k2.to(tl.int8)), tl.join(k1.to(tl.int8), k3.to(tl.int8)))
    return tl.reshape(keep, [BLOCK_M, BLOCK_N]) != 0


@triton.jit
def prefix_dropout_mask_kernel(Keep, seed, prefix_threshold, BH, P, WORDS: tl.constexpr, BLOCK_P: tl.constexpr):
    """Prefix-dropout keep bits ``Keep[kv, bh, j, w]`` (int32): bit ``r`` of word ``w`` keeps element
    ``d = 32 w + r`` of prefix key (kv 0, stream 1) / value (kv 1, stream 2) row ``j`` of batch row ``bh``
    (= b*H + h). Grid (2 * BH * cdiv(P, BLOCK_P),)."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(P, BLOCK_P)
    tile = pid % tiles
    bh = (pid // tiles) % BH
    kv = pid // (tiles * BH)
    rows = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    groups = tl.arange(0, WORDS * 8)  # element d = 4 g + r reads word r of group g
    if kv == 0:
        k0, k1, k2, k3 = _philox_keep4(seed, groups[None, :], rows[:, None], bh, PREFIX_K_STREAM, prefix_threshold)
    else:
        k0, k1, k2, k3 = _philox_keep4(seed, groups[None, :], rows[:, None], bh, PREFIX_V_STREAM, prefix_threshold)
    nibble = k0.to(tl.int32) | (k1.to(tl.int32) << 1) | (k2.to(tl.int32) << 2) | (k3.to(tl.int32) << 3)
    nibble = tl.reshape(nibble, [BLOCK_P, WORDS, 8]) << (4 * tl.arange(0, 8))[None, None, :]
    words = tl.sum(nibble, 2)  # disjoint bits: the sum is their OR
    ptrs = Keep + ((kv * BH + bh).to(tl.int64) * P + rows[:, None]) * WORDS + tl.arange(0, WORDS)[None, :]
    tl.store(ptrs, words, mask=rows[:, None] < P)


@triton.jit
def _prefix_keep(Keep, kv: tl.constexpr, bh, BH, cols, P, WORDS: tl.constexpr, BLOCK_D: tl.constexpr,
                 LAST_USE: tl.constexpr = False):
    """``[len(cols), BLOCK_D]`` prefix-dropout keep of elements (cols, d) of batch row ``bh`` from the bitmask
    of ``prefix_dropout_mask_kernel``. Each row's words are loaded once (``[len(cols), BLOCK_D / 32]``, not one
    word per element: one register a thread where a per-element gather takes 32 plus 64 of addresses) and
    expanded to bits. LAST_USE: the program reads these bits for the last time (evict them first; also a load
    of its own, which the compiler does not merge with an earlier one and so keep live in between)."""
    BITS: tl.constexpr = 32 if BLOCK_D >= 32 else BLOCK_D
    GROUPS: tl.constexpr = BLOCK_D // BITS  # element d = BITS * g + r is bit r of word g
    groups = tl.arange(0, GROUPS)[None, :]
    ptrs = Keep + (kv * BH + bh).to(tl.int64) * P * WORDS + cols[:, None] * WORDS + groups
    words = tl.load(ptrs, mask=(cols[:, None] < P) & (groups < WORDS), other=0,
                    eviction_policy="evict_first" if LAST_USE else "")
    bits = (words[:, :, None] >> tl.arange(0, BITS)[None, None, :]) & 1
    return tl.reshape(bits, [cols.shape[0], BLOCK_D]) != 0


# ----- rows, tiles, biases ------------------------------------------------------------------------------------
@triton.jit
def _batch_row(b, N, TOTAL, T, TaskIds, SeqLens, CuSeqlens, HAS_TASKS: tl.constexpr, HAS_LENGTHS: tl.constexpr,
               VARLEN: tl.constexpr):
    """Of batch row ``b``: (first token as int64, length ``n`` in [0, N], task in [0, T)). The tokens are a
    slice of the packed sequence with VARLEN, else the padded row (offset 0; length from SeqLens or N)."""
    task = b * 0
    if HAS_TASKS:
        task = _clamp(tl.load(TaskIds + b), 0, T - 1).to(tl.int32)
    if VARLEN:
        first = _clamp(tl.load(CuSeqlens + b), 0, TOTAL)
        end = _clamp(tl.load(CuSeqlens + b + 1), first, TOTAL)
        return first, tl.minimum(end - first, N).to(tl.int32), task
    elif HAS_LENGTHS:
        return b.to(tl.int64) * 0, _clamp(tl.load(SeqLens + b), 0, N), task
    else:
        return b.to(tl.int64) * 0, N + b * 0, task


@triton.jit
def _load_rows(ptr, rows, n_rows, stride_row, offs_d, D):
    """Load a ``[len(rows), BLOCK_D]`` tile whose rows are ``stride_row`` apart; zero outside."""
    mask = (rows[:, None] >= 0) & (rows[:, None] < n_rows) & (offs_d[None, :] < D)
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride_row + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _real_columns(Mask, b, seq, n, N, HAS_MASK: tl.constexpr):
    """Which sequence columns ``seq`` of batch row ``b`` (length ``n``, mask row stride ``N``) are real."""
    valid = (seq >= 0) & (seq < n)
    if HAS_MASK:
        valid &= tl.load(Mask + b.to(tl.int64) * N + seq, mask=valid, other=0) != 0
    return valid


@triton.jit
def _load_columns(K, V, PK, PV, PrefixKeep, Mask, b, bh, BH, cols, offs_d, n, N, P, D, stride_kn, stride_vn,
                  prefix_scale, PREFIX_COLS: tl.constexpr, SEQ_COLS: tl.constexpr, HAS_MASK: tl.constexpr,
                  PREFIX_DROPOUT: tl.constexpr, WORDS: tl.constexpr):
    """Keys, values ``[BLOCK_N, BLOCK_D]`` and visibility ``[BLOCK_N]`` of joint columns ``cols``. ``K``/``V``
    point at row ``b``'s first token of head h, ``PK``/``PV`` at its task's prefix of head h. PREFIX_COLS /
    SEQ_COLS: which kinds of columns the tile may hold (both: one loop over the joint columns, each row of
    the tile read from the prefix or the sequence). Prefix dropout (prefix-only tiles) applies row ``bh``'s
    mask and the 1/(1-p) scale."""
    d_ok = offs_d[None, :] < D
    seq = cols - P
    if PREFIX_COLS and SEQ_COLS:
        is_prefix = cols[:, None] < P
        # select whole-tile pointers (selecting [BLOCK_N, 1] row pointers loses the contiguity along D that the
        # pipeliner needs for cp.async)
        k_ptrs = tl.where(is_prefix, PK + cols[:, None] * D + offs_d[None, :],
                          K + seq[:, None].to(tl.int64) * stride_kn + offs_d[None, :])
        v_ptrs = tl.where(is_prefix, PV + cols[:, None] * D + offs_d[None, :],
                          V + seq[:, None].to(tl.int64) * stride_vn + offs_d[None, :])
        ok = (cols[:, None] < P + n) & d_ok
        k = tl.load(k_ptrs, mask=ok, other=0.0)
        v = tl.load(v_ptrs, mask=ok, other=0.0)
        valid = (cols < P) | _real_columns(Mask, b, seq, n, N, HAS_MASK)
    elif PREFIX_COLS:
        k = _load_rows(PK, cols, P, D, offs_d, D)
        v = _load_rows(PV, cols, P, D, offs_d, D)
        valid = cols < P
        if PREFIX_DROPOUT:
            keep_k = _prefix_keep(PrefixKeep, 0, bh, BH, cols, P, WORDS, offs_d.shape[0])
            k = tl.where(keep_k, k * prefix_scale, 0.0).to(k.dtype)
            keep_v = _prefix_keep(PrefixKeep, 1, bh, BH, cols, P, WORDS, offs_d.shape[0])
            v = tl.where(keep_v, v * prefix_scale, 0.0).to(v.dtype)
    else:
        k = _load_rows(K, seq, n, stride_kn, offs_d, D)
        v = _load_rows(V, seq, n, stride_vn, offs_d, D)
        valid = _real_columns(Mask, b, seq, n, N, HAS_MASK)
    return k, v, valid


@triton.jit
def _load_bias(Bias, b, h, rows, cols, N, stride_bb, stride_bh, stride_bm, stride_bn, HAS_BIAS: tl.constexpr):
    """Bias of query ``rows`` and sequence columns ``cols`` (broadcastable index tensors, so both
    orientations work), in base-2 units; 0 outside the sequence or without a bias."""
    if HAS_BIAS:
        ptrs = (Bias + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh + rows.to(tl.int64) * stride_bm
                + cols * stride_bn)
        return tl.load(ptrs, mask=(rows < N) & (cols >= 0) & (cols < N), other=0.0).to(tl.float32) * LOG2_E
    else:
        return 0.0


@triton.jit
def _window_rows(Pos, RelIndex, TABLE: tl.constexpr, h, dist0, N, R, offs_d, D, WINDOW: tl.constexpr):
    """Relative embeddings ``[WINDOW, BLOCK_D]`` of head ``h`` for the distances ``dist0 + w``, through
    index table ``TABLE`` (0: c2p, 1: p2c; entries clamped to [0, R)); also each slot's distance-table
    position and whether it is in the table (zero rows outside)."""
    slots = dist0 + tl.arange(0, WINDOW) + N - 1
    ok = (slots >= 0) & (slots < 2 * N - 1)
    rows = _clamp(tl.load(RelIndex + TABLE * (2 * N - 1) + slots, mask=ok, other=0), 0, R - 1)
    ptrs = Pos + (h.to(tl.int64) * R + rows)[:, None] * D + offs_d[None, :]
    return tl.load(ptrs, mask=ok[:, None] & (offs_d[None, :] < D), other=0.0), slots, ok


@triton.jit
def _rel_scores(q, k, PosK, PosQ, RelIndex, h, i0, j0, N, R, offs_d, D,
                HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, DOT_FP32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Unscaled c2p + p2c ``[BLOCK_M, BLOCK_N]`` (BLOCK_M == BLOCK_N) of query rows ``i0 + m`` (``q``) and sequence
    columns ``j0 + n`` (``k``): window products ``q @ PosK_w^T`` / ``k @ PosQ_w^T`` gathered at slot
    ``w = m - n + BLOCK_N - 1``. The window is taken in two halves of BLOCK_N slots (two products and gathers of
    ``[BLOCK_M, BLOCK_N]``): a gather's source lives in registers in a row-per-warp layout, and a whole
    ``[BLOCK_M, 2 BLOCK_N]`` window there does not fit beside the attention state."""
    slot = tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :] + (BLOCK_N - 1)
    dist0 = i0 - j0 - (BLOCK_N - 1)
    rel = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for half in tl.static_range(2):
        inside = (slot >= half * BLOCK_N) & (slot < (half + 1) * BLOCK_N)
        index = tl.where(inside, slot - half * BLOCK_N, 0)
        if HAS_C2P:
            emb, _, _ = _window_rows(PosK, RelIndex, 0, h, dist0 + half * BLOCK_N, N, R, offs_d, D, BLOCK_N)
            rel += tl.where(inside, tl.gather(_dot(q, tl.trans(emb), DOT_FP32), index, axis=1), 0.0)
        if HAS_P2C:
            emb, _, _ = _window_rows(PosQ, RelIndex, 1, h, dist0 + half * BLOCK_N, N, R, offs_d, D, BLOCK_N)
            rel += tl.where(inside, tl.trans(tl.gather(_dot(k, tl.trans(emb), DOT_FP32), tl.trans(index), axis=1)),
                            0.0)
    return rel


@triton.jit
def _rel_grad(ds, x, Pos, DPos, RelIndex, TABLE: tl.constexpr, h, dist0, N, R, offs_d, D, EMB_GRAD: tl.constexpr,
              DOT_FP32: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """Backward of one relative term of a tile (ROWS == COLS == BLOCK_N). TABLE 0 (c2p): ``ds`` ``[BLOCK_M,
    BLOCK_N]`` and ``x = q``; TABLE 1 (p2c): ``ds`` transposed ``[BLOCK_N, BLOCK_M]`` and ``x = k``. The score
    gradient is moved to window slots (``dsw[a, w]``, zero where no score has that slot; in two halves of
    BLOCK_N slots, as :func:`_rel_scores`), with EMB_GRAD its product with ``x`` is added to the per-distance
    ``DPos`` with relaxed atomics, and ``dsw @ embeddings`` (x's gradient, unscaled) is returned."""
    a = tl.arange(0, ROWS)[:, None]
    dx = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for half in tl.static_range(2):
        w = half * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        if TABLE == 0:
            col = a - w + (BLOCK_N - 1)  # c2p: slot w of query row m is column n = m + BLOCK_N - 1 - w
        else:
            col = a + w - (BLOCK_N - 1)  # p2c: slot w of key column n is row m = w + n - BLOCK_N + 1
        ok = (col >= 0) & (col < COLS)
        dsw = tl.where(ok, tl.gather(ds, tl.where(ok, col, 0), axis=1), 0.0)
        emb, slots, slot_ok = _window_rows(Pos, RelIndex, TABLE, h, dist0 + half * BLOCK_N, N, R, offs_d, D, BLOCK_N)
        if EMB_GRAD:  # off for frozen relative embeddings (prefix tuning of a frozen backbone)
            d_emb = _dot(tl.trans(dsw).to(x.dtype), x, DOT_FP32)
            ptrs = DPos + (h.to(tl.int64) * (2 * N - 1) + slots)[:, None] * D + offs_d[None, :]
            tl.atomic_add(ptrs, d_emb, mask=slot_ok[:, None] & (offs_d[None, :] < D), sem="relaxed")
        dx += _dot(dsw.to(emb.dtype), emb, DOT_FP32)
    return dx


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


# ----- forward ------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_block(q, k, v, bias, col_valid, col0, rows, bh, m_i, l_i, acc, scale_log2, seed, threshold, drop_scale,
               ATTN_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One online-softmax step over a tile of joint columns ``col0 ..``; ``bias`` is the tile's base-2
    score bias (0 for prefix columns)."""
    s = _dot(q, tl.trans(k), DOT_FP32) * scale_log2 + bias
    s = tl.where(col_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if ATTN_DROPOUT:
        p = tl.where(_attention_keep(seed, rows, col0, bh, threshold, BLOCK_M, BLOCK_N), p * drop_scale, 0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
    return m_new, l_i, acc


@triton.jit
def _column_tile(start, q, m0, rows, k_base, v_base, pk_base, pv_base, PrefixKeep, Mask, Bias, PosK, PosQ, RelIndex,
                 b, h, bh, BH, n, N, P, D, R, stride_kn, stride_vn, stride_bb, stride_bh, stride_bm, stride_bn,
                 scale_log2, prefix_scale, PREFIX_COLS: tl.constexpr, SEQ_COLS: tl.constexpr, HAS_MASK: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, PREFIX_DROPOUT: tl.constexpr,
                 DOT_FP32: tl.constexpr, WORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Keys, values, visibility and base-2 score bias of the tile of joint columns ``start ..`` for the query
    tile ``q`` (rows ``m0 ..``), as the forward and dq loops see it."""
    offs_d = tl.arange(0, BLOCK_D)
    cols = start + tl.arange(0, BLOCK_N)
    k, v, valid = _load_columns(k_base, v_base, pk_base, pv_base, PrefixKeep, Mask, b, bh, BH, cols, offs_d, n, N,
                                P, D, stride_kn, stride_vn, prefix_scale, PREFIX_COLS, SEQ_COLS, HAS_MASK,
                                PREFIX_DROPOUT, WORDS)
    bias = 0.0
    if SEQ_COLS and not PREFIX_COLS:
        bias = _sequence_bias(Bias, PosK, PosQ, RelIndex, q, k, b, h, m0, start - P, N, R, offs_d, D, stride_bb,
                              stride_bh, stride_bm, stride_bn, scale_log2, HAS_BIAS, HAS_C2P, HAS_P2C, DOT_FP32,
                              BLOCK_M, BLOCK_N)
    elif SEQ_COLS and HAS_BIAS:  # joint tiles: no relative terms (those take the split loops)
        bias = _load_bias(Bias, b, h, rows[:, None], (cols - P)[None, :], N, stride_bb, stride_bh, stride_bm,
                          stride_bn, HAS_BIAS)
    return k, v, valid, bias


@triton.jit
def _fwd_columns(lo, hi, q, rows, m0, m_i, l_i, acc, k_base, v_base, pk_base, pv_base, PrefixKeep, Mask, Bias,
                 PosK, PosQ, RelIndex, b, h, bh, BH, n, N, P, D, R, stride_kn, stride_vn,
                 stride_bb, stride_bh, stride_bm, stride_bn, scale_log2, seed, threshold, drop_scale, prefix_scale,
                 PREFIX_COLS: tl.constexpr, SEQ_COLS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, ATTN_DROPOUT: tl.constexpr,
                 PREFIX_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, WORDS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online softmax of the query tile over the joint columns ``[lo, hi)`` (one software-pipelined loop)."""
    for start in tl.range(lo, hi, BLOCK_N, num_stages=1 if PREFIX_COLS and not SEQ_COLS else None):
        k, v, valid, bias = _column_tile(start, q, m0, rows, k_base, v_base, pk_base, pv_base, PrefixKeep, Mask, Bias,
                                         PosK, PosQ, RelIndex, b, h, bh, BH, n, N, P, D, R, stride_kn, stride_vn,
                                         stride_bb, stride_bh, stride_bm, stride_bn, scale_log2, prefix_scale,
                                         PREFIX_COLS, SEQ_COLS, HAS_MASK, HAS_BIAS, HAS_C2P, HAS_P2C, PREFIX_DROPOUT,
                                         DOT_FP32, WORDS, BLOCK_M, BLOCK_N, BLOCK_D)
        m_i, l_i, acc = _fwd_block(q, k, v, bias, valid, start, rows, bh, m_i, l_i, acc, scale_log2, seed, threshold,
                                   drop_scale, ATTN_DROPOUT, DOT_FP32, BLOCK_M, BLOCK_N)
    return m_i, l_i, acc


@triton.jit
def _row_tile(pid, N, H, BLOCK: tl.constexpr):
    """(b*H + h, first row) of program ``pid`` of a 1-D grid of ``cdiv(N, BLOCK)`` tiles per (batch row,
    head), tiles of one (b, h) adjacent (they share K/V in L2). 1-D: any B*H launches."""
    tiles = tl.cdiv(N, BLOCK)
    return pid // tiles, (pid % tiles) * BLOCK


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def prefix_attention_fwd_kernel(
    Q, K, V, PK, PV, PrefixKeep, TaskIds, SeqLens, Mask, Bias, PosK, PosQ, RelIndex, CuSeqlens, Out, Lse,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    stride_bb, stride_bh, stride_bm, stride_bn,
    B, H, N, P, D, T, R, TOTAL, SEQ_SHIFT, scale_log2, seed, threshold, drop_scale, prefix_scale,
    HAS_MASK: tl.constexpr, HAS_TASKS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_C2P: tl.constexpr,
    HAS_P2C: tl.constexpr, VARLEN: tl.constexpr, ATTN_DROPOUT: tl.constexpr, PREFIX_DROPOUT: tl.constexpr,
    DOT_FP32: tl.constexpr, WORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M) * B * H,): one query tile against the prefix and sequence columns up to the
    row's length; one loop over the joint columns, or (prefix dropout, c2p/p2c) a prefix loop then a
    sequence loop, so that only prefix tiles are masked and only sequence tiles get relative terms."""
    bh, m0 = _row_tile(tl.program_id(0), N, H, BLOCK_M)
    b = bh // H
    h = bh % H
    tok0, n, task = _batch_row(b, N, TOTAL, T, TaskIds, SeqLens, CuSeqlens, HAS_TASKS, HAS_MASK, VARLEN)
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_limit = n if VARLEN else N  # rows this program owns in the output (padded rows included)
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + h * stride_oh + (tok0 + rows[:, None]) * stride_on
              + offs_d[None, :])
    o_mask = (rows[:, None] < row_limit) & (offs_d[None, :] < D)
    if m0 >= n:  # past the row's length: padding only
        tl.store(o_ptrs, tl.zeros([BLOCK_M, BLOCK_D], Out.dtype.element_ty), mask=o_mask)
        tl.store(Lse + bh.to(tl.int64) * N + rows, tl.full([BLOCK_M], float("inf"), tl.float32), mask=rows < row_limit)
        return
    q_base = Q + b.to(tl.int64) * stride_qb + tok0 * stride_qn + h * stride_qh
    q = _load_rows(q_base, rows, n, stride_qn, offs_d, D)
    k_base = K + b.to(tl.int64) * stride_kb + tok0 * stride_kn + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + tok0 * stride_vn + h * stride_vh
    prefix_base = (task.to(tl.int64) * H + h) * P * D

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if PREFIX_DROPOUT or HAS_C2P or HAS_P2C:
        m_i, l_i, acc = _fwd_columns(0, P, q, rows, m0, m_i, l_i, acc, k_base, v_base, PK + prefix_base,
                                     PV + prefix_base, PrefixKeep, Mask, Bias, PosK, PosQ, RelIndex, b, h, bh, B * H,
                                     n, N, P, D, R, stride_kn, stride_vn, stride_bb, stride_bh, stride_bm, stride_bn,
                                     scale_log2, seed, threshold, drop_scale, prefix_scale, True, False, HAS_MASK,
                                     HAS_BIAS, HAS_C2P, HAS_P2C, ATTN_DROPOUT, PREFIX_DROPOUT, DOT_FP32, WORDS,
                                     BLOCK_M, BLOCK_N, BLOCK_D)
        m_i, l_i, acc = _fwd_columns(P - SEQ_SHIFT, P + n, q, rows, m0, m_i, l_i, acc, k_base, v_base, PK + prefix_base,
                                     PV + prefix_base, PrefixKeep, Mask, Bias, PosK, PosQ, RelIndex, b, h, bh, B * H,
                                     n, N, P, D, R, stride_kn, stride_vn, stride_bb, stride_bh, stride_bm, stride_bn,
                                     scale_log2, seed, threshold, drop_scale, prefix_scale, False, True, HAS_MASK,
                                     HAS_BIAS, HAS_C2P, HAS_P2C, ATTN_DROPOUT, PREFIX_DROPOUT, DOT_FP32, WORDS,
                                     BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        m_i, l_i, acc = _fwd_columns(0, P + n, q, rows, m0, m_i, l_i, acc, k_base, v_base, PK + prefix_base,
                                     PV + prefix_base, PrefixKeep, Mask, Bias, PosK, PosQ, RelIndex, b, h, bh, B * H,
                                     n, N, P, D, R, stride_kn, stride_vn, stride_bb, stride_bh, stride_bm, stride_bn,
                                     scale_log2, seed, threshold, drop_scale, prefix_scale, True, True, HAS_MASK,
                                     HAS_BIAS, HAS_C2P, HAS_P2C, ATTN_DROPOUT, PREFIX_DROPOUT, DOT_FP32, WORDS,
                                     BLOCK_M, BLOCK_N, BLOCK_D)

    empty = (l_i == 0.0) | ~_real_columns(Mask, b, rows, n, N, HAS_MASK)  # no visible column, or a padded row
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)
    tl.store(Lse + bh.to(tl.int64) * N + rows, lse, mask=rows < row_limit)


# ----- backward -----------------------------------------------------------------------------------------------
@triton.jit
def _ds_block(q, do, k, v, bias, lse, delta, col_valid, col0, rows, bh, scale_log2, seed, threshold, drop_scale,
              ATTN_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Score gradient ``[BLOCK_M, BLOCK_N]`` (of the scaled scores) of one tile of joint columns ``col0 ..``."""
    s = _dot(q, tl.trans(k), DOT_FP32) * scale_log2 + bias
    p = tl.where(col_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), DOT_FP32)
    if ATTN_DROPOUT:
        dp = tl.where(_attention_keep(seed, rows, col0, bh, threshold, BLOCK_M, BLOCK_N), dp * drop_scale, 0.0)
    return p * (dp - delta[:, None])


@triton.jit
def _dq_columns(lo, hi, q, do, lse, delta, rows, m0, dq, k_base, v_base, pk_base, pv_base, PrefixKeep, Mask, Bias,
                PosK, PosQ, RelIndex, DPosK, b, h, bh, BH, n, N, P, D, R, stride_kn, stride_vn,
                stride_bb, stride_bh, stride_bm, stride_bn, scale_log2, seed, threshold, drop_scale, prefix_scale,
                PREFIX_COLS: tl.constexpr, SEQ_COLS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, C2P_GRAD: tl.constexpr, ATTN_DROPOUT: tl.constexpr,
                PREFIX_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, WORDS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq (unscaled) of the query tile over the joint columns ``[lo, hi)``; with C2P_GRAD also the tiles' share
    of the c2p embeddings' gradient (per distance, unscaled, in DPosK)."""
    offs_d = tl.arange(0, BLOCK_D)
    for start in tl.range(lo, hi, BLOCK_N, num_stages=1 if PREFIX_COLS and not SEQ_COLS else None):
        k, v, valid, bias = _column_tile(start, q, m0, rows, k_base, v_base, pk_base, pv_base, PrefixKeep, Mask, Bias,
                                         PosK, PosQ, RelIndex, b, h, bh, BH, n, N, P, D, R, stride_kn, stride_vn,
                                         stride_bb, stride_bh, stride_bm, stride_bn, scale_log2, prefix_scale,
                                         PREFIX_COLS, SEQ_COLS, HAS_MASK, HAS_BIAS, HAS_C2P, HAS_P2C, PREFIX_DROPOUT,
                                         DOT_FP32, WORDS, BLOCK_M, BLOCK_N, BLOCK_D)
        ds = _ds_block(q, do, k, v, bias, lse, delta, valid, start, rows, bh, scale_log2, seed, threshold, drop_scale,
                       ATTN_DROPOUT, DOT_FP32, BLOCK_M, BLOCK_N)
        dq += _dot(ds.to(k.dtype), k, DOT_FP32)
        if SEQ_COLS and not PREFIX_COLS and HAS_C2P:
            dq += _rel_grad(ds, q, PosK, DPosK, RelIndex, 0, h, m0 - (start - P) - (BLOCK_N - 1), N, R, offs_d, D,
                            C2P_GRAD, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_N, BLOCK_D)
    return dq


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def prefix_attention_bwd_dq_kernel(
    Q, K, V, PK, PV, PrefixKeep, TaskIds, SeqLens, Mask, Bias, PosK, PosQ, RelIndex, CuSeqlens, Out, DOut, Lse, Delta,
    DQ, DPosK,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on, stride_gb, stride_gh, stride_gn,
    stride_dqb, stride_dqh, stride_dqn, stride_bb, stride_bh, stride_bm, stride_bn,
    B, H, N, P, D, T, R, TOTAL, SEQ_SHIFT, scale, scale_log2, seed, threshold, drop_scale, prefix_scale,
    HAS_MASK: tl.constexpr, HAS_TASKS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_C2P: tl.constexpr,
    HAS_P2C: tl.constexpr, C2P_GRAD: tl.constexpr, VARLEN: tl.constexpr, ATTN_DROPOUT: tl.constexpr,
    PREFIX_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, WORDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M) * B * H,): dq of one query tile (the columns as in the forward). Also the
    softmax-backward row term ``delta = rowsum(out * d_out)`` of its rows (stored for the dk/dv kernel: the
    backward preprocessing fused here, no separate pass over out and d_out)."""
    bh, m0 = _row_tile(tl.program_id(0), N, H, BLOCK_M)
    b = bh // H
    h = bh % H
    tok0, n, task = _batch_row(b, N, TOTAL, T, TaskIds, SeqLens, CuSeqlens, HAS_TASKS, HAS_MASK, VARLEN)
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_limit = n if VARLEN else N
    dq_ptrs = (DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh + (tok0 + rows[:, None]) * stride_dqn
               + offs_d[None, :])
    dq_mask = (rows[:, None] < row_limit) & (offs_d[None, :] < D)
    if m0 >= n:  # padding only: no gradient
        tl.store(dq_ptrs, tl.zeros([BLOCK_M, BLOCK_D], DQ.dtype.element_ty), mask=dq_mask)
        return
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + tok0 * stride_qn + h * stride_qh, rows, n, stride_qn, offs_d, D)
    do = _load_rows(DOut + b.to(tl.int64) * stride_gb + tok0 * stride_gn + h * stride_gh, rows, n, stride_gn, offs_d,
                    D)
    o = _load_rows(Out + b.to(tl.int64) * stride_ob + tok0 * stride_on + h * stride_oh, rows, n, stride_on, offs_d, D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * N + rows, delta, mask=rows < n)
    lse = tl.load(Lse + bh.to(tl.int64) * N + rows, mask=rows < n, other=float("inf"))
    k_base = K + b.to(tl.int64) * stride_kb + tok0 * stride_kn + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + tok0 * stride_vn + h * stride_vh
    prefix_base = (task.to(tl.int64) * H + h) * P * D

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if PREFIX_DROPOUT or HAS_C2P or HAS_P2C:
        dq = _dq_columns(0, P, q, do, lse, delta, rows, m0, dq, k_base, v_base, PK + prefix_base, PV + prefix_base,
                         PrefixKeep, Mask, Bias, PosK, PosQ, RelIndex, DPosK, b, h, bh, B * H, n, N, P, D, R,
                         stride_kn, stride_vn, stride_bb, stride_bh, stride_bm, stride_bn, scale_log2, seed,
                         threshold, drop_scale, prefix_scale, True, False, HAS_MASK, HAS_BIAS, HAS_C2P, HAS_P2C,
                         C2P_GRAD, ATTN_DROPOUT, PREFIX_DROPOUT, DOT_FP32, WORDS, BLOCK_M, BLOCK_N, BLOCK_D)
        dq = _dq_columns(P - SEQ_SHIFT, P + n, q, do, lse, delta, rows, m0, dq, k_base, v_base, PK + prefix_base,
                         PV + prefix_base, PrefixKeep, Mask, Bias, PosK, PosQ, RelIndex, DPosK, b, h, bh, B * H, n,
                         N, P, D, R, stride_kn, stride_vn, stride_bb, stride_bh, stride_bm, stride_bn, scale_log2,
                         seed, threshold, drop_scale, prefix_scale, False, True, HAS_MASK, HAS_BIAS, HAS_C2P, HAS_P2C,
                         C2P_GRAD, ATTN_DROPOUT, PREFIX_DROPOUT, DOT_FP32, WORDS, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        dq = _dq_columns(0, P + n, q, do, lse, delta, rows, m0, dq, k_base, v_base, PK + prefix_base, PV + prefix_base,
                         PrefixKeep, Mask, Bias, PosK, PosQ, RelIndex, DPosK, b, h, bh, B * H, n, N, P, D, R,
                         stride_kn, stride_vn, stride_bb, stride_bh, stride_bm, stride_bn, scale_log2, seed,
                         threshold, drop_scale, prefix_scale, True, True, HAS_MASK, HAS_BIAS, HAS_C2P, HAS_P2C,
                         C2P_GRAD, ATTN_DROPOUT, PREFIX_DROPOUT, DOT_FP32, WORDS, BLOCK_M, BLOCK_N, BLOCK_D)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=dq_mask)


@triton.jit
def _dkdv_tile(dk, dv, start, q_hi, Q, DOut, Lse, Delta, Bias, DBias, PosK, PosQ, RelIndex, DPosQ, b, h, bh,
               tok0, k, v, col_valid, col0, seq0, stride_qb, stride_qh, stride_qn, stride_gb, stride_gh, stride_gn,
               stride_bb, stride_bh, stride_bm, stride_bn, N, D, R, scale_log2, seed, threshold, drop_scale,
               HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr,
               P2C_GRAD: tl.constexpr, ATTN_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``dk`` (before the softmax scale) and ``dv`` ``[BLOCK_N, BLOCK_D]`` plus the gradient of one tile of
    columns (joint columns ``col0 ..``: the dropout counters; sequence columns ``seq0 ..``: bias and relative
    terms, only read with those) of batch row ``b``, head ``h``, from its query tile ``start ..`` (the row's
    ``q_hi`` queries start at token ``tok0``; ``N`` is the lse/bias row stride). Rows of columns that are not
    visible (``col_valid``) are left unmasked: a key's dk/dv depend on its own column only, so the caller
    zeroes them once at the end. With BIAS_GRAD the tile's score gradient is the bias gradient, written to
    ``DBias``; with P2C_GRAD its share of the p2c embeddings' gradient goes to ``DPosQ`` (per distance,
    unscaled)."""
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b.to(tl.int64) * stride_qb + tok0 * stride_qn + h * stride_qh
    do_base = DOut + b.to(tl.int64) * stride_gb + tok0 * stride_gn + h * stride_gh
    seq_cols = seq0 + tl.arange(0, BLOCK_N)
    rows = start + tl.arange(0, BLOCK_M)
    q = _load_rows(q_base, rows, q_hi, stride_qn, offs_d, D)
    do = _load_rows(do_base, rows, q_hi, stride_gn, offs_d, D)
    lse = tl.load(Lse + bh.to(tl.int64) * N + rows, mask=rows < q_hi, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * N + rows, mask=rows < q_hi, other=0.0)
    # scores in [queries, keys] orientation (per-row lse/delta: 2 registers a thread, not 16); the products
    # with the transposed probabilities read them from shared memory. Columns that are not visible are not
    # masked here: a key's dk/dv depend on its own column only, so the caller zeroes those rows at the end.
    s = _dot(q, tl.trans(k), DOT_FP32) * scale_log2
    if HAS_BIAS or HAS_C2P or HAS_P2C:
        s += _load_bias(Bias, b, h, rows[:, None], seq_cols[None, :], N, stride_bb, stride_bh, stride_bm,
                        stride_bn, HAS_BIAS)
    if HAS_C2P or HAS_P2C:
        s += _rel_scores(q, k, PosK, PosQ, RelIndex, h, start, seq0, N, R, offs_d, D, HAS_C2P, HAS_P2C,
                         DOT_FP32, BLOCK_M, BLOCK_N) * scale_log2
    p = tl.exp2(s - lse[:, None])
    dp = _dot(do, tl.trans(v), DOT_FP32)
    pd = p
    if ATTN_DROPOUT:
        keep = _attention_keep(seed, rows, col0, bh, threshold, BLOCK_M, BLOCK_N)
        pd = tl.where(keep, p * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    dv += _dot(tl.trans(pd.to(do.dtype)), do, DOT_FP32)
    ds = p * (dp - delta[:, None])
    if HAS_P2C or BIAS_GRAD:  # these read every column's score gradient: zero the invisible ones
        ds = tl.where(col_valid[None, :], ds, 0.0)
    dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_FP32)
    if HAS_P2C:
        dk += _rel_grad(tl.trans(ds), k, PosQ, DPosQ, RelIndex, 1, h, start - seq0 - (BLOCK_N - 1), N, R,
                        offs_d, D, P2C_GRAD, DOT_FP32, BLOCK_N, BLOCK_M, BLOCK_N, BLOCK_D)
    if BIAS_GRAD:
        ptrs = DBias + (bh.to(tl.int64) * N + rows[:, None]) * N + seq_cols[None, :]
        tl.store(ptrs, ds.to(DBias.dtype.element_ty),
                 mask=(rows[:, None] < N) & (seq_cols[None, :] >= 0) & (seq_cols[None, :] < N))
    return dk, dv


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def prefix_attention_bwd_dprefix_kernel(
    Q, PK, PV, PrefixKeep, TaskIds, SeqLens, CuSeqlens, DOut, Lse, Delta, DPrefix, RowOrder, RunRange,
    stride_qb, stride_qh, stride_qn, stride_gb, stride_gh, stride_gn,
    B, H, N, P, D, T, TOTAL, NUM_RUNS, scale, scale_log2, seed, threshold, drop_scale, prefix_scale,
    HAS_MASK: tl.constexpr, HAS_TASKS: tl.constexpr, VARLEN: tl.constexpr, ATTN_DROPOUT: tl.constexpr,
    PREFIX_DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr, DOT_FP32: tl.constexpr, WORDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Prefix key/value gradients reduced over the batch. Grid (cdiv(P, BLOCK_N) * H * NUM_RUNS,): one program
    per (prefix tile, head, run). A run is a range ``RunRange[run] = [first, end)`` of positions in the row
    visiting order (``RowOrder``: sorted by task, stable, with a bank; else the batch order) whose rows share a
    task: a chunk of rows (a chunk's task runs with a bank) or, under prefix dropout, a single row (each row's
    share is masked by its own keep bits, which a multi-row run would need a second pair of accumulators for,
    and spill). The program sums the run's gradient in one pair of float32 accumulators, in one
    software-pipelined loop over its (row, query tile) pairs, and writes it once:
    - default: one relaxed float32 atomic add per element into ``DPrefix`` = the gradient ``[2, T, H, P, D]``;
    - DETERMINISTIC: a plain store into ``DPrefix`` = the partials ``[NUM_RUNS, 2, H, P, D]`` at slot ``run`` (all
      of it: an empty run stores zeros). Every slot is written by exactly one program, once, and nothing reads it
      in this kernel: no access can race; ``prefix_grad_reduce_kernel`` then sums each task's slots in a fixed
      order.
    Its own kernel rather than programs of the dk/dv kernel: the accumulators and the run state would push that
    kernel's register allocation (shared by all its programs) into spills."""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    prefix_tiles = tl.cdiv(P, BLOCK_N)
    tile = pid % prefix_tiles
    h = (pid // prefix_tiles) % H
    run = pid // (prefix_tiles * H)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < P
    first = _clamp(tl.load(RunRange + 2 * run), 0, B)
    end = _clamp(tl.load(RunRange + 2 * run + 1), first, B)
    b0 = _row_of(tl.minimum(first, B - 1), B, RowOrder, HAS_TASKS)
    task = _batch_row(b0, N, TOTAL, T, TaskIds, SeqLens, CuSeqlens, HAS_TASKS, False, False)[2]
    prefix_base = (task.to(tl.int64) * H + h) * P * D
    pk, pv, pk_valid = _load_columns(PK, PV, PK + prefix_base, PV + prefix_base, PrefixKeep, PK, b0, b0 * H + h, B * H,
                                     cols, offs_d, N, N, P, D, 0, 0, prefix_scale, True, False, False, PREFIX_DROPOUT,
                                     WORDS)
    tiles = tl.cdiv(N, BLOCK_M)  # query tiles per row (those past a row's length are masked: no memory traffic)
    acc_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    acc_v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # one software-pipelined loop over the run's (row, query tile) pairs; a prefix-dropout run is one row: its
    # query tiles up to the row's length
    tok0, n, row_task = _batch_row(b0, N, TOTAL, T, TaskIds, SeqLens, CuSeqlens, False, HAS_MASK, VARLEN)
    steps = tl.where(end > first, tl.cdiv(n, BLOCK_M), 0) if PREFIX_DROPOUT else (end - first) * tiles
    b = b0
    for it in range(0, steps):
        start = it * BLOCK_M
        if not PREFIX_DROPOUT:
            start = (it % tiles) * BLOCK_M
            b = _row_of(first + it // tiles, B, RowOrder, HAS_TASKS)
            tok0, n, row_task = _batch_row(b, N, TOTAL, T, TaskIds, SeqLens, CuSeqlens, False, HAS_MASK, VARLEN)
        acc_k, acc_v = _dkdv_tile(acc_k, acc_v, start, n, Q, DOut, Lse, Delta, PK, PK, PK, PK, PK, PK,
                                  b, h, b * H + h, tok0, pk, pv, col_valid, tile * BLOCK_N, 0, stride_qb, stride_qh,
                                  stride_qn, stride_gb, stride_gh, stride_gn, 0, 0, 0, 0, N, D, 0, scale_log2, seed,
                                  threshold, drop_scale, False, False, False, False, False, ATTN_DROPOUT, DOT_FP32,
                                  BLOCK_M, BLOCK_N, BLOCK_D)
    ok = col_valid[:, None] & (offs_d[None, :] < D)
    offs = cols[:, None] * D + offs_d[None, :]
    if PREFIX_DROPOUT:  # d(prefix) = d(dropped prefix) * keep / (1 - p) with the run's (single) row's mask (a
        # select: a per-element write mask would split the vector atomics into scalar ones)
        acc_k = tl.where(_prefix_keep(PrefixKeep, 0, b0 * H + h, B * H, cols, P, WORDS, BLOCK_D, True),
                         acc_k * prefix_scale, 0.0)
        acc_v = tl.where(_prefix_keep(PrefixKeep, 1, b0 * H + h, B * H, cols, P, WORDS, BLOCK_D, True),
                         acc_v * prefix_scale, 0.0)
    if DETERMINISTIC:
        base = ((run * 2).to(tl.int64) * H + h) * P * D
        tl.store(DPrefix + base + offs, acc_k * scale, mask=ok)
        tl.store(DPrefix + base + H * P * D + offs, acc_v, mask=ok)
    elif end > first:
        tl.atomic_add(DPrefix + prefix_base + offs, acc_k * scale, mask=ok, sem="relaxed")
        tl.atomic_add(DPrefix + T * H * P * D + prefix_base + offs, acc_v, mask=ok, sem="relaxed")


@triton.jit
def _row_of(s, B, RowOrder, HAS_TASKS: tl.constexpr):
    """Batch row at position ``s`` of the prefix-gradient visiting order (sorted by task with a bank)."""
    if HAS_TASKS:
        return _clamp(tl.load(RowOrder + s), 0, B - 1)
    else:
        return s


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def prefix_attention_bwd_dkdv_kernel(
    Q, K, V, TaskIds, SeqLens, Mask, Bias, PosK, PosQ, RelIndex, CuSeqlens, DOut, Lse, Delta, DK, DV, DBias, DPosQ,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_gb, stride_gh, stride_gn,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    B, H, N, P, D, T, R, TOTAL, SEQ_SHIFT, scale, scale_log2, seed, threshold, drop_scale,
    HAS_MASK: tl.constexpr, HAS_TASKS: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, P2C_GRAD: tl.constexpr, VARLEN: tl.constexpr,
    ATTN_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dk, dv of the sequence. Grid (cdiv(N + SEQ_SHIFT, BLOCK_N) * B * H,): one program per tile of sequence
    columns of a (batch row, head); tiles start at ``-SEQ_SHIFT`` so that their joint columns are 4-aligned for
    the dropout counters. A tile past the row's length writes zeros without its query loop."""
    offs_d = tl.arange(0, BLOCK_D)
    bh, j0 = _row_tile(tl.program_id(0), N + SEQ_SHIFT, H, BLOCK_N)
    b = bh // H
    h = bh % H
    tok0, n, _ = _batch_row(b, N, TOTAL, T, TaskIds, SeqLens, CuSeqlens, HAS_TASKS, HAS_MASK, VARLEN)
    seq0 = j0 - SEQ_SHIFT
    seq_cols = seq0 + tl.arange(0, BLOCK_N)
    k = _load_rows(K + b.to(tl.int64) * stride_kb + tok0 * stride_kn + h * stride_kh, seq_cols, n, stride_kn, offs_d, D)
    v = _load_rows(V + b.to(tl.int64) * stride_vb + tok0 * stride_vn + h * stride_vh, seq_cols, n, stride_vn, offs_d, D)
    valid = _real_columns(Mask, b, seq_cols, n, N, HAS_MASK)
    q_hi = tl.where(seq0 < n, n, 0)  # a tile past the row's length has no gradient: skip its query loop
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, q_hi, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, start, q_hi, Q, DOut, Lse, Delta, Bias, DBias, PosK, PosQ, RelIndex, DPosQ, b, h,
                            bh, tok0, k, v, valid, P + seq0, seq0, stride_qb, stride_qh, stride_qn, stride_gb,
                            stride_gh, stride_gn, stride_bb, stride_bh, stride_bm, stride_bn, N, D, R, scale_log2, seed,
                            threshold, drop_scale, HAS_BIAS, BIAS_GRAD, HAS_C2P, HAS_P2C, P2C_GRAD, ATTN_DROPOUT,
                            DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_D)
    dk = tl.where(valid[:, None], dk, 0.0)
    dv = tl.where(valid[:, None], dv, 0.0)
    ok = (seq_cols[:, None] >= 0) & (seq_cols[:, None] < (n if VARLEN else N)) & (offs_d[None, :] < D)
    row = tok0 + seq_cols[:, None]
    tl.store(DK + b.to(tl.int64) * stride_dkb + h * stride_dkh + row * stride_dkn + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + b.to(tl.int64) * stride_dvb + h * stride_dvh + row * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def prefix_grad_reduce_kernel(Partial, SlotRange, DPrefix, T, HPD, NUM_SLOTS, HAS_TASKS: tl.constexpr,
                              ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    """Deterministic prefix gradient: ``DPrefix[kv, t] (+)= sum of Partial[slot, kv]`` over the slots of task
    ``t`` (``SlotRange[t] = (first, end)`` with a bank, else all) in slot order; ACCUMULATE adds to what a
    previous launch (an earlier group of rows) wrote. Partial ``[NUM_SLOTS, 2, HPD]``, DPrefix ``[2, T, HPD]``
    (HPD = H * P * D), float32; each element is read and written by one program. Grid (cdiv(HPD, BLOCK) * 2 * T,)."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(HPD, BLOCK)
    kv = (pid // blocks) % 2
    t = pid // (blocks * 2)
    offs = (pid % blocks) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < HPD
    lo = t * 0
    hi = lo + NUM_SLOTS
    if HAS_TASKS:
        lo = _clamp(tl.load(SlotRange + 2 * t), 0, NUM_SLOTS)
        hi = _clamp(tl.load(SlotRange + 2 * t + 1), lo, NUM_SLOTS)
    ptrs = DPrefix + (kv * T + t).to(tl.int64) * HPD + offs
    acc = tl.zeros([BLOCK], tl.float32)
    if ACCUMULATE:
        acc = tl.load(ptrs, mask=ok, other=0.0)
    for slot in range(lo, hi):
        acc += tl.load(Partial + (slot * 2 + kv).to(tl.int64) * HPD + offs, mask=ok, other=0.0)
    tl.store(ptrs, acc, mask=ok)
