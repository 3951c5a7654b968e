"""Our classes behave as Transformers' machinery expects of a LLaVA model: signatures the Trainer and
generation read, every decoding mode seeing the image, the Trainer with default arguments, exact resume, the
parent's output fields, loading from a state dict, and initialisation on the meta device."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaModel, Trainer, TrainerCallback, TrainingArguments

import transformers_alignedvq as tav
from tests.conftest import IMAGE_SIZE, NUM_PATCHES, prompt_ids, tiny_alignedvq, tiny_llava_config
from transformers_alignedvq.models.llava_alignedvq.split import vision_blocks
from transformers_alignedvq.training import prepare_for_finetuning

Model = tav.LlavaAlignedVQForConditionalGeneration


def _parameters(function) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("ours, parent", [(Model, LlavaForConditionalGeneration), (tav.LlavaAlignedVQModel, LlavaModel)])
def test_forward_names_the_parents_arguments_then_ours(ours, parent):
    mine, theirs = _parameters(ours.forward), _parameters(parent.forward)
    assert mine[: len(theirs) - 1] == theirs[:-1], "the parent's arguments, in its order, with its defaults"
    assert mine[len(theirs) - 1][0] == "image_indices" and mine[-1] == theirs[-1]  # then ours, then **kwargs


def test_trainer_and_generation_see_labels_and_logits_to_keep():
    from transformers.utils import find_labels

    assert find_labels(Model) == ["labels"]
    assert tiny_alignedvq(calibrate=False)._supports_logits_to_keep()


def test_positional_arguments_bind_as_for_the_parent(pixels):
    model = tiny_alignedvq()
    ids = prompt_ids()
    mask = torch.ones_like(ids)
    by_position = model(ids, pixels, mask).logits
    assert torch.equal(by_position, model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits)
    assert model(ids, pixels, mask, logits_to_keep=1).logits.shape[1] == 1


# ---------------------------------------------------------------- generation


def _generate(model, ids, pixels, **kwargs):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                          max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True,
                          pad_token_id=0, **kwargs)


@pytest.mark.parametrize("image", ["pixels", "indices"])
def test_the_first_generated_step_sees_the_image(pixels, image):
    model = tiny_alignedvq()
    ids = prompt_ids()
    given = {"pixel_values": pixels} if image == "pixels" else {"image_indices": model.encode_edge(pixels)}
    out = model.generate(input_ids=ids, max_new_tokens=1, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=0, **given)
    torch.testing.assert_close(out.scores[0], model(input_ids=ids, **given).logits[:, -1])
    without_image = model.model.language_model.get_input_embeddings()  # the placeholder embeddings alone
    plain = model(inputs_embeds=without_image(ids)).logits[:, -1]
    assert not torch.allclose(out.scores[0], plain, atol=1e-3)


def test_assisted_and_prompt_lookup_decoding_equal_greedy(pixels):
    model = tiny_alignedvq()
    ids = prompt_ids(batch=1)
    greedy = _generate(model, ids, pixels[:1])
    assisted = _generate(model, ids, pixels[:1], assistant_model=model)
    lookup = _generate(model, ids, pixels[:1], prompt_lookup_num_tokens=2)
    assert torch.equal(assisted.sequences, greedy.sequences) and torch.equal(lookup.sequences, greedy.sequences)
    torch.testing.assert_close(assisted.scores[0], greedy.scores[0])


def test_generation_without_a_cache_sees_the_image_at_every_step(pixels):
    model = tiny_alignedvq()
    ids = prompt_ids()
    cached = _generate(model, ids, pixels, output_hidden_states=True)
    uncached = _generate(model, ids, pixels, use_cache=False, output_hidden_states=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step in range(1, len(uncached.hidden_states)):  # the whole sequence again at every step
        assert uncached.hidden_states[step][0].shape[1] == ids.shape[1] + step
        assert cached.hidden_states[step][0].shape[1] == 1


@pytest.mark.parametrize("mode", [{"num_beams": 2}, {"cache_implementation": "static"}])
def test_beams_and_static_cache_match_greedy_from_indices(pixels, mode):
    model = tiny_alignedvq()
    ids = prompt_ids(batch=1)
    indices = model.encode_edge(pixels[:1])
    greedy = model.generate(input_ids=ids, image_indices=indices, max_new_tokens=4, do_sample=False, pad_token_id=0)
    other = model.generate(input_ids=ids, pixel_values=pixels[:1], max_new_tokens=4, do_sample=False, pad_token_id=0,
                           **mode)
    assert other.shape == greedy.shape
    if "cache_implementation" in mode:
        assert torch.equal(other, greedy)


def test_generation_never_moves_the_codebook(pixels):
    model = tiny_alignedvq().train()
    codebook = model.model.alignedvq.quantizer.codebook.clone()
    model.generate(input_ids=prompt_ids(), pixel_values=pixels, max_new_tokens=2, pad_token_id=0)
    assert torch.equal(model.model.alignedvq.quantizer.codebook, codebook)


# ---------------------------------------------------------------- outputs


def test_image_outputs_as_the_parent_gives_them(pixels):
    model = tiny_alignedvq()
    features = model.model.get_image_features(pixel_values=pixels, return_dict=False)
    assert isinstance(features, tuple) and features[0].shape == (2, NUM_PATCHES, 32)
    out = model(input_ids=prompt_ids(), pixel_values=pixels)
    image_hidden = out.image_hidden_states  # a property over image_outputs in 5.24, a field before
    image_hidden = torch.stack(list(image_hidden)) if isinstance(image_hidden, (list, tuple)) else image_hidden
    assert image_hidden.shape == (2, NUM_PATCHES, 32)
    assert out.image_indices.shape == (2, NUM_PATCHES + 1)
    base = model.model(input_ids=prompt_ids(), pixel_values=pixels, output_hidden_states=True)
    assert len(base.hidden_states) == 3  # the language model's, as for LLaVA
    assert torch.equal(base.image_indices, out.image_indices)
    assert isinstance(model(input_ids=prompt_ids(), pixel_values=pixels, return_dict=False), tuple)


# ---------------------------------------------------------------- loading and initialisation


def test_from_pretrained_takes_a_state_dict_and_stays_strict():
    model = tiny_alignedvq()
    state = model.state_dict()
    loaded = Model.from_pretrained(None, config=model.config, state_dict=state)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    state.pop("model.multi_modal_projector.linear_1.weight")
    with pytest.raises(tav.CheckpointMismatchError, match="linear_1"):
        Model.from_pretrained(None, config=model.config, state_dict=state)
    with pytest.raises(tav.CheckpointMismatchError, match="state_dict"):
        Model.from_pretrained(None, config=model.config)


def test_init_weights_on_meta_gives_clip_its_own_scale():
    config = tav.AlignedVQConfig.from_llava_config(tiny_llava_config(), codebook_size=16)
    stds = []
    for cls, cfg in ((Model, config), (LlavaForConditionalGeneration, tiny_llava_config())):
        torch.manual_seed(0)
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device="cpu")
        model.init_weights()
        stds.append(vision_blocks(model.model.vision_tower)[0].self_attn.q_proj.weight.std().item())
    assert stds[0] == pytest.approx(stds[1], rel=0.2), stds


# ---------------------------------------------------------------- the Trainer


class _Rows(torch.utils.data.Dataset):
    """Rows as a dataset would give them: extra columns the model does not take, labels named `labels`."""

    def __init__(self, n: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        ids = prompt_ids(batch=n, seed=seed + 1)
        labels = ids.clone()
        labels[:, :NUM_PATCHES] = -100
        self.rows = [
            {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": labels[i],
             "pixel_values": torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator), "question": "q?"}
            for i in range(n)
        ]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _collate(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0] if key != "question"}


def test_plain_trainer_with_default_arguments_trains_and_evaluates(tmp_path):
    model = prepare_for_finetuning(tiny_alignedvq(codebook_size=8), lora_r=4)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                             report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(4), eval_dataset=_Rows(4, seed=5))
    assert trainer.train().training_loss > 0
    assert trainer.evaluate()["eval_loss"] > 0


class _StopAt(TrainerCallback):
    """Ends a run after ``step`` steps without changing its schedule (as a preemption would)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def _finetune(tmp_path, *, stop_at: int = 4, resume: str | None = None, save_steps: int = 2):
    model = prepare_for_finetuning(tiny_alignedvq(codebook_size=8), lora_r=4)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4,
                             learning_rate=5e-3, save_steps=save_steps, report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=3, data_seed=3)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(8), data_collator=_collate,
                      callbacks=[_StopAt(stop_at)])
    trainer.train(resume_from_checkpoint=resume)
    return model


