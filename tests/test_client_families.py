"""The device client for LLaVA-OneVision, LLaVA-NeXT and Qwen2.5-VL: `EdgeClient` and ``alignedvq ask`` on each
family's exported ONNX edge, against a real server of the same tiny model on 127.0.0.1. The answer must be the
model's own ``generate`` from the indices the edge computed; the ask runs in a fresh interpreter where torch,
transformers and onnx cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests import test_serving_qwen as qwen_serving
from tests import test_serving_tiled as tiled_serving
from transformers_alignedvq.client import EdgeClient, EdgeClientError
from transformers_alignedvq.client_edges import QwenDeviceEdge, TiledDeviceEdge, open_edge
from transformers_alignedvq.errors import EdgeCheckpointError
from transformers_alignedvq.preprocess_qwen import QwenImagePreprocessing
from transformers_alignedvq.serving import BackgroundServer, create_app
from transformers_alignedvq.testing import WITHOUT_CLOUD_PACKAGES, tiny_tokenizer
from transformers_alignedvq.wire_followup import encode_followup

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.skipif(not tiled_serving._HAS_MM_ENCODER_OUTPUTS, reason="needs transformers>=5.19")

QUESTION = "what color is the shape ?"
FAMILIES = ["llava_onevision", "llava_next", "qwen2_5_vl"]
# (height, width) of the photos asked about: several tile counts and patch grids each.
PHOTOS = [(20, 30), (16, 16), (13, 40)]


def _model_and_processor(family: str):
    if family == "llava_onevision":
        return tiled_serving.tiny_onevision_alignedvq(), tiny_tokenizer()
    if family == "llava_next":
        return tiled_serving.tiny_next_alignedvq(), tiny_tokenizer()
    return qwen_serving.tiny_served_qwen(), qwen_serving.processor()


def _export(model, family: str, folder) -> None:
    if family == "qwen2_5_vl":
        from transformers_alignedvq.export.qwen_edge_onnx import export_qwen_edge

        export_qwen_edge(model, folder, preprocessing=QwenImagePreprocessing(
            min_pixels=qwen_serving.MIN_PIXELS, max_pixels=qwen_serving.MAX_PIXELS, patch_size=qwen_serving.PATCH,
            merge_size=qwen_serving.MERGE))
    else:
        from transformers_alignedvq.export.tiled_edge import export_tiled_edge

        export_tiled_edge(model, folder)


@pytest.fixture(scope="module", params=FAMILIES)
def deployed(request, tmp_path_factory):
    """``(family, engine, edge folder, server URL, photo paths)`` for one family."""
    family = request.param
    model, processor = _model_and_processor(family)
    folder = tmp_path_factory.mktemp(f"edge_{family}")
    _export(model, family, folder)
    photos = []
    for index, (height, width) in enumerate(PHOTOS):
        photos.append(str(folder / f"photo{index}.png"))
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            photos[-1])
    app = create_app(model, processor=processor, max_new_tokens=6, max_wait_ms=1)
    with BackgroundServer(app, host="127.0.0.1", port=0) as running:
        yield family, app.state.engine, folder, running.url, photos


def _direct(family: str, engine, sent) -> str:
    """The model's own generate from the indices the edge sent (its layout: the image size, or the patch grid)."""
    indices = torch.from_numpy(np.asarray(sent.indices))
    if family == "qwen2_5_vl":
        return qwen_serving.direct_answer(engine, indices, sent.layout)
    tiles = indices.reshape(-1, engine.tiles.tokens_per_tile)
    return tiled_serving.direct_answer(engine, tiles, sent.layout)[0]


def test_ask_answers_as_the_model_does_from_the_edges_indices(deployed):
    family, engine, folder, url, photos = deployed
    with EdgeClient(folder, url, retry_window=5, backoff=0.01) as client:
        assert isinstance(client.device_edge, QwenDeviceEdge if family == "qwen2_5_vl" else TiledDeviceEdge)
        assert client.check_server()["family"] == family
        layouts = set()
        for path in photos:
            sent = client.device_edge.encode(path)
            layouts.add(sent.layout)
            first, again = client.ask_many(path, ["what ?", QUESTION])
            expected = _direct(family, engine, sent)
            assert again.text == expected
            # The second question named the kept image by the digest the server gave (its layout bound in).
            assert again.server["image_digest"] == sent.digest(client.fingerprint).hex()
            assert again.bytes_sent == len(encode_followup(sent.digest(client.fingerprint), QUESTION))
            assert first.bytes_sent > again.bytes_sent
        assert len(layouts) == len(photos)  # three different tilings / grids went over the wire


