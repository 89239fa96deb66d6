"""Image files of every kind become RGB by a documented rule, or stop with the file's name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ademvl.images import ImageError, load_image


def pixel(tmp_path: Path, img: Image.Image, name: str = "x.png") -> tuple[int, int, int]:
    img.save(tmp_path / name)
    out = load_image(tmp_path / name)
    assert out.mode == "RGB" and out.size == img.size
    return out.getpixel((0, 0))


def test_modes_become_rgb(tmp_path: Path) -> None:
    assert pixel(tmp_path, Image.new("L", (4, 3), 128)) == (128, 128, 128)
    assert pixel(tmp_path, Image.new("RGBA", (4, 3), (255, 0, 0, 0))) == (255, 255, 255)  # transparent -> white
    assert pixel(tmp_path, Image.new("RGBA", (4, 3), (255, 0, 0, 255))) == (255, 0, 0)
    assert pixel(tmp_path, Image.new("LA", (4, 3), (10, 0))) == (255, 255, 255)
    pal = Image.new("P", (4, 3), 0)
    pal.putpalette([0, 0, 255] + [0] * 765)
    assert pixel(tmp_path, pal) == (0, 0, 255)
    assert pixel(tmp_path, Image.new("CMYK", (4, 3), (0, 255, 0, 0)), "x.tif") == (255, 0, 255)  # magenta
    assert pixel(tmp_path, Image.new("1", (4, 3), 1)) == (255, 255, 255)


def test_16_bit_is_scaled_to_8_bits(tmp_path: Path) -> None:
    img = Image.fromarray(np.full((3, 4), 100 * 256, dtype=np.uint16))
    assert img.mode.startswith("I;16")
    assert pixel(tmp_path, img) == (100, 100, 100)


def test_missing_unreadable_and_huge_files_name_themselves(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ImageError, match=r"nope\.png: image file not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match=r"bad\.png: cannot read this image"):
        load_image(tmp_path / "bad.png")
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels > 2 x 1000: PIL's bomb check
    with pytest.raises(ImageError, match=r"big\.png: image too large to decode safely"):
        load_image(tmp_path / "big.png")
