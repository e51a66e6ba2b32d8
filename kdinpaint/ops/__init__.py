"""Low-level operators: adaptive convolution (Eq. 6), softmax attention (Eq. 7-8) and StructureFlow's Gaussian
resampling."""

from kdinpaint.ops.adaptive_conv import adaptive_conv
from kdinpaint.ops.attention import softmax_attention
from kdinpaint.ops.gaussian_resample import GaussianResample2d, gaussian_resample

__all__ = ["adaptive_conv", "softmax_attention", "gaussian_resample", "GaussianResample2d"]
