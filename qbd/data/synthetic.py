"""The embedded default data set: procedural 32x32 RGB "traffic signs", generated on the fly.

Twelve classes, each a (sign shape, sign colour, inner glyph) triple. The table is built so that
classes share attributes pairwise -- same shape and colour with a different glyph, same glyph and
colour on a different shape -- so a model has to look at all three, not just the dominant colour.
Every image draws its own nuisances: position, scale, rotation, vertical squash, filled or rimmed
style, a pole, background gradient and clutter (discs, boxes and lines, some in sign colours), an
occluding branch, lighting (contrast, brightness, colour cast, shading), blur and pixel noise.

Rendering is vectorised numpy on a 32x32 pixel grid: every shape is a signed distance field in
pixels and its anti-aliased coverage is clip(0.5 - distance, 0, 1). No per-pixel Python loops.

Bit-identical output across runs and machines is a requirement (the tests pin a sha256), so the
generator only uses operations IEEE 754 rounds exactly: + - * / sqrt, min/max/abs/clip/where and
the Generator's bit-exact uniform draws (float32 `random`, `integers`, `permutation`). No sin/cos/
exp/log or normal draws (numpy may dispatch those to CPU-specific SIMD code that differs in the
last bit), no float reductions (their summation order is an implementation detail) and no torch.
Float constants are Python floats so NEP 50 keeps every array float32.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from qbd.config import DatasetSpec
from qbd.data.base import DataSplit

SIZE = 32
N_TRAIN_PER_CLASS = 1000  # 12 classes -> 12,000 training images
N_TEST_PER_CLASS = 200  # -> 2,400 test images

# (shape, colour, glyph) per class. Pairs that differ in one attribute only: 0/1, 2/3, 4/5, 10/11
# (glyph); 0/6 (shape: circle vs octagon); 7/8 (shape and colour, same glyph); 9/10 (shape and
# colour, same glyph); 2/11 (shape, same colour and glyph).
CLASS_TABLE: tuple[tuple[str, str, str], ...] = (
    ("circle", "red", "hbar"),
    ("circle", "red", "cross"),
    ("circle", "blue", "arrow_up"),
    ("circle", "blue", "arrow_right"),
    ("triangle", "red", "vbar"),
    ("triangle", "red", "ring"),
    ("octagon", "red", "vbar"),
    ("octagon", "blue", "dot"),
    ("diamond", "yellow", "dot"),
    ("diamond", "yellow", "plus"),
    ("square", "blue", "plus"),
    ("square", "blue", "arrow_up"),
)
CLASSES: tuple[str, ...] = tuple(f"{s}-{c}-{g}" for s, c, g in CLASS_TABLE)

# Per-channel mean/std of the seed-0 training set in [0, 1] units, rounded to 4 decimals.
# Fixed constants (see DataSplit); recompute with `channel_stats` if the generator changes.
MEAN = (0.3761, 0.3519, 0.3623)
STD = (0.2228, 0.2132, 0.2173)

_COLOURS = {"red": (0.80, 0.08, 0.10), "blue": (0.08, 0.25, 0.78), "yellow": (0.95, 0.78, 0.08)}
# Clutter sometimes takes sign colours (plus white and black) so colour alone is not a give-away.
_PALETTE = np.array(
    [_COLOURS["red"], _COLOURS["blue"], _COLOURS["yellow"], (0.92, 0.92, 0.92), (0.08, 0.08, 0.08)],
    dtype=np.float32,
)
_PALETTE.flags.writeable = False  # a constant
_SHAPE_GLYPH_SCALE = {"circle": 1.0, "octagon": 1.0, "square": 0.95, "diamond": 0.8, "triangle": 0.62}
_TRIANGLE_HALF_SIDE = 1.15
_RIM = 0.2  # rim width of the rimmed style, in sign radii
_HIGHLIGHT = 0.86  # brightest noise-free value (in [0, 1]); see _render
# Clutter slots, painted in this order: each slot is one kind, present or not per image.
_CLUTTER_KINDS = ("disc", "disc", "box", "box", "line", "line")
_CHUNK = 256  # images rendered at a time: small enough to stay in cache; results do not depend on it
_SQRT3 = math.sqrt(3.0)
# Mixed into every seed so these streams differ from anything else seeded with the same integer.
_SALT = 0x5159_4E54


def load(spec: DatasetSpec, root: Path | None = None) -> DataSplit:
    """Generate the train and test splits for `spec.seed`. `root` is unused (embedded data)."""
    x_train, y_train = generate(spec.seed, "train", N_TRAIN_PER_CLASS)
    x_test, y_test = generate(spec.seed, "test", N_TEST_PER_CLASS)
    return DataSplit.from_numpy("synthetic", (x_train, y_train), (x_test, y_test), CLASSES, MEAN, STD)


def generate(seed: int, split: str, n_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, N x 3 x 32 x 32, RGB) and labels (int64) of one split, N = 12 * n_per_class.

    Train and test draw from different sub-seeds of `seed` (independent streams), so they
    share no image; the tests check this for seed 0.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if n_per_class < 0:
        raise ValueError(f"n_per_class must be >= 0, got {n_per_class}")
    # Separate streams for the per-image parameters and for each of the two uniform draws that
    # make the pixel noise: each stream is consumed in image order, so the output does not
    # depend on how the images are chunked.
    streams = np.random.SeedSequence([_SALT, seed, 0 if split == "train" else 1]).spawn(3)
    rng, noise_a, noise_b = (np.random.Generator(np.random.PCG64(ss)) for ss in streams)

    n_classes = len(CLASS_TABLE)
    labels = rng.permutation(np.repeat(np.arange(n_classes, dtype=np.int64), n_per_class))
    params = _draw_params(rng, labels)
    images = np.empty((labels.size, 3, SIZE, SIZE), dtype=np.uint8)
    for start in range(0, labels.size, _CHUNK):
        sl = slice(start, min(start + _CHUNK, labels.size))
        chunk = {k: v[sl] for k, v in params.items()}
        images[sl] = _render(chunk, labels[sl], noise_a, noise_b)
    return images, labels


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, rounded to 4 decimals (how MEAN/STD were made)."""
    # From per-channel histograms: exact counts, and no float copy of the whole array.
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        m = float(counts @ levels / counts.sum())
        mean.append(round(m, 4))
        std.append(round(float(np.sqrt(counts @ (levels - m) ** 2 / counts.sum())), 4))
    return tuple(mean), tuple(std)


