"""How the cloud decodes an answer: greedy by default, or sampled with a temperature, top-p and a seed.

`SamplingOptions` is one request's choice, read from the answer route's query string by `parse_query`
(every bad value is a `SamplingError` naming it, which the server answers with 422). Both engines honour the
same options: vLLM through its own ``SamplingParams``; Transformers through `RowSampler` and `RowLimits`,
which let the requests of one batch each keep their own options in a single ``generate`` call.

A seed makes a sampled answer reproducible: the same frame, options and seed give the same answer on every
run, whatever else shares the batch (each request draws from its own generator). Without a seed each answer
draws fresh randomness. Greedy decoding (``temperature=0``) ignores ``top_p`` and ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from transformers import LogitsProcessor, StoppingCriteria

MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


class SamplingError(ValueError):
    """A sampling or streaming query parameter is unknown, repeated, malformed or out of range."""


@dataclass(frozen=True)
class SamplingOptions:
    """One request's decoding: ``max_new_tokens`` at most, greedy when ``temperature`` is 0, otherwise
    softmax(logits / temperature) restricted to the smallest set of tokens whose probability reaches
    ``top_p``, drawn with ``seed`` (None: fresh randomness)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise SamplingError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise SamplingError(f"temperature={self.temperature!r} must be in [0, {MAX_TEMPERATURE:g}]")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise SamplingError(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED):
            raise SamplingError(f"seed={self.seed!r} must be an integer in [0, 2**63 - 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _one(name: str, values: Sequence[str]) -> str:
    if len(values) != 1:
        raise SamplingError(f"query parameter {name!r} is given {len(values)} times; give it once")
    return values[0].strip()


def _number(name: str, values: Sequence[str], kind: type):
    text = _one(name, values)
    try:
        return kind(text)
    except ValueError:
        raise SamplingError(f"query parameter {name}={text!r} is not {'an integer' if kind is int else 'a number'}"
                            ) from None


def parse_query(query: Mapping[str, Sequence[str]], *, max_new_tokens: int) -> tuple[SamplingOptions, bool]:
    """``(options, stream)`` from the answer route's query parameters ``{name: [values]}``.

    ``max_new_tokens`` (default and upper bound: the server's), ``temperature`` (default 0, greedy),
    ``top_p`` (default 1), ``seed`` (default none) and ``stream`` (``true``/``false``, default false).
    Unknown or repeated parameters, values that do not parse and values out of range raise `SamplingError`.
    """
    known = {"max_new_tokens", "temperature", "top_p", "seed", "stream"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise SamplingError(f"unknown query parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    options = {}
    for name, kind in (("max_new_tokens", int), ("temperature", float), ("top_p", float), ("seed", int)):
        if name in query:
            options[name] = _number(name, query[name], kind)
    requested = options.setdefault("max_new_tokens", max_new_tokens)
    if requested > max_new_tokens:
        raise SamplingError(f"max_new_tokens={requested} exceeds this server's limit of {max_new_tokens}")
    stream = False
    if "stream" in query:
        text = _one("stream", query["stream"]).lower()
        if text not in _TRUE + _FALSE:
            raise SamplingError(f"query parameter stream={text!r} must be true or false")
        stream = text in _TRUE
    return SamplingOptions(**options), stream


def _sample(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator) -> int:
    """One token id from a row of logits ``(vocab_size,)``, drawn on the CPU so a seed gives the same
    token on every device."""
    probs = torch.softmax(logits.detach().to("cpu", torch.float64) / options.temperature, dim=-1)
    ordered, order = probs.sort(descending=True)
    # Keep tokens while the probability mass before them is below top_p: the first one always stays.
    ordered[(ordered.cumsum(0) - ordered) >= options.top_p] = 0
    return int(order[torch.multinomial(ordered, 1, generator=generator)])


class RowSampler(LogitsProcessor):
    """A Transformers logits processor that samples each row of a batch with its own options and generator.

    Greedy rows pass through untouched (``generate`` then takes their argmax, exactly as without this
    processor); a sampled row's scores become -inf everywhere but the token drawn for it, so the same argmax
    picks that token. Run ``generate`` with ``do_sample=False``.
    """

    def __init__(self, options: Sequence[SamplingOptions]):
        self.options = list(options)
        self.generators = [self._generator(option) for option in self.options]

    @staticmethod
    def _generator(options: SamplingOptions) -> torch.Generator | None:
        if options.greedy:
            return None
        generator = torch.Generator()
        if options.seed is None:
            generator.seed()
        else:
            generator.manual_seed(options.seed)
        return generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, (options, generator) in enumerate(zip(self.options, self.generators)):
            if generator is not None:
                token = _sample(scores[row], options, generator)
                scores[row] = float("-inf")
                scores[row, token] = 0.0
        return scores


class RowLimits(StoppingCriteria):
    """A Transformers stopping criterion: row ``i`` is done after ``limits[i]`` new tokens."""

    def __init__(self, prompt_length: int, limits: Sequence[int]):
        self.prompt_length, self.limits = prompt_length, torch.tensor(list(limits))

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        return self.limits.to(input_ids.device) <= generated


__all__ = ["MAX_SEED", "MAX_TEMPERATURE", "RowLimits", "RowSampler", "SamplingError", "SamplingOptions",
           "parse_query"]
