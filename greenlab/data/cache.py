"""A preprocessing cache for image folders: decode + field-of-view crop + resize once, then read uint8 pixels.

Each entry is one file ``<root>/<key[:2]>/<key>.px``: a 32-byte header (magic, height, width, channels, CRC-32
of the pixels) and the raw uint8 pixels (H, W, C), read straight into their array (one copy; for a batch, into
its place in the batch: ``get_batch``). The key hashes the source
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
        return Image.fromarray(self.get_pixels(source, make))

    def get_pixels(self, source: Path, make: Callable[[Path], Image.Image]) -> np.ndarray:
        """``get``'s pixels, (H, W, 3) uint8, without a PIL image when the entry is there."""
        key = self.key(source)
        entry = self.path(key)
        if entry.is_file():
            pixels = self.read(entry)
            if pixels is not None:
                self.hits += 1
                return pixels
            self.rebuilt += 1
        self.misses += 1
        pixels = np.asarray(make(source).convert("RGB"), dtype=np.uint8)
        self.write(entry, pixels)
        return pixels

    def get_batch(self, sources: list[Path], make: Callable[[Path], Image.Image], allocate: Callable | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """The preprocessed pixels of ``sources`` as one (B, H, W, C) uint8 array (``allocate(shape)``, uint8: e.g. a
        view of shared memory; default ``np.empty``), each entry read straight into its place (black beyond its own size), and their (B, 2)
        sizes: what a loader worker hands over for augmentation on the training device. Missing or corrupt
        entries are made (and stored) first."""
        entries = [self.path(self.key(source)) for source in sources]
        shapes = [self.shape(entry) for entry in entries]
        made = {}
        for i, shape in enumerate(shapes):
            if shape is None:
                made[i] = self.get_pixels(sources[i], make)
                shapes[i] = made[i].shape
        height, width = max(s[0] for s in shapes), max(s[1] for s in shapes)
        shape = (len(sources), height, width, shapes[0][2])
        batch = allocate(shape) if allocate else np.empty(shape, np.uint8)
        if batch.dtype != np.uint8 or batch.shape != shape or not batch.flags.c_contiguous:
            raise TypeError(f"allocate gave {batch.dtype} {batch.shape}, not C-contiguous uint8 {shape}")
        for i, (entry, shape) in enumerate(zip(entries, shapes)):
            whole = shape[:2] == (height, width)
            place = batch[i] if whole else np.empty(shape, np.uint8)
            if i in made:
                place[...] = made[i]
            elif self.read_into(entry, place):
                self.hits += 1
            else:  # rebuilt; a header that lied about the shape (same byte count): read the batch again
                pixels = self.get_pixels(sources[i], make)
                if pixels.shape != shape:
                    return self.get_batch(sources, make, allocate)
                place[...] = pixels
            if not whole:
                batch[i] = 0
                batch[i, : shape[0], : shape[1]] = place
        return batch, np.array([s[:2] for s in shapes], dtype=np.int64)

    @staticmethod
    def shape(entry: Path) -> tuple[int, int, int] | None:
        """(H, W, C) from ``entry``'s header when it is there with the size that says (else None)."""
        try:
            with entry.open("rb") as handle:
                magic, height, width, channels, _ = HEADER.unpack(handle.read(HEADER.size))
            if magic != MAGIC or entry.stat().st_size != HEADER.size + height * width * channels:
                return None
            return height, width, channels
        except (OSError, struct.error):
            return None

    @classmethod
    def read(cls, entry: Path) -> np.ndarray | None:
        """The pixels of the existing file ``entry``, or None when it is corrupt (logged)."""
        shape = cls.shape(entry)
        if shape is None:
            log.warning("preprocessing cache: %s is corrupt (bad header or size); rebuilding it", entry)
            return None
        pixels = np.empty(shape, np.uint8)
        return pixels if cls.read_into(entry, pixels) else None

    @staticmethod
    def read_into(entry: Path, pixels: np.ndarray) -> bool:
        """Read ``entry``'s pixels straight into ``pixels`` ((H, W, C) uint8, C-contiguous: one copy); False
        (logged) when the entry is corrupt: bad header, wrong size, truncated, checksum mismatch."""
        try:
            with entry.open("rb") as handle:
                magic, height, width, channels, crc = HEADER.unpack(handle.read(HEADER.size))
                if magic != MAGIC:
                    raise ValueError("not a greenlab cache entry")
                if (height, width, channels) != pixels.shape:
                    raise ValueError(f"{height}x{width}x{channels} pixels, expected {pixels.shape}")
                if handle.readinto(memoryview(pixels).cast("B")) != pixels.nbytes or handle.read(1):
                    raise ValueError(f"{entry.stat().st_size} bytes, expected {HEADER.size + pixels.nbytes}")
            if zlib.crc32(pixels) != crc:
                raise ValueError("checksum mismatch")
            return True
        except (OSError, ValueError, struct.error) as err:
            log.warning("preprocessing cache: %s is corrupt (%s); rebuilding it", entry, err)
            return False

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
