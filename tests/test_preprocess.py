"""The edge's numpy/Pillow preprocessing against Transformers' own image processor."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor

from transformers_alignedvq.preprocess import ImageInputError, ImagePreprocessing, load_image


def _images():
    rng = np.random.default_rng(0)
    yield "square", Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    yield "landscape", Image.fromarray(rng.integers(0, 256, (50, 93, 3), dtype=np.uint8))
    yield "portrait", Image.fromarray(rng.integers(0, 256, (121, 40, 3), dtype=np.uint8))
    yield "small", Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8))
    yield "grey", Image.fromarray(rng.integers(0, 256, (70, 70), dtype=np.uint8))
    yield "rgba", Image.fromarray(rng.integers(0, 256, (64, 80, 4), dtype=np.uint8))


@pytest.mark.parametrize("crop", [32, 48])
@pytest.mark.parametrize("name,image", list(_images()))
def test_matches_transformers_clip_image_processor(name, image, crop):
    processor = CLIPImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})
    reference = image
    if image.mode == "RGBA":  # ours puts transparency onto white, as Transformers >= 5.2x does (older: dropped)
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        reference = Image.alpha_composite(white, image).convert("RGB")
    expected = processor(images=reference, return_tensors="np")["pixel_values"]
    ours = ImagePreprocessing.from_image_processor(processor.to_dict())(image)
    assert ours.shape == expected.shape == (1, 3, crop, crop) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)


def test_defaults_of_a_clip_tower_are_the_clip_processor():
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert ImagePreprocessing.for_vision_config("clip_vision_model", 336) == ImagePreprocessing.from_image_processor(processor.to_dict())
    with pytest.raises(ValueError, match="pass the model's image processor"):
        ImagePreprocessing.for_vision_config("dinov2", 224)


def test_settings_round_trip_through_json():
    import json

    settings = ImagePreprocessing.for_vision_config("siglip_vision_model", 224)
    assert ImagePreprocessing.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    with pytest.raises(ValueError, match="invalid preprocessing"):
        ImagePreprocessing.from_dict({"resize": None})


def test_inputs_of_every_kind_and_bad_ones(tmp_path):
    image = Image.fromarray(np.full((20, 30, 3), 200, dtype=np.uint8))
    path = tmp_path / "x.png"
    image.save(path)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    prep = ImagePreprocessing.for_vision_config("clip_vision_model", 16)
    from_pil = prep(image)
    for other in (str(path), path, path.read_bytes(), np.asarray(image)):
        assert np.array_equal(prep(other), from_pil)
    assert prep(buffer.getvalue()).shape == (1, 3, 16, 16)
    (tmp_path / "notes.txt").write_text("not an image")
    for bad, words in [(tmp_path / "notes.txt", "cannot read"), (b"\x89PNG\r\n", "cannot read"),
                       (tmp_path / "missing.png", "cannot read"), (np.zeros((4, 4), np.float32), "uint8"),
                       (3.5, "must be a PIL image")]:
        with pytest.raises(ImageInputError, match=words):
            load_image(bad)


def test_saved_image_processor_settings_are_read_from_either_file(tmp_path):
    import json

    from transformers_alignedvq.preprocess import saved_image_processor

    assert saved_image_processor(tmp_path) is None
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 64}}))
    assert saved_image_processor(tmp_path) == {"size": {"shortest_edge": 64}}
    # processor_config.json (newer) wins, unless it lacks what the caller needs
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {"min_pixels": 3136}}))
    assert saved_image_processor(tmp_path) == {"min_pixels": 3136}
    assert saved_image_processor(tmp_path, having=("size",)) == {"size": {"shortest_edge": 64}}
    (tmp_path / "processor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="processor_config.json is not valid JSON"):
        saved_image_processor(tmp_path)
