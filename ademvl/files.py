"""Files in and out: every file the CLI reads is opened and parsed here, and writes lose no work.

Reading: each reader checks the ways a file can be wrong (missing, a directory, empty, not UTF-8,
cut short, malformed, the wrong JSON form, NaN/Infinity where JSON has no such number) and raises
one error type, `InputError`, that names the file, says what it should hold and how to fix it.
The CLI prints it in one or two lines without a traceback (`--debug` shows one); anything else
that escapes is a bug and keeps its traceback. docs/errors.md lists every case.

Writing: checkpoints, converted base models and cached dataset images are all written the same
way: into a hidden temporary sibling, flushed to disk, then renamed into place. A crash or a kill
mid-write leaves the previous complete directory (or none) under the final name, never a
half-written one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any


# ---- the one error type of bad input ----------------------------------------------------------
class InputError(ValueError):
    """Input the user can fix: `where` (a file, or a file and key), what is wrong there, the fix.

    A ValueError, so code that catches ValueError keeps working. Built from one message alone too
    (`InputError("text")`), as a DataLoader worker re-raises it in the main process.
    """

    def __init__(self, where: str | Path, problem: str | None = None, fix: str | None = None) -> None:
        self.where, self.problem, self.fix = str(where), problem, fix
        if problem is None:  # a message alone
            super().__init__(str(where))
        else:
            super().__init__(f"{where}: {problem}" + (f"; {fix}" if fix else ""))


class InputNotFound(InputError, FileNotFoundError):
    """A file or directory the input names is not there (also a FileNotFoundError)."""


class ImageError(InputError):
    """An image that cannot be used; the message names the file and the fix."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of a library's message, cut to `limit` characters (the error stays one line)."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _what(expected: str) -> str:
    return f"; expected {expected}" if expected else ""


# ---- reading --------------------------------------------------------------------------------
def check_file(path: str | Path, what: str, fix: str | None = None) -> Path:
    """`path` if it is a readable file, else the InputError that says why not."""
    path = Path(path)
    if not path.exists():
        raise InputNotFound(path, f"{what} not found", fix)
    if path.is_dir():
        raise InputError(path, f"is a directory{_what(what)}", fix)
    return path


def read_bytes(path: str | Path, what: str, fix: str | None = None) -> bytes:
    path = check_file(path, what, fix)
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(path, f"cannot be read ({e.strerror or e}){_what(what)}", fix) from e


def read_text(path: str | Path, what: str, fix: str | None = None) -> str:
    """UTF-8 text (a byte-order mark is dropped); other encodings name the byte at fault."""
    data = read_bytes(path, what, fix)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}){_what(what)}",
                         "save the file as UTF-8") from None


class _NotJsonNumber(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NotJsonNumber(name)


def _json_type(obj: Any) -> str:
    return {dict: "object {...}", list: "list [...]", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(obj), type(obj).__name__)


def parse_json(text: str, where: str | Path, what: str, form: type | tuple[type, ...] | None = None,
               fix: str | None = None) -> Any:
    """JSON text as Python objects; NaN/Infinity (Python's extension, not JSON) are refused."""
    if not text.strip():
        raise InputError(where, f"empty{_what(what)}", fix)
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except _NotJsonNumber as e:
        raise InputError(where, f"{e} is not a JSON number{_what(what)}", fix or "write finite numbers (or null)") from None
    except json.JSONDecodeError as e:
        cut = " (the file ends too early: cut short?)" if e.pos >= len(text.rstrip()) else ""
        raise InputError(where, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}{cut}{_what(what)}",
                         fix) from None
    if form is not None and not isinstance(obj, form):
        raise InputError(where, f"holds a JSON {_json_type(obj)}{_what(what)}", fix)
    return obj


def read_json(path: str | Path, what: str, form: type | tuple[type, ...] | None = None, fix: str | None = None) -> Any:
    """Parse a JSON file; a missing, empty or malformed file, or one of another form (`form`: dict
    or list), is an InputError that names it and `what` it should hold."""
    return parse_json(read_text(path, what, fix), path, what, form, fix)


def read_yaml(path: str | Path, what: str, fix: str | None = None) -> Any:
    """A YAML file through OmegaConf's loader (which reads 9e-3 as a float; PyYAML alone does not)."""
    import yaml
    from omegaconf import OmegaConf

    text = read_text(path, what, fix)
    try:
        return OmegaConf.load(io.StringIO(text))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise InputError(path, f"not valid YAML: {e.problem or e.context}{at}{_what(what)}", fix) from None
    except Exception as e:  # OmegaConf's own (e.g. a key twice): name the file, not a traceback
        raise InputError(path, f"not a valid YAML config ({first_line(e)}){_what(what)}", fix) from None