def test_the_frame_carries_the_geometry_the_server_checks(deployed, tmp_path):
    from transformers_alignedvq import wire

    family, engine, folder, url, photos = deployed
    with EdgeClient(folder, url) as client:
        size = client.save_frame(tmp_path / "frame.bin", photos[0], QUESTION)
    frame = wire.decode_frame((tmp_path / "frame.bin").read_bytes(), **engine.frame_checks())
    assert len((tmp_path / "frame.bin").read_bytes()) == size and frame.prompt == QUESTION
    assert frame.geometry.kind == (2 if family == "qwen2_5_vl" else 1) and len(frame.geometry.images) == 1


_ASK = WITHOUT_CLOUD_PACKAGES + """
from transformers_alignedvq import cli
rc = cli.main(sys.argv[1:])
blocked = sorted({m.split(".")[0] for m, mod in sys.modules.items() if mod} & {"torch", "transformers", "onnx"})
print(json.dumps({"rc": rc, "loaded": blocked}))
"""


def test_cli_ask_on_a_device_without_torch(deployed):
    family, engine, folder, url, photos = deployed
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", "import json, sys\n" + _ASK, "ask", "--edge", str(folder), "--server",
                          url, "--image", photos[2], "--threads", "1", "--json", QUESTION],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"rc": 0, "loaded": []}
    answer = json.loads("\n".join(lines[:-1]))
    sent = open_edge(folder).encode(photos[2])
    assert answer["answer"] == _direct(family, engine, sent)


def test_an_edge_of_another_family_is_named_before_sending(deployed, tmp_path):
    """An edge whose server serves another family (or other pixel limits / tiling) fails `check_server` with
    the differing fields, and its frames are refused as 4xx without harming the server."""
    family, engine, folder, url, photos = deployed
    other = "qwen2_5_vl" if family != "qwen2_5_vl" else "llava_onevision"
    model, _ = _model_and_processor(other)
    _export(model, other, tmp_path / "other")
    with EdgeClient(tmp_path / "other", url, retry_window=0) as client:
        with pytest.raises(EdgeClientError, match="do not match"):
            client.check_server()
        with pytest.raises(EdgeClientError, match="server answered (409|422)"):
            client.ask(photos[0], QUESTION)
    with EdgeClient(folder, url) as client:
        assert client.ask(photos[0], QUESTION).text


def test_qwen_edge_folder_needs_its_fingerprint(tmp_path):
    model = qwen_serving.tiny_served_qwen()
    _export(model, "qwen2_5_vl", tmp_path)
    edge = open_edge(tmp_path)
    assert edge.fingerprint == engine_fingerprint(model) and edge.entropy_grid is None
    config = json.loads((tmp_path / "qwen_edge.json").read_text())
    del config["codebook_fingerprint"]
    (tmp_path / "qwen_edge.json").write_text(json.dumps(config))
    with pytest.raises(EdgeCheckpointError, match="codebook_fingerprint"):
        open_edge(tmp_path)
    with pytest.raises(EdgeClientError, match="codebook_fingerprint"):
        EdgeClient(tmp_path, "http://127.0.0.1:9")


def engine_fingerprint(model) -> bytes:
    from transformers_alignedvq.wire import codebook_fingerprint

    return codebook_fingerprint(model.model.alignedvq.quantizer.codebook)


def test_stream_gives_the_asked_answer(deployed):
    family, engine, folder, url, photos = deployed
    with EdgeClient(folder, url, reuse_images=False) as client:
        with client.stream(photos[1], QUESTION) as stream:
            pieces = list(stream)
        assert "".join(pieces).strip() == stream.answer.text == client.ask(photos[1], QUESTION).text


def test_tiled_frames_are_entropy_coded_with_the_folders_model(tmp_path):
    """A tiled edge folder carrying an entropy model fitted on tiles sends coded frames, tile by tile; a server
    holding the same model answers them as the model does from the edge's indices."""
    from transformers_alignedvq import wire

    model = tiled_serving.tiny_onevision_alignedvq()
    _export(model, "llava_onevision", tmp_path / "edge")
    edge = open_edge(tmp_path / "edge")
    rng = np.random.default_rng(0)
    tiles = np.concatenate([edge.encode(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).indices.reshape(-1, 16)
                            for _ in range(10)])
    entropy = wire.EntropyModel.fit(tiles, codebook_size=16, grid=(4, 4), has_cls_token=False)
    entropy.save(tmp_path / "edge")
    app = create_app(model, processor=tiny_tokenizer(), max_new_tokens=6, max_wait_ms=1, entropy_model=entropy)
    photo = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    with BackgroundServer(app, host="127.0.0.1", port=0) as running:
        with EdgeClient(tmp_path / "edge", running.url, entropy_coding=True) as client:
            frame = client.encode(photo, QUESTION)
            assert wire.decode_frame(frame, entropy_model=entropy).entropy_coded
            answer = client.ask(photo, QUESTION)
    sent = edge.encode(photo)
    assert answer.bytes_sent == len(frame)
    assert answer.text == _direct("llava_onevision", app.state.engine, sent)