# --- parameters ---------------------------------------------------------------------------------


def _uniform(rng: np.random.Generator, shape: int | tuple[int, ...], lo: float, hi: float) -> np.ndarray:
    # float32 `random` is (next_uint32 >> 8) * 2**-24: bit-exact everywhere, unlike `uniform`'s
    # float64 path that is also exact but would make every later op float64 (slower).
    return rng.random(shape, dtype=np.float32) * (hi - lo) + lo


def _unit_vectors(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Random directions without trigonometry: normalise a point of the square."""
    x = _uniform(rng, n, -1.0, 1.0)
    y = _uniform(rng, n, -1.0, 1.0)
    norm = np.sqrt(x * x + y * y) + 1e-6
    return x / norm, y / norm


def _draw_params(rng: np.random.Generator, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Every random choice of every image, drawn up front in a fixed order."""
    n = labels.size
    p: dict[str, np.ndarray] = {}
    # sign geometry: radius in pixels, centre kept (mostly) inside the image
    p["radius"] = _uniform(rng, n, 5.5, 12.0)
    off = np.maximum(SIZE / 2 - 0.9 * p["radius"], 0.0)
    p["cx"] = SIZE / 2 + _uniform(rng, n, -1.0, 1.0) * off
    p["cy"] = SIZE / 2 + _uniform(rng, n, -1.0, 1.0) * off
    # rotation up to about +-20 degrees as (cos, sin) = normalised (1, t)
    t = _uniform(rng, n, -0.36, 0.36)
    p["cos"] = 1.0 / np.sqrt(1.0 + t * t)
    p["sin"] = t * p["cos"]
    p["squash"] = _uniform(rng, n, 0.78, 1.0)  # vertical foreshortening
    colours = np.array([_COLOURS[c] for _, c, _ in CLASS_TABLE], dtype=np.float32)
    p["body"] = np.clip(colours[labels] + _uniform(rng, (n, 3), -0.1, 0.1), 0.0, 1.0)
    p["rimmed"] = (rng.random(n, dtype=np.float32) < 0.4).astype(np.float32)
    p["paper"] = _uniform(rng, n, 0.8, 1.0)  # white of glyph / rimmed interior
    p["ink"] = _uniform(rng, n, 0.0, 0.2)  # black of glyph
    # pole below the sign
    p["pole"] = (rng.random(n, dtype=np.float32) < 0.5).astype(np.float32)
    p["pole_width"] = _uniform(rng, n, 0.6, 1.6)
    p["pole_grey"] = _uniform(rng, n, 0.25, 0.65)
    # background: base colour plus a linear colour gradient
    p["bg"] = _uniform(rng, (n, 3), 0.03, 0.8)
    p["bg_grad"] = _uniform(rng, (n, 3), -0.3, 0.3)
    p["bg_dx"], p["bg_dy"] = _unit_vectors(rng, n)
    # clutter: discs, rotated boxes and line segments, behind the sign
    k = len(_CLUTTER_KINDS)
    p["cl_on"] = (rng.random((n, k), dtype=np.float32) < 0.45).astype(np.float32)
    p["cl_x"] = _uniform(rng, (n, k), -2.0, SIZE + 2.0)
    p["cl_y"] = _uniform(rng, (n, k), -2.0, SIZE + 2.0)
    p["cl_a"] = _uniform(rng, (n, k), 1.5, 8.0)
    p["cl_b"] = _uniform(rng, (n, k), 0.8, 8.0)
    dx, dy = _unit_vectors(rng, n * k)
    p["cl_dx"], p["cl_dy"] = dx.reshape(n, k), dy.reshape(n, k)
    p["cl_len"] = _uniform(rng, (n, k), 4.0, 22.0)
    p["cl_thick"] = _uniform(rng, (n, k), 0.4, 1.6)
    free = _uniform(rng, (n, k, 3), 0.0, 1.0)
    pal = _PALETTE[rng.integers(0, len(_PALETTE), size=(n, k))]
    pal = np.clip(pal + _uniform(rng, (n, k, 3), -0.1, 0.1), 0.0, 1.0)
    p["cl_col"] = np.where((rng.random((n, k), dtype=np.float32) < 0.35)[..., None], pal, free)
    # a branch crossing in front of the sign
    p["occ_on"] = (rng.random(n, dtype=np.float32) < 0.2).astype(np.float32)
    p["occ_x"] = _uniform(rng, n, 0.0, SIZE)
    p["occ_y"] = _uniform(rng, n, 0.0, SIZE)
    p["occ_dx"], p["occ_dy"] = _unit_vectors(rng, n)
    p["occ_thick"] = _uniform(rng, n, 0.4, 1.2)
    p["occ_col"] = _uniform(rng, (n, 3), 0.05, 0.45)
    # lighting
    p["contrast"] = _uniform(rng, n, 0.45, 1.1)
    p["brightness"] = _uniform(rng, n, -0.25, 0.15)
    p["cast"] = _uniform(rng, (n, 3), 0.8, 1.2)
    p["shade"] = _uniform(rng, n, 0.0, 0.4)
    p["shade_dx"], p["shade_dy"] = _unit_vectors(rng, n)
    # degradations
    p["blur"] = _uniform(rng, n, 0.0, 1.6)
    p["noise"] = _uniform(rng, n, 0.01, 0.11)
    return p


# --- signed distance fields (pixel-grid arrays; negative inside) ---------------------------------


_Scalar = float | np.ndarray  # a constant, or per-image values shaped (n, 1, 1)


def _length(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.sqrt(x * x + y * y)


def _coverage(sdf_px: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a shape whose signed distance is given in pixels."""
    return np.clip(0.5 - sdf_px, 0.0, 1.0)


def _sd_circle(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    return _length(u, v) - r


def _sd_box(u: np.ndarray, v: np.ndarray, bx: _Scalar, by: _Scalar) -> np.ndarray:
    """Axis-aligned box with half-sizes bx, by."""
    qx = np.abs(u) - bx
    qy = np.abs(v) - by
    return _length(np.maximum(qx, 0.0), np.maximum(qy, 0.0)) + np.minimum(np.maximum(qx, qy), 0.0)


def _sd_segment(
    u: np.ndarray, v: np.ndarray, ax: _Scalar, ay: _Scalar, bx: _Scalar, by: _Scalar, thickness: _Scalar
) -> np.ndarray:
    """Line segment a-b with half-thickness `thickness`."""
    pax, pay = u - ax, v - ay
    bax, bay = bx - ax, by - ay
    h = np.clip((pax * bax + pay * bay) / (bax * bax + bay * bay), 0.0, 1.0)
    return _length(pax - h * bax, pay - h * bay) - thickness


def _sd_octagon(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Regular octagon with apothem r (after Inigo Quilez's sdOctogon)."""
    kx, ky, kz = -0.9238795325, 0.3826834323, 0.4142135623
    px, py = np.abs(u), np.abs(v)
    d = 2.0 * np.minimum(kx * px + ky * py, 0.0)
    px, py = px - d * kx, py - d * ky
    d = 2.0 * np.minimum(-kx * px + ky * py, 0.0)
    px, py = px + d * kx, py - d * ky
    px = px - np.clip(px, -kz * r, kz * r)
    py = py - r
    return _length(px, py) * np.sign(py)


def _sd_triangle(u: np.ndarray, v_up: np.ndarray, r: float) -> np.ndarray:
    """Equilateral triangle pointing up (+v_up), half side r, centred on its centroid (Quilez)."""
    px = np.abs(u) - r
    py = v_up + r / _SQRT3
    fold = px + _SQRT3 * py > 0.0
    px, py = (
        np.where(fold, (px - _SQRT3 * py) * 0.5, px),
        np.where(fold, (-_SQRT3 * px - py) * 0.5, py),
    )
    px = px - np.clip(px, -2.0 * r, 0.0)
    return -_length(px, py) * np.sign(py)


def _sd_sign(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sign outline in sign radii (image v points down)."""
    if shape == "circle":
        return _sd_circle(u, v, 1.0)
    if shape == "octagon":
        return _sd_octagon(u, v, 0.95)
    if shape == "triangle":
        return _sd_triangle(u, -v, _TRIANGLE_HALF_SIDE)
    if shape == "diamond":
        return (np.abs(u) + np.abs(v) - 1.05) * (1.0 / math.sqrt(2.0))
    if shape == "square":
        return _sd_box(u, v, 0.85, 0.85)
    raise ValueError(f"unknown sign shape {shape!r}")


def _sd_glyph(glyph: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if glyph == "hbar":
        return _sd_box(u, v, 0.55, 0.15)
    if glyph == "vbar":
        return _sd_box(u, v, 0.15, 0.55)
    if glyph == "dot":
        return _sd_circle(u, v, 0.28)
    if glyph == "ring":
        return np.abs(_length(u, v) - 0.40) - 0.11
    if glyph == "cross":
        return np.minimum(
            _sd_segment(u, v, -0.42, -0.42, 0.42, 0.42, 0.12), _sd_segment(u, v, -0.42, 0.42, 0.42, -0.42, 0.12)
        )
    if glyph == "plus":
        return np.minimum(_sd_box(u, v, 0.5, 0.16), _sd_box(u, v, 0.16, 0.5))
    if glyph == "arrow_up":
        shaft = _sd_segment(u, v, 0.0, 0.55, 0.0, -0.2, 0.12)
        head = _sd_triangle(u, -(v + 0.3), 0.3)
        return np.minimum(shaft, head)
    if glyph == "arrow_right":
        return _sd_glyph("arrow_up", v, -u)  # rotate the up arrow by 90 degrees
    raise ValueError(f"unknown glyph {glyph!r}")


# --- rendering -----------------------------------------------------------------------------------


def _col(a: np.ndarray) -> np.ndarray:
    """Per-image scalars (n,) -> (n, 1, 1) for broadcasting against (n, H, W)."""
    return a[:, None, None]


def _blend(img: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Paint `colour` (n, 3[, H, W]) over img (n, 3, H, W) with coverage alpha (n, H, W)."""
    if colour.ndim == 2:
        colour = colour[:, :, None, None]
    return img + alpha[:, None] * (colour - img)


def _blur3(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 binomial blur with edge replication (exact, order fixed)."""
    for axis in (2, 3):
        x = np.moveaxis(img, axis, 0)  # a view: rows (or columns) first
        out = 2.0 * x
        out[1:] += x[:-1]
        out[0] += x[0]
        out[:-1] += x[1:]
        out[-1] += x[-1]
        img = np.moveaxis(out * 0.25, 0, axis)
    return img


def _render(
    p: dict[str, np.ndarray], labels: np.ndarray, noise_a: np.random.Generator, noise_b: np.random.Generator
) -> np.ndarray:
    n = labels.size
    grid = np.arange(SIZE, dtype=np.float32) + 0.5  # pixel centres
    gy = np.broadcast_to(grid[None, :, None], (n, SIZE, SIZE))
    gx = np.broadcast_to(grid[None, None, :], (n, SIZE, SIZE))
    cx, cy = (gx - SIZE / 2) / (SIZE / 2), (gy - SIZE / 2) / (SIZE / 2)  # [-1, 1]

    # background gradient
    ramp = _col(p["bg_dx"]) * cx + _col(p["bg_dy"]) * cy
    img = p["bg"][:, :, None, None] + p["bg_grad"][:, :, None, None] * ramp[:, None]

    # clutter behind the sign
    for k, kind in enumerate(_CLUTTER_KINDS):
        px, py = _col(p["cl_x"][:, k]), _col(p["cl_y"][:, k])
        dx, dy = _col(p["cl_dx"][:, k]), _col(p["cl_dy"][:, k])
        if kind == "disc":
            sdf = _sd_circle(gx - px, gy - py, 0.0) - _col(p["cl_a"][:, k])
        elif kind == "box":  # frame rotated to the slot's direction
            u = (gx - px) * dx + (gy - py) * dy
            v = (gy - py) * dx - (gx - px) * dy
            sdf = _sd_box(u, v, _col(p["cl_a"][:, k]), _col(p["cl_b"][:, k]))
        else:
            ln = _col(p["cl_len"][:, k])
            sdf = _sd_segment(gx, gy, px, py, px + dx * ln, py + dy * ln, _col(p["cl_thick"][:, k]))
        img = _blend(img, p["cl_col"][:, k], _coverage(sdf) * _col(p["cl_on"][:, k]))

    # the sign: pole, body, rimmed interior, glyph
    radius = _col(p["radius"])
    sx, sy = _col(p["cx"]), _col(p["cy"])
    pole = _sd_box(gx - sx, gy - sy - 0.5 * SIZE, _col(p["pole_width"]), 0.5 * SIZE)
    grey = np.repeat(p["pole_grey"][:, None], 3, axis=1)
    img = _blend(img, grey, _coverage(pole) * _col(p["pole"]))
    rx, ry = gx - sx, gy - sy
    cos, sin = _col(p["cos"]), _col(p["sin"])
    u = (cos * rx + sin * ry) / radius
    v = (cos * ry - sin * rx) / (radius * _col(p["squash"]))
    for cls, (shape, colour, glyph) in enumerate(CLASS_TABLE):
        idx = np.flatnonzero(labels == cls)
        if idx.size == 0:
            continue
        uu, vv, rr = u[idx], v[idx], radius[idx]
        body_sdf = _sd_sign(shape, uu, vv)
        scale = _SHAPE_GLYPH_SCALE[shape]
        glyph_cov = _coverage(_sd_glyph(glyph, uu / scale, vv / scale) * (rr * scale))
        rimmed = _col(p["rimmed"][idx])
        inner = _coverage((body_sdf + _RIM) * rr) * rimmed
        paper = np.repeat(p["paper"][idx, None], 3, axis=1)
        ink = np.repeat(p["ink"][idx, None], 3, axis=1)
        # filled style: glyph in white (black on yellow); rimmed style: white disc, black glyph
        filled_glyph = ink if colour == "yellow" else paper
        glyph_col = np.where(p["rimmed"][idx, None] > 0.5, ink, filled_glyph)
        face = np.broadcast_to(p["body"][idx, :, None, None], (idx.size, 3, SIZE, SIZE))
        face = _blend(face, paper, inner)
        face = _blend(face, glyph_col, glyph_cov)
        img[idx] = _blend(img[idx], face, _coverage(body_sdf * rr))

    # a branch in front
    ox, oy = _col(p["occ_x"]), _col(p["occ_y"])
    odx, ody = _col(p["occ_dx"]) * SIZE, _col(p["occ_dy"]) * SIZE
    occ = _sd_segment(gx, gy, ox - odx, oy - ody, ox + odx, oy + ody, _col(p["occ_thick"]))
    img = _blend(img, p["occ_col"], _coverage(occ) * _col(p["occ_on"]))

    # lighting: contrast about mid-grey, brightness, per-channel cast, linear shading
    img = (img - 0.5) * p["contrast"][:, None, None, None] + 0.5 + p["brightness"][:, None, None, None]
    shade = 1.0 - _col(p["shade"]) * (0.5 + 0.5 * (_col(p["shade_dx"]) * cx + _col(p["shade_dy"]) * cy))
    img = img * p["cast"][:, :, None, None] * shade[:, None]

    # blur: up to two binomial passes, blended by the per-image amount
    blur = p["blur"][:, None, None, None]
    img = img + np.minimum(blur, 1.0) * (_blur3(img) - img)
    img = img + np.maximum(blur - 1.0, 0.0) * (_blur3(img) - img)

    # Limited dynamic range: the scene never saturates to pure white, only the noise reaches
    # 255 in single pixels. A solid white patch (BadNet's default trigger) then stands out as in
    # real sign photographs, instead of being confusable with over-exposed white clutter.
    img = np.minimum(img, _HIGHLIGHT)

    # pixel noise: triangular (sum of two uniforms), per-image amplitude
    noise = noise_a.random(img.shape, dtype=np.float32) + noise_b.random(img.shape, dtype=np.float32) - 1.0
    img = img + noise * p["noise"][:, None, None, None] * 1.7

    return np.floor(np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
