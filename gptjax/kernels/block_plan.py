"""Which (query block, key block) tiles of document-masked causal attention can contribute, and
so which ones a kernel visits. One definition for both kernels (Triton's and Mosaic GPU's) and
for `visited_blocks`, which counts the work on the host.

A tile is needed when it is not wholly above the causal diagonal, not wholly padding, and its
query and key segment-id ranges overlap. Per query block the kernels loop over the key-block
range [lo, hi) of needed tiles (per key block, over the query-block range [klo, khi)); the range
is tight for sorted ids (packed rows), and inside it the kernels re-check the per-block id
overlap (`blocks_meet`), so unsorted ids stay correct.
"""

from __future__ import annotations

import numpy as np


def pad_segments(segment_ids, batch, seq_len, padded_len, xp):
    """(query ids, key ids) as int32 [B, padded_len]. Padding repeats the row's last id, which
    keeps per-block ranges tight (and sorted rows sorted); padded keys are masked by position."""
    if segment_ids is None:
        q_seg = kv_seg = xp.zeros((batch, seq_len), xp.int32)
    elif isinstance(segment_ids, (tuple, list)):
        q_seg, kv_seg = (xp.asarray(s).astype(xp.int32) for s in segment_ids)
    else:
        q_seg = kv_seg = xp.asarray(segment_ids).astype(xp.int32)
    for s in (q_seg, kv_seg):
        if tuple(s.shape) != (batch, seq_len):
            raise ValueError(f"segment_ids must be [batch, time] = {(batch, seq_len)}, got {s.shape}")
    pad = ((0, 0), (0, padded_len - seq_len))
    return xp.pad(q_seg, pad, mode="edge"), xp.pad(kv_seg, pad, mode="edge")


def blocks_meet(qmin, qmax, kmin, kmax):
    return (qmin <= kmax) & (kmin <= qmax)


def block_plan(q_seg, kv_seg, block_q, block_k, causal, seq_len, xp):
    """Per-block segment-id ranges (qmin, qmax, kmin, kmax) and the loop ranges lo, hi (per
    query block) and klo, khi (per key block), each int32 [B, blocks]. Works with numpy and
    jax.numpy alike."""
    batch, padded_len = q_seg.shape
    nq, nk = padded_len // block_q, padded_len // block_k
    qb, kb = q_seg.reshape(batch, nq, block_q), kv_seg.reshape(batch, nk, block_k)
    qmin, qmax, kmin, kmax = qb.min(-1), qb.max(-1), kb.min(-1), kb.max(-1)
    iq, jk = xp.arange(nq)[:, None], xp.arange(nk)[None, :]
    need = blocks_meet(qmin[:, :, None], qmax[:, :, None], kmin[:, None, :], kmax[:, None, :])
    # Tiles of padding only (sliced off by the wrapper; their cotangent is zero) are not needed.
    need = need & ((jk * block_k < seq_len) & (iq * block_q < seq_len))[None]
    if causal:
        need = need & (jk * block_k <= iq * block_q + block_q - 1)[None]

    def first_last(mask, axis):
        n = mask.shape[axis]
        hit = mask.any(axis)
        lo = xp.argmax(mask, axis=axis)
        hi = n - xp.argmax(xp.flip(mask, axis=axis), axis=axis)
        return xp.where(hit, lo, 0).astype(xp.int32), xp.where(hit, hi, 0).astype(xp.int32)

    lo, hi = first_last(need, 2)
    klo, khi = first_last(need, 1)
    cast = lambda a: a.astype(xp.int32)
    return dict(qmin=cast(qmin), qmax=cast(qmax), kmin=cast(kmin), kmax=cast(kmax),
                lo=lo, hi=hi, klo=klo, khi=khi)


def visited_blocks(segment_ids, block_q: int, block_k: int, causal: bool = True,
                   skip_blocks: bool = True) -> np.ndarray:
    """Bool [batch, n_q_blocks, n_k_blocks]: the tiles a forward kernel with these blocks
    computes (numpy). `segment_ids` is [batch, time] (or a (query ids, key ids) pair); pass zeros
    for "no documents". The kernels' own plan and in-loop check, so tests can count the work."""
    first = segment_ids[0] if isinstance(segment_ids, (tuple, list)) else segment_ids
    batch, seq_len = np.shape(first)
    padded = -(-seq_len // max(block_q, block_k)) * max(block_q, block_k)
    q_seg, kv_seg = pad_segments(segment_ids, batch, seq_len, padded, np)
    nq, nk = padded // block_q, padded // block_k
    if not skip_blocks:
        return np.ones((batch, nq, nk), bool)
    p = block_plan(q_seg, kv_seg, block_q, block_k, causal, seq_len, np)
    j = np.arange(nk)[None, None, :]
    in_range = (p["lo"][:, :, None] <= j) & (j < p["hi"][:, :, None])
    return in_range & blocks_meet(p["qmin"][:, :, None], p["qmax"][:, :, None],
                                  p["kmin"][:, None, :], p["kmax"][:, None, :])
