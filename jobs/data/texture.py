"""The 13-channel texture array of ARR-COC, computed from RGB on the cluster (numpy only).

Per pixel, then average-pooled onto a grid x grid patch grid (H and W must divide by grid):
   0-2  R, G, B in [0, 1] (sRGB values as stored)
   3-4  CIE L* (0..100) and a* from sRGB, D65 white, with the sRGB gamma removed first
   5-7  Sobel Gx, Gy and per-pixel magnitude sqrt(Gx^2 + Gy^2) on channel 12's luminance;
        3x3 kernels, edge-replicate padding, unnormalised (|Gx|, |Gy| <= 4); Gx > 0 when it is
        brighter to the right, Gy > 0 when brighter below. Magnitude is pooled per pixel, so
        opposite edges in one patch do not cancel.
   8-9  y and x of the patch centre as a fraction of the image, (i + 0.5) / grid
   10   distance of the patch centre from the image centre, divided by the centre-to-corner
        distance (a corner would be 1)
   11   saliency: per-pixel Euclidean distance in (L*, a*, b*) from the image's mean LAB colour,
        divided by the image's largest such distance (0 when that is under 1e-3, i.e. a uniform
        image up to float rounding); a frequency-tuned
        saliency (Achanta et al. 2009) without the blur
   12   luminance Y = 0.2126 R + 0.7152 G + 0.0722 B on linear RGB (Rec. 709 / sRGB primaries)
"""

from __future__ import annotations

import numpy as np

CHANNELS = (
    "r", "g", "b", "lab_l", "lab_a", "sobel_x", "sobel_y", "sobel_mag",
    "pos_y", "pos_x", "centre_dist", "saliency", "luminance",
)  # fmt: skip

_SRGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ],
    dtype=np.float32,
)
_D65 = np.array([0.95047, 1.0, 1.08883], dtype=np.float32)
_DELTA = 6.0 / 29.0


def _linear(srgb: np.ndarray) -> np.ndarray:
    return np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)


# uint8 input has 256 possible values: a table makes the gamma removal exact and ~3x faster.
_LINEAR_LUT = _linear(np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)


def _lab(linear_rgb: np.ndarray) -> np.ndarray:
    xyz = (linear_rgb @ _SRGB_TO_XYZ.T) / _D65
    f = np.where(xyz > _DELTA**3, np.cbrt(xyz), xyz / (3 * _DELTA**2) + 4.0 / 29.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def _sobel(lum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(lum, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = lum.shape[1:]

    def at(dy, dx):  # the neighbour at offset (dy, dx) of every pixel
        return p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    return gx, gy


def _pool(x: np.ndarray, grid: int) -> np.ndarray:
    b, c, h, w = x.shape
    return x.reshape(b, c, grid, h // grid, grid, w // grid).mean(axis=(3, 5))


def texture_array(images: np.ndarray, grid: int = 32) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 13, grid, grid); see the module docstring per channel."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
    b, h, w, _ = images.shape
    if h % grid or w % grid:
        raise ValueError(f"image size {h}x{w} is not divisible by the {grid}x{grid} patch grid")
    rgb = images.astype(np.float32) / 255.0
    lin = _LINEAR_LUT[images]
    lab = _lab(lin)
    lum = lin @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
    gx, gy = _sobel(lum)
    dist = np.sqrt(((lab - lab.mean(axis=(1, 2), keepdims=True)) ** 2).sum(axis=-1))
    peak = dist.max(axis=(1, 2), keepdims=True)
    saliency = np.divide(dist, peak, out=np.zeros_like(dist), where=peak > 1e-3)
    per_pixel = np.concatenate(
        [
            rgb.transpose(0, 3, 1, 2),
            lab[..., :2].transpose(0, 3, 1, 2),
            np.stack([gx, gy, np.sqrt(gx * gx + gy * gy), saliency, lum], axis=1),
        ],
        axis=1,
    ).astype(np.float32)
    pooled = _pool(per_pixel, grid)  # channels 0-7, 11, 12 in that order

    centre = (np.arange(grid, dtype=np.float32) + 0.5) / grid
    pos_y, pos_x = np.meshgrid(centre, centre, indexing="ij")
    centre_dist = np.sqrt((pos_y - 0.5) ** 2 + (pos_x - 0.5) ** 2) / np.sqrt(0.5)
    position = np.broadcast_to(np.stack([pos_y, pos_x, centre_dist]), (b, 3, grid, grid))
    return np.concatenate([pooled[:, :8], position, pooled[:, 8:]], axis=1).astype(np.float32)


def _as_images(column) -> np.ndarray:
    """Ray Data hands a tensor column as (B, H, W, 3); a flat fixed-size list as (B, H*W*3)
    or an object array of rows. Flat images are taken as square."""
    if isinstance(column, np.ndarray) and column.dtype == object:
        column = np.stack([np.asarray(x, dtype=np.uint8) for x in column])
    images = np.asarray(column, dtype=np.uint8)
    if images.ndim == 2:
        side = int(round((images.shape[1] / 3) ** 0.5))
        images = images.reshape(len(images), side, side, 3)
    return images


def texture_batch(batch: dict, grid: int = 32) -> dict:
    """For `ds.map_batches(texture_batch, batch_format="numpy")`: adds a float32 `texture` column
    (B, 13, grid, grid) computed from the `image` column; the other columns pass through."""
    out = dict(batch)
    out["texture"] = texture_array(_as_images(batch["image"]), grid)
    return out
