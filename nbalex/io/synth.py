"""A synthetic ImageNet-style folder for demos and tests: ``train/`` and ``val/``, one sub-folder
per class, JPEG files.

Class k draws one shape (disc, square, triangle, plus, ring, striped patch, checker patch,
star, diagonal cross, square frame) at a random position, scale, rotation and colour over a
random smooth textured background.  Colours are drawn independently of the class, so the
average colour says nothing about it: telling classes apart needs spatial filters.  Images
are stored at a random size and aspect ratio (``min_size``..``max_size`` per side) so packing
exercises resize and crop; the shape always lies inside the centre square that packing keeps.
Everything is drawn from ``numpy.random.default_rng((seed, split, class, index))``: the same
seed writes the same files.  ``out_dir`` must be empty (or new); with ``force`` what an earlier
synth wrote there is removed first, so no class of an earlier, larger dataset is left behind.
"""

import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle", "plus", "ring", "stripes", "checker", "star",
          "diagonal_cross", "frame")
SPLITS = {"train": 0, "val": 1}


def _background(rng, width, height):
    """A smooth random texture: two colours mixed by upsampled noise, plus fine grain."""
    coarse = rng.random((rng.integers(3, 7), rng.integers(3, 7)))
    field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC), dtype=np.float32)[..., None] / 255.0
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = c0 * (1 - field) + c1 * field + rng.normal(0, 8, (height, width, 3))
    return img, 0.5 * (c0 + c1)


def _shape_colour(rng, background_colour):
    """A random colour whose brightness differs clearly from the background's."""
    grey = background_colour.mean()
    for _ in range(100):
        colour = rng.uniform(0, 255, 3)
        if abs(colour.mean() - grey) > 60:
            return colour
    return 255.0 - background_colour


def _polygon(cx, cy, radius, angle, points):
    """Vertices of the polygon ``points`` = [(r_fraction, theta), ...], rotated by ``angle``."""
    return [(cx + radius * r * np.cos(t + angle), cy + radius * r * np.sin(t + angle))
            for r, t in points]


def _mask(shape, rng, width, height, cx, cy, radius):
    """A float mask in [0, 1] (H, W) of ``shape`` centred at (cx, cy) with ``radius``."""
    m = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(m)
    angle = rng.uniform(-0.3, 0.3)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "disc":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        r = radius * 0.55
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=0)
    elif shape in ("square", "frame"):
        corners = [(1, k * np.pi / 2) for k in range(4)]
        draw.polygon(_polygon(cx, cy, radius, angle + np.pi / 4, corners), fill=255)
        if shape == "frame":
            draw.polygon(_polygon(cx, cy, radius * 0.55, angle + np.pi / 4, corners), fill=0)
    elif shape == "triangle":
        corners = [(1, k * 2 * np.pi / 3) for k in range(3)]
        draw.polygon(_polygon(cx, cy, radius, angle - np.pi / 2, corners), fill=255)
    elif shape == "star":
        pts = [(1.0 if k % 2 == 0 else 0.45, k * np.pi / 5) for k in range(10)]
        draw.polygon(_polygon(cx, cy, radius, angle - np.pi / 2, pts), fill=255)
    elif shape in ("plus", "diagonal_cross"):
        base = angle + (np.pi / 4 if shape == "diagonal_cross" else 0.0)
        half = 0.28
        arm = [(np.hypot(1, half), np.arctan2(half, 1)), (np.hypot(half, half), np.pi / 4),
               (np.hypot(1, half), np.pi / 2 - np.arctan2(half, 1))]
        pts = [(r, t + k * np.pi / 2) for k in range(4) for r, t in arm]
        draw.polygon(_polygon(cx, cy, radius, base, pts), fill=255)
    elif shape in ("stripes", "checker"):
        draw.rectangle(box, fill=255)
    mask = np.asarray(m, dtype=np.float32) / 255.0
    if shape in ("stripes", "checker"):
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        period = max(radius / 2.5, 3.0)
        theta = rng.uniform(np.pi / 6, np.pi / 3) if shape == "stripes" else angle
        u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        if shape == "stripes":
            pattern = (np.floor(u / period) % 2 == 0)
        else:
            pattern = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
        mask = mask * pattern
    return mask


