"""The one path from an image file to the uint8 square that pack stores and predict classifies.

:func:`load_and_resize` decodes (JPEG draft mode when it helps), turns the image upright as
its EXIF orientation says (portrait phone photos are stored sideways with a tag), converts
to RGB, resizes its shorter side to ``size`` with a Lanczos filter and keeps the centre
square, all in one ``Image.resize(..., box=...)`` call.  :func:`image_files` expands folders
into the image files under them.
"""

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from nbalex.io.errors import DataError

RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0            # Pillow reduces by an integer factor first, then Lanczos
ALPHA_BACKGROUND = (255, 255, 255)
EXIF_ORIENTATION = 0x0112
SWAPS_SIDES = (5, 6, 7, 8)    # orientations that turn the image by 90 degrees


def to_rgb(img):
    """``img`` as an RGB image: transparency composited over white, 16-bit grey scaled to 8-bit."""
    if img.mode == "P" or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16"):
        grey = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.rint(grey).astype(np.uint8), "L").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def centre_square(width, height):
    """The centred square box (left, top, right, bottom) of side min(width, height)."""
    side = min(width, height)
    left, top = (width - side) / 2.0, (height - side) / 2.0
    return (left, top, left + side, top + side)


def orientation(img):
    """The EXIF orientation (1..8) of an opened image; 1 when absent, unknown or unreadable."""
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block does not make the pixels unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def _open(path, notes):
    """Image.open, with PIL's DecompressionBombWarning turned into one line in ``notes``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = Image.open(path)
    for warning in caught:
        if issubclass(warning.category, Image.DecompressionBombWarning):
            width, height = img.size
            note = (f"{path}: {width}x{height} = {width * height:,} pixels is over PIL's "
                    f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,}; kept")
            if notes is not None:
                notes.append(note)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)
    return img


def load_and_resize(path, size, notes=None):
    """Decode ``path``, upright; its centre square, shorter side resized to ``size``:
    uint8 (size, size, 3).

    JPEGs are decoded in draft mode (DCT scaling by 1/2, 1/4 or 1/8) when the scaled image
    keeps both sides >= ``size``; Pillow picks the largest such scale.  An image over PIL's
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is decoded all the same and a
    one-line note naming it is appended to the list ``notes`` (if given); over twice that
    limit PIL refuses it.  Raises whatever PIL raises for an unreadable file.
    """
    with _open(path, notes) as img:
        turn = orientation(img)
        width, height = img.size
        upright = (height, width) if turn in SWAPS_SIDES else (width, height)
        box = centre_square(*upright)
        if img.format == "JPEG" and min(width, height) >= 2 * size:
            drafted = img.draft("RGB", (size, size))
            if drafted is not None:           # the box maps the original onto the drafted image
                dw, dh = drafted[1][2], drafted[1][3]
                if turn in SWAPS_SIDES:
                    dw, dh = dh, dw
                sx, sy = dw / upright[0], dh / upright[1]
                box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        if turn != 1:
            img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img)
        out = rgb.resize((size, size), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
        return np.asarray(out, dtype=np.uint8)


def image_extensions():
    """File name endings (lower case, with the dot) of the formats PIL can open."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def image_files(paths):
    """``paths`` with every folder replaced by the image files under it (recursively, sorted,
    hidden names skipped, known image extensions only); files are kept as given.
    DataError for a folder that holds no image file."""
    extensions = image_extensions()
    files = []
    for path in map(Path, paths):
        if not path.is_dir():
            files.append(str(path))
            continue
        found = sorted(p for p in path.rglob("*") if p.is_file()
                       and p.suffix.lower() in extensions
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise DataError(f"folder {path} holds no image files")
        files.extend(str(p) for p in found)
    return files
