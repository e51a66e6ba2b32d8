"""kdinpaint.inference: padding to the stride, the Inpainter's compositing and batching, mask files, masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import kdinpaint
from kdinpaint.data import FreeFormMasks, rng_for
from kdinpaint.inference import (
    InferenceOutOfMemory,
    Inpainter,
    NonFiniteOutput,
    evaluate_model,
    generated_masks,
    load_image,
    load_mask,
    pad_to_multiple,
    save_image,
    unpad,
)
from kdinpaint.evaluation.metrics import TABLE1_BUCKETS


def _image(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("h, w, multiple", [(37, 50, 8), (32, 24, 8), (5, 9, 4), (3, 2, 8), (17, 1, 3)])
def test_pad_round_trip_against_numpy(h, w, multiple):
    image = _image(2, h, w)
    mask = (torch.rand(2, 1, h, w, generator=torch.Generator().manual_seed(1)) > 0.6).float()
    padded, pmask, crop = pad_to_multiple(image, mask, multiple)
    H, W = padded.shape[-2:]
    assert H % multiple == 0 and W % multiple == 0 and H - h < multiple and W - w < multiple
    assert pmask.shape == (2, 1, H, W)
    assert torch.equal(unpad(padded, crop), image) and torch.equal(unpad(pmask, crop), mask)
    # oracle: numpy's pad, the border split evenly with the odd pixel bottom/right; mirror without repeating the
    # edge pixel, or repeat the edge when the image is too small to mirror
    ph, pw = H - h, W - w
    widths = ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
    mode = "reflect" if max(widths[2]) < h and max(widths[3]) < w else "edge"
    np.testing.assert_array_equal(padded.numpy(), np.pad(image.numpy(), widths, mode=mode))
    np.testing.assert_array_equal(pmask.numpy(), np.pad(mask.numpy(), widths, mode=mode))
    assert set(pmask.unique().tolist()) <= {0.0, 1.0}


def test_pad_is_a_no_op_on_multiples_and_refuses_bad_multiples():
    image, mask = _image(1, 16, 24), torch.zeros(1, 1, 16, 24)
    padded, pmask, crop = pad_to_multiple(image, mask, 8)
    assert padded is image and pmask is mask and crop == (0, 0, 16, 24)
    with pytest.raises(ValueError, match="multiple"):
        pad_to_multiple(image, mask, 0)


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


def test_inpainter_pads_crops_and_keeps_known_pixels_exactly():
    image = _image(3, 37, 50)
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


def test_inpainter_never_lets_the_prediction_leak_into_known_pixels():
    def far_off(image, mask):
        return torch.full_like(image, 5.0)

    image, mask = _image(2, 16, 16), torch.zeros(1, 1, 16, 16)
    mask[..., 4:8, 4:8] = 1
    out = Inpainter(far_off)(image, mask)  # a single mask broadcast over the batch
    known = mask.expand_as(image) == 0
    assert torch.equal(out[known], image[known]) and (out[~known] == 1).all()  # clamped to [-1, 1]
    with pytest.raises(NonFiniteOutput, match=r"nan_model returned NaN/inf at 256 of 256 pixels \(image 0 of the batch\)"):  # refused, not composited
        Inpainter(lambda i, m: torch.full_like(i, float("nan")), name="nan_model")(image, mask)


def test_inpainter_hides_the_hole_from_the_model():
    seen = {}

    def spy(image, mask):
        seen["hole"] = image[mask.expand_as(image) == 1]
        return image

    image, mask = _image(1, 8, 8), torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 2:5] = 1
    Inpainter(spy)(image, mask)
    assert torch.equal(seen["hole"], torch.zeros(27))


def test_inpainter_refuses_bad_input_with_the_fix():
    inp = Inpainter(lambda i, m: i)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        inp(torch.full((1, 3, 8, 8), 200.0), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="nearest"):
        inp(_image(1, 8, 8), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="255"):
        inp(_image(1, 8, 8), torch.full((1, 1, 8, 8), 255.0))


def test_out_of_memory_names_the_batch_size():
    def oom(image, mask):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(InferenceOutOfMemory, match=r"batch size 4.*--batch-size.*from 4 to 2"):
        Inpainter(oom, batch_size=4)(_image(4, 8, 8), torch.ones(1, 1, 8, 8))
    with pytest.raises(InferenceOutOfMemory, match="already 1"):
        Inpainter(oom)(_image(1, 8, 8), torch.ones(1, 1, 8, 8))


def test_checkpoint_inpainter_equals_the_model_composited(tmp_path):
    torch.manual_seed(0)
    adapter = kdinpaint.get_adapter("tiny-unet")
    student = adapter.student(width=4)
    kd = kdinpaint.attach(student, adapter.teacher(width=4), adapter.spec)
    path = tmp_path / "tiny.safetensors"
    kdinpaint.save_exported(kd.export(), path, adapter="tiny-unet", builder_kwargs={"width": 4})
    kd.detach()
    inp = Inpainter.from_checkpoint(path, "tiny-unet", device="cpu", batch_size=3)
    assert inp.stride == 8
    image, mask = _image(2, 24, 32), torch.zeros(2, 1, 24, 32)
    mask[0, :, 3:12, 5:20] = 1
    mask[1, :, 10:20, 0:9] = 1
    fresh = kdinpaint.load_exported(path, adapter.student(width=4)).eval()
    with torch.no_grad():
        pred = fresh(image * (1 - mask), mask)
    assert torch.equal(inp(image, mask), pred * mask + image * (1 - mask))
    with pytest.raises(ValueError, match="'tiny-unet:wide' was expected"):
        Inpainter.from_checkpoint(path, "tiny-unet:wide")


def test_mask_files_are_thresholded_and_resized_nearest(tmp_path):
    holes = np.zeros((6, 5), bool)
    holes[1:4, 2:4] = True
    Image.fromarray(holes.astype(np.uint8) * 255).save(tmp_path / "m255.png")
    Image.fromarray(holes.astype(np.uint8)).save(tmp_path / "m01.png")  # a 0/1 label image
    noisy = np.where(holes, 230, 20).astype(np.uint8)  # JPEG-like grey levels
    Image.fromarray(np.stack([noisy] * 3 + [np.full_like(noisy, 255)], -1), "RGBA").save(tmp_path / "rgba.png")
    for name in ("m255.png", "m01.png", "rgba.png"):
        m = load_mask(tmp_path / name)
        assert m.shape == (1, 1, 6, 5) and torch.equal(m[0, 0], torch.from_numpy(holes).float())
    big = load_mask(tmp_path / "m255.png", size=(18, 10))  # 3x taller, 2x wider: every pixel repeated
    assert torch.equal(big[0, 0], torch.from_numpy(np.kron(holes, np.ones((3, 2)))).float())
    assert torch.equal(load_mask(tmp_path / "m255.png", hole="black")[0, 0], torch.from_numpy(~holes).float())
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_mask(tmp_path / "nope.png")


def test_image_round_trip_and_errors(tmp_path):
    image = (torch.randint(0, 256, (1, 3, 7, 9)).float() / 127.5 - 1)
    save_image(tmp_path / "sub" / "x.png", image)
    assert torch.allclose(load_image(tmp_path / "sub" / "x.png"), image, atol=1e-6)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_generated_masks_fill_the_table1_buckets_deterministically():
    masks = generated_masks("freeform", 5, 48, seed=3)
    ratios = masks.mean((1, 2, 3))
    for i, r in enumerate(ratios.tolist()):
        lo, hi = TABLE1_BUCKETS[i % 4]
        assert lo <= r < hi
    again = FreeFormMasks(ratio=TABLE1_BUCKETS[1]).sample(rng_for(3, 1), (48, 48))
    assert torch.equal(masks[1, 0], torch.from_numpy(again).float())
    with pytest.raises(ValueError, match="freeform"):
        generated_masks("circles", 1, 32)


def test_evaluate_model_takes_dataset_items_and_refuses_mismatches():
    images = _image(3, 32, 32)
    masks = generated_masks("rect", 3, 32)
    inp = Inpainter.from_baseline("mean", batch_size=2)
    done = []
    rows, summary = evaluate_model(inp, [{"image": i, "mask": m} for i, m in zip(images, masks)], on_batch=done.append)
    rows2, _ = evaluate_model(inp, images, masks, names=["a", "b", "c"])
    assert done == [2, 1] and [r.psnr for r in rows] == [r.psnr for r in rows2] and rows2[2].name == "c"
    assert summary["buckets"]["all"]["count"] == 3
    with pytest.raises(ValueError, match="3 images but 2 masks"):
        evaluate_model(inp, images, masks[:2])
    with pytest.raises(TypeError, match="Inpainter"):
        evaluate_model(lambda i, m: i, images, masks)
