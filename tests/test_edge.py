import json

import pytest
import torch

from tests.conftest import IMAGE_SIZE, tiny_alignedvq
from transformers_alignedvq.export.edge import (
    EDGE_CONFIG_NAME,
    EDGE_WEIGHTS_NAME,
    AlignedVQEdgeEncoder,
    EdgeCheckpointError,
)


@pytest.mark.parametrize("site", ["input", "ln1", "attn", "ln2", "mlp"])
def test_edge_encoder_matches_the_model_and_holds_only_edge_weights(tmp_path, pixels, site):
    model = tiny_alignedvq(split_layer=1, split_site=site, num_codebooks=2)
    with torch.no_grad():
        model.model.alignedvq.dlp_in.gate.fill_(0.4)
    edge = model.edge_encoder()
    assert torch.equal(edge(pixels), model.encode_edge(pixels))
    assert edge.codebook_fingerprint() == model.codebook_fingerprint()
    names = set(edge.state_dict())
    assert not any(n.startswith(("language_model", "multi_modal_projector", "lm_head")) for n in names)
    assert not any("dlp_out" in n or "embed_sum" in n or "cluster_size" in n for n in names)
    assert not any(n.startswith("encoder.layers.2.") for n in names), "blocks after the split stay in the cloud"
    unused = {"input": "layer_norm1", "ln1": "self_attn", "attn": "layer_norm2", "ln2": "mlp"}.get(site)
    if unused:
        assert not any(n.startswith(f"encoder.layers.1.{unused}") for n in names)
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert 0 < edge.num_bytes() < full
    path = edge.save_pretrained(tmp_path)
    assert path.name == EDGE_WEIGHTS_NAME and (tmp_path / EDGE_CONFIG_NAME).is_file()
    loaded = AlignedVQEdgeEncoder.from_pretrained(tmp_path)
    assert torch.equal(loaded(pixels), model.encode_edge(pixels))
    assert loaded.codebook_fingerprint() == model.codebook_fingerprint()


def test_edge_checkpoint_errors(tmp_path, pixels):
    model = tiny_alignedvq()
    edge = model.edge_encoder()
    edge.save_pretrained(tmp_path)
    weights = tmp_path / EDGE_WEIGHTS_NAME
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgeCheckpointError, match="truncated or corrupt"):
        AlignedVQEdgeEncoder.from_pretrained(tmp_path)

    config = json.loads((tmp_path / EDGE_CONFIG_NAME).read_text())
    weights.write_bytes(data)
    (tmp_path / EDGE_CONFIG_NAME).write_text(json.dumps({**config, "codebook_size": 32}))
    with pytest.raises(EdgeCheckpointError, match=r"codebook_size.*=\[1, 1, 32, 32\] but the weights hold \[1, 1, 16"):
        AlignedVQEdgeEncoder.from_pretrained(tmp_path)

    (tmp_path / EDGE_CONFIG_NAME).write_text(json.dumps({**config, "split_layer": 1}))
    with pytest.raises(EdgeCheckpointError, match="missing"):
        AlignedVQEdgeEncoder.from_pretrained(tmp_path)

    (tmp_path / EDGE_CONFIG_NAME).write_text("{not json")
    with pytest.raises(EdgeCheckpointError, match="not valid JSON"):
        AlignedVQEdgeEncoder.from_pretrained(tmp_path)

    (tmp_path / EDGE_CONFIG_NAME).write_text(json.dumps(config))
    weights.unlink()
    with pytest.raises(EdgeCheckpointError, match="not found"):
        AlignedVQEdgeEncoder.from_pretrained(tmp_path)

    with pytest.raises(ValueError, match="shape"):
        edge(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE + 1))
