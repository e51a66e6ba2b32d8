"""kdinpaint.inference.inpainter: the Inpainter pads once to the stride, batches, hides the hole from the model,
composites (known pixels bit for bit), refuses bad input and NaN output, names the batch size when memory runs out,
and runs an exported checkpoint as the model itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdinpaint
from kdinpaint.inference import InferenceOutOfMemory, Inpainter, NonFiniteOutput


class _Blur(torch.nn.Module):
    """Translation-equivariant: a fixed 3x3 mean filter; records the sizes it was called at."""

    def __init__(self, stride: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((3, 1, 3, 3), 1 / 9))
        self.stride, self.seen = stride, []

    def forward(self, image, mask):
        self.seen.append((tuple(image.shape[-2:]), torch.is_inference_mode_enabled(), self.training))
        assert image.shape[-1] % self.stride == 0 and image.shape[-2] % self.stride == 0
        return F.conv2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), self.weight, groups=3) * 3  # leaves [-1, 1]


def test_inpainter_pads_crops_and_keeps_known_pixels_exactly(random_image):
    image = random_image(3, 37, 50)
    mask = torch.zeros(3, 1, 37, 50)
    mask[..., 10:25, 15:35] = 1
    net = _Blur(8)
    net.train()
    out = Inpainter(net, stride=8, batch_size=2)(image, mask)
    assert [s[0] for s in net.seen] == [(40, 56), (40, 56)]  # two batches (2 + 1), padded once to the stride
    assert all(inference and not training for _, inference, training in net.seen)
    assert net.training  # the caller's mode is restored
    known = mask.expand_as(image) == 0
    assert torch.equal(out[known], image[known])  # bit for bit
    # inside the hole, away from the border, the prediction lines up with the same filter at native size
    with torch.no_grad():
        native = F.conv2d(F.pad(image * (1 - mask), (1, 1, 1, 1), mode="replicate"), net.weight, groups=3) * 3
    torch.testing.assert_close(out[..., 10:25, 15:35], native.clamp(-1, 1)[..., 10:25, 15:35])
    assert float(out.abs().max()) <= 1


def test_inpainter_never_lets_the_prediction_leak_into_known_pixels(random_image):
    def far_off(image, mask):
        return torch.full_like(image, 1.8)  # a little beyond [-1, 1]: clamped (beyond 2 is refused)

    image, mask = random_image(2, 16, 16), torch.zeros(1, 1, 16, 16)
    mask[..., 4:8, 4:8] = 1
    out = Inpainter(far_off)(image, mask)  # a single mask broadcast over the batch
    known = mask.expand_as(image) == 0
    assert torch.equal(out[known], image[known]) and (out[~known] == 1).all()  # clamped to [-1, 1]
    with pytest.raises(NonFiniteOutput, match=r"nan_model returned NaN/inf at 256 of 256 pixels \(image 0 of the batch\)"):  # refused, not composited
        Inpainter(lambda i, m: torch.full_like(i, float("nan")), name="nan_model")(image, mask)


def test_inpainter_hides_the_hole_from_the_model(random_image):
    seen = {}

    def spy(image, mask):
        seen["hole"] = image[mask.expand_as(image) == 1]
        return image

    image, mask = random_image(1, 8, 8), torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 2:5] = 1
    Inpainter(spy)(image, mask)
    assert torch.equal(seen["hole"], torch.zeros(27))


def test_inpainter_refuses_bad_input_with_the_fix(random_image):
    inp = Inpainter(lambda i, m: i)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        inp(torch.full((1, 3, 8, 8), 200.0), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="nearest"):
        inp(random_image(1, 8, 8), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="255"):
        inp(random_image(1, 8, 8), torch.full((1, 1, 8, 8), 255.0))


def test_out_of_memory_names_the_batch_size(random_image):
    def oom(image, mask):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(InferenceOutOfMemory, match=r"batch size 4.*--batch-size.*from 4 to 2"):
        Inpainter(oom, batch_size=4)(random_image(4, 8, 8), torch.ones(1, 1, 8, 8))
    with pytest.raises(InferenceOutOfMemory, match="already 1"):
        Inpainter(oom)(random_image(1, 8, 8), torch.ones(1, 1, 8, 8))


def test_checkpoint_inpainter_equals_the_model_composited(tmp_path, random_image):
    torch.manual_seed(0)
    adapter = kdinpaint.get_adapter("tiny-unet")
    student = adapter.student(width=4)
    kd = kdinpaint.attach(student, adapter.teacher(width=4), adapter.spec)
    path = tmp_path / "tiny.safetensors"
    kdinpaint.save_exported(kd.export(), path, adapter="tiny-unet", builder_kwargs={"width": 4})
    kd.detach()
    inp = Inpainter.from_checkpoint(path, "tiny-unet", device="cpu", batch_size=3)
    assert inp.stride == 8
    image, mask = random_image(2, 24, 32), torch.zeros(2, 1, 24, 32)
    mask[0, :, 3:12, 5:20] = 1
    mask[1, :, 10:20, 0:9] = 1
    fresh = kdinpaint.load_exported(path, adapter.student(width=4)).eval()
    with torch.no_grad():
        pred = fresh(image * (1 - mask), mask)
    assert torch.equal(inp(image, mask), pred * mask + image * (1 - mask))
    with pytest.raises(ValueError, match="'tiny-unet:wide' was expected"):
        Inpainter.from_checkpoint(path, "tiny-unet:wide")
