"""kdinpaint: distillation-guided image inpainting (Suin, Purohit & Rajagopalan, ICCV 2021) for any network."""

__version__ = "0.1.0"