def test_resume_from_a_checkpoint_is_exact(tmp_path):
    straight = _finetune(tmp_path / "straight", save_steps=100)
    _finetune(tmp_path / "split", stop_at=2)
    resumed = _finetune(tmp_path / "split", resume=str(tmp_path / "split" / "checkpoint-2"))
    lora = [k for k in straight.state_dict() if "lora_B" in k]
    assert lora and sum(straight.state_dict()[k].abs().sum() for k in lora) > 0
    differ = [k for k, v in straight.state_dict().items() if not torch.allclose(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-6)]
    assert not differ, differ  # LoRA, DLP, codebook and its EMA state included


def test_resume_into_a_model_without_the_lora_refuses(tmp_path):
    _finetune(tmp_path, stop_at=2)
    fresh = tiny_alignedvq(codebook_size=8)  # prepare_for_finetuning forgotten: no LoRA layers to load into
    state = __import__("safetensors.torch").torch.load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    with pytest.raises(tav.CheckpointMismatchError, match="lora_"):
        fresh.load_state_dict(state, strict=False)


def test_a_trainer_checkpoint_loads_with_from_pretrained(tmp_path):
    trained = _finetune(tmp_path, stop_at=2)
    loaded = Model.from_pretrained(tmp_path / "checkpoint-2").eval()
    ids, pixels = prompt_ids(), torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(loaded(input_ids=ids, pixel_values=pixels).logits,
                               trained.eval()(input_ids=ids, pixel_values=pixels).logits)
