"""Generated hostile inputs shared by the tests of this folder (each probe of issue 16 is a test named
after it): image files whose header lies about their size, special files named ``.png``, YAML bombs."""

from __future__ import annotations

import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def lying_png(width: int, height: int, depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG whose header declares width x height but whose data inflates to 1000 zero bytes: a decoder
    that trusts the header allocates width * height * bytes-per-pixel before it notices (100000^2
    16-bit RGB: 60 GB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + png_chunk(b"IEND", b"")


def zero_png(width: int, height: int) -> bytes:
    """A real, valid all-zero 8-bit grey PNG: tiny on disk (zlib of zeros), width * height once decoded."""
    rows = b"".join(b"\0" + b"\0" * width for _ in range(height))  # filter byte 0 + a row of zeros
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows, 9)) + png_chunk(b"IEND", b"")


def billion_laughs(levels: int, fan_out: int = 9) -> str:
    """A YAML flow sequence holding ``levels`` nested anchors, each ``fan_out`` aliases of the one before:
    a few hundred bytes that stand for ``fan_out ** levels`` strings once expanded (9 levels: 387 M)."""
    items = ["&a0 [" + ", ".join(['"lol"'] * fan_out) + "]"]
    for i in range(1, levels):
        items.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * fan_out) + "]")
    return "[" + ", ".join(items) + "]"


def noisy_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
