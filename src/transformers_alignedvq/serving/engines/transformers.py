"""The ``"transformers"`` engine: Transformers' ``generate`` on static, left-padded batches.

Greedy decoding with an attention mask makes a batched answer equal to the unbatched one; sampled rows each draw
with their own options and generator (`serving.sampling.RowSampler`); each row stops at its own
``max_new_tokens``, and a row whose client left stops at once.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..sampling import RowLimits, RowSampler
from .base import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_PROMPT_BYTES, AnswerEngine, GenerationRequest, GenerationResult
from .base import load_model as _load_model


class _RowStreamer(BaseStreamer):
    """Passes each row's new tokens so far to its callback after every step of a batched ``generate``."""

    def __init__(self, callbacks: Sequence[Callable[[list[int]], None] | None]):
        self.callbacks, self.rows, self.prompt_seen = list(callbacks), [[] for _ in callbacks], False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first put is the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            self.rows[row].append(token)
            if self.callbacks[row] is not None:
                self.callbacks[row](list(self.rows[row]))

    def end(self) -> None:
        pass


class _RowCancelled(StoppingCriteria):
    """Row ``i`` is done once ``events[i]`` is set (its client left); when every row is, ``generate`` ends."""

    def __init__(self, events):
        self.events = list(events)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor([event.is_set() for event in self.events], device=input_ids.device)


class TransformersAnswerEngine(AnswerEngine):
    """`AnswerEngine` on Transformers' ``generate``: the server's batch step is the whole answer."""

    name = "transformers"

    @classmethod
    def from_pretrained(cls, model_dir_or_model, *, processor=None, device=None, dtype=None,
                        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
                        max_batch_size: int = 8) -> "TransformersAnswerEngine":
        model, processor, tokenizer = _load_model(model_dir_or_model, processor, device, dtype)
        return cls(model, tokenizer, processor=processor, max_new_tokens=max_new_tokens)

    def generate(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        """One left-padded generate for the batch. Greedy rows come out exactly as they would alone; sampled
        rows each draw with their own options and generator (`sampling.RowSampler`); each row stops at its
        own ``max_new_tokens``."""
        start = time.perf_counter()
        length = max(len(request.input_ids) for request in batch)
        input_ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, request in enumerate(batch):
            ids = request.input_ids
            input_ids[row, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, length - len(ids):] = 1
        device = self.device
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                **{name: value.to(device) for name, value in self.image_inputs(batch).items()},
                **self._generate_options(batch, length),
            )
        elapsed = time.perf_counter() - start
        return [self.result(row, request.options, elapsed) for row, request in zip(out[:, length:].tolist(), batch)]

    def _generate_options(self, batch: list[GenerationRequest], prompt_length: int) -> dict:
        options = [request.options for request in batch]
        limits = [option.max_new_tokens for option in options]
        # A fresh config, not the checkpoint's: its sampling defaults must not leak into serving. Sampled rows
        # draw in `RowSampler`; generate itself stays greedy.
        config = GenerationConfig(max_new_tokens=max(limits), do_sample=False, num_beams=1,
                                  pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_ids or None)
        extra: dict[str, Any] = {"generation_config": config}
        if not all(option.greedy for option in options):
            extra["logits_processor"] = LogitsProcessorList([RowSampler(options)])
        stopping = [_RowCancelled([request.cancelled for request in batch])]
        if len(set(limits)) > 1:
            stopping.append(RowLimits(prompt_length, limits))
        extra["stopping_criteria"] = StoppingCriteriaList(stopping)
        if any(request.on_tokens for request in batch):
            extra["streamer"] = _RowStreamer([request.on_tokens for request in batch])
        return extra

    def run_batch(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        """The server's batch step: here the whole answer (`generate`)."""
        return self.generate(batch)


__all__ = ["TransformersAnswerEngine"]
