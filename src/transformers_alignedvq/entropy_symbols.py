"""The symbols of coded wire frames (`entropy`): what a frame's indices and question become before the ANS coder
codes them, and the counts a fit makes of them. numpy only: it runs on the edge.

* **Indices** (`raster_symbols`): rasters of patches, each visited row by row (`walk_patches`) and coded as its rank
  among up to ``NUM_RANKS`` candidates (neighbours, then recent values) under one of ``NUM_CONTEXTS`` contexts, or
  an escape and the index; a raster with a CLS token codes it first. A frame's rasters are its tiles (one fixed
  grid, `index_symbols`) or its images' patch grids (`grid_rasters`), each coded on its own.
* **Questions** (`split_pieces`, `fit_questions`): pieces under a bigram model, unknown pieces spelled in bytes.

The exact order is written in ``docs/wire-format.md``; the encoder, the decoder and the fit share these functions so
they see the same symbols.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import WireFormatError

NUM_RANKS = 8
NUM_CONTEXTS = 128
MAX_CODEBOOK_SIZE = 2**20  # every symbol keeps one 2**-24 quantum of constriction's fixed-point tables
MAX_PIECES = 4096
ESCAPE = NUM_RANKS  # rank symbol meaning "not a candidate: the index follows under the escape table"
END_OF_PIECE = 256
# A word or mark takes the one space before it; other whitespace forms runs (the last space of a run before a
# word stays with the word).
_PIECE = re.compile(r"\s?\w+|\s?[^\w\s]|\s+(?!\S)|\s+")
STAGED = ("cls_probabilities", "rank_probabilities", "escape_probabilities")  # a leading stage axis if staged


def split_pieces(text: str) -> list[str]:
    """``text`` cut into the pieces the question model codes; ``"".join`` gives ``text`` back."""
    return _PIECE.findall(text)


def walk_patches(height: int, width: int, take) -> list[int]:
    """Visit the patches in raster order; ``take(context, candidates)`` returns each patch's index.

    The context (0..127) and the candidate list depend only on patches already visited, so the encoder,
    the decoder and the fit see the same ones.
    """
    grid: list[int] = []
    recent: list[int] = []  # the most recent distinct values, newest first
    for position in range(height * width):
        row, col = divmod(position, width)
        left = grid[-1] if col else None
        up = grid[position - width] if row else None
        up_left = grid[position - width - 1] if row and col else None
        up_right = grid[position - width + 1] if row and col < width - 1 else None
        context = ((col > 0) | (row > 0) << 1 | (row > 0 and col > 0 and left == up) << 2
                   | (up_left is not None and up_left == left) << 3
                   | (up_right is not None and up_right == up) << 4 | min(len(recent), 3) << 5)
        candidates: list[int] = []
        for value in (left, up, up_right, up_left, *recent):
            if value is not None and value not in candidates:
                candidates.append(value)
        value = take(context, candidates[:NUM_RANKS])
        grid.append(value)
        if value in recent:
            recent.remove(value)
        recent.insert(0, value)
        del recent[NUM_RANKS:]
    return grid


def index_symbols(tokens: list[int], height: int, width: int, has_cls_token: bool,
                   tiles: int = 1) -> list[tuple[Any, int]]:
    """The symbols coding ``tokens`` (``tiles`` tiles one after the other), in decoding order, each with the
    key of its table (name, row)."""
    return raster_symbols(tokens, [(height, width, has_cls_token)] * tiles)


def raster_symbols(tokens: list[int], rasters: list[tuple[int, int, bool]]) -> list[tuple[Any, int]]:
    """The symbols coding ``tokens``: ``rasters`` ``(height, width, CLS)`` one after the other, each on its own."""
    symbols: list[tuple[Any, int]] = []
    start = 0
    for height, width, has_cls_token in rasters:
        end = start + height * width + int(has_cls_token)
        symbols += tile_symbols(tokens[start:end], height, width, has_cls_token)
        start = end
    return symbols


def grid_rasters(grids: Iterable[Any]) -> list[tuple[int, int, bool]]:
    """The rasters of patch grids ``(t, h, w)`` (or ``(h, w)``, t = 1): ``t`` of ``h x w`` each, no CLS token."""
    rasters = []
    for grid in grids:
        try:
            sides = tuple(int(side) for side in grid)
        except (TypeError, ValueError):
            raise WireFormatError(f"a patch grid must be (t, h, w) ints, got {grid!r}") from None
        t, h, w = sides if len(sides) == 3 else (1, *sides) if len(sides) == 2 else (0, 0, 0)
        if min(t, h, w) < 1:
            raise WireFormatError(f"a patch grid must be (t, h, w) positive ints, got {grid!r}")
        rasters += [(h, w, False)] * t
    return rasters


def tile_symbols(tokens: list[int], height: int, width: int, has_cls_token: bool) -> list[tuple[Any, int]]:
    symbols: list[tuple[Any, int]] = []
    if has_cls_token:
        symbols.append((("cls_probabilities", None), tokens[0]))
    patches = iter(tokens[int(has_cls_token):])

    def take(context: int, candidates: list[int]) -> int:
        value = next(patches)
        rank = candidates.index(value) if value in candidates else ESCAPE
        symbols.append((("rank_probabilities", context), rank))
        if rank == ESCAPE:
            symbols.append((("escape_probabilities", None), value))
        return value

    walk_patches(height, width, take)
    return symbols


def stage_counts(rows: list[tuple[list[int], list[tuple[int, int, bool]]]], k: int) -> dict[str, np.ndarray]:
    """Symbol counts of one stage's indices, by table: ``rows`` of (one image's or tile's tokens, its rasters)."""
    counts = {"cls_probabilities": np.zeros(k), "rank_probabilities": np.zeros((NUM_CONTEXTS, NUM_RANKS + 1)),
              "escape_probabilities": np.zeros(k)}
    for tokens, rasters in rows:
        for (name, row), symbol in raster_symbols(tokens, rasters):
            counts[name][symbol if row is None else (row, symbol)] += 1
    return counts


