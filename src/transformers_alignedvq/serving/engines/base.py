"""What an engine is: `AnswerEngine`, the base of every backend, and the requests and results it trades in.

The part every backend shares is ours: checking that the model is an AlignedVQ model and fits its tokenizer,
turning a question (or a conversation) into prompt token ids with the image placeholder expanded, and turning
generated token ids into the answer. A backend adds how answers are computed: `run_batch` (the server's batch
step), `generate` (blocking, for the warm-up and scripts), optionally `complete` (a second, per-request stage the
batcher awaits) and `close`. Backends derive from this class only, never from each other.

Engines raise `ServerConfigError` at start-up and `InvalidQuestionError` for a question the model cannot take;
never an HTTP error (the app maps them).
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import torch

from ... import wire
from ...errors import ServerConfigError
from ...export.edge_export import describe
from ...settings import FRAME_SETTINGS
from ..errors import InvalidQuestionError
from ..qwen import QwenImages
from ..sampling import SamplingOptions
from ..tiled import TiledImages, refuse_geometry

DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_MAX_PROMPT_BYTES = 2048
# LLaVA-1.5's format, for tokenizers saved without a chat template.
FALLBACK_PROMPT = "USER: {image}\n{question} ASSISTANT:"


@dataclass
class GenerationRequest:
    """One answer to compute: ``indices`` ``(tokens, codes_per_token)``, the prompt's ``input_ids`` (image
    placeholder expanded), its decoding ``options``, and ``on_tokens``, called with the answer's token ids so
    far after each step (from any thread) when the answer is streamed. ``cancelled`` is set once nobody waits
    for the answer (its client left): generation stops for that row."""

    indices: torch.Tensor
    input_ids: list[int]
    options: SamplingOptions
    on_tokens: Callable[[list[int]], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    image_digest: bytes | None = None  # set where the server keeps the image for follow-ups
    # The image's layout where it varies: (height, width) for the tiled families' tiling and un-padding, the
    # patch grid (t, h, w) for Qwen2.5-VL; None for LLaVA-1.5.
    image_size: tuple[int, ...] | None = None


@dataclass
class GenerationResult:
    """One answer: its ``text``, the number of tokens generated (eos excluded), and the seconds its batch step
    (and, with vLLM, its own generation) took."""

    text: str
    generated_tokens: int
    generate_s: float


class AnswerEngine(ABC):
    """The model side of the server: question -> prompt token ids, a batch step, tokens -> answer."""

    name: str = ""
    # The server's second, per-request stage and its bound (`DynamicBatcher`): None where `run_batch` answers.
    complete: Callable[[GenerationRequest, Any], Awaitable[GenerationResult]] | None = None
    max_in_flight: int | None = None

    def __init__(self, model, tokenizer, *, processor=None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        if max_new_tokens < 1:
            raise ServerConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
        config = model.config
        # Images whose token count varies, so the counts come from their contract: the any-resolution families'
        # tiles (`tiled.TiledImages`) or Qwen2.5-VL's patch grids (`qwen.QwenImages`); None for LLaVA-1.5.
        self.tiles = (QwenImages(model, processor) if QwenImages.serves(model)
                      else TiledImages(model) if TiledImages.serves(model) else None)
        for attribute in ("codebook_size", "codes_per_token", "split_layer") + (() if self.tiles else
                                                                                ("num_image_tokens",)):
            if not hasattr(config, attribute):
                raise ServerConfigError(f"{type(model).__name__} is not an AlignedVQ model (config lacks {attribute})")
        self.model, self.tokenizer, self.processor = model.eval(), tokenizer, processor
        self.config = config
        self.fingerprint = model.codebook_fingerprint()  # every family's (`checkpoints.mixin.CheckpointMixin`)
        self.max_new_tokens = max_new_tokens
        self._init_tokens(model, tokenizer, processor)
        template_owner = processor if getattr(processor, "chat_template", None) else tokenizer
        self._template_owner = template_owner if getattr(template_owner, "chat_template", None) else None
        if self.tiles is not None:
            self.summary = self.tiles.summary(self.fingerprint)
            return
        geometry = describe(
            settings={key: getattr(config, key) for key in FRAME_SETTINGS},
            image_size=config.vision_config.image_size,
            patch_size=config.vision_config.patch_size,
            fingerprint=self.fingerprint,
        )
        if geometry["num_tokens"] != config.num_image_tokens:
            raise ServerConfigError(
                f"frames would carry {geometry['num_tokens']} tokens but the model makes {config.num_image_tokens}"
            )
        self.summary = geometry

    def _init_tokens(self, model, tokenizer, processor) -> None:
        """The image placeholder, padding and end-of-sequence ids, checked against the model's."""
        config = model.config
        self.image_token = (getattr(processor, "image_token", None) or getattr(tokenizer, "image_token", None)
                            or "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id != config.image_token_id:
            raise ServerConfigError(
                f"the tokenizer maps {self.image_token!r} to id {self.image_token_id}, the model expects image "
                f"token id {config.image_token_id}; the processor and the model do not belong together"
            )
        # LLaVA's "default" strategy drops the CLS feature before the language model. Tiled images: per image.
        drops_cls = getattr(config, "vision_feature_select_strategy", None) == "default"
        self.lm_image_tokens = None if self.tiles else config.num_image_tokens - (1 if drops_cls else 0)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ServerConfigError("the tokenizer has neither a pad nor an eos token; batched generation needs one")
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids = eos

    @classmethod
    @abstractmethod
    def from_pretrained(cls, model_dir_or_model, *, processor=None, device=None, dtype=None,
                        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
                        max_batch_size: int = 8, **options) -> "AnswerEngine":
        """The engine for a model folder or Hub id (or a loaded model plus its ``processor``); ``options`` are
        the backend's own."""

    # -- prompts ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.model.alignedvq.quantizer.codebook.device

    def prompt_text(self, question: str) -> str:
        if self._template_owner is None:
            return FALLBACK_PROMPT.format(image=self.image_token, question=question)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self._template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def input_ids(self, question: str, image_size: tuple[int, int] | None = None) -> list[int]:
        """Token ids of the chat prompt with the image placeholder expanded, as `LlavaProcessor` makes them
        (tiled families: as many placeholders as an image of ``image_size`` packs into)."""
        return self._expanded_ids(self.prompt_text(question), image_size)

    def chat_input_ids(self, messages: list[dict], image_size: tuple[int, int] | None = None) -> list[int]:
        """`input_ids` of a conversation in Transformers' chat format (``{"role", "content": [parts]}``, one
        ``{"type": "image"}`` part in all); without a chat template, only one user turn of text and the image."""
        if self._template_owner is None:
            texts = [part["text"] for message in messages for part in message["content"] if part["type"] == "text"]
            if len(messages) != 1 or messages[0]["role"] != "user":
                raise InvalidQuestionError("this model has no chat template: send one user message")
            return self.input_ids("\n".join(texts), image_size)
        text = self._template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self._expanded_ids(text, image_size)

    def image_tokens(self, image_size: tuple[int, int] | None) -> int:
        """Placeholders the language model reads for one image (of ``image_size``, for the tiled families)."""
        if self.tiles is None:
            return self.lm_image_tokens
        if image_size is None:
            raise InvalidQuestionError("this model tiles its images: the image's size is needed")
        return self.tiles.image_tokens(tuple(image_size))

    def _expanded_ids(self, text: str, image_size: tuple[int, int] | None = None) -> list[int]:
        if text.count(self.image_token) != 1:
            raise InvalidQuestionError(f"the question must not contain the image placeholder {self.image_token!r}")
        count = self.image_tokens(image_size)
        text = text.replace(self.image_token, self.image_token * count)
        ids = self.tokenizer(text)["input_ids"]
        if sum(1 for i in ids if i == self.image_token_id) != count:
            raise InvalidQuestionError(
                f"the question tokenizes to extra image placeholder tokens (id {self.image_token_id})")
        return list(ids)

    def request(self, indices: torch.Tensor, question: str, image_size: tuple[int, int] | None = None,
                **options) -> GenerationRequest:
        """A `GenerationRequest` for ``question`` about the image ``indices`` (of ``image_size``, for the tiled
        families); ``options`` override the defaults (greedy, this engine's ``max_new_tokens``)."""
        fields = {"max_new_tokens": self.max_new_tokens, **options}
        return GenerationRequest(indices, self.input_ids(question, image_size), SamplingOptions(**fields),
                                 image_size=image_size)

    def frame_checks(self) -> dict[str, Any]:
        """`wire.decode_frame`'s expectations of a frame for this model (the geometry checked before the payload
        is decoded)."""
        summary = self.summary
        checks = {"codebook_size": summary["codebook_size"], "codebook_fingerprint": self.fingerprint,
                  "codes_per_token": summary["codes_per_token"]}
        if self.tiles is not None:
            return {**checks, "check_geometry": self.tiles.check}
        return {**checks, "num_tokens": summary["num_tokens"], "check_geometry": refuse_geometry(summary["num_tokens"])}

    def image_of(self, frame: wire.Frame) -> tuple[torch.Tensor, tuple[int, ...] | None]:
        """A checked frame's indices ``(tokens, codes_per_token)`` and its image's layout (`wire_geometry`: a tiled
        image's size, a patch grid; None for LLaVA-1.5, whose frames `frame_checks` keeps without a geometry)."""
        layout = None if frame.geometry is None else frame.geometry.images[0].layout
        return torch.from_numpy(frame.indices.copy()), layout

    def stack_indices(self, batch: list[GenerationRequest]) -> torch.Tensor:
        """The batch's indices as the model takes them: ``(batch, tokens[, codes_per_token])``."""
        indices = torch.stack([request.indices for request in batch])
        return indices.squeeze(-1) if self.config.codes_per_token == 1 else indices

    def image_inputs(self, batch: list[GenerationRequest]) -> dict[str, torch.Tensor]:
        """The batch's images as ``generate`` takes them: ``image_indices`` (and, for tiled families, every
        request's tiles in order plus ``image_sizes``)."""
        if self.tiles is None:
            return {"image_indices": self.stack_indices(batch)}
        return self.tiles.generate_inputs([r.indices for r in batch], [r.image_size for r in batch])

    # -- answers ------------------------------------------------------------------------------------------
    def answer_tokens(self, tokens: Sequence[int], options: SamplingOptions) -> list[int]:
        """The answer's tokens among ``tokens`` generated: at most ``max_new_tokens``, up to the first eos
        (rows of a batch that finished early are padded after it)."""
        tokens = list(tokens[:options.max_new_tokens])
        end = next((i for i, token in enumerate(tokens) if token in self.eos_token_ids), len(tokens))
        return tokens[:end]

    def answer_text(self, tokens: Sequence[int], options: SamplingOptions) -> str:
        return self.tokenizer.decode(self.answer_tokens(tokens, options), skip_special_tokens=True).strip()

    def result(self, tokens: Sequence[int], options: SamplingOptions, seconds: float) -> GenerationResult:
        return GenerationResult(text=self.answer_text(tokens, options),
                                generated_tokens=len(self.answer_tokens(tokens, options)), generate_s=seconds)

    # -- what a backend provides --------------------------------------------------------------------------
    @abstractmethod
    def run_batch(self, batch: list[GenerationRequest]) -> list:
        """The server's batch step: the answers (`GenerationResult`), or, with `complete`, what `complete`
        takes for each request."""

    @abstractmethod
    def generate(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        """The answers to ``batch``, blocking (the warm-up, scripts)."""

    def close(self) -> None:
        """Release what the engine holds beyond the model (processes, threads, temporary files)."""


def load_model(model_dir_or_model, processor, device, dtype):
    """``(model, processor or None, tokenizer)`` of a model folder or Hub id, or of a loaded model (whose
    processor is looked up where it was loaded from unless given). `ServerConfigError` when it cannot be served."""
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    from ...checkpoint_limits import CheckpointSizeError, check_model_folder

    if isinstance(model_dir_or_model, (str, os.PathLike)):
        source = str(model_dir_or_model)
        if os.path.isdir(source):
            try:  # before from_pretrained allocates what config.json asks for
                check_model_folder(source)
            except CheckpointSizeError as exc:
                raise ServerConfigError(str(exc)) from None
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = AutoModel.from_pretrained(source, **kwargs)
    else:
        model = model_dir_or_model
        source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if device is not None:
        model = model.to(device)
    if processor is None:
        if not source:
            raise ServerConfigError("pass processor= when serving a model object that was not loaded from a folder")
        try:
            processor = AutoProcessor.from_pretrained(source)
        except (OSError, ValueError, TypeError):
            processor = None
        if processor is None or not hasattr(processor, "tokenizer"):
            try:
                processor = AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError) as exc:
                raise ServerConfigError(f"no processor or tokenizer found in {source}: {exc}") from exc
    tokenizer = getattr(processor, "tokenizer", processor)
    return model, (processor if processor is not tokenizer else None), tokenizer


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_MAX_PROMPT_BYTES",
    "FALLBACK_PROMPT",
    "AnswerEngine",
    "GenerationRequest",
    "GenerationResult",
    "load_model",
]
