import json

import pytest
from transformers import AutoConfig, LlavaConfig

import transformers_alignedvq as tav
from tests.conftest import tiny_llava_config


def test_defaults_reproduce_the_paper_setup():
    config = tav.AlignedVQConfig()
    assert (config.split_layer, config.split_site) == (0, "ln1")
    assert config.codebook_size == 4096 and config.codebook_dim == 1024
    assert (config.num_codebooks, config.num_groups, config.use_dlp) == (1, 1, True)
    assert config.num_image_tokens == 577
    assert config.feature_layer_indices() == [23]


@pytest.mark.parametrize(
    "options, words",
    [
        (dict(split_site="ffn"), "split_site"),
        (dict(split_site="patch", split_layer=1), "comes before block 0"),
        (dict(split_layer=-1), "split_layer"),
        (dict(split_layer=3), "split_layer"),
        (dict(split_layer=2), "before the split"),  # vision_feature_layer=-2 reads hidden state 2
        (dict(split_layer="0"), "split_layer must be an int"),
        (dict(codebook_size=1), "codebook_size"),
        (dict(num_codebooks=0), "num_codebooks"),
        (dict(num_groups=0), "num_groups"),
        (dict(num_groups=3), "not divisible"),
        (dict(codebook_dim=0), "codebook_dim"),
        (dict(commitment_weight=-0.1), "commitment_weight"),
        (dict(ema_decay=0.0), "ema_decay"),
        (dict(ema_decay=1.5), "ema_decay"),
        (dict(dead_code_threshold=-1.0), "dead_code_threshold"),
        (dict(use_dlp="yes"), "use_dlp"),
    ],
)
def test_invalid_values_raise_value_error(options, words):
    with pytest.raises(ValueError, match=words):
        tav.AlignedVQConfig.from_llava_config(tiny_llava_config(), **options)


def test_from_llava_config_keeps_the_base_model_and_round_trips(tmp_path, llava_7b_config_path):
    base = LlavaConfig.from_pretrained(llava_7b_config_path)
    config = tav.AlignedVQConfig.from_llava_config(base, codebook_size=256, split_site="ln2", split_layer=5)
    assert config.model_type == "llava_alignedvq"
    assert config.text_config.vocab_size == base.text_config.vocab_size == 32064
    assert config.image_token_id == base.image_token_id
    assert config.vision_config.to_dict() == base.vision_config.to_dict()
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava_alignedvq"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, tav.AlignedVQConfig)
    assert (loaded.codebook_size, loaded.split_site, loaded.split_layer) == (256, "ln2", 5)


def test_feature_layer_lists_are_checked_against_the_split():
    config = tav.AlignedVQConfig.from_llava_config(tiny_llava_config(vision_feature_layer=[-1, 2]), split_layer=1)
    assert config.feature_layer_indices() == [3, 2]
    with pytest.raises(ValueError, match="before the split"):
        tav.AlignedVQConfig.from_llava_config(tiny_llava_config(vision_feature_layer=[-1, 1]), split_layer=1)
