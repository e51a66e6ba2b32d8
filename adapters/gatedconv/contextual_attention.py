"""Contextual attention (Yu et al., CVPR 2018), batched, with per-sample patch validity.

The attention branch of DeepFill v2's refinement network matches every foreground position against
``3 x 3`` patches of the background features, both downsampled by ``rate``, and pastes the matching
full-resolution ``2*rate x 2*rate`` background patches back with a transposed convolution.

Two numerics, chosen with ``compat`` (:data:`COMPATS`):

``"tf"`` (default): the official TensorFlow graph (JiahuiYu/generative_inpainting ``contextual_attention``,
called with ``ksize=3, stride=1, rate=2`` and the defaults ``fuse_k=3, softmax_scale=10, fuse=True``),
the graph the released weights were trained in. Nearest resizing is TF1's ``resize_nearest_neighbor``
with ``align_corners=True``: source index ``roundf(i * s)`` with ``s = (n_in - 1) / (n_out - 1)``, both
products in float32 (:func:`resize_nearest_tf`).

``"nipponjo"``: the PyTorch port nipponjo/deepfillv2-pytorch (``model/networks_tf.py``), through which
most users run the converted weights. It differs in one place inside this op: its nearest
downsampling takes ``floor(linspace(0, n_in - 1, n_out) + 0.5)`` in float32, which picks another row
than TF for a few sizes (58 -> 29 rows: output row 14 reads row 28 where TF reads 29; 54 -> 27:
27 where TF reads 26). The port also calls the op with ``fuse=False`` and hands it the
full-resolution mask (see :class:`~kdinpaint_adapters.gatedconv.GatedConvInpaint`, which sets both).

Common to both:

* TF ``"SAME"`` zero padding for every patch extraction (:func:`.layers.tf_same_pad`);
* background patches L2-normalised (norm clamped at ``1e-4``), foreground patches not;
* ``fuse=True``: the score volume, seen as a ``(keys, queries)`` image, is convolved with a
  ``fuse_k x fuse_k`` identity kernel along its diagonal, once in row-major and once in column-major
  flattening (favours coherent neighbouring matches); ``fuse=False`` skips it;
* patch validity: the mask is resized **straight** to the matching resolution (``H_b/rate``), and a
  ``ksize x ksize`` patch there is valid iff it holds no hole. The official generator hands this op
  the mask already resized to the background's resolution (so it is resized twice, ``H -> H/4 -> H/8``);
  nipponjo's generator hands it the full-resolution mask (resized once, ``H -> H/8``). The two pick
  different rows and disagree on a few patches near hole borders;
* ``attention = softmax(scale * scores * valid) * valid``: invalid background patches get a logit of
  0 (not ``-inf``) and are zeroed after the softmax, so a row sums to exactly 1 only where every key
  is valid, and to less than 1 otherwise;
* pasting divides by 4, the number of overlapping ``2r x 2r`` patches at stride ``r``.

**Deviation from both (deliberate).** The official op and nipponjo's port compute the patch validity
from the mask of batch element 0 only and apply it to every sample (the maintainer confirmed that
masks are shared within a minibatch, generative_inpainting #233, #379). Here each sample uses its own
mask, which a distillation recipe with per-sample masks needs. With one mask shared by the whole batch
(or a batch of one) the results agree exactly.

**Affinity for attention transfer.** The softmax over background patches is the submodule
``softmax`` (``nn.Softmax(dim=1)``) and the masked probabilities pass through the submodule
``affinity`` (``nn.Identity``). A forward hook on ``affinity`` sees the attention actually used,
shape ``(B, L, h, w)`` = batch x keys x query rows x query columns with ``L = h_b * w_b`` background
patches in row-major order. Neither submodule adds ``state_dict`` entries.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import tf_same_pad

__all__ = ["ContextualAttention", "COMPATS", "resize_nearest_tf"]

COMPATS = ("tf", "nipponjo")
"""Numerics: the official TF graph, or nipponjo/deepfillv2-pytorch's port (see the module docstring)."""


def check_compat(compat: str) -> str:
    if compat not in COMPATS:
        raise ValueError(f"compat must be one of {COMPATS}, got {compat!r}")
    return compat


def _align_corners_index(n_in: int, n_out: int, device: torch.device, compat: str = "tf") -> torch.Tensor:
    """Source indices of an ``align_corners`` nearest resize from ``n_in`` to ``n_out`` samples.

    ``"tf"``: TF1 ``resize_nearest_neighbor``: ``roundf(float32(i) * float32((n_in - 1) / (n_out - 1)))``,
    halves rounded away from zero, clamped to ``n_in - 1``. ``"nipponjo"``:
    ``floor(torch.linspace(0, n_in - 1, n_out) + 0.5)`` in float32. Both give ``0`` for ``n_out == 1``.
    """
    check_compat(compat)
    if n_out == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    if compat == "nipponjo":
        x = torch.linspace(0, n_in - 1, steps=n_out, device=device, dtype=torch.float32)
        return (x + 0.5).floor().long()
    scale = torch.tensor(float(n_in - 1), dtype=torch.float32) / torch.tensor(float(n_out - 1), dtype=torch.float32)
    x = torch.arange(n_out, dtype=torch.float32) * scale  # float32 product, as TF's LegacyScaler
    down = x.floor()
    idx = down + (x - down >= 0.5).to(x.dtype)  # roundf: x - floor(x) is exact in float32
    return idx.long().clamp_max(n_in - 1).to(device)


