"""One image, many questions: follow-ups (`wire_followup`) about images the server keeps (`image_cache`)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.wire_data import QUESTIONS, blocky_images, small_model
from transformers_alignedvq.errors import WireFormatError
from transformers_alignedvq.serving.image_cache import ImageCache, scope_of
from transformers_alignedvq.wire_followup import decode_followup, encode_followup, image_digest, is_followup

FP = bytes(range(16))


def test_follow_ups_round_trip_coded_and_plain():
    pytest.importorskip("constriction")
    model, digest = small_model(), image_digest(blocky_images(1)[0], FP)
    for question in (*QUESTIONS[:4], "an unseen question ☃"):
        for entropy_model in (model, None):
            data = encode_followup(digest, question, entropy_model=entropy_model)
            assert is_followup(data) and not is_followup(b"AV\x02")
            decoded = decode_followup(data, entropy_model=entropy_model)
            assert (decoded.digest, decoded.question) == (digest, question)
    coded = encode_followup(digest, QUESTIONS[0], entropy_model=model)
    assert decode_followup(coded, entropy_model=model).coded and len(coded) <= 13 + 6 < 13 + len(QUESTIONS[0])
    with pytest.raises(WireFormatError, match="another entropy model"):
        decode_followup(coded, entropy_model=small_model(seed=1))
    with pytest.raises(WireFormatError, match="has no entropy model"):
        decode_followup(coded)
    with pytest.raises(WireFormatError, match="CRC-32 mismatch"):
        decode_followup(coded[:-5] + bytes([coded[-5] ^ 1]) + coded[-4:], entropy_model=model)
    with pytest.raises(WireFormatError, match="truncated"):
        decode_followup(coded[:10], entropy_model=model)
    with pytest.raises(WireFormatError, match="prompt too long"):
        decode_followup(encode_followup(digest, "x" * 50), max_prompt_bytes=49)


def test_digest_depends_on_indices_and_codebook_only():
    image = blocky_images(1)[0]
    assert image_digest(image, FP) == image_digest(image[:, None].astype(np.int16), FP)
    assert image_digest(image, FP) != image_digest(image[::-1], FP)
    assert image_digest(image, FP) != image_digest(image, FP[::-1])


def test_cache_is_bounded_scoped_and_least_recently_used_first_out():
    cache = ImageCache(max_entries=2, max_bytes=10**6)
    image = np.arange(17)[:, None]
    cache.put(b"", b"a" * 8, image, 12)
    cache.put(b"", b"b" * 8, image, 12)
    assert cache.get(b"", b"a" * 8) is not None  # a is now the most recent
    cache.put(b"", b"c" * 8, image, 12)
    assert cache.get(b"", b"b" * 8) is None and len(cache) == 2
    assert cache.get(scope_of("Bearer other-key"), b"a" * 8) is None  # another key's images are not visible
    assert cache.get(b"", b"a" * 8).dtype == np.int16
    small = ImageCache(max_entries=100, max_bytes=3 * (17 * 2 + 200))
    for name in b"defgh":
        small.put(b"", bytes([name]) * 8, image, 12)
    assert len(small) == 3 and small.bytes <= small.max_bytes


def test_each_api_key_sees_only_its_own_images(tmp_path):
    from fastapi.testclient import TestClient

    from tests.test_server import OCTET, make_frame
    from transformers_alignedvq.serving import create_app
    from transformers_alignedvq.testing import save_tiny_deployment

    keys = ["first-key-" + "1" * 20, "second-key-" + "2" * 20]
    app = create_app(save_tiny_deployment(tmp_path / "model"), max_new_tokens=2, warmup=False, api_keys=keys)
    engine = app.state.engine
    frame = make_frame(engine)
    with TestClient(app) as client:
        def post(body, key):
            return client.post("/v1/answer", content=body, headers={**OCTET, "Authorization": f"Bearer {key}"})

        first = post(frame, keys[0]).json()
        followup = encode_followup(bytes.fromhex(first["image_digest"]), "what color is the shape ?")
        assert post(followup, keys[0]).json()["answer"] == first["answer"]
        assert post(followup, keys[1]).json()["error"]["type"] == "image_not_cached"
