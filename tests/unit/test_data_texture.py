"""The texture array, checked channel by channel against plain-Python arithmetic per pixel."""

import math

import numpy as np
import pytest

from jobs.data.texture import CHANNELS, texture_array, texture_batch


def _to_linear(v):  # sRGB byte -> linear light, written out from the sRGB standard
    c = v / 255.0
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def _lab_of(r, g, b):
    R, G, B = _to_linear(r), _to_linear(g), _to_linear(b)
    X = 0.4124564 * R + 0.3575761 * G + 0.1804375 * B
    Y = 0.2126729 * R + 0.7151522 * G + 0.0721750 * B
    Z = 0.0193339 * R + 0.1191920 * G + 0.9503041 * B

    def f(t):
        return t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29

    fx, fy, fz = f(X / 0.95047), f(Y / 1.0), f(Z / 1.08883)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def _reference(img, grid):
    """(13, grid, grid) from loops over pixels, with no code shared with the module."""
    h, w, _ = img.shape
    px = [[tuple(int(v) for v in img[y, x]) for x in range(w)] for y in range(h)]
    lum = [[0.2126 * _to_linear(p[0]) + 0.7152 * _to_linear(p[1]) + 0.0722 * _to_linear(p[2])
            for p in row] for row in px]  # fmt: skip
    labs = [[_lab_of(*p) for p in row] for row in px]
    mean = [sum(labs[y][x][k] for y in range(h) for x in range(w)) / (h * w) for k in range(3)]
    sal = [[math.dist(labs[y][x], mean) for x in range(w)] for y in range(h)]
    top = max(max(row) for row in sal)
    sal = [[s / top if top > 0 else 0.0 for s in row] for row in sal]

    def L(y, x):  # luminance with edge replication
        return lum[min(max(y, 0), h - 1)][min(max(x, 0), w - 1)]

    per_pixel = np.zeros((13, h, w))
    for y in range(h):
        for x in range(w):
            gx = (L(y - 1, x + 1) - L(y - 1, x - 1)) + 2 * (L(y, x + 1) - L(y, x - 1)) + (
                L(y + 1, x + 1) - L(y + 1, x - 1))  # fmt: skip
            gy = (L(y + 1, x - 1) - L(y - 1, x - 1)) + 2 * (L(y + 1, x) - L(y - 1, x)) + (
                L(y + 1, x + 1) - L(y - 1, x + 1))  # fmt: skip
            r, g, b = px[y][x]
            per_pixel[:, y, x] = [r / 255, g / 255, b / 255, labs[y][x][0], labs[y][x][1],
                                  gx, gy, math.hypot(gx, gy), 0, 0, 0, sal[y][x], lum[y][x]]  # fmt: skip
    out = np.zeros((13, grid, grid))
    ph, pw = h // grid, w // grid
    for i in range(grid):
        for j in range(grid):
            out[:, i, j] = per_pixel[:, i * ph : (i + 1) * ph, j * pw : (j + 1) * pw].mean(axis=(1, 2))
            cy, cx = (i + 0.5) / grid, (j + 0.5) / grid
            out[8, i, j], out[9, i, j] = cy, cx
            out[10, i, j] = math.hypot(cy - 0.5, cx - 0.5) / math.hypot(0.5, 0.5)
    return out


@pytest.mark.parametrize("size,grid", [(4, 2), (8, 4), (8, 1)])
def test_every_channel_matches_hand_arithmetic(size, grid):
    rng = np.random.default_rng(size * 10 + grid)
    images = rng.integers(0, 256, size=(3, size, size, 3), dtype=np.uint8)
    got = texture_array(images, grid)
    assert got.shape == (3, 13, grid, grid) and got.dtype == np.float32
    for k in range(3):
        want = _reference(images[k], grid)
        for c, name in enumerate(CHANNELS):
            np.testing.assert_allclose(got[k, c], want[c], rtol=1e-4, atol=2e-4, err_msg=name)


def test_known_colour_values():
    # published CIELAB of sRGB primaries (D65): red L* 53.24 a* 80.09, green L* 87.73 a* -86.18
    img = np.array([[[[255, 0, 0], [0, 255, 0]], [[255, 255, 255], [0, 0, 0]]]], np.uint8)
    t = texture_array(np.repeat(np.repeat(img, 2, axis=1), 2, axis=2), grid=2)[0]
    np.testing.assert_allclose(t[3], [[53.24, 87.73], [100.0, 0.0]], atol=0.01)
    np.testing.assert_allclose(t[4], [[80.09, -86.18], [0.0, 0.0]], atol=0.01)
    np.testing.assert_allclose(t[12], [[0.2126, 0.7152], [1.0, 0.0]], atol=1e-4)
    np.testing.assert_allclose(t[10], np.full((2, 2), 0.5), atol=1e-6)  # quarter-way to corners


def test_vertical_step_edge_gives_positive_gx_only():
    img = np.zeros((1, 4, 4, 3), np.uint8)
    img[:, :, 2:] = 255  # dark left half, white right half
    t = texture_array(img, grid=4)[0]
    # at columns 1 and 2 the kernel spans the step: 1 + 2 + 1 = 4 (luminance 0 -> 1)
    np.testing.assert_allclose(t[5], np.tile([0.0, 4.0, 4.0, 0.0], (4, 1)), atol=1e-6)
    np.testing.assert_allclose(t[6], 0.0, atol=1e-6)
    np.testing.assert_allclose(t[7], t[5], atol=1e-6)


def test_uniform_image_has_zero_saliency_and_edges():
    t = texture_array(np.full((2, 8, 8, 3), 77, np.uint8), grid=4)
    assert np.all(t[:, 5:8] == 0) and np.all(t[:, 11] == 0)


def _object_rows(images):
    rows = np.empty(len(images), dtype=object)
    rows[:] = list(images.reshape(len(images), -1))
    return rows


def test_batch_accepts_tensor_and_flat_columns_and_keeps_others():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    want = texture_array(images, 4)
    for column in (images, images.reshape(2, -1), _object_rows(images)):
        out = texture_batch({"image": column, "answer": np.array(["a", "b"])}, grid=4)
        np.testing.assert_array_equal(out["texture"], want)
        assert list(out["answer"]) == ["a", "b"]


def test_rejects_a_grid_that_does_not_divide_the_image():
    with pytest.raises(ValueError, match="not divisible"):
        texture_array(np.zeros((1, 10, 10, 3), np.uint8), grid=4)