def resize_nearest_tf(x: torch.Tensor, size: tuple[int, int], compat: str = "tf") -> torch.Tensor:
    """Nearest-neighbour resize of ``(B, C, H, W)`` to ``size = (h, w)`` with ``align_corners=True``.

    ``compat="tf"`` is how the official graph resizes features and masks (neuralgym ``resize``);
    ``"nipponjo"`` is the port's ``linspace`` version (see :func:`_align_corners_index`). For an exact
    x2 upsampling both equal PyTorch's ``nearest`` mode; for downsampling they do not.
    """
    h, w = int(size[0]), int(size[1])
    rows = _align_corners_index(x.shape[-2], h, x.device, compat)
    cols = _align_corners_index(x.shape[-1], w, x.device, compat)
    return x.index_select(-2, rows).index_select(-1, cols)


class ContextualAttention(nn.Module):
    """Contextual attention with per-sample patch-validity masks.

    Args:
        ksize: size of the matching patches (official 3; odd).
        rate: downsampling factor for matching; pasted patches are ``2*rate`` wide (official 2).
        fuse_k: size of the identity kernel of the fusion step (official 3; odd).
        softmax_scale: temperature multiplier of the scores before the softmax (official 10).
        fuse: apply the fusion step (``True`` in the official TF graph; nipponjo's generator calls the
            op with ``False``).
        eps: lower bound of the background patch norms (official ``1e-4``).
        compat: ``"tf"`` or ``"nipponjo"``, the nearest-resize rounding (see the module docstring).
            Alone it does not reproduce nipponjo's generator: that also needs ``fuse=False`` and the
            full-resolution mask, which ``GatedConvInpaint(compat="nipponjo")`` passes.
    """

    def __init__(
        self,
        ksize: int = 3,
        rate: int = 2,
        fuse_k: int = 3,
        softmax_scale: float = 10.0,
        fuse: bool = True,
        eps: float = 1e-4,
        compat: str = "tf",
    ) -> None:
        super().__init__()
        if ksize < 1 or ksize % 2 == 0:
            raise ValueError(f"ksize must be a positive odd integer, got {ksize}")
        if fuse_k < 1 or fuse_k % 2 == 0:
            raise ValueError(f"fuse_k must be a positive odd integer, got {fuse_k}")
        if rate < 1:
            raise ValueError(f"rate must be >= 1, got {rate}")
        self.ksize = ksize
        self.rate = rate
        self.fuse_k = fuse_k
        self.softmax_scale = float(softmax_scale)
        self.fuse = bool(fuse)
        self.eps = float(eps)
        self.compat = check_compat(compat)
        self.softmax = nn.Softmax(dim=1)  # over background patches (keys)
        self.affinity = nn.Identity()  # hook here: the masked attention, (B, L, h, w)

    def extra_repr(self) -> str:
        return (
            f"ksize={self.ksize}, rate={self.rate}, fuse_k={self.fuse_k}, "
            f"softmax_scale={self.softmax_scale:g}, fuse={self.fuse}, compat={self.compat!r}"
        )

    def patch_validity(self, mask: torch.Tensor | None, size: tuple[int, int], batch: int) -> torch.Tensor:
        """Per-sample validity of the background patches, ``(B, L, 1, 1)`` with 1 = usable.

        ``mask``: ``(B or 1, 1, H_m, W_m)``, 1 = hole, at any resolution (or ``None``: all valid). It is
        resized straight to the matching resolution ``size`` (nearest, ``align_corners``, this op's
        ``compat``); a ``ksize x ksize`` patch (zero padded at the border) is valid iff it contains no hole.
        """
        L = size[0] * size[1]
        if mask is None:
            return torch.ones(batch, L, 1, 1)
        m = resize_nearest_tf(mask, size, self.compat)
        patches = F.unfold(tf_same_pad(m, self.ksize), self.ksize)  # (B, k*k, L)
        valid = (patches == 0).all(dim=1).to(mask.dtype)  # (B, L)
        return valid.expand(batch, L).reshape(batch, L, 1, 1)

    def _diagonal_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, P)`` convolved with a ``fuse_k x fuse_k`` identity kernel, zero padded ("SAME").

        ``out[l, p] = sum_d x[l + d, p + d]`` for ``|d| <= fuse_k // 2``: shifted slices instead of a
        one-channel convolution over an ``L x P`` image, which is many times slower on CPU.
        """
        r = self.fuse_k // 2
        L, P = x.shape[-2:]
        padded = F.pad(x, (r, r, r, r))
        out = x.clone()
        for d in range(-r, r + 1):
            if d:
                out = out + padded[:, r + d : r + d + L, r + d : r + d + P]
        return out

    def _fuse(self, scores: torch.Tensor, key_hw: tuple[int, int], query_hw: tuple[int, int]) -> torch.Tensor:
        """Diagonal identity-kernel fusion of ``(B, L, P)`` scores, row-major then column-major."""
        B = scores.shape[0]
        (hb, wb), (hf, wf) = key_hw, query_hw
        y = self._diagonal_sum(scores)
        # re-flatten keys and queries column-major: (B, hb, wb, hf, wf) -> (B, wb, hb, wf, hf)
        y = y.view(B, hb, wb, hf, wf).permute(0, 2, 1, 4, 3).reshape(B, wb * hb, wf * hf)
        y = self._diagonal_sum(y)
        return y.view(B, wb, hb, wf, hf).permute(0, 2, 1, 4, 3).reshape(B, hb * wb, hf * wf)

    def forward(self, f: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct ``f`` from patches of ``b``.

        Args:
            f: foreground features ``(B, C, H_f, W_f)``, any range.
            b: background features ``(B, C, H_b, W_b)``; ``H_b`` and ``W_b`` divisible by ``rate``.
            mask: ``(B or 1, 1, H_m, W_m)``, 1 = hole, at any resolution: resized straight to the
                matching resolution ``(H_b // rate, W_b // rate)``; background patches touching a hole
                there are not used. The official generator passes it at the background's size,
                nipponjo's at the image's. Each sample uses its own mask (see the module docstring).

        Returns:
            ``(B, C, rate * (H_f // rate), rate * (W_f // rate))``: the attended background patches.
        """
        if f.dim() != 4 or b.dim() != 4 or f.shape[:2] != b.shape[:2]:
            raise ValueError(
                f"f and b must be (B, C, H, W) with the same B and C, got {tuple(f.shape)} and {tuple(b.shape)}"
            )
        B, C, Hb, Wb = b.shape
        r = self.rate
        if Hb % r or Wb % r or f.shape[-2] % r or f.shape[-1] % r:
            raise ValueError(
                f"feature sizes must be divisible by rate={r}, got f {tuple(f.shape[-2:])} and b {(Hb, Wb)}; "
                "pad the network input to a multiple of 8"
            )
        if mask is not None and (mask.dim() != 4 or mask.shape[1] != 1 or min(mask.shape[-2:]) < 1):
            raise ValueError(
                f"mask must be (B, 1, H, W), e.g. (B, 1, {Hb}, {Wb}) at the background's size, got {tuple(mask.shape)}"
            )
        if mask is not None and mask.shape[0] not in (1, B):
            raise ValueError(f"mask has batch size {mask.shape[0]} but the features have {B}")

        # Full-resolution background patches, pasted back at the end: (B, C*2r*2r, L).
        raw = F.unfold(tf_same_pad(b, 2 * r, r), 2 * r, stride=r)
        fs = resize_nearest_tf(f, (f.shape[-2] // r, f.shape[-1] // r), self.compat)
        bs = resize_nearest_tf(b, (Hb // r, Wb // r), self.compat)
        hf, wf = fs.shape[-2:]
        hb, wb = bs.shape[-2:]
        L = hb * wb

        # Matching: each sample's normalised background patches are the filters of a convolution over
        # its own foreground; groups=B runs the whole batch as one convolution.
        k = self.ksize
        keys = F.unfold(tf_same_pad(bs, k), k)  # (B, C*k*k, L)
        keys = keys / keys.norm(dim=1, keepdim=True).clamp_min(self.eps)
        keys = keys.transpose(1, 2).reshape(B * L, C, k, k)
        queries = tf_same_pad(fs, k).reshape(1, B * C, hf + k - 1, wf + k - 1)
        scores = F.conv2d(queries, keys, groups=B).view(B, L, hf * wf)
        if self.fuse:
            scores = self._fuse(scores, (hb, wb), (hf, wf))
        scores = scores.view(B, L, hf, wf)

        valid = self.patch_validity(mask, (hb, wb), B).to(device=scores.device, dtype=scores.dtype)
        attention = self.softmax(scores * valid * self.softmax_scale) * valid
        attention = self.affinity(attention)  # (B, L, hf, wf)

        # Pasting: transposed convolution with the raw patches as filters, again grouped by sample.
        raw = raw.view(B, C, 2 * r, 2 * r, L).permute(0, 4, 1, 2, 3).reshape(B * L, C, 2 * r, 2 * r)
        y = F.conv_transpose2d(attention.reshape(1, B * L, hf, wf), raw, stride=r, groups=B)
        y = y.view(B, C, (hf + 1) * r, (wf + 1) * r)
        top = r // 2  # TF "SAME" transposed convolution crops r//2 before, r - r//2 after
        return y[..., top : top + hf * r, top : top + wf * r] / 4.0
