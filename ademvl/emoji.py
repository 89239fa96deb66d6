"""The emoji corpus (`ademvl data emoji --out DIR`): real artwork, human-written words, held-out styles.

Six vendor families draw the same ~1,650 emoji concepts in their own styles; Unicode CLDR (through
emojibase-data) gives each a short name ("red apple"), keywords, a group and a subgroup. A vendor
family held out whole is a test of recognition in a style the model never saw.

    1. fetch   `npm pack NAME@VERSION` of each pinned package (PACKAGES) into $ADEMVL_CACHE/emoji/npm;
               every tarball's SHA-256 is checked and a mismatch refused.
    2. map     every icon to its concept (code points, lower-case hex joined by "-", fe0f dropped):
               chars.json first; a set without one is matched by name (MAPPINGS says how), only to
               concepts no newer than the set's art, and aliases (old, reused names) never.
               Skin tones, components and flags are not concepts. One icon claimed by two
               concepts stops the build (MappingCollision).
    3. render  each SVG once with resvg (on white, SIZE px) into $ADEMVL_CACHE/emoji/renders.
    4. write   OUT/images/emoji/{vendor}/{key}.png and the layouts the tasks read
               (ademvl/tasks/emoji.py: splits by vendor family, questions, the three layouts),
               LICENSES.md and a contact sheet.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .files import InputError, atomic_write_bytes


@dataclass(frozen=True)
class Package:
    """One pinned npm package: what `npm pack` fetches, and the SHA-256 its tarball must have."""

    name: str
    version: str
    sha256: str
    licence: str
    author: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tarball(self) -> str:
        """The file name `npm pack` writes (scope "@a/b" -> "a-b")."""
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


PACKAGES = {
    "noto": Package("@iconify-json/noto", "1.2.9", "3e918d88fc945c0bb3d468dbace6f88caef67f01c9f0e7bcae0915a042e8f1ad",
                    "Apache-2.0", "Google Inc. (Noto Emoji)"),
    "twemoji": Package("@iconify-json/twemoji", "1.2.5", "19046dff7d8707ce96212ec86468b36ac5f8e60409629dd13f809265c6d0ebb7",
                       "CC-BY-4.0", "Twitter, Inc. and other contributors (Twemoji)"),
    "openmoji": Package("@iconify-json/openmoji", "1.2.29", "03181e2c156cab35cf4a62f1f7886bd971d59212e75ac3f189d5a4cae3930fc5",
                        "CC-BY-SA-4.0", "OpenMoji, HfG Schwäbisch Gmünd"),
    "fluent-flat": Package("@iconify-json/fluent-emoji-flat", "1.2.6",
                           "7d064769dee690815f823bc5bcc511d957198caf9f5edd8dd9c1aa48a6aeb175", "MIT", "Microsoft Corporation (Fluent Emoji)"),
    "fluent-color": Package("@iconify-json/fluent-emoji", "1.2.7",
                            "8044210dbf11e016d4de85f15d01a243423bd832457e7e2491df1b751c0e272b", "MIT", "Microsoft Corporation (Fluent Emoji)"),
    "emojione": Package("@iconify-json/emojione", "1.2.3", "26a14f44284407e8bcde91799388dca2bfd91dbcd55a97f425524a1c5b73610e",
                        "CC-BY-4.0", "Emoji One (EmojiOne 2.3)"),
    "fxemoji": Package("@iconify-json/fxemoji", "1.2.2", "f3e72b3c59d05e1db03b7e308d55c0d05bd7ba3f625a90da1b79313c12858eef",
                       "Apache-2.0", "Mozilla (FirefoxOS emoji)"),
    "emojibase": Package("emojibase-data", "17.0.0", "d01d0e2ca4e22cb402679532155342c71e2e871f25c32223c013b8b166ebdf5a",
                         "MIT (data: Unicode CLDR, Unicode License V3)", "Miles Johnson (emojibase); Unicode, Inc. (CLDR)"),
}
VENDORS = ("noto", "fluent-flat", "fluent-color", "openmoji", "fxemoji", "emojione", "twemoji")
# Fluent flat and "color" draw the same shapes: one family, held out together.
FAMILY = {"noto": "noto", "fluent-flat": "fluent", "fluent-color": "fluent", "openmoji": "openmoji",
          "fxemoji": "fxemoji", "emojione": "emojione", "twemoji": "twemoji"}
SPLIT_OF_FAMILY = {"twemoji": "test", "emojione": "val"}  # every other family trains
# How a set without its own chars.json is mapped. ("chars", VENDOR): the same icon names as that
# set's chars.json (Fluent "color" names its icons as Fluent flat does). ("cldr", V): the icon
# name is the CLDR name hyphenated (EmojiOne: "red-apple"); ("unicode", V): the Unicode name
# squashed (fxemoji: "alarmclock"); for concepts of emoji version <= V only: the art predates newer
# emoji, whose names reuse old ones ("man in tuxedo" 13.0; fxemoji's "window"). A name that fits
# two concepts is not used.
MAPPINGS: dict[str, tuple[str, Any]] = {"fluent-color": ("chars", "fluent-flat"), "emojione": ("cldr", 3.0),
                                        "fxemoji": ("unicode", 1.0)}
DROPPED_GROUPS = ("component",)  # skin-tone and hair components
DROPPED_SUBGROUPS = ("country-flag", "subdivision-flag")  # the 262 flags Noto and Fluent do not draw
SIZE = 224
UNSEEN_FRACTION = 0.2


class ChecksumMismatch(InputError):
    """A downloaded archive is not the pinned one."""


class MappingCollision(RuntimeError):
    """One icon claimed by two concepts (or two icons by one): the mapping cannot be trusted."""


# ---- 1. fetch ----------------------------------------------------------------------------------
def cache_root() -> Path:
    from .hub import cache_dir

    return cache_dir() / "emoji"


def check_sha256(path: Path, expected: str) -> None:
    from .mobilenet import sha256

    actual = sha256(path)
    if actual != expected:
        raise ChecksumMismatch(path, f"SHA-256 {actual}, not the pinned {expected}",
                               "the registry served other bytes than the pinned version: delete the file and "
                               "fetch again, and if it persists do not use it")


def fetch(key: str, npm_dir: Path | None = None) -> Path:
    """The pinned tarball of PACKAGES[key]: from the cache, else `npm pack`; its SHA-256 checked."""
    pkg = PACKAGES[key]
    npm_dir = npm_dir or cache_root() / "npm"
    path = npm_dir / pkg.tarball
    if not path.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise FileNotFoundError(f"the emoji corpus needs {pkg.spec} from the npm registry and no `npm` is on PATH; "
                                    "install Node.js and npm (e.g. apt-get install npm), or put the tarball at "
                                    f"{path} yourself")
        npm_dir.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([npm, "pack", pkg.spec, "--pack-destination", str(npm_dir)], capture_output=True, text=True, check=False)
        if r.returncode != 0 or not path.exists():
            raise RuntimeError(f"`npm pack {pkg.spec}` failed ({r.stderr.strip().splitlines()[-1:] or r.returncode}); "
                               "check that the npm registry is reachable (npm config get registry)")
    check_sha256(path, pkg.sha256)
    return path


def read_member(tgz: Path, member: str, default: Any = None) -> Any:
    """A JSON file inside an npm tarball (package/MEMBER); `default` when it is not there."""
    with tarfile.open(tgz, "r:gz") as tar:
        try:
            f = tar.extractfile(f"package/{member}")
        except KeyError:
            f = None
        if f is None:
            if default is not None:
                return default
            raise InputError(tgz, f"no package/{member} in the tarball", "is it the pinned package?")
        return json.load(f)


# ---- 2. concepts and the mapping ---------------------------------------------------------------
def norm_key(codepoints: str) -> str:
    """"1F9D1-200D-1F384" / "2764-fe0f" / "u+1f600" -> "1f9d1-200d-1f384" / "2764" / "1f600": the
    join of lower-case hex code points without the presentation selector fe0f."""
    parts = [p.lower().removeprefix("u+") for p in re.split(r"[-_ ]", codepoints.strip()) if p]
    return "-".join(p for p in parts if p != "fe0f")


def slug(text: str) -> str:
    """Iconify's kind of icon name: "A button (blood type)" -> "a-button-blood-type"."""
    text = text.lower().replace("’", "").replace("'", "").replace("&", "and")
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def name_form(c: Concept, how: str) -> str:
    """The icon name a set without chars.json gives concept c (MAPPINGS: "cldr" or "unicode")."""
    return slug(c.name) if how == "cldr" else slug(c.unicode_name).replace("-", "")


