"""Sampling options, their query-string parsing, and the per-row sampler of the Transformers engine."""

from __future__ import annotations

import pytest
import torch

from transformers_alignedvq.serving.sampling import RowLimits, RowSampler, SamplingError, SamplingOptions, parse_query


def test_defaults_are_greedy_with_the_server_limit():
    options, stream = parse_query({}, max_new_tokens=12)
    assert options == SamplingOptions(max_new_tokens=12) and options.greedy and not stream


def test_every_parameter_is_read():
    query = {"max_new_tokens": ["5"], "temperature": ["0.7"], "top_p": ["0.9"], "seed": ["42"], "stream": ["true"]}
    options, stream = parse_query(query, max_new_tokens=12)
    assert options == SamplingOptions(max_new_tokens=5, temperature=0.7, top_p=0.9, seed=42) and stream
    assert not options.greedy
    assert parse_query({"stream": ["0"]}, max_new_tokens=1)[1] is False


@pytest.mark.parametrize(("query", "fragment"), [
    ({"temperature": ["-0.1"]}, "temperature"),
    ({"temperature": ["nan"]}, "temperature"),
    ({"temperature": ["inf"]}, "temperature"),
    ({"temperature": ["2.5"]}, "temperature"),
    ({"temperature": ["warm"]}, "not a number"),
    ({"top_p": ["0"]}, "top_p"),
    ({"top_p": ["1.01"]}, "top_p"),
    ({"max_new_tokens": ["0"]}, "max_new_tokens"),
    ({"max_new_tokens": ["13"]}, "limit of 12"),
    ({"max_new_tokens": ["2.5"]}, "not an integer"),
    ({"seed": ["-1"]}, "seed"),
    ({"seed": [str(2**63)]}, "seed"),
    ({"seed": ["abc"]}, "not an integer"),
    ({"stream": ["maybe"]}, "stream"),
    ({"temprature": ["1"]}, "unknown query parameter(s) temprature"),
    ({"temperature": ["1", "2"]}, "given 2 times"),
])
def test_bad_parameters_are_refused_by_name(query, fragment):
    with pytest.raises(SamplingError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse_query(query, max_new_tokens=12)


def test_sampling_error_is_a_value_error():
    assert issubclass(SamplingError, ValueError)


def _scores(rows: int = 3, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def test_greedy_rows_pass_through_and_sampled_rows_keep_one_token():
    scores = _scores()
    options = [SamplingOptions(4), SamplingOptions(4, temperature=1.0, seed=1), SamplingOptions(4)]
    out = RowSampler(options)(torch.zeros(3, 1, dtype=torch.long), scores.clone())
    assert torch.equal(out[0], scores[0]) and torch.equal(out[2], scores[2])
    assert torch.isfinite(out[1]).sum() == 1


def draws(options: SamplingOptions, scores: torch.Tensor, steps: int = 20) -> list[int]:
    sampler = RowSampler([options])
    return [int(sampler(None, scores[:1].clone())[0].argmax()) for _ in range(steps)]


def test_a_seed_reproduces_the_draws_and_other_seeds_differ():
    scores = _scores()
    first = draws(SamplingOptions(4, temperature=1.5, seed=7), scores)
    assert first == draws(SamplingOptions(4, temperature=1.5, seed=7), scores)
    assert first != draws(SamplingOptions(4, temperature=1.5, seed=8), scores)
    assert len(set(first)) > 1  # it samples: a flat-ish distribution gives several tokens in 20 draws


def test_a_row_draws_the_same_whatever_shares_its_batch():
    scores = _scores(rows=2)
    alone = RowSampler([SamplingOptions(4, temperature=1.0, seed=3)])
    together = RowSampler([SamplingOptions(4, temperature=0.5, seed=99), SamplingOptions(4, temperature=1.0, seed=3)])
    for _ in range(10):
        assert alone(None, scores[1:].clone())[0].argmax() == together(None, scores.clone())[1].argmax()


def test_small_top_p_keeps_only_the_most_likely_token():
    scores = _scores()
    assert set(draws(SamplingOptions(4, temperature=2.0, top_p=1e-6, seed=0), scores)) == {int(scores[0].argmax())}


def test_draws_follow_the_tempered_distribution():
    scores = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    counts = torch.bincount(torch.tensor(draws(SamplingOptions(4, temperature=1.0, seed=0), scores, 2000)),
                            minlength=3)
    assert torch.allclose(counts / 2000, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)
    # top_p=0.8 keeps 0.7 and 0.2 (0.7 alone does not reach it) and renormalises them.
    counts = torch.bincount(torch.tensor(draws(SamplingOptions(4, temperature=1.0, top_p=0.8, seed=0), scores, 2000)),
                            minlength=3)
    assert counts[2] == 0 and abs(counts[0] / 2000 - 0.7 / 0.9) < 0.04


def test_row_limits_stop_each_row_after_its_own_count():
    stop = RowLimits(prompt_length=4, limits=[1, 3])
    assert stop(torch.zeros(2, 5, dtype=torch.long), None).tolist() == [True, False]
    assert stop(torch.zeros(2, 7, dtype=torch.long), None).tolist() == [True, True]
