"""Coded frames end to end: the entropy model stored with the checkpoint, carried to the edge by export,
used by the client, decoded by the server, and a mismatch refused with 409."""

import numpy as np
import pytest

pytest.importorskip("constriction")

from tests.wire_data import blocky_images  # noqa: E402
from transformers_alignedvq import wire  # noqa: E402
from transformers_alignedvq.client import EdgeClient, ServerError  # noqa: E402
from transformers_alignedvq.entropy import ENTROPY_MODEL_NAME, EntropyModel, load_entropy_model  # noqa: E402
from transformers_alignedvq.export.edge_export import export_edge  # noqa: E402
from transformers_alignedvq.serving import BackgroundServer, ServerConfigError, create_app  # noqa: E402
from transformers_alignedvq.testing import save_tiny_deployment  # noqa: E402

QUESTION = "what shape is it?"


def test_coded_frames_round_trip_through_client_and_server(tmp_path):
    model_dir = save_tiny_deployment(tmp_path / "model")
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    # The tiny deployment: K = 12, a 4 x 4 grid and a CLS token.
    training = np.concatenate([blocky_images(300, k=12, side=4)] * 2)
    model = EntropyModel.fit(training, codebook_size=12, grid=(4, 4), has_cls_token=True, questions=[QUESTION] * 2)
    model.save(model_dir)
    assert load_entropy_model(model_dir).model_id == model.model_id

    edge_dir = export_edge(model_dir, tmp_path / "edge")
    assert (edge_dir / ENTROPY_MODEL_NAME).is_file()
    app = create_app(model_dir, max_batch_size=2)
    with BackgroundServer(app, port=0) as server:
        with EdgeClient(edge_dir, server.url, entropy_coding=True) as coded, \
                EdgeClient(edge_dir, server.url, entropy_coding=False) as plain, \
                EdgeClient(edge_dir, server.url) as auto:
            assert coded.entropy_model is not None and plain.entropy_model is None
            assert coded.server_info()["entropy_model_id"] == model.model_id.hex()
            coded_frame, plain_frame = coded.encode(image, QUESTION), plain.encode(image, QUESTION)
            assert len(auto.encode(image, QUESTION)) == min(len(coded_frame), len(plain_frame))
            decoded = wire.decode_frame(coded_frame, entropy_model=model)
            assert decoded.entropy_coded and decoded.prompt == QUESTION
            assert not wire.decode_frame(plain_frame).entropy_coded
            assert np.array_equal(decoded.indices, wire.decode_frame(plain_frame).indices)
            a, b = coded.ask(image, QUESTION), plain.ask(image, QUESTION)
    assert a.text == b.text and (a.bytes_sent, b.bytes_sent) == (len(coded_frame), len(plain_frame))

    # A server holding another entropy model (or none) refuses coded frames with 409 and says which.
    other = EntropyModel.fit(training[:50], codebook_size=12, grid=(4, 4), has_cls_token=True)
    for held in (other, None):
        (model_dir / ENTROPY_MODEL_NAME).unlink(missing_ok=True)
        if held is not None:
            held.save(model_dir)
        with BackgroundServer(create_app(model_dir, max_batch_size=1), port=0) as server, \
                EdgeClient(edge_dir, server.url, entropy_coding=True, retry_window=0) as client:
            with pytest.raises(ServerError) as caught:
                client.ask(image, QUESTION)
        assert (caught.value.status, caught.value.type) == (409, "entropy_model_mismatch")
        assert model.model_id.hex() in caught.value.message


def test_server_refuses_an_entropy_model_of_other_frames(tmp_path):
    model_dir = save_tiny_deployment(tmp_path / "model")
    wrong = EntropyModel.fit(blocky_images(10, k=12, side=5), codebook_size=12, grid=(5, 5), has_cls_token=True)
    with pytest.raises(ServerConfigError, match="does not fit"):
        create_app(model_dir, entropy_model=wrong, warmup=False)
