"""The lossless entropy-coded wire mode end to end: the distribution stored with the checkpoint, carried to
the edge by export, used by the client, decoded by the server."""

import numpy as np
import pytest

pytest.importorskip("constriction")

from transformers_alignedvq import wire  # noqa: E402
from transformers_alignedvq.client import EdgeClient  # noqa: E402
from transformers_alignedvq.edge_export import export_edge  # noqa: E402
from transformers_alignedvq.hub import INDEX_DISTRIBUTION_NAME, load_index_distribution, save_index_distribution  # noqa: E402
from transformers_alignedvq.server import BackgroundServer, create_app  # noqa: E402
from transformers_alignedvq.testing import save_tiny_deployment  # noqa: E402


def test_entropy_coded_frames_round_trip_through_client_and_server(tmp_path):
    model_dir = save_tiny_deployment(tmp_path / "model")
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)

    raw_edge = export_edge(model_dir, tmp_path / "edge_raw")
    with EdgeClient(raw_edge, "http://127.0.0.1:9") as probe:  # no network: only to compute indices
        frame = probe.encode(image, "what shape is it?")
    indices = wire.decode_frame(frame).indices
    # A skewed distribution so entropy coding has something to gain on the indices this image produces.
    counts = np.ones(12)
    np.add.at(counts, indices[:, 0], 50)
    distribution = wire.IndexDistribution.from_counts(counts[None, :])
    save_index_distribution(distribution, model_dir)
    assert load_index_distribution(model_dir).distribution_id == distribution.distribution_id

    edge_dir = export_edge(model_dir, tmp_path / "edge")
    assert (edge_dir / INDEX_DISTRIBUTION_NAME).is_file()
    app = create_app(model_dir, max_batch_size=2)
    with BackgroundServer(app, port=0) as server:
        with EdgeClient(edge_dir, server.url, entropy_coding=True) as coded, \
                EdgeClient(edge_dir, server.url, entropy_coding=False) as plain, \
                EdgeClient(edge_dir, server.url) as auto:
            assert coded.entropy_model is not None and plain.entropy_model is None
            # by default the client sends the smaller frame: here the bit-packed one
            auto_frame = auto.encode(image, "what shape is it?")
            assert len(auto_frame) == min(len(coded.encode(image, "what shape is it?")), len(plain.encode(image, "what shape is it?")))
            coded_frame = coded.encode(image, "what shape is it?")
            plain_frame = plain.encode(image, "what shape is it?")
            decoded = wire.decode_frame(coded_frame, entropy_model=distribution)
            assert decoded.entropy_coded and not wire.decode_frame(plain_frame).entropy_coded
            assert np.array_equal(decoded.indices, wire.decode_frame(plain_frame).indices)
            a, b = coded.ask(image, "what shape is it?"), plain.ask(image, "what shape is it?")
    # 17 indices of 4 bits are too few for ANS to beat its own 12-byte header here; sizes are the frames'.
    assert a.text == b.text and (a.bytes_sent, b.bytes_sent) == (len(coded_frame), len(plain_frame))
