"""Requests and answers of the cloud server for its tests (`test_server`, `test_server_hardening`, `test_nginx`,
`test_vllm_engine`): frames for an engine's model, the JSON error shape, streamed answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from transformers_alignedvq import wire

OCTET = {"Content-Type": "application/octet-stream"}


def make_frame(engine, indices=None, question: str | None = "what color is the shape ?", **overrides) -> bytes:
    config = engine.config
    options = dict(codebook_size=config.codebook_size, codebook_fingerprint=engine.fingerprint, prompt=question,
                   grid=(4, 4), has_cls_token=True)
    options.update(overrides)
    if indices is None:  # every code of every token, in the model's shape (one column per residual stage)
        codes = config.codes_per_token
        indices = (np.arange(config.num_image_tokens * codes) % config.codebook_size).reshape(-1, codes)
        indices = indices[:, 0] if codes == 1 else indices
    return wire.encode_frame(indices, **options)


def assert_error(response, status: int, type_: str, contains: str = ""):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_
    assert contains.lower() in error["message"].lower()
    assert response.headers["content-type"].startswith("application/json")


def sse_events(response) -> list[tuple[str, dict]]:
    """``[(event, data), ...]`` of a server-sent-events body."""
    events = []
    for block in response.text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def streamed(client, body: bytes, query: str = "") -> tuple[str, dict, list[str]]:
    """``(answer from the deltas, the done event, the deltas)`` of one streamed request."""
    response = client.post(f"/v1/answer?stream=true{query}", content=body, headers=OCTET)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert [name for name, _ in events[:-1]] == ["token"] * (len(events) - 1) and events[-1][0] == "done"
    deltas = [data["delta"] for _, data in events[:-1]]
    return "".join(deltas), events[-1][1], deltas


def post_to(client, body: bytes, query: str = "") -> dict:
    response = client.post(f"/v1/answer{query}", content=body, headers=OCTET)
    assert response.status_code == 200, response.text
    return response.json()


def descendants(root: int) -> dict[int, str]:
    """Live descendants of process ``root``: pid -> name."""
    parents, names = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                name = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry.name)], names[int(entry.name)] = int(fields[1]), name
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return {pid: names[pid] for pid in found}