@dataclass(frozen=True)
class Concept:
    """One emoji with its CLDR words (emojibase-data)."""

    key: str
    emoji: str
    name: str
    keywords: tuple[str, ...]
    group: str
    subgroup: str
    version: float
    unicode_name: str = ""


def concepts_from(data: list[dict[str, Any]], messages: dict[str, Any], unicode_names: dict[str, str]) -> dict[str, Concept]:
    """key -> Concept of emojibase's en/data.json, en/messages.json and meta/unicode-names.json:
    no skin tones (they sit under each entry's `skins`), components, country or subdivision flags,
    or regional indicators (no group)."""
    groups = {g["order"]: g["message"] for g in messages["groups"]}
    group_keys = {g["order"]: g["key"] for g in messages["groups"]}
    subgroups = {g["order"]: g["message"] for g in messages["subgroups"]}
    subgroup_keys = {g["order"]: g["key"] for g in messages["subgroups"]}
    unicode_names = {norm_key(k): v for k, v in unicode_names.items()}
    out = {}
    for e in data:
        if (e.get("group") is None or group_keys.get(e["group"]) in DROPPED_GROUPS
                or subgroup_keys.get(e["subgroup"]) in DROPPED_SUBGROUPS):
            continue
        key = norm_key(e["hexcode"])
        c = Concept(key, e["emoji"], e["label"], tuple(e.get("tags", ())), groups[e["group"]],
                    subgroups[e["subgroup"]], float(e.get("version", 0)), unicode_names.get(key, ""))
        if c.key in out:
            raise MappingCollision(f"emojibase: two entries for {c.key} ({out[c.key].name!r}, {c.name!r})")
        out[c.key] = c
    return out


