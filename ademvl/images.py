"""Reading image files robustly: every mode becomes RGB, and a bad file names itself."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from .files import ImageError, read_image

__all__ = ["DATASET_HINT", "ImageError", "load_image", "to_rgb"]

DATASET_HINT = "check the dataset's image root (--data-root / --image-root)"


def load_image(path: str | Path, missing_hint: str = DATASET_HINT) -> Image.Image:
    """Open an image file as RGB.

    Fallbacks (documented): palette/greyscale/CMYK are converted; an alpha channel is composited
    on white; 16-bit images are scaled to 8 bits. A missing, unreadable or huge file raises
    ImageError (ademvl/files.py reads it); `missing_hint` says where the path came from, so the
    message names the right fix.
    """
    return to_rgb(read_image(path, missing_hint))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: alpha on white, 16/32-bit greyscale scaled to 8 bits, the rest converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v * (1 / 256)).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
        return background
    return img.convert("RGB")
