"""A preprocessing cache for image folders: decode + field-of-view crop + resize once, then read uint8 pixels.

Each entry is one file ``<root>/<key[:2]>/<key>.px``: a 32-byte header (magic, height, width, channels, CRC-32
of the pixels) and the raw uint8 pixels (H, W, C), read through a memory map. The key hashes the source
file's resolved path, size and modification time and the preprocessing parameters, so an edited or added
photograph is processed alone and a change of parameters never reuses stale pixels. Writes go to a
temporary file renamed into place (atomic: concurrent runs sharing a cache never see half an entry; two
writers of one key write the same bytes). A corrupt entry (bad header, truncated, CRC mismatch) is detected
on read, logged and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

MAGIC = b"GLPX0001"
HEADER = struct.Struct("<8sIIII8x")  # magic, height, width, channels, crc32; padded to 32 bytes


class PreprocessedCache:
    """Args: root (the cache folder), params (the preprocessing's parameters: part of every key)."""

    def __init__(self, root: str | Path, params: dict):
        self.root = Path(root).expanduser()
        self.params = json.dumps(params, sort_keys=True)
        self.hits = self.misses = self.rebuilt = 0

    def key(self, source: Path) -> str:
        """Hash of the source file's path, size and mtime and of the parameters."""
        stat = source.stat()
        text = f"{source.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{self.params}"
        return hashlib.sha1(text.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.px"

    def get(self, source: Path, make: Callable[[Path], Image.Image]) -> Image.Image:
        """The preprocessed image of ``source``: from the cache, or ``make(source)`` stored first."""
        key = self.key(source)
        entry = self.path(key)
        if entry.is_file():
            pixels = self.read(entry)
            if pixels is not None:
                self.hits += 1
                return Image.fromarray(pixels)
            self.rebuilt += 1
        self.misses += 1
        image = make(source)
        self.write(entry, np.asarray(image.convert("RGB"), dtype=np.uint8))
        return image

    @staticmethod
    def read(entry: Path) -> np.ndarray | None:
        """The pixels of ``entry`` (a copy of the memory-mapped bytes), or None when it is corrupt (logged)."""
        try:
            with entry.open("rb") as handle:
                magic, height, width, channels, crc = HEADER.unpack(handle.read(HEADER.size))
            if magic != MAGIC:
                raise ValueError("not a greenlab cache entry")
            expected = HEADER.size + height * width * channels
            if entry.stat().st_size != expected:
                raise ValueError(f"{entry.stat().st_size} bytes, expected {expected}")
            pixels = np.memmap(entry, np.uint8, "r", offset=HEADER.size, shape=(height, width, channels))
            if zlib.crc32(pixels) != crc:
                raise ValueError("checksum mismatch")
            return np.array(pixels)
        except (OSError, ValueError, struct.error) as err:
            log.warning("preprocessing cache: %s is corrupt (%s); rebuilding it", entry, err)
            return None

    @staticmethod
    def write(entry: Path, pixels: np.ndarray) -> None:
        """``pixels`` (H, W, C) uint8 to ``entry``, atomically."""
        entry.parent.mkdir(parents=True, exist_ok=True)
        height, width, channels = pixels.shape
        header = HEADER.pack(MAGIC, height, width, channels, zlib.crc32(np.ascontiguousarray(pixels)))
        descriptor, temporary = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.name}.")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(header)
                handle.write(np.ascontiguousarray(pixels).tobytes())
            os.replace(temporary, entry)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def stats(self) -> dict:
        return {
            "cache_dir": str(self.root),
            "hits": self.hits,
            "misses": self.misses,
            "rebuilt": self.rebuilt,
        }