def load_concepts(emojibase_tgz: Path | None = None) -> dict[str, Concept]:
    tgz = emojibase_tgz or fetch("emojibase")
    return concepts_from(read_member(tgz, "en/data.json"), read_member(tgz, "en/messages.json"),
                         read_member(tgz, "meta/unicode-names.json"))


def map_icons(vendor: str, icons: dict[str, Any], chars: dict[str, str], concepts: dict[str, Concept]) -> dict[str, str]:
    """concept key -> icon name of one set, as MAPPINGS says (module docstring, step 2)."""
    names = icons["icons"]  # real icons only: aliases are old names, some reused for other things
    how, arg = MAPPINGS.get(vendor, ("chars", None))
    out: dict[str, str] = {}
    if how == "chars":
        for cp, name in sorted(chars.items(), key=lambda kv: ("fe0f" not in kv[0].lower(), kv[0])):
            key = norm_key(cp)
            if key not in concepts or name not in names:
                continue
            if key in out and out[key] != name:  # fully qualified (with fe0f) sorted first: keep it
                continue
            out[key] = name
    else:
        fits: dict[str, set[str]] = {}
        for c in concepts.values():
            if c.version <= arg and name_form(c, how):
                fits.setdefault(name_form(c, how), set()).add(c.key)
        for n in sorted(names):
            keys = fits.get(n, set())
            if len(keys) == 1:  # one icon per name, one name per concept: one icon per concept
                out[keys.pop()] = n
    claimed: dict[str, str] = {}
    for key, name in out.items():
        if name in claimed:
            raise MappingCollision(f"{vendor}: icon {name!r} claimed by {claimed[name]} ({concepts[claimed[name]].name!r}) "
                                   f"and {key} ({concepts[key].name!r})")
        claimed[name] = key
    return out


