"""Checkpoint reading and writing for the AlignedVQ model classes, kept beside the model folders.

`CheckpointMixin` is what every family gets when this package is installed: strict loading of our own
checkpoints (`loading.py`), the adapter-only kind, the edge files and model card written with every save, the
Trainer's resume, and `codebook_fingerprint`. `AlignedVQCheckpointMixin` adds LLaVA's conversion and its
`edge_encoder` and is a base of `LlavaAlignedVQForConditionalGeneration`; `FamilyCheckpointMixin` is the base of the
other families' classes (through `models/tiled_alignedvq.py`). The model folders ship as remote code without this
package; there the stock methods run.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import PreTrainedModel

from ..preprocess import ImagePreprocessing
from ..wire import codebook_fingerprint
from .cards import hub_reference, write_model_card
from .loading import (
    check_complete_load,
    load_adapter_checkpoint,
    load_base,
    load_from_state_dict,
    load_full_checkpoint,
    load_llava,
    module_state_dict,
    read_alignedvq_config,
)
from .saving import save_checkpoint


class CheckpointMixin:
    """Loading and saving of our checkpoints for a model class (first base); the class's ``config_class`` says
    which family's checkpoints it reads, and ``_convert_base`` how an adapter-only checkpoint's base is converted."""

    @staticmethod
    def _base_reference(path: str | os.PathLike, revision: str | None) -> tuple[str, str | None]:
        """What the conversion records as the base: the Hub id and commit of a Hub id or Hub-cache folder."""
        repo_id, commit = hub_reference(path)
        return repo_id or str(path), commit or revision

    @classmethod
    def _convert_base(cls, base, *, load_kwargs: dict, **options):
        """The model an adapter-only checkpoint's base becomes with ``options`` (the subclasses' conversion)."""
        raise NotImplementedError(f"{cls.__name__} does not say how to convert an adapter-only checkpoint's base")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a full or an adapter-only AlignedVQ checkpoint (see `loading.py`), strictly: a missing, unexpected,
        mis-shaped or mis-typed tensor, or a truncated weights file, raises `hub.CheckpointMismatchError`.
        A plain checkpoint is refused with a pointer to the conversion (`from_llava`, `from_vlm`)."""
        config = kwargs.pop("config", None)
        if pretrained_model_name_or_path is None:  # weights given as `state_dict`, as Transformers allows
            return load_from_state_dict(super().from_pretrained, config, *model_args, config_class=cls.config_class,
                                        **kwargs)
        if not isinstance(config, cls.config_class):
            config = read_alignedvq_config(pretrained_model_name_or_path, kwargs, cls.config_class)
        if config.checkpoint_kind == "adapter":
            return load_adapter_checkpoint(cls, pretrained_model_name_or_path, config, **kwargs)
        parent = super().from_pretrained
        return load_full_checkpoint(parent, pretrained_model_name_or_path, config, *model_args, **kwargs)

    def save_pretrained(
        self,
        save_directory,
        *,
        checkpoint_kind: str | None = None,
        merge_lora: bool = False,
        include_ema_state: bool | None = None,
        eval_results: dict | None = None,
        **kwargs,
    ):
        """Save as a `"full"` or `"adapter"` checkpoint (default: `config.checkpoint_kind`), safetensors only.

        Args:
            checkpoint_kind: `"full"` writes every weight; `"adapter"` writes only the codebook, DLP and LoRA
                adapter plus a config naming `config.base_model_name_or_path` / `base_model_revision`.
            merge_lora: merge an injected LoRA adapter into the weights first (full kind).
            include_ema_state: also save the EMA statistics; default: yes for the full kind (the `Trainer`
                resumes from it and nothing may restart), no for the adapter kind. Inference needs only the
                codebook.
            eval_results: `{"results": {name: value}, "datasets": [...], "model_name": ...}` for the model card.
        """
        kwargs.pop("safe_serialization", None)  # safetensors always
        return save_checkpoint(
            self,
            save_directory,
            kind=checkpoint_kind,
            merge_lora=merge_lora,
            include_ema_state=include_ema_state,
            eval_results=eval_results,
            save_function=PreTrainedModel.save_pretrained,
            **kwargs,
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict` that also takes our weights files' names (what the `Trainer` passes when
        it resumes or loads the best model), and refuses a whole-model load that would leave a tensor fresh or
        drop one, even with ``strict=False`` (`loading.check_complete_load`)."""
        state_dict = module_state_dict(self, state_dict)
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        check_complete_load(self, state_dict, result)
        return result

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # `push_to_hub` saves through `save_pretrained`, then replaces README.md with a generic card; put ours
        # back (titled with the repo's name) before the upload.
        write_model_card(self, Path(working_dir), kind=self.config.checkpoint_kind, model_name=repo_id.split("/")[-1])
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    def codebook_fingerprint(self) -> bytes:
        """16-byte fingerprint of the codebook(s); the wire format carries it so a cloud holding a different
        codebook refuses the frame instead of decoding garbage."""
        return codebook_fingerprint(self.model.alignedvq.quantizer.codebook)


class AlignedVQCheckpointMixin(CheckpointMixin):
    """`CheckpointMixin` for LLaVA-1.5: conversion with `from_llava`, and the LLaVA edge (`edge_encoder`)."""

    @classmethod
    def _load_llava(cls, path: str | os.PathLike, **load_kwargs):
        """`from_llava`'s loader for a path or Hub id: checked as strictly as our own checkpoints."""
        return load_llava(path, **load_kwargs)

    @classmethod
    def _convert_base(cls, base, *, load_kwargs: dict, **options):
        return cls.from_llava(base, load_kwargs=load_kwargs, **options)

    def edge_encoder(self, image_processor=None):
        """A standalone module with only what the edge needs; see `AlignedVQEdgeEncoder`. Pass the model's
        image processor to record its exact preprocessing (default: the vision tower family's standard one)."""
        from ..export.edge import AlignedVQEdgeEncoder

        preprocessing = None
        if image_processor is not None:
            settings = getattr(image_processor, "image_processor", image_processor)  # a whole processor works too
            settings = settings if isinstance(settings, dict) else settings.to_dict()
            preprocessing = ImagePreprocessing.from_image_processor(settings)
        return AlignedVQEdgeEncoder.from_model(self, preprocessing)


class FamilyCheckpointMixin(CheckpointMixin):
    """`CheckpointMixin` for the families converted by ``from_base`` (LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL)."""

    @classmethod
    def _load_base(cls, path: str | os.PathLike, **load_kwargs):
        """``from_base``'s loader for a path or Hub id of the family's Transformers class, checked as strictly as
        our own checkpoints."""
        return load_base(cls.parent_class, path, **load_kwargs)

    @classmethod
    def _convert_base(cls, base, *, load_kwargs: dict, **options):
        return cls.from_base(base, load_kwargs=load_kwargs, **options)


__all__ = ["AlignedVQCheckpointMixin", "CheckpointMixin", "FamilyCheckpointMixin"]
