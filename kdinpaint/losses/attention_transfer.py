"""Attention transfer, Eq. (9): ``R_att = sum_{i in H} t_i * sum_j (r^AN_ij - r_ij)^2``, per hole row.

Only hole query rows enter the loss, so only those rows are computed: the hole queries are gathered before
the softmax, and memory grows with (hole pixels × N), not N². Rows are padded to the largest hole count of
the batch and a validity mask drops the padding, so the whole batch is one batched matmul. Normalised by the
number of hole rows; exactly 0 (never NaN) with no hole. Computed in at least float32.

:func:`attention_transfer` (queries and keys of pixel attention) computes the hole rows of both affinities as
dense batched matrices (in cache-sized chunks) where they fit :data:`~kdinpaint.ops.attention.DENSE_ELEMENTS`
(the main job's crops), differentiated (twice) by autograd, nothing recomputed; larger, they run in blocks (:func:`kdinpaint.ops.rowwise.rowwise`),
so neither the backward pass nor the derivative of that backward pass taken by Reverse-HG keeps the
``rows × N`` affinities; only one block's are alive at a time. The loss needs the affinity rows themselves
(Eq. 9 compares probabilities), so it cannot use a fused attention kernel, which returns only ``r @ v``.
"""

from __future__ import annotations

import torch
from einops import rearrange

from kdinpaint.masking import at_least_fp32, mask_at
from kdinpaint.ops.attention import CHUNK_ELEMENTS, DENSE_ELEMENTS, affinity, block_rows, chunked, gather_rows, row_index
from kdinpaint.ops.rowwise import rowwise

__all__ = ["hole_rows", "attention_transfer", "attention_transfer_from_affinity"]


def hole_rows(mask: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of the hole query positions at ``size``, padded per sample.

    Returns ``index`` ``(B, R)`` (flat positions; the padding entries are distinct non-hole positions),
    ``valid`` ``(B, R)`` bool and ``count`` (scalar tensor, total hole rows), with ``R`` the largest per-sample
    count (at least 1).
    """
    holes = mask_at(mask, size).flatten(1) > 0.5  # (B, N)
    index, valid = row_index(holes)
    return index, valid, valid.sum()


def _weighted(sq_rows: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    t = torch.gather(at_least_fp32(weights.flatten(1)), 1, index)  # (B, R)
    return (sq_rows * t * valid).sum() / count.clamp_min(1).to(sq_rows.dtype)


def attention_transfer(
    q: torch.Tensor,
    k: torch.Tensor,
    q_teacher: torch.Tensor,
    k_teacher: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Eq. (9) from queries and keys (pixel attention), computing only the hole rows of both affinities.

    Args:
        q, k: the student's queries and keys, ``(B, N, C)`` with ``N = h*w``.
        q_teacher, k_teacher: the teacher's, ``(B, N, C')``.
        weights: ``t(d^AN)`` in (0, 1), ``(B, 1, h, w)``; its size gives the query grid.
        mask: ``(B, 1, H, W)``, 1 = hole; max-pooled to ``(h, w)``.
    """
    size = weights.shape[-2:]
    if q.shape[1] != size[0] * size[1] or q_teacher.shape[1] != q.shape[1] or k_teacher.shape[1] != k.shape[1]:
        raise ValueError(
            f"attention transfer: student queries {tuple(q.shape)}, keys {tuple(k.shape)}, teacher queries "
            f"{tuple(q_teacher.shape)}, keys {tuple(k_teacher.shape)} and a {tuple(size)} query grid do not match"
        )
    index, valid, count = hole_rows(mask, size)
    rows = (gather_rows(at_least_fp32(q), index), gather_rows(at_least_fp32(q_teacher), index))  # (B, R, C)
    keys = (at_least_fp32(k), at_least_fp32(k_teacher))
    if index.shape[0] * index.shape[1] * k.shape[1] <= DENSE_ELEMENTS:  # the rows fit: dense, in chunks
        sq_rows = chunked(_row_distance, rows, keys, max(1, CHUNK_ELEMENTS // (k.shape[0] * k.shape[1])))
    else:
        sq_rows = rowwise(_row_distance, rows, keys, block_rows(*k.shape[:2]))
    return _weighted(sq_rows, weights, index, valid, count)


def _row_distance(q: torch.Tensor, q_teacher: torch.Tensor, k: torch.Tensor, k_teacher: torch.Tensor) -> torch.Tensor:
    """``sum_j (r^AN_ij - r_ij)^2`` for the query rows given, ``(B, R)``."""
    r = affinity(q, k)
    r_t = affinity(q_teacher, k_teacher)
    return (r_t - r).pow(2).sum(-1)


def attention_transfer_from_affinity(
    affinity: torch.Tensor, affinity_teacher: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, layout: str = "queries_keys"
) -> torch.Tensor:
    """Eq. (9) from affinities a model materialises itself (attention modules that are not ours).

    Args:
        affinity, affinity_teacher: ``(B, N_q, N_k)`` for ``layout="queries_keys"`` (rows = queries in raster
            order of the ``weights`` grid), or ``(B, N_k, h, w)`` for ``layout="keys_hw"`` (the patch-based
            contextual attention of DeepFill: one key distribution per query position).
        weights: ``t(d^AN)``, ``(B, 1, h, w)``: the query grid.
        mask: ``(B, 1, H, W)``, 1 = hole.
    """
    if affinity.shape != affinity_teacher.shape:
        raise ValueError(
            f"student affinity {tuple(affinity.shape)} and teacher affinity {tuple(affinity_teacher.shape)} differ; "
            "the teacher must see inputs of the same size (and, for patch attention, the same mask: teacher_input: same_mask)"
        )
    size = tuple(weights.shape[-2:])
    if layout == "keys_hw":
        if affinity.dim() != 4 or tuple(affinity.shape[-2:]) != size:
            raise ValueError(f"layout keys_hw expects (B, keys, {size[0]}, {size[1]}), got {tuple(affinity.shape)}")
        affinity = rearrange(affinity, "b k h w -> b (h w) k")
        affinity_teacher = rearrange(affinity_teacher, "b k h w -> b (h w) k")
    elif layout == "queries_keys":
        if affinity.dim() != 3 or affinity.shape[1] != size[0] * size[1]:
            raise ValueError(
                f"layout queries_keys expects (B, {size[0] * size[1]} queries, keys), got {tuple(affinity.shape)}"
            )
    else:
        raise ValueError(f"unknown affinity layout {layout!r}; use 'queries_keys' or 'keys_hw'")
    index, valid, count = hole_rows(mask, size)
    diff = gather_rows(at_least_fp32(affinity_teacher), index) - gather_rows(at_least_fp32(affinity), index)
    return _weighted(diff.pow(2).sum(-1), weights, index, valid, count)