def chars_source(vendor: str) -> str:
    """The set whose chars.json maps `vendor`'s icons (its own, or the one MAPPINGS names)."""
    how, arg = MAPPINGS.get(vendor, ("chars", vendor))
    return arg if how == "chars" else vendor


def svg_of(icons: dict[str, Any], name: str) -> str:
    """An Iconify icon as a standalone SVG document."""
    icon = icons["icons"][name]
    left, top = icon.get("left", icons.get("left", 0)), icon.get("top", icons.get("top", 0))
    w, h = icon.get("width", icons.get("width", 16)), icon.get("height", icons.get("height", 16))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{left} {top} {w} {h}">{icon["body"]}</svg>')


# ---- 3. render ---------------------------------------------------------------------------------
def render(svg: str, size: int = SIZE) -> bytes:
    """PNG bytes (RGB) of an SVG on white, size x size."""
    from PIL import Image

    try:
        import resvg_py
    except ImportError as e:
        raise ImportError("rendering the emoji SVGs needs resvg-py: pip install resvg-py (make install does)") from e
    png = bytes(resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size, background="#ffffff"))
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, "PNG")  # opaque already: the alpha channel is dropped
    return buf.getvalue()


def _render_job(job: tuple[str, str, int]) -> tuple[str, bytes]:
    path, svg, size = job
    return path, render(svg, size)


def render_all(jobs: list[tuple[Path, str]], size: int = SIZE, workers: int = 2) -> None:
    """Render (path, svg) pairs whose file is not there yet (the cache: each SVG once)."""
    todo = [(str(p), svg, size) for p, svg in jobs if not p.exists()]
    if not todo:
        return
    with ProcessPoolExecutor(workers) as pool, tqdm(total=len(todo), desc="render emoji", unit="img", mininterval=2.0) as bar:
        for path, png in pool.map(_render_job, todo, chunksize=32):
            atomic_write_bytes(Path(path), png)
            bar.update()


# ---- the corpus --------------------------------------------------------------------------------
@dataclass
class Item:
    """One rendered image of one concept by one vendor."""

    vendor: str
    key: str
    image: str  # relative to the corpus directory
    split: str  # train | val | test (by vendor family) | unseen-train (a concept held out of training)

    @property
    def family(self) -> str:
        return FAMILY[self.vendor]


def unseen_concepts(concepts: dict[str, Concept], seed: int = 0, fraction: float = UNSEEN_FRACTION) -> set[str]:
    """round(fraction x n) of each subgroup's n concepts, chosen by a seeded shuffle."""
    import random

    rng = random.Random(seed)
    by_sub: dict[str, list[str]] = {}
    for c in sorted(concepts.values(), key=lambda c: c.key):
        by_sub.setdefault(c.subgroup, []).append(c.key)
    out: set[str] = set()
    for sub in sorted(by_sub):
        keys = by_sub[sub]
        rng.shuffle(keys)
        out.update(keys[: round(fraction * len(keys))])
    return out


@dataclass
class Corpus:
    """The concepts that have an image, every image, and the concepts held out of training."""

    concepts: dict[str, Concept]
    items: list[Item]
    unseen: set[str] = field(default_factory=set)


