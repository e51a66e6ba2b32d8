"""harmonic_fill and biharmonic_fill against the exact discrete harmonic and biharmonic interpolants (direct
solves) and scikit-image's inpaint_biharmonic, and their contract."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdinpaint.ops.fill import biharmonic_fill, harmonic_fill


def _exact(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """The discrete harmonic interpolant, solved directly: every hole pixel is the mean of its 4 neighbours,
    an out-of-image neighbour being the pixel itself (replicate padding), known pixels fixed.
    ``image`` ``(C, H, W)``, ``hole`` ``(H, W)`` bool; returns ``(C, H, W)`` float64."""
    C, H, W = image.shape
    pts = list(zip(*np.nonzero(hole)))
    index = {p: i for i, p in enumerate(pts)}
    A, b = np.zeros((len(pts), len(pts))), np.zeros((len(pts), C))
    for i, (y, x) in enumerate(pts):
        # 4 u_p = sum of the 4 neighbours; an outside one is u_p itself, so (inside count) u_p - sum inside = 0
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < H and 0 <= nx < W:
                A[i, i] += 1
                if hole[ny, nx]:
                    A[i, index[ny, nx]] -= 1
                else:
                    b[i] += image[:, ny, nx]
    out = image.astype(np.float64).copy()
    for (y, x), u in zip(pts, np.linalg.solve(A, b)):
        out[:, y, x] = u
    return out


def _exact_biharmonic(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """The hole values minimising ``sum over all pixels of (L u)^2``, L the 5-point Laplacian with an
    out-of-image neighbour equal to the pixel (the graph Laplacian of the pixel grid), known pixels fixed:
    a dense least-squares solve. ``image`` ``(C, H, W)``, ``hole`` ``(H, W)`` bool."""
    C, H, W = image.shape
    L = np.zeros((H * W, H * W))
    for y in range(H):
        for x in range(W):
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < H and 0 <= nx < W:
                    L[y * W + x, y * W + x] -= 1
                    L[y * W + x, ny * W + nx] += 1
    h = hole.ravel()
    out = image.reshape(C, H * W).astype(np.float64).copy()
    for c in range(C):
        out[c, h] = np.linalg.lstsq(L[:, h], -L[:, ~h] @ out[c, ~h], rcond=None)[0]
    return out.reshape(C, H, W)


def _rect_holes(H: int, W: int) -> np.ndarray:
    hole = np.zeros((H, W), bool)
    hole[2 : H // 2 + 2, 3 : W // 2 + 2] = True  # inside
    hole[H - 3 :, W - 4 :] = True  # in the corner: neighbours outside the image
    return hole


def _random_holes(H: int, W: int, seed: int = 0, fraction: float = 0.45) -> np.ndarray:
    hole = np.random.default_rng(seed).random((H, W)) < fraction
    hole.flat[0] = False  # at least one known pixel
    return hole


CASES = [
    ("rects", 12, 12),
    ("rects", 13, 17),  # odd: the 2×2 pyramid uses ceil_mode (13×17 -> 7×9 -> 4×5 -> 2×3)
    ("random", 13, 17),
    ("random", 3, 7),
    ("random", 1, 9),
    ("random", 9, 1),
]


@pytest.mark.parametrize("kind,H,W", CASES)
def test_many_sweeps_converge_to_the_discrete_harmonic_interpolant(kind, H, W):
    hole = _rect_holes(H, W) if kind == "rects" else _random_holes(H, W)
    image = np.random.default_rng(1).uniform(-1, 1, (2, 3, H, W))
    expected = np.stack([_exact(im, hole) for im in image])
    mask = torch.from_numpy(hole).double()[None, None].expand(2, 1, H, W)
    out = harmonic_fill(torch.from_numpy(image), mask, iterations=1000)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-9, rtol=0)
    out32 = harmonic_fill(torch.from_numpy(image).float(), mask.float(), iterations=1000)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("H,W", [(12, 12), (13, 17)])
def test_biharmonic_steps_converge_to_the_least_squares_biharmonic_fill(H, W):
    hole = _rect_holes(H, W)
    image = np.random.default_rng(2).uniform(-1, 1, (2, 3, H, W))
    expected = np.stack([_exact_biharmonic(im, hole) for im in image])
    mask = torch.from_numpy(hole).double()[None, None]
    out = harmonic_fill(torch.from_numpy(image), mask, biharmonic_iterations=200)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-9, rtol=0)
    assert np.array_equal(out.numpy()[..., ~hole], image[..., ~hole])  # the steps move hole pixels only
    out32 = harmonic_fill(torch.from_numpy(image).float(), mask.float(), biharmonic_iterations=200)
    np.testing.assert_allclose(out32.numpy(), expected, atol=1e-4, rtol=0)
    # a sample without holes and one without known pixels stay finite: unchanged, and zeros
    edge = torch.from_numpy(image[:1]).expand(2, 3, H, W)
    masks = torch.stack([torch.zeros(1, H, W), torch.ones(1, H, W)]).double()
    refined = harmonic_fill(edge, masks, biharmonic_iterations=50)
    assert torch.equal(refined[0], edge[0]) and torch.equal(refined[1], torch.zeros(3, H, W))


def test_coarse_to_fine_is_closer_than_as_many_plain_sweeps():
    # the pyramid is the point of the op: 64 sweeps per level must beat 64 Jacobi sweeps at full resolution
    # from the mean colour (computed naively here) on a large hole
    H = W = 64
    yy, xx = np.mgrid[:H, :W]
    image = np.stack([np.sin(xx / 7) + np.cos(yy / 5), np.cos(xx / 9) * np.sin(yy / 11), (xx - yy) / 64]) / 2
    hole = np.zeros((H, W), bool)
    hole[10:50, 14:46] = True
    expected = _exact(image, hole)
    x, m = torch.from_numpy(image)[None], torch.from_numpy(hole).double()[None, None]
    ours = harmonic_fill(x, m, iterations=64)[0].numpy()
    plain = x * (1 - m) + m * (x * (1 - m)).sum((2, 3), keepdim=True) / (1 - m).sum()
    neighbours = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float64).expand(3, 1, 3, 3) / 4
    for _ in range(64):
        plain = plain + m * (F.conv2d(F.pad(plain, (1, 1, 1, 1), mode="replicate"), neighbours, groups=3) - plain)
    err_ours = np.abs(ours - expected)[:, hole].mean()
    err_plain = np.abs(plain[0].numpy() - expected)[:, hole].mean()
    assert err_ours < 0.5 * err_plain, (err_ours, err_plain)


@pytest.mark.parametrize("iterations", [0, 1, 64])
def test_known_pixels_kept_and_fill_within_the_known_range(iterations):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 3, 24, 20, generator=g) * 2 - 1
    image[1] = image[1] * 0.05 + 0.3  # another range per sample: the bounds must be the sample's own
    image[2, 0] = -0.7  # a constant channel is filled with that constant
    mask = (torch.rand(3, 1, 24, 20, generator=g) < 0.4).float()
    mask[:, :, 5:15, 4:12] = 1
    out = harmonic_fill(image, mask, iterations)
    known = (mask == 0).expand_as(image)
    assert torch.equal(out[known], image[known])  # returned unchanged, not recomputed
    for b in range(3):
        for c in range(3):
            vals = image[b, c][mask[b, 0] == 0]
            fill = out[b, c][mask[b, 0] == 1]
            assert float(fill.min()) >= float(vals.min()) - 1e-6 and float(fill.max()) <= float(vals.max()) + 1e-6
    torch.testing.assert_close(out[2, 0], torch.full((24, 20), -0.7), atol=1e-6, rtol=0)
    # values under the holes are not read
    garbage = image + mask * torch.randn(image.shape, generator=g) * 100
    assert torch.equal(harmonic_fill(garbage, mask, iterations), out)


def test_sample_without_known_pixels_is_zeros_and_samples_are_independent():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[0] = 1  # nothing known
    mask[1, :, 4:12, 2:9] = 1
    out = harmonic_fill(image, mask)
    assert torch.equal(out[0], torch.zeros(3, 16, 16))
    torch.testing.assert_close(out[1:], harmonic_fill(image[1:], mask[1:]), atol=1e-6, rtol=0)
    # one mask for the whole batch is broadcast
    torch.testing.assert_close(harmonic_fill(image, mask[1:]), harmonic_fill(image, mask[1:].expand(2, 1, 16, 16)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_dtype_is_preserved(dtype):
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 13, 17, generator=g, dtype=torch.float64) * 2 - 1
    mask = torch.from_numpy(_rect_holes(13, 17)).double()[None, None]
    out = harmonic_fill(image.to(dtype), mask)
    assert out.dtype == dtype and out.shape == image.shape
    reference = harmonic_fill(image, mask)
    tol = {torch.float64: 0, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.double(), reference, atol=tol, rtol=0)


def test_bad_arguments_are_named():
    image, mask = torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"image \(B, C, H, W\) and mask \(B, 1, H, W\).*\(3, 8, 8\)"):
        harmonic_fill(image[0], mask)
    with pytest.raises(ValueError, match=r"\(1, 3, 8, 8\)"):
        harmonic_fill(image, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"same size.*\(1, 1, 8, 9\)"):
        harmonic_fill(image, torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="iterations must be >= 0, got -1"):
        harmonic_fill(image, mask, -1)
    with pytest.raises(ValueError, match="biharmonic_iterations -2"):
        harmonic_fill(image, mask, 4, -2)


@pytest.mark.parametrize("kind,H,W", [("rects", 12, 12), ("rects", 13, 17), ("random", 13, 17), ("random", 3, 7), ("random", 1, 9)])
def test_biharmonic_fill_is_the_least_squares_biharmonic_fill(kind, H, W):
    # float64 to a tight tolerance: the direct solve's values (clipped to the known range, as scikit-image does)
    hole = _rect_holes(H, W) if kind == "rects" else _random_holes(H, W)
    image = np.random.default_rng(3).uniform(-1, 1, (2, 3, H, W))
    expected = np.stack([_exact_biharmonic(im, hole) for im in image])
    lo = image[..., ~hole].min(-1)[..., None, None]
    hi = image[..., ~hole].max(-1)[..., None, None]
    expected = np.clip(expected, lo, hi)
    mask = torch.from_numpy(hole).double()[None, None]
    out = biharmonic_fill(torch.from_numpy(image), mask, tol=1e-12, max_iterations=200)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-8, rtol=0)
    assert np.array_equal(out.numpy()[..., ~hole], image[..., ~hole])
    out32 = biharmonic_fill(torch.from_numpy(image).float(), mask.float())
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("where", ["inside", "edges", "strokes"])
def test_biharmonic_fill_matches_scikit_image(where):
    skimage_restoration = pytest.importorskip("skimage.restoration")
    from skimage.data import chelsea
    from skimage.transform import resize

    size = 48
    photo = resize(chelsea(), (size, size), anti_aliasing=True)  # (H, W, 3) in [0, 1], float64
    hole = np.zeros((size, size), bool)
    if where == "inside":
        hole[12:36, 10:40] = True
    elif where == "edges":  # touching the image's border: no fixed value there
        hole[:16, :] = True
        hole[:, -10:] = True
    else:
        hole[np.random.default_rng(4).random((size, size)) < 0.3] = True
        hole[20:23, :] = True
    expected = skimage_restoration.inpaint_biharmonic(photo, hole, channel_axis=-1)  # float64 direct solve
    image = torch.from_numpy(photo).permute(2, 0, 1)[None].float()
    out = biharmonic_fill(image, torch.from_numpy(hole).float()[None, None])[0].permute(1, 2, 0).double().numpy()
    np.testing.assert_allclose(out, expected, atol=2e-4, rtol=0)


def test_biharmonic_fill_samples_without_holes_or_known_pixels():
    g = torch.Generator().manual_seed(5)
    image = torch.rand(3, 2, 16, 12, generator=g)
    mask = torch.zeros(3, 1, 16, 12)
    mask[1] = 1  # nothing known: zeros
    mask[2, :, 3:9, 2:10] = 1
    out = biharmonic_fill(image, mask)
    assert torch.equal(out[0], image[0]) and torch.equal(out[1], torch.zeros(2, 16, 12))
    torch.testing.assert_close(out[2:], biharmonic_fill(image[2:], mask[2:]))
    garbage = image + mask * 100  # values under the holes are not read
    assert torch.equal(biharmonic_fill(garbage, mask), out)
    with pytest.raises(ValueError, match="biharmonic_fill needs image"):
        biharmonic_fill(image, mask[:, :, :8])


class _Fills(torch.nn.Module):
    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([harmonic_fill(image, mask, 64), biharmonic_fill(image, mask)], 1)


@pytest.mark.slow
def test_traced_fills_hold_each_loop_once_and_equal_eager():
    # torch.export: every loop is one while_loop (3 pyramid levels of sweeps at 8×8, one conjugate-gradient loop),
    # not 64 copies of a sweep per level
    g = torch.Generator().manual_seed(6)
    image = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 1:5] = 1
    program = torch.export.export(_Fills(), (image, mask))
    loops = [n for n in program.graph.nodes if n.op == "call_function" and "while_loop" in str(n.target)]
    assert len(loops) == 4
    torch.testing.assert_close(program.module()(image, mask), _Fills()(image, mask), atol=1e-5, rtol=0)


def test_laplacian_eager_and_traced_forms_equal_the_stencil_with_a_replicated_border(monkeypatch):
    # naive reference: the sum over the four neighbours of (neighbour - centre), a neighbour outside the image
    # being the centre itself (zero flux); the traced form (one pad, four views) must give the same values and
    # leave no whole-map copies (slice_scatter) in an exported graph
    from kdinpaint.ops import fill

    g = torch.Generator().manual_seed(2)
    u = torch.rand(2, 3, 5, 7, generator=g, dtype=torch.float64)
    H, W = u.shape[-2:]
    expected = torch.zeros_like(u)
    for y in range(H):
        for x in range(W):
            for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                ny, nx = min(max(y + dy, 0), H - 1), min(max(x + dx, 0), W - 1)
                expected[..., y, x] += u[..., ny, nx] - u[..., y, x]
    torch.testing.assert_close(fill._laplacian(u), expected, atol=1e-12, rtol=0)
    monkeypatch.setattr(fill, "is_tracing", lambda: True)
    torch.testing.assert_close(fill._laplacian(u), expected, atol=1e-12, rtol=0)
    monkeypatch.undo()

    class Lap(torch.nn.Module):
        def forward(self, v):
            return fill._laplacian(v)

    program = torch.export.export(Lap(), (u,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("slice_scatter" in t or "copy" in t for t in targets), targets
    torch.testing.assert_close(program.module()(u), expected, atol=1e-12, rtol=0)
