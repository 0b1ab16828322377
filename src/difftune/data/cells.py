"""Reading one image cell for the data check: a path under the dataset folder, bytes, or
an undecoded `datasets` Image; what its header says, and what training will do to it."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from difftune.data.images import oriented_size
from difftune.data.report import Finding
from difftune.data.sources import regular_file_problem


@dataclass
class Scanned:
    """What one readable image cell told us (None for a cell with a fatal finding)."""

    size: tuple[int, int]
    file: str | None
    digest: bytes | None


class ImageScanner:
    """Reads image cells (paths under root, bytes, undecoded Image dicts)."""

    def __init__(self, root: Path, full: bool) -> None:
        self.root = root
        self.full = full
        # Absolute paths (imagefolder's) are shown relative to the dataset folder.
        self.prefix = str(root.resolve()) + os.sep

    def scan(
        self, value: Any, row: int, column: str, hashed: bool
    ) -> tuple[list[Finding], Scanned | None]:
        """Findings for one cell, and what it told us (None when it cannot be trained on)."""
        source, file, label = self._source(value)

        def finding(kind: str, message: str, fatal: bool = True) -> Finding:
            # A path is in Finding.file already; bytes have none, so the message says what they are.
            return Finding(row, column, file, kind, f"{label}: {message}" if label else message, fatal)

        if source is None:
            message = f"expected a path, bytes or an image, got {type(value).__name__}"
            return [finding("not_an_image_cell", message)], None
        if self.escapes(source, file):
            return [finding("outside_dataset", f"{file} points outside the dataset folder {self.root}")], None
        data, problem = self._read(source)
        if problem is not None:
            return [finding(*problem)], None
        readable = data if data is not None else source
        try:
            image = Image.open(io.BytesIO(data) if data is not None else source)
        except Exception as error:  # PIL raises many types for a file it cannot identify
            return [finding("unreadable", _unidentified(error, readable))], None
        with image:
            try:
                header = Header.of(image)
            except Exception as error:  # a malformed EXIF block: training's exif_transpose fails on it too
                return [finding("unreadable", f"its EXIF cannot be read ({_error(error)})")], None
            try:
                # verify() checks what the format allows without decoding; load() decodes all.
                image.load() if self.full else image.verify()
            except Exception as error:
                message = f"the header reads ({header.describe()}) but the data does not ({_error(error)})"
                return [finding("truncated", message)], None
        notes = [finding(kind, message, fatal=False) for kind, message in header.mode_notes()]
        digest = None
        if hashed and self.full and data is not None:
            digest = hashlib.blake2b(data, digest_size=16).digest()
        return notes, Scanned(header.size, file, digest)

    def _source(self, value: Any) -> tuple[Path | bytes | None, str | None, str]:
        """(what to read, the file as written or None, a label for messages about bytes)."""
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data or (data is not None and not path):
                # Embedded bytes win, as in sources.py; their "path" is only the original name.
                named = f" (originally {path})" if path else ""
                return bytes(data), None, f"embedded image bytes{named}"
            value = path
        if isinstance(value, (bytes, bytearray)):
            return bytes(value), None, "image bytes"
        if isinstance(value, str) and value:
            file = value.removeprefix(self.prefix)
            return self.root / value, file, ""
        return None, None, ""

    def escapes(self, source: Path | bytes, file: str | None) -> bool:
        """A relative path that leads out of the dataset folder ("../../x.png")."""
        if not isinstance(source, Path) or file is None or Path(file).is_absolute():
            return False
        # Lexically, not through symlinks: a link to a file kept elsewhere is fine. The folder
        # may itself be a link, and datasets gives paths through its target.
        path = os.path.abspath(source)
        inside = (os.path.abspath(self.root) + os.sep, os.path.realpath(self.root) + os.sep)
        return self.root.is_dir() and not path.startswith(inside)

    def _read(self, source: Path | bytes) -> tuple[bytes | None, tuple[str, str] | None]:
        """The bytes to decode (None: let PIL read the file, headers only), or a problem."""
        if isinstance(source, bytes):
            return source, (("zero_byte", "the image bytes are empty") if not source else None)
        problem = regular_file_problem(source)
        if problem == "no such file":
            return None, ("missing_file", f"no such file {source}")
        if problem:
            return None, ("not_a_file", f"{source}: {problem}")
        try:
            if self.full:
                data = source.read_bytes()  # read once: hashed and decoded from memory
                size = len(data)
            else:
                data, size = None, source.stat().st_size
        except FileNotFoundError:
            return None, ("missing_file", f"no such file {source}")
        except OSError as error:
            return None, ("unreadable", f"cannot read {source} ({_error(error)})")
        if size == 0:
            return None, ("zero_byte", "the file is empty (0 bytes)")
        return data, None


@dataclass
class Header:
    size: tuple[int, int]
    mode: str
    format: str | None
    rawmode: str
    transparency: bool

    @classmethod
    def of(cls, image: Image.Image) -> Header:
        # The tile's raw mode is the only place PIL keeps a PNG's 16-bit depth once it
        # has chosen an 8-bit mode (RGB;16B is read as RGB); it is gone after load().
        tile = getattr(image, "tile", None) or []
        rawmode = tile[0][3] if tile and isinstance(tile[0][3], str) else ""
        # The size training sees: EXIF orientation applied, as images.to_rgb does.
        return cls(oriented_size(image), image.mode, image.format, rawmode, "transparency" in image.info)

    def describe(self) -> str:
        return f"{self.format or 'image'} {self.size[0]}x{self.size[1]} {self.mode}"

    def mode_notes(self) -> list[tuple[str, str]]:
        """(kind, message) for each way convert("RGB") changes this image, as training does."""
        mode, notes = self.mode, []
        if mode == "CMYK":
            notes.append(("cmyk", (
                "CMYK image: converted to RGB with PIL's plain formula R = (255-C)(255-K)/255 "
                "(likewise G, B), ignoring any ICC profile, so colours may shift"
            )))
        if mode.startswith("I;16") or mode in ("I", "F"):
            depth = {"I": "32-bit integer", "F": "32-bit float"}.get(mode, "16-bit")
            how = {"I": "divided by 257 when any value is above 255", "F": "times 255 when all are within 0-1"}
            notes.append(("sixteen_bit", (
                f"{depth} greyscale image (mode {mode}): rescaled to 8 bits (values "
                f"{how.get(mode, 'divided by 257: the 16-bit range onto 0-255')}) and converted to RGB"
            )))
        elif self.format == "PNG" and ";16" in self.rawmode:
            notes.append(("sixteen_bit", (
                f"16-bit-per-channel PNG: PIL reads it as {mode}, keeping the high byte of each "
                "value (8-bit precision), then converts it to RGB"
            )))
        if mode in ("P", "PA"):
            notes.append(("palette", (
                f"palette image (mode {mode}): converted to RGB by looking up each pixel's palette colour"
            )))
        if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            notes.append(("alpha", (
                f"mode {mode} has an alpha channel: converted to RGB by dropping it, not compositing, "
                "so transparent pixels train with whatever colour they store"
            )))
        elif self.transparency:
            notes.append(("alpha", (
                f"mode {mode} with a transparent colour: converted to RGB ignoring the transparency, "
                "so transparent pixels train with their stored colour"
            )))
        return notes


def _unidentified(error: BaseException, source: Path | bytes) -> str:
    if not isinstance(error, UnidentifiedImageError):
        return f"PIL cannot open it ({_error(error)})"
    # PIL's own message names a BytesIO object; the first bytes say more (text, HTML, a
    # Git LFS pointer, ...).
    start = source[:16] if isinstance(source, bytes) else b""
    if isinstance(source, Path):
        try:
            with source.open("rb") as handle:
                start = handle.read(16)
        except OSError:
            pass
    return f"not an image PIL recognises (it starts with {start!r})"


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