def build(out: str | Path, vendors: Iterable[str] = VENDORS, size: int = SIZE, seed: int = 0, workers: int = 2,
          npm_dir: Path | None = None, contact_rows: int = 40) -> Corpus:
    """Everything `ademvl data emoji` does; returns the corpus (OUT/index.json holds it too)."""
    from .tasks import emoji as task

    out = Path(out)
    concepts = load_concepts(fetch("emojibase", npm_dir))
    vendors = list(vendors)
    unknown = set(vendors) - set(VENDORS)
    if unknown:
        raise ValueError(f"vendors {sorted(unknown)}: choose among {', '.join(VENDORS)}")
    tarballs = {v: fetch(v, npm_dir) for v in {*vendors, *map(chars_source, vendors)}}
    renders = cache_root() / "renders" / str(size)
    jobs, mapped = [], {}
    for v in vendors:
        icons = read_member(tarballs[v], "icons.json")
        chars = read_member(tarballs[chars_source(v)], "chars.json", default={})
        mapped[v] = map_icons(v, icons, chars, concepts)
        folder = renders / f"{v}-{PACKAGES[v].version}"
        jobs += [(folder / f"{key}.png", svg_of(icons, name)) for key, name in mapped[v].items()]
    # One concept by two vendors of a family is fine; two icons of one vendor for one concept are not
    # possible (map_icons keys by concept); an icon for two concepts stopped map_icons.
    render_all(jobs, size, workers)
    unseen = unseen_concepts(concepts, seed)
    items = []
    for v in vendors:
        folder = renders / f"{v}-{PACKAGES[v].version}"
        for key in sorted(mapped[v]):
            rel = f"images/emoji/{v}/{key}.png"
            dst = out / rel
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / f"{key}.png", dst)
            split = SPLIT_OF_FAMILY.get(FAMILY[v], "train")
            items.append(Item(v, key, rel, "unseen-train" if split == "train" and key in unseen else split))
    used = {i.key for i in items}
    corpus = Corpus({k: c for k, c in concepts.items() if k in used}, items, unseen & used)
    task.write_layouts(out, corpus, seed)
    (out / "LICENSES.md").write_text(licences(vendors))
    contact_sheet(out, corpus, out / "contact_sheet.png", contact_rows, seed)
    return corpus


def licences(vendors: Iterable[str]) -> str:
    """LICENSES.md: whose art and words these are, under which licence (CC-BY needs attribution,
    CC-BY-SA share-alike for what is made from OpenMoji's)."""
    lines = ["# Licences and attributions of the emoji corpus", "",
             "Images rendered from the SVGs of these packages (unchanged art, resized, on white); names, keywords,",
             "groups and subgroups from Unicode CLDR through emojibase-data.", "",
             "| set | package | licence | by |", "|---|---|---|---|"]
    for v in [*vendors, "emojibase"]:
        p = PACKAGES[v]
        lines.append(f"| {v} | `{p.spec}` (npm) | {p.licence} | {p.author} |")
    lines += ["", "OpenMoji's images and anything derived from them are shared under CC-BY-SA-4.0.", ""]
    return "\n".join(lines)


def contact_sheet(root: Path, corpus: Corpus, path: Path, rows: int = 40, seed: int = 0) -> None:
    """One concept per row (its CLDR name), one vendor per column: the mapping checked by eye."""
    import random

    from PIL import Image, ImageDraw

    by_key: dict[str, dict[str, str]] = {}
    for it in corpus.items:
        by_key.setdefault(it.key, {})[it.vendor] = it.image
    vendors = [v for v in VENDORS if any(it.vendor == v for it in corpus.items)]
    keys = sorted(by_key)
    keys = sorted(random.Random(seed).sample(keys, min(rows, len(keys))), key=lambda k: (corpus.concepts[k].group, k))
    cell, label = 64, 220
    sheet = Image.new("RGB", (label + cell * len(vendors), cell * (len(keys) + 1)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, v in enumerate(vendors):
        draw.text((label + j * cell + 2, cell // 2), v, fill="black")
    for i, k in enumerate(keys, start=1):
        draw.text((4, i * cell + cell // 2 - 6), f"{corpus.concepts[k].name[:34]}", fill="black")
        for j, v in enumerate(vendors):
            if v in by_key[k]:
                img = Image.open(root / by_key[k][v]).convert("RGB").resize((cell - 4, cell - 4))
                sheet.paste(img, (label + j * cell + 2, i * cell + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    atomic_write_bytes(path, buf.getvalue())