CUT_SHORT = "copy it again (an interrupted copy leaves a short file), or save it again"


def read_safetensors(path: str | Path, what: str, fix: str | None = None) -> dict[str, Any]:
    """Every tensor of a .safetensors file; an empty, cut-short or foreign file is an InputError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = check_file(path, what, fix)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        size = path.stat().st_size
        raise InputError(path, f"not a readable safetensors file ({size} bytes; {first_line(e)}){_what(what)}",
                         CUT_SHORT) from None


def read_torch(path: str | Path, what: str, fix: str | None = None) -> Any:
    """A torch.save file we wrote (trainer state, RNG states); a cut-short one is an InputError."""
    import pickle

    import torch

    path = check_file(path, what, fix)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
        raise InputError(path, f"cannot be loaded ({first_line(e)}){_what(what)}", CUT_SHORT) from None


def read_parquet(path: str | Path, what: str, fix: str | None = None) -> Any:
    """A pyarrow Table; a truncated or foreign file is an InputError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = check_file(path, what, fix)
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(path, f"not a readable parquet file ({first_line(e)}){_what(what)}",
                         CUT_SHORT) from None


def read_image(path: str | Path, missing_hint: str) -> Any:
    """A decoded PIL image (any mode). Missing, not an image, cut short or too large: ImageError."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ImageError(path, "image file not found", missing_hint)
    if path.is_dir():
        raise ImageError(path, "is a directory; expected an image file", missing_hint)
    from PIL import ImageFile

    # A library may have switched PIL to decode cut-short files silently (lmms-eval does, on import);
    # a truncated image must stay an error here, whoever imported what.
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        img = Image.open(path)
        img.load()
    except Image.DecompressionBombError as e:  # PIL refuses > 2 x MAX_IMAGE_PIXELS (~179 M pixels)
        raise ImageError(path, f"image too large to decode safely ({e})",
                         "downscale it (the model sees 224 px or so anyway)") from None
    except UnidentifiedImageError:
        raise ImageError(path, "cannot read this image (not an image format PIL knows)", "re-encode it as PNG or JPEG") from None
    except OSError as e:  # e.g. "image file is truncated"
        raise ImageError(path, f"cannot read this image ({e})", "re-encode it as PNG or JPEG") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    return img


# ---- writing --------------------------------------------------------------------------------
def output_dir(path: str | Path, flag: str) -> Path:
    """`path` as an output directory: refused when it is a file, so nothing is written half-way."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, f"is a file; {flag} needs a directory", f"choose another {flag}")
    return path


def write_json(path: str | Path, obj: Any, indent: int = 1) -> Path:
    """Write JSON by rename (a reader never sees half a file)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


def fsync_tree(path: Path) -> None:
    """Flush every file directly under `path` to disk (the rename is the commit point)."""
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `directory` in one rename.

    On an exception the temporary directory is removed and `directory` is left as it was, so a
    failed run never overwrites or removes a good earlier result.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = directory.with_name(f".{directory.name}.old{os.getpid()}")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write one file by rename, so a reader never sees it half-written."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a directory; expected the path of a file to write", "name a file, e.g. DIR/scores.json")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        tmp.rename(path)
    except OSError as e:  # a parent that is a file, no permission, a full disk: the earlier file stays
        with suppress(OSError):
            tmp.unlink()
        raise InputError(path, f"cannot write here ({e.strerror or e})", "choose a writable path") from None
    return path


def atomic_write_files(directory: str | Path, files: dict[str, bytes]) -> None:
    """Files that belong together (an evaluation's outputs and their scores) into `directory`.

    All are written to temporary siblings first and renamed into place only once every one is
    written, so a failure on the way (a full disk, a path that is a file) leaves the earlier set
    whole. Other files in `directory` are left alone.
    """
    out = output_dir(directory, "--out")
    staged: list[tuple[Path, Path]] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            path = out / name
            if path.is_dir():
                raise InputError(path, "is a directory; the evaluation writes a file of this name", "choose another --out")
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            staged.append((tmp, path))
            tmp.write_bytes(data)
    except BaseException as e:
        for tmp, _ in staged:
            with suppress(OSError):
                tmp.unlink()
        if isinstance(e, OSError):
            raise InputError(out, f"cannot write here ({e.strerror or e}); the earlier results are kept",
                             "choose a writable --out") from None
        raise
    for tmp, path in staged:
        tmp.rename(path)