def fitted_tables(stages: list[list[tuple[list[int], list[tuple[int, int, bool]]]]], k: int,
                   smoothing: float) -> dict[str, np.ndarray]:
    """The three index tables (a leading stage axis for more than one stage), from each stage's rows."""
    counts = [stage_counts(rows, k) for rows in stages]
    return {name: normalised(np.stack([c[name] for c in counts]) if len(counts) > 1 else counts[0][name], smoothing)
            for name in STAGED}


def check_fit_options(smoothing: Any, k: int) -> None:
    if not (isinstance(smoothing, (int, float)) and math.isfinite(smoothing) and smoothing > 0):
        raise WireFormatError(f"smoothing must be a positive number, got {smoothing!r}")
    if not 2 <= k <= MAX_CODEBOOK_SIZE:
        raise WireFormatError(f"codebook_size must be in 2..{MAX_CODEBOOK_SIZE}, got {k}")


def normalised(counts: np.ndarray, smoothing: float) -> np.ndarray:
    smoothed = np.asarray(counts, dtype=np.float64) + smoothing
    return smoothed / smoothed.sum(axis=-1, keepdims=True)


def fit_questions(questions: list[str], smoothing: float, max_pieces: int) -> dict[str, np.ndarray]:
    if not 0 <= max_pieces <= MAX_PIECES:
        raise WireFormatError(f"max_pieces must be in 0..{MAX_PIECES}, got {max_pieces}")
    split = [split_pieces(question) for question in questions]
    frequent = Counter(piece for pieces in split for piece in pieces).most_common()
    vocabulary = [piece for piece, n in frequent if n >= 2][:max_pieces]
    ids = {piece: i for i, piece in enumerate(vocabulary)}
    escape = len(vocabulary)
    bigrams, byte_counts = np.zeros((escape + 2, escape + 2)), np.zeros(END_OF_PIECE + 1)
    for pieces in split:
        context = 0
        for piece in pieces:
            symbol = ids.get(piece, escape)
            bigrams[context, symbol] += 1
            context = symbol + 1
            if symbol == escape:
                byte_counts[END_OF_PIECE] += 1
        bigrams[context, escape + 1] += 1
        # Bytes of every piece, not only the rare ones, so the byte table has seen the language.
        byte_counts[:256] += np.bincount(np.frombuffer("".join(pieces).encode("utf-8"), np.uint8), minlength=256)
    encoded = [piece.encode("utf-8") for piece in vocabulary]
    return {
        "question_pieces": np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
        "question_piece_ends": np.cumsum([len(piece) for piece in encoded], dtype=np.int64),
        "question_probabilities": normalised(bigrams, smoothing),
        "question_byte_probabilities": normalised(byte_counts, smoothing),
    }
