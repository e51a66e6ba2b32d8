"""kdinpaint: distillation-guided image inpainting (Suin, Purohit & Rajagopalan, ICCV 2021) for any network.

    kd = kdinpaint.attach(student, teacher, spec)
    pred = student(masked_image, mask)
    loss = recon(pred, gt) + 20 * kd.losses(target=gt)["total"]
"""

from kdinpaint import _moved

_moved.install()  # old import paths of moved modules (kdinpaint.objective, ...) warn and keep working

from kdinpaint.adapter import Adapter  # noqa: E402
from kdinpaint.attach import Distiller, attach
from kdinpaint.pixel_attention import PixelAttention
from kdinpaint.train.bilevel import MetaLearner, TrainingDiverged
from kdinpaint.export import CompletedModel, load_checkpoint, load_exported, save_exported
from kdinpaint.hookspecs import hookimpl
from kdinpaint.plugins import get_adapter, list_adapters
from kdinpaint.plugins import resolve_spec as load_spec
from kdinpaint.spec import AdapterSpec, AttentionSite
from kdinpaint.suggest import suggest_spec
from kdinpaint.teacher import build_teacher, pretrain

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterSpec",
    "AttentionSite",
    "CompletedModel",
    "Distiller",
    "MetaLearner",
    "PixelAttention",
    "TrainingDiverged",
    "attach",
    "build_teacher",
    "get_adapter",
    "hookimpl",
    "list_adapters",
    "load_checkpoint",
    "load_exported",
    "load_spec",
    "pretrain",
    "save_exported",
    "suggest_spec",
]