def draw_image(shape, rng, min_size=48, max_size=96):
    """One synthetic image of ``shape``: a PIL RGB image of random size."""
    width, height = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
    side = min(width, height)
    left, top = (width - side) / 2.0, (height - side) / 2.0
    radius = side * rng.uniform(0.22, 0.40)
    margin = radius + 1
    cx = left + rng.uniform(margin, side - margin)
    cy = top + rng.uniform(margin, side - margin)
    background, bg_colour = _background(rng, width, height)
    colour = _shape_colour(rng, bg_colour)
    mask = _mask(shape, rng, width, height, cx, cy, radius)[..., None]
    img = background * (1 - mask) + colour * mask
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


MAX_CLASSES = len(SHAPES)


def class_names(classes):
    """Folder names for ``classes`` classes, numbered so that sorting keeps their order."""
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"synth draws {MAX_CLASSES} shapes ({', '.join(SHAPES)}): "
                         f"choose 1 to {MAX_CLASSES} classes, got {classes}")
    return [f"{k:02d}_{SHAPES[k]}" for k in range(classes)]


def _written_by_synth(split_dir):
    """(entries synth wrote, entries it did not) directly under ``out_dir/<split>``."""
    ours, foreign = [], []
    for entry in sorted(split_dir.iterdir()):
        name = entry.name
        mine = entry.is_dir() and name in class_names(MAX_CLASSES) and all(
            f.is_file() and re.fullmatch(re.escape(name) + r"_\d{5}\.jpg", f.name)
            for f in entry.iterdir())
        (ours if mine else foreign).append(entry)
    return ours, foreign


def clear_previous(out_dir, force):
    """Make ``out_dir`` ready for synth: it must be new or empty; with ``force`` the class
    folders an earlier synth wrote under train/ and val/ are removed.  ValueError when the
    folder is not empty without ``force``, or holds files synth did not write (nothing is
    removed then)."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a folder")
    if not any(out_dir.iterdir()):
        return
    if not force:
        raise ValueError(f"{out_dir} is not empty; pass --force to replace what an earlier "
                         f"`nbalex synth` wrote there")
    remove, foreign = [], []
    for split in SPLITS:
        if (out_dir / split).is_dir():
            ours, theirs = _written_by_synth(out_dir / split)
            remove += ours
            foreign += theirs
    if foreign:
        raise ValueError(f"{out_dir} holds {len(foreign)} entries synth did not write, such as "
                         f"{foreign[0]}; remove them yourself or choose another folder")
    for folder in remove:
        shutil.rmtree(folder)


def synth(out_dir, classes=10, train_per_class=100, val_per_class=20, seed=0,
          min_size=48, max_size=96, quality=(75, 95), force=False):
    """Write ``out_dir/{train,val}/<class>/*.jpg``; returns a summary dict.

    ``out_dir`` must be new or empty; ``force`` first removes an earlier synth's classes
    (:func:`clear_previous`)."""
    if not 8 <= min_size <= max_size:
        raise ValueError(f"need 8 <= min_size <= max_size, got {min_size}, {max_size}")
    names = class_names(classes)
    out_dir = Path(out_dir)
    clear_previous(out_dir, force)
    counts = {"train": train_per_class, "val": val_per_class}
    for split, per_class in counts.items():
        for k, name in enumerate(names):
            folder = out_dir / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng((seed, SPLITS[split], k, i))
                img = draw_image(SHAPES[k], rng, min_size, max_size)
                q = int(rng.integers(quality[0], quality[1] + 1))
                img.save(folder / f"{name}_{i:05d}.jpg", "JPEG", quality=q)
    return {"out_dir": str(out_dir), "classes": names,
            "train": train_per_class * classes, "val": val_per_class * classes, "seed": seed}
