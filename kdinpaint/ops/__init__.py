"""Low-level operators: adaptive convolution (Eq. 6)."""

from kdinpaint.ops.adaptive_conv import adaptive_conv

__all__ = ["adaptive_conv"]
from kdinpaint.ops.gaussian_resample import GaussianResample2d, gaussian_resample  # noqa: E402,F401