def test_qwen_frames_are_entropy_coded_with_the_folders_model(tmp_path):
    """A Qwen2.5-VL edge folder carrying an entropy model of patch grids sends coded frames (the indices and the patch
    grid in the geometry section); a server holding the same model answers them as the model does from the edge's
    indices. A folder whose model codes a fixed grid or another K is refused when the client opens it."""
    from transformers_alignedvq import wire
    from transformers_alignedvq.training.entropy_fit import fit_patch_grid_model

    model = qwen_serving.tiny_served_qwen()
    _export(model, "qwen2_5_vl", tmp_path / "edge")
    with pytest.raises(EdgeClientError, match="has no entropy model"):
        EdgeClient(tmp_path / "edge", "http://127.0.0.1:9", entropy_coding=True)
    edge = open_edge(tmp_path / "edge")
    rng = np.random.default_rng(0)
    training = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8) for h, w in rng.integers(8, 40, (12, 2))]
    assert len({edge.encode(image).layout for image in training}) > 3  # several grids
    entropy = fit_patch_grid_model(tmp_path / "edge", training, [QUESTION] * 2)
    assert entropy.patch_grids and entropy.codebook_size == 16
    entropy.save(tmp_path / "edge")
    app = create_app(model, processor=qwen_serving.processor(), max_new_tokens=6, max_wait_ms=1,
                     entropy_model=entropy)
    photo = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    with BackgroundServer(app, host="127.0.0.1", port=0) as running:
        with EdgeClient(tmp_path / "edge", running.url, entropy_coding=True) as client:
            frame = client.encode(photo, QUESTION)
            decoded = wire.decode_frame(frame, entropy_model=entropy)
            assert decoded.entropy_coded and decoded.geometry.images[0].grid_thw == (1, 10, 16)
            answer = client.ask(photo, QUESTION)
        with EdgeClient(tmp_path / "edge", running.url, entropy_coding=False) as client:
            raw = client.ask(photo, QUESTION)
    image = edge.encode(photo)
    np.testing.assert_array_equal(decoded.indices[:, 0], image.indices)
    assert answer.bytes_sent == len(frame) < raw.bytes_sent
    assert answer.text == raw.text == _direct("qwen2_5_vl", app.state.engine, image)
    fixed = wire.EntropyModel.fit(np.zeros((2, 16), int), codebook_size=16, grid=(4, 4), has_cls_token=False)
    other_k = wire.EntropyModel.fit_patch_grids([(np.zeros(16, int), (1, 4, 4))], codebook_size=32)
    for wrong, words in ((fixed, r"grid \(4, 4\) \(CLS False\); this qwen2_5_vl edge sends .* patch grids"),
                         (other_k, "codes K=32")):
        wrong.save(tmp_path / "edge")
        for coding in (None, True):
            with pytest.raises(EdgeClientError, match=words):
                EdgeClient(tmp_path / "edge", "http://127.0.0.1:9", entropy_coding=coding)
    assert EdgeClient(tmp_path / "edge", "http://127.0.0.1:9", entropy_coding=False).entropy_model is None


def test_the_easy_vqa_fit_of_a_qwen_folder_is_of_patch_grids(tmp_path, monkeypatch):
    """`examples/fit_entropy_model.py`'s fit on a Qwen2.5-VL folder runs its ONNX edge on the split's images (a
    stand-in for easy_vqa with three photos here)."""
    import types

    from transformers_alignedvq import wire
    from transformers_alignedvq.training.entropy_fit import fit

    _export(qwen_serving.tiny_served_qwen(), "qwen2_5_vl", tmp_path)
    paths = {}
    for index, (height, width) in enumerate(PHOTOS):
        paths[f"p{index}"] = str(tmp_path / f"p{index}.png")
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            paths[f"p{index}"])
    monkeypatch.setitem(sys.modules, "easy_vqa", types.SimpleNamespace(
        get_train_image_paths=lambda: paths, get_train_questions=lambda: ([QUESTION] * 3, ["red"] * 3, ["p0"] * 3)))
    model = fit(tmp_path)
    assert model.patch_grids and model.codebook_size == 16
    edge = open_edge(tmp_path)
    image = edge.encode(paths["p2"])
    frame = wire.encode_frame(image.indices, codebook_size=16, codebook_fingerprint=edge.fingerprint,
                              geometry=image.geometry, entropy_model=model, prompt=QUESTION)
    decoded = wire.decode_frame(frame, entropy_model=model)
    assert decoded.prompt == QUESTION and np.array_equal(decoded.indices[:, 0], image.indices)
