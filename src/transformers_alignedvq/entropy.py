"""Static entropy models for coded wire frames (coder 1 of `wire`): lossless, fitted on training data.

One `EntropyModel` belongs to one codebook and one token grid (or, fitted on patch grids, any grid). It codes

* the **indices** with a context model: each patch (raster order) is either one of up to ``NUM_RANKS``
  candidates (its left, upper, upper-right and upper-left neighbours, then the most recent other values of
  the image) or an escape followed by the index under a static table. The rank's probabilities depend on a
  context of 128 classes (which neighbours exist, which of them are equal, how many values the image has
  shown so far). The CLS token has its own static table. Several codes per token (residual VQ's stages, or
  groups) are coded one code position ("stage") after the other, each over the same grid with tables of its
  own (the arrays then have a leading stage dimension). A frame of several tiles (the any-resolution
  families, `wire_geometry`) codes its tiles one after the other, each on its own: a token's neighbours and
  recent values are those of its tile, so the model fitted on single tiles codes any tile count. A model fitted
  on **patch grids** (Qwen2.5-VL, `EntropyModel.fit_patch_grids`) has no grid of its own: a frame's images are
  coded one after the other, each ``(t, h, w)`` grid as ``t`` rasters of ``h x w`` patches, its size taken from
  the frame's geometry section; the tables do not depend on the grid's size.
* the **question** as pieces (``" shape"``, ``"?"``; a word with its leading space, a punctuation mark, a
  run of spaces) under a bigram model over the training questions' pieces; a piece outside the vocabulary
  is escaped and spelled in UTF-8 bytes under a static byte table. No tokenizer is needed on the device.

Every table is a probability vector stored as float64 and turned into a ``constriction`` ``Categorical``
(``perfect=False``) when first used. The model is identified on the wire by the first ``MODEL_ID_SIZE``
bytes of SHA-256 over its arrays. Coding and decoding use ``constriction``'s ANS coder (32-bit words) with
the exact symbol order written in ``docs/wire-format.md``.

This module imports numpy only at the top: it runs on the edge.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .entropy_symbols import (
    END_OF_PIECE,
    ESCAPE,
    MAX_CODEBOOK_SIZE,
    MAX_PIECES,
    NUM_CONTEXTS,
    NUM_RANKS,
    check_fit_options,
    fit_questions,
    fitted_tables,
    grid_rasters,
    raster_symbols,
    split_pieces,
    walk_patches,
)
from .errors import CheckpointMismatchError, WireFormatError

ENTROPY_MODEL_NAME = "entropy_model.safetensors"
MODEL_ID_SIZE = 4
MAX_TOKENS = 2**16
# Patches of one coded frame of patch grids, which bounds the decoder's work (under a second for 2**18) before
# any data is read: four of Qwen2.5-VL's largest images (65,536 patches at its default max_pixels).
MAX_CODED_PATCHES = 2**18
# A coded question longer than this is refused by the decoder (bounded work whatever the payload says);
# the encoder sends longer ones as UTF-8.
MAX_CODED_PROMPT_BYTES = 4096

_ID_DOMAIN = b"AVQ entropy model v2\x00"
MAX_STAGES = 8
_ARRAYS = ("geometry", "cls_probabilities", "rank_probabilities", "escape_probabilities", "question_pieces",
           "question_piece_ends", "question_probabilities", "question_byte_probabilities")


def _constriction() -> Any:
    try:
        import constriction
    except ImportError as exc:
        raise ModuleNotFoundError(
            "coded wire frames need the 'constriction' package; install it with "
            "`pip install transformers-alignedvq[entropy]`, or send raw frames (entropy_model=None)",
            name="constriction",
        ) from exc
    return constriction


class EntropyModel:
    """The static models coded frames are written with; see the module docstring.

    Build one with `EntropyModel.fit`, store it with `save` and read it with `load_entropy_model`. The
    constructor takes the arrays `to_arrays` returns (e.g. a safetensors file's) and checks them.
    """

    def __init__(self, arrays: Mapping[str, Any]) -> None:
        missing = [key for key in _ARRAYS if key not in arrays]
        if missing:
            raise WireFormatError(f"entropy model lacks the arrays {missing}")
        self._arrays = {key: np.array(arrays[key], order="C") for key in _ARRAYS}
        for array in self._arrays.values():
            array.setflags(write=False)
        self._check()
        digest = hashlib.sha256(_ID_DOMAIN)
        for key in _ARRAYS:
            array = self._arrays[key]
            digest.update(struct.pack(f"<{2 + array.ndim}I", len(key), array.ndim, *array.shape) + key.encode())
            digest.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        self._model_id = digest.digest()[:MODEL_ID_SIZE]
        self._models: dict[Any, Any] = {}

    # ------------------------------------------------------------------------------------------------
    def _check(self) -> None:
        a = self._arrays
        geometry = a["geometry"]
        if geometry.shape != (4,) or geometry.dtype.kind not in "iu":
            raise WireFormatError("entropy model: geometry must be 4 integers (K, grid height, width, CLS)")
        k, height, width, cls = (int(v) for v in geometry)
        if not 2 <= k <= MAX_CODEBOOK_SIZE:
            raise WireFormatError(f"entropy model: codebook size must be in 2..{MAX_CODEBOOK_SIZE}, got {k}")
        patch_grids = height == width == cls == 0  # the frames' geometry sections give the grids
        if not patch_grids and (height < 1 or width < 1 or cls not in (0, 1) or height * width + cls > MAX_TOKENS):
            raise WireFormatError(f"entropy model: grid {height}x{width} (CLS {cls}) must have 1..{MAX_TOKENS} tokens "
                                  "(or be 0x0 without CLS: patch grids)")
        pieces = self._read_pieces()
        staged = a["cls_probabilities"].ndim == 2
        stages = (a["cls_probabilities"].shape[0],) if staged else ()
        if staged and not 2 <= stages[0] <= MAX_STAGES:
            raise WireFormatError(f"entropy model: a staged model has 2..{MAX_STAGES} stages, got {stages[0]}")
        shapes = {"cls_probabilities": (*stages, k), "rank_probabilities": (*stages, NUM_CONTEXTS, NUM_RANKS + 1),
                  "escape_probabilities": (*stages, k), "question_probabilities": (len(pieces) + 2,) * 2,
                  "question_byte_probabilities": (END_OF_PIECE + 1,)}
        for key, shape in shapes.items():
            table = a[key]
            if table.shape != shape or table.dtype != np.float64:
                raise WireFormatError(f"entropy model: {key} must be float64 of shape {shape}, got "
                                      f"{table.dtype} {table.shape}")
            if not (np.all(np.isfinite(table)) and np.all(table > 0)):
                raise WireFormatError(f"entropy model: {key} must be finite and strictly positive")
        self._pieces = pieces
        self._piece_ids = {piece: i for i, piece in enumerate(pieces)}
        self._stages = stages[0] if staged else 1

    def _read_pieces(self) -> list[str]:
        data, ends = self._arrays["question_pieces"], self._arrays["question_piece_ends"]
        if data.dtype != np.uint8 or data.ndim != 1 or ends.ndim != 1 or ends.dtype.kind not in "iu":
            raise WireFormatError("entropy model: question pieces must be uint8 bytes and integer ends")
        if len(ends) > MAX_PIECES or np.any(np.diff(ends, prepend=0) < 1) or (len(ends) and ends[-1] != len(data)):
            raise WireFormatError(f"entropy model: question piece ends must rise to the byte count, at most "
                                  f"{MAX_PIECES} non-empty pieces")
        raw = data.tobytes()
        try:
            pieces = [raw[start:end].decode("utf-8") for start, end in zip([0, *ends[:-1]][: len(ends)], ends, strict=True)]
        except UnicodeDecodeError as exc:
            raise WireFormatError(f"entropy model: a question piece is not UTF-8: {exc}") from None
        if len(set(pieces)) != len(pieces) or any(split_pieces(p) != [p] for p in pieces):
            raise WireFormatError("entropy model: question pieces must be distinct single pieces")
        return pieces

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, indices: Any, *, codebook_size: int, grid: tuple[int, int], has_cls_token: bool,
            questions: Iterable[str] = (), smoothing: float = 0.5, max_pieces: int = 256) -> EntropyModel:
        """Fit on training images' indices, shape ``(images, tokens)`` or ``(images, tokens, stages)`` for residual
        VQ (for tiled frames: one row per tile, ``grid`` being one tile's), and training questions.

        ``smoothing`` is added to every count, so every index, rank and byte stays codable.
        ``max_pieces`` caps the question vocabulary (the most frequent pieces seen at least twice); its
        bigram table has ``(max_pieces + 2) ** 2`` entries. Images of varying patch grids: `fit_patch_grids`.
        """
        k, (height, width) = int(codebook_size), (int(grid[0]), int(grid[1]))
        check_fit_options(smoothing, k)
        table = np.asarray(indices)
        tokens = height * width + bool(has_cls_token)
        if table.ndim == 2:
            table = table[:, :, None]
        if table.ndim != 3 or table.shape[1] != tokens or table.dtype.kind not in "iu" or table.shape[2] > MAX_STAGES:
            raise WireFormatError(f"indices must be integers of shape (images, {tokens}[, stages <= {MAX_STAGES}]), "
                                  f"got {table.dtype} {table.shape}")
        if table.size and (table.min() < 0 or table.max() >= k):
            raise WireFormatError(f"indices must be in [0, {k})")
        raster = [(height, width, bool(has_cls_token))]
        arrays = fitted_tables([[(row, raster) for row in table[:, :, stage].tolist()]
                                 for stage in range(table.shape[2])], k, smoothing)
        arrays["geometry"] = np.array([k, height, width, int(bool(has_cls_token))], dtype=np.int64)
        return cls({**arrays, **fit_questions(list(questions), smoothing, max_pieces)})

    @classmethod
    def fit_patch_grids(cls, images: Iterable[tuple[Any, Any]], *, codebook_size: int, questions: Iterable[str] = (),
                        smoothing: float = 0.5, max_pieces: int = 256) -> EntropyModel:
        """Fit a model of patch grids (Qwen2.5-VL) on ``images``: pairs of one image's indices, shape
        ``(t * h * w,)`` or ``(t * h * w, stages)`` in raster order, and its grid ``(t, h, w)`` (as
        ``image_grid_thw``); grids may differ from image to image. The model codes frames of any patch grids
        (their geometry section gives them); ``smoothing``, ``max_pieces`` and ``questions`` as in `fit`."""
        k = int(codebook_size)
        check_fit_options(smoothing, k)
        rows, stages = [], None
        for number, (indices, grid) in enumerate(images):
            table, rasters = np.asarray(indices), grid_rasters([grid])
            table = table[:, None] if table.ndim == 1 else table
            tokens = sum(h * w for h, w, _ in rasters)
            if table.ndim != 2 or table.shape[0] != tokens or table.dtype.kind not in "iu" or \
                    not 1 <= table.shape[1] <= MAX_STAGES or table.shape[1] != (stages or table.shape[1]):
                raise WireFormatError(f"image {number}: indices must be integers of shape ({tokens}[, stages <= "
                                      f"{MAX_STAGES}, the same for every image]) for grid {tuple(grid)}, got "
                                      f"{table.dtype} {table.shape}")
            if table.size and (table.min() < 0 or table.max() >= k):
                raise WireFormatError(f"image {number}: indices must be in [0, {k})")
            stages = table.shape[1]
            rows.append((table, rasters))
        if not rows:
            raise WireFormatError("fit_patch_grids needs at least one image")
        arrays = fitted_tables([[(table[:, stage].tolist(), rasters) for table, rasters in rows]
                                 for stage in range(stages)], k, smoothing)
        arrays["geometry"] = np.array([k, 0, 0, 0], dtype=np.int64)
        return cls({**arrays, **fit_questions(list(questions), smoothing, max_pieces)})

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The model's arrays (numpy), as `save` stores them."""
        return {key: array.copy() for key, array in self._arrays.items()}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``entropy_model.safetensors`` into ``directory`` (beside a checkpoint or an edge folder)."""
        from safetensors.numpy import save_file

        path = Path(directory) / ENTROPY_MODEL_NAME
        save_file(self.to_arrays(), str(path), metadata={"format": "alignedvq-entropy-model",
                                                         "model_id": self.model_id.hex()})
        return path

    # ------------------------------------------------------------------------------------------------
    @property
    def model_id(self) -> bytes:
        """``MODEL_ID_SIZE`` bytes naming this model in coded frames."""
        return self._model_id

    @property
    def codebook_size(self) -> int:
        return int(self._arrays["geometry"][0])

    @property
    def patch_grids(self) -> bool:
        """Whether the model codes patch grids of any size (`fit_patch_grids`) rather than one fixed grid."""
        return int(self._arrays["geometry"][1]) == 0

    @property
    def grid(self) -> tuple[int, int] | None:
        """The one (tile's) patch grid the model codes; None for a model of patch grids."""
        return None if self.patch_grids else (int(self._arrays["geometry"][1]), int(self._arrays["geometry"][2]))

    @property
    def has_cls_token(self) -> bool:
        return bool(self._arrays["geometry"][3])

    @property
    def codes_per_token(self) -> int:
        """Residual VQ stages the model codes per token (1 for a single codebook)."""
        return self._stages

    @property
    def num_tokens(self) -> int | None:
        """Tokens of one image (tile); None for a model of patch grids, whose images each have their own."""
        if self.patch_grids:
            return None
        height, width = self.grid
        return height * width + int(self.has_cls_token)

    def __repr__(self) -> str:
        grid = "patch grids" if self.patch_grids else self.grid
        return (f"EntropyModel(codebook_size={self.codebook_size}, grid={grid}, stages={self._stages}, "
                f"has_cls_token={self.has_cls_token}, pieces={len(self._pieces)}, id={self.model_id.hex()})")

    # ------------------------------------------------------------------------------------------------
    def _model(self, key: Any) -> Any:
        # Built on first use and kept: building a 4096-entry table takes ~20 us, coding a symbol ~0.1 us.
        model = self._models.get(key)
        if model is None:
            name, row, *stage = key  # a staged model's keys name the stage last
            table = self._arrays[name][stage[0]] if stage else self._arrays[name]
            table = table if row is None else table[row]
            # perfect=False is pinned: encoder and decoder must quantize tables alike, and constriction's
            # default changed in 0.5.
            model = self._models[key] = _constriction().stream.model.Categorical(table, perfect=False)
        return model

    def _question_symbols(self, question: str) -> list[tuple[Any, int]]:
        symbols, context = [], 0
        escape, end = len(self._pieces), len(self._pieces) + 1
        for piece in split_pieces(question):
            piece_id = self._piece_ids.get(piece)
            if piece_id is None:
                symbols.append((("question_probabilities", context), escape))
                symbols += [(("question_byte_probabilities", None), byte) for byte in piece.encode("utf-8")]
                symbols.append((("question_byte_probabilities", None), END_OF_PIECE))
                context = escape + 1
            else:
                symbols.append((("question_probabilities", context), piece_id))
                context = piece_id + 1
        symbols.append((("question_probabilities", context), end))
        return symbols

    def _push(self, coder: Any, symbols: list[tuple[Any, int]]) -> None:
        # ANS is a stack: push in reverse so the decoder pops in order.
        for key, symbol in reversed(symbols):
            coder.encode_reverse(symbol, self._model(key))

    def rasters(self, tiles: int, grids: Iterable[Any] | None) -> list[tuple[int, int, bool]]:
        """What a frame's tokens are coded as: ``tiles`` of the model's grid, or (a model of patch grids) the
        rasters of ``grids`` ``(t, h, w)``; `WireFormatError` when the frame's kind is not the model's."""
        if not self.patch_grids:
            if grids is not None:
                raise WireFormatError(f"entropy model mismatch: the model codes a fixed {self.grid[0]}x{self.grid[1]} "
                                      "grid, the frame carries patch grids; fit one with EntropyModel.fit_patch_grids")
            return [(*self.grid, self.has_cls_token)] * tiles
        if grids is None:
            raise WireFormatError("entropy model mismatch: the model codes patch grids, the frame carries none "
                                  "(a fixed grid or tiles); use a model fitted on that grid")
        rasters = grid_rasters(grids)
        total = sum(h * w for h, w, _ in rasters)
        if total > MAX_CODED_PATCHES:
            raise WireFormatError(f"too many patches to code: {total} in one frame, at most {MAX_CODED_PATCHES}; send "
                                  "the images in frames of their own")
        return rasters

    def encode_payload(self, tokens: np.ndarray, question: str | None, *, tiles: int = 1,
                       grids: Iterable[Any] | None = None) -> tuple[bytes, bytes | None]:
        """Payloads for ``tokens`` (shape ``(tiles * num_tokens,)``, tile after tile; ``(tiles * num_tokens,
        stages)`` for a staged model; a model of patch grids: every patch of ``grids`` ``(t, h, w)``, image after
        image): without the question, and with it coded first (None when there is no question or it is longer
        than ``MAX_CODED_PROMPT_BYTES``)."""
        rasters = self.rasters(tiles, grids)
        count = sum(h * w + int(cls) for h, w, cls in rasters)
        tokens = np.asarray(tokens).reshape(len(tokens), -1)
        if tokens.shape != (count, self._stages):
            what = f"{tiles} tiles of {self.num_tokens}" if grids is None else f"the patch grids' {count}"
            raise WireFormatError(f"tokens of shape {tokens.shape} are not {what} tokens x {self._stages} codes")
        coder = _constriction().stream.stack.AnsCoder()
        for stage in reversed(range(self._stages)):  # a stack: the last stage pushed first is popped last
            symbols = raster_symbols(tokens[:, stage].tolist(), rasters)
            self._push(coder, symbols if self._stages == 1 else [((*key, stage), s) for key, s in symbols])
        with_question = None
        if question is not None and len(question.encode("utf-8")) <= MAX_CODED_PROMPT_BYTES:
            both = coder.clone()
            self._push(both, self._question_symbols(question))
            with_question = _words_to_bytes(both.get_compressed())
        return _words_to_bytes(coder.get_compressed()), with_question

    def encode_question(self, question: str) -> bytes:
        """The question alone, coded as in a frame (a follow-up about a cached image, `wire_followup`)."""
        if len(question.encode("utf-8")) > MAX_CODED_PROMPT_BYTES:
            raise WireFormatError(f"prompt too long: a coded question holds at most {MAX_CODED_PROMPT_BYTES} bytes")
        coder = _constriction().stream.stack.AnsCoder()
        self._push(coder, self._question_symbols(question))
        return _words_to_bytes(coder.get_compressed())

    def decode_question(self, payload: bytes, *, max_question_bytes: int = MAX_CODED_PROMPT_BYTES) -> str:
        """Inverse of `encode_question`, bounded like `decode_payload`."""
        limit = min(int(max_question_bytes), MAX_CODED_PROMPT_BYTES)
        question, leftover = _decoded(payload, lambda coder: self._decode_question(coder, limit), "coded question")
        if leftover:
            raise WireFormatError("coded question has unread data after its end")
        return question

    def decode_payload(self, payload: bytes, *, with_question: bool, tiles: int = 1, grids: Iterable[Any] | None = None,
                       max_question_bytes: int = MAX_CODED_PROMPT_BYTES) -> tuple[np.ndarray, str | None]:
        """Inverse of `encode_payload`: ``(tokens int64 (tiles * num_tokens[, stages]), question or None)``.

        The work is bounded by the model (its token count) and ``tiles``, or by ``grids`` (at most
        ``MAX_CODED_PATCHES``), and by ``max_question_bytes`` (at most ``MAX_CODED_PROMPT_BYTES``), never by what
        the payload claims; decoding stops with `WireFormatError` as soon as the coder runs out of data (a valid
        payload is consumed only by its last index).
        """
        limit = min(int(max_question_bytes), MAX_CODED_PROMPT_BYTES)
        rasters = self.rasters(tiles, grids)

        def read(coder):
            question = self._decode_question(coder, limit) if with_question else None
            stages = [[token for raster in rasters for token in self._decode_raster(coder, stage, *raster)]
                      for stage in range(self._stages)]
            return question, stages[0] if self._stages == 1 else list(zip(*stages))

        (question, tokens), leftover = _decoded(payload, read, "entropy-coded payload")
        if leftover:
            raise WireFormatError("entropy-coded payload has unread data after the last index; the frame is "
                                  "corrupt or was coded with another constriction release")
        return np.array(tokens, dtype=np.int64), question

    def _decode_raster(self, coder: Any, stage: int, height: int, width: int, has_cls_token: bool) -> list[int]:
        def pop(name: str, row: int | None) -> int:
            return int(coder.decode(self._model((name, row) if self._stages == 1 else (name, row, stage))))

        head = [pop("cls_probabilities", None)] if has_cls_token else []

        def take(context: int, candidates: list[int]) -> int:
            rank = pop("rank_probabilities", context)
            if rank == ESCAPE:
                return pop("escape_probabilities", None)
            if rank >= len(candidates):
                raise WireFormatError(f"entropy-coded payload is corrupt: rank {rank} of {len(candidates)} "
                                      "candidates")
            return candidates[rank]

        return head + walk_patches(height, width, take)

    def _decode_question(self, coder: Any, limit: int) -> str:
        out, context, escape = bytearray(), 0, len(self._pieces)
        while True:
            # Symbol 0 is piece 0 (leading to context 1) where the model has pieces; without any, it is the escape.
            symbol = _pop(coder, self._model(("question_probabilities", context)), repeats=context == 1 and escape > 0)
            if symbol == escape + 1:
                break
            if symbol == escape:
                start = len(out)
                while (byte := _pop(coder, self._model(("question_byte_probabilities", None)), repeats=True)) \
                        != END_OF_PIECE:
                    out.append(byte)
                    if len(out) > limit:
                        break
                if len(out) == start:
                    raise WireFormatError("entropy-coded payload is corrupt: empty escaped question piece")
                context = escape + 1
            else:
                out += self._pieces[symbol].encode("utf-8")
                context = symbol + 1
            if len(out) > limit:
                raise WireFormatError(f"prompt too long: the coded question exceeds {limit} bytes")
        try:
            return out.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireFormatError(f"prompt is not valid UTF-8: {exc}") from None


def _pop(coder: Any, model: Any, *, repeats: bool) -> int:
    """One question symbol off ``coder``, or `WireFormatError` once the coder is exhausted.

    A question ends with a symbol other than 0, and an escaped piece with byte 256. An ANS coder that has run
    out of data decodes symbol 0 without changing its state (an empty one always; any other once its state is
    below one symbol's precision and no words are left). When that happens where the next pop uses the same
    table again (``repeats``: the byte table, or piece 0's own context), every later pop repeats it and the
    question would only run to the length limit: stop at once instead. From an empty coder no question ends.
    """
    if coder.is_empty():
        raise WireFormatError("entropy-coded payload is corrupt: the data ended before the last symbol")
    before = coder.pos()
    symbol = int(coder.decode(model))
    if repeats and coder.pos() == before:
        raise WireFormatError("entropy-coded payload is corrupt: the data ended before the last symbol")
    return symbol


def _decoded(payload: bytes, read: Any, what: str) -> tuple[Any, bool]:
    """``(read(coder), whether data is left)`` for an ANS coder over ``payload``; a corrupt payload (including
    a panic in constriction, which pyo3 raises as a `BaseException`) is a `WireFormatError` naming ``what``."""
    words = np.frombuffer(bytes(payload) + bytes(-len(payload) % 4), dtype="<u4").astype(np.uint32)
    try:
        coder = _constriction().stream.stack.AnsCoder(words)
        return read(coder), not coder.is_empty()
    except (WireFormatError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - pyo3 maps Rust panics to a BaseException
        raise WireFormatError(f"{what} is corrupt: {exc}") from None


def _words_to_bytes(words: np.ndarray) -> bytes:
    # Little-endian words; zero bytes at the end of the last word are dropped (the decoder pads them back),
    # which removes most of the unused high bits of the coder's final state.
    raw = np.asarray(words, dtype="<u4").tobytes()
    keep = len(raw)
    while keep > len(raw) - 3 and keep > 0 and raw[keep - 1] == 0:
        keep -= 1
    return raw[:keep]


def load_entropy_model(directory: str | os.PathLike) -> EntropyModel | None:
    """The folder's ``entropy_model.safetensors`` as an `EntropyModel`, or None when it has none. numpy +
    safetensors only; a truncated, corrupt or inconsistent file raises `CheckpointMismatchError`."""
    from safetensors.numpy import load_file

    path = Path(directory) / ENTROPY_MODEL_NAME
    if not path.is_file():
        return None
    try:
        return EntropyModel(load_file(str(path)))
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointMismatchError(f"{path.name} cannot be read (truncated, corrupt or invalid?): {exc}") from exc


__all__ = ["ENTROPY_MODEL_NAME", "MAX_CODED_PATCHES", "MODEL_ID_SIZE", "EntropyModel", "load_entropy_model", "split_pieces"]
