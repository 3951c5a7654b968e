"""LLaVA with an AlignedVQ split inside its vision tower.

`LlavaAlignedVQForConditionalGeneration` is `LlavaForConditionalGeneration` with one extra submodule,
``model.alignedvq`` (input DLP, codebook(s), output DLP); every base parameter keeps its name, so a llava-hf
checkpoint loads into it with only the AlignedVQ parameters missing.

Edge: :meth:`~LlavaAlignedVQForConditionalGeneration.encode_edge` (pixels -> indices).
Cloud: :meth:`~LlavaAlignedVQForConditionalGeneration.forward_from_indices` and
``generate(..., image_indices=...)``. ``forward(pixel_values=...)`` computes exactly edge followed by cloud.

How this extends LLaVA without restating it: the image features (from pixels or from indices) are computed by
``LlavaAlignedVQModel.get_image_features`` and placed into the prompt's input embeddings, and the stock
``LlavaForConditionalGeneration.forward`` / ``generate`` run on those embeddings with every other argument
passed through untouched. Input embeddings are the one channel every Transformers 5 release shares, so
nothing here depends on how a release names its cache or its image outputs; our output copies whatever fields
the parent's output has and adds only the AlignedVQ ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.auto import AutoModel
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)

from .split import cloud_forward, check_pixel_values, edge_forward
from .alignedvq_layer import AlignedVQLayer
from .configuration_alignedvq import AlignedVQConfig
from .dlp import DualLinearProjection
from .quantizer import VectorQuantizer


def _register_checkpoint_conversions() -> None:
    """llava-hf checkpoints (`language_model.model.*`, `vision_tower.vision_model.*`) are renamed on load by
    per-model-type rules; ours are LLaVA's rules under our model type and class names. Done here, not in the
    package `__init__`, so it also happens when this file is loaded as remote code."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    for ours, theirs in ((AlignedVQConfig.model_type, "llava"), ("LlavaAlignedVQModel", "LlavaModel")):
        rules = get_checkpoint_conversion_mapping(theirs)
        if rules is not None and get_checkpoint_conversion_mapping(ours) is None:
            register_checkpoint_conversion_mapping(ours, rules)


_register_checkpoint_conversions()


@dataclass
class AlignedVQImageOutput(BaseModelOutputWithPooling):
    r"""
    Image features of the split vision tower.

    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_selected_tokens, vision_hidden_size)`):
        The selected vision hidden state(s) LLaVA projects (CLS removed for the "default" strategy).
    pooler_output (`list[torch.FloatTensor]`):
        One `(num_selected_tokens, text_hidden_size)` tensor per image: projected features for the LM.
    image_indices (`torch.LongTensor` of shape `(batch_size, num_image_tokens[, codes_per_token])`):
        Codebook indices; what crosses the edge-cloud link.
    commitment_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Unweighted commitment loss (Eq. 3); only when pixels were quantized here.
    codebook_perplexity (`torch.FloatTensor` of shape `()`, *optional*):
        Perplexity of this batch's code usage (training only).
    codebook_usage (`torch.FloatTensor` of shape `()`, *optional*):
        Fraction of codewords used by this batch (training only).
    """

    image_indices: torch.LongTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    codebook_perplexity: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None


@dataclass
class LlavaAlignedVQCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    r"""
    [`LlavaCausalLMOutputWithPast`] plus the AlignedVQ terms.

    loss (`torch.FloatTensor` of shape `()`, *optional*):
        `lm_loss + commitment_weight * commitment_loss` when `labels` are given.
    lm_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Next-token loss alone.
    commitment_loss, codebook_perplexity, codebook_usage, image_indices:
        As in [`AlignedVQImageOutput`].
    """

    lm_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    codebook_perplexity: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None
    image_indices: torch.LongTensor | None = None


def build_alignedvq_layer(config: AlignedVQConfig) -> AlignedVQLayer:
    """The AlignedVQ layer ``config`` describes."""
    return AlignedVQLayer(
        config.vision_config.hidden_size,
        config.codebook_size,
        codebook_dim=config.codebook_dim,
        num_codebooks=config.num_codebooks,
        num_groups=config.num_groups,
        use_dlp=config.use_dlp,
        ema_decay=config.ema_decay,
        dead_code_threshold=config.dead_code_threshold,
    )


def _init_alignedvq_weights(model: LlavaPreTrainedModel, module: nn.Module) -> bool:
    """Initialise AlignedVQ modules; return False for modules that are not ours. Uses Transformers' init
    functions so values loaded from a checkpoint are left alone."""
    if isinstance(module, DualLinearProjection):
        init.normal_(module.proj.weight, std=module.init_std)
        init.zeros_(module.proj.bias)
        init.zeros_(module.gate)
        return True
    if isinstance(module, VectorQuantizer):
        init.normal_(module.codebook)
        init.ones_(module.cluster_size)
        # A checkpoint saved without EMA state restores the codebook only; embed_sum must then agree with it.
        init.copy_(module.embed_sum, module.codebook)
        return True
    return False


class LlavaAlignedVQModel(LlavaModel):
    """[`LlavaModel`] whose vision tower is split by ``self.alignedvq``."""

    config_class = AlignedVQConfig
    config: AlignedVQConfig

    def __init__(self, config: AlignedVQConfig):
        # Same submodules, same order and names as LlavaModel.__init__, plus `alignedvq`.
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.alignedvq = build_alignedvq_layer(config)
        self.post_init()

    def _init_weights(self, module):
        if not _init_alignedvq_weights(self, module):
            super()._init_weights(module)

    # ------------------------------------------------------------------------------------------------
    # input checks
    # ------------------------------------------------------------------------------------------------
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        vision = self.config.vision_config
        check_pixel_values(pixel_values, num_channels=vision.num_channels, image_size=vision.image_size)

    def check_indices(self, image_indices: torch.Tensor) -> torch.Tensor:
        """Validate indices from the wire and return them as ``(batch, tokens, codes_per_token)`` int64.

        Raises ``ValueError`` naming the problem: not a tensor, non-integer dtype, wrong number of dimensions,
        wrong token count or codes per token, or a value outside ``[0, codebook_size)``.
        """
        config = self.config
        codes = config.codes_per_token
        if not isinstance(image_indices, torch.Tensor):
            raise ValueError(f"image_indices must be a torch.Tensor, got {type(image_indices).__name__}.")
        expected_shape = "(batch_size, num_tokens)" if codes == 1 else f"(batch_size, num_tokens, {codes})"
        if image_indices.dim() != (2 if codes == 1 else 3):
            raise ValueError(
                f"image_indices must have shape {expected_shape} for {config.num_codebooks} codebook(s) x "
                f"{config.num_groups} group(s), got {tuple(image_indices.shape)}."
            )
        if codes > 1 and image_indices.shape[2] != codes:
            raise ValueError(f"image_indices carry {image_indices.shape[2]} codes per token, this model uses {codes}.")
        if image_indices.shape[1] != config.num_image_tokens:
            raise ValueError(
                f"image_indices hold {image_indices.shape[1]} tokens per image, this model's vision tower makes "
                f"{config.num_image_tokens}."
            )
        self.alignedvq.quantizer.validate_indices(image_indices)
        device = self.alignedvq.quantizer.codebook.device
        return image_indices.to(device=device, dtype=torch.long).reshape(*image_indices.shape[:2], codes)

    def _public_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return indices.squeeze(-1) if self.config.codes_per_token == 1 else indices

    # ------------------------------------------------------------------------------------------------
    # edge and cloud halves
    # ------------------------------------------------------------------------------------------------
    def edge_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Site features ``(batch, num_image_tokens, vision_hidden)``: the tower up to the split site."""
        self._check_pixel_values(pixel_values)
        config = self.config
        return edge_forward(self.vision_tower, pixel_values, config.split_layer, config.split_site)

    @torch.no_grad()
    def encode_edge(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """Edge half: pixels ``(batch, channels, height, width)`` -> indices ``(batch, tokens[, codes])``."""
        return self._public_indices(self.alignedvq.encode(self.edge_features(pixel_values)))

    def decode_indices(self, image_indices: torch.Tensor) -> torch.Tensor:
        """Cloud side of the link: indices -> recovered site features ``(batch, tokens, vision_hidden)``."""
        indices = self.check_indices(image_indices)
        return self.alignedvq.decode(indices, dtype=self.vision_tower.dtype)

    def _selected_layers(self, vision_feature_layer) -> list[int]:
        if vision_feature_layer is None or vision_feature_layer == self.config.vision_feature_layer:
            return self.config.feature_layer_indices()
        probe = AlignedVQConfig.from_llava_config(self.config, vision_feature_layer=vision_feature_layer)
        return probe.feature_layer_indices()

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_indices: torch.Tensor | None = None,
        **kwargs,
    ) -> AlignedVQImageOutput:
        """Projected image features from pixels (edge + cloud) or from indices (cloud only).

        Args:
            pixel_values: `(batch_size, channels, height, width)`.
            image_indices: `(batch_size, num_image_tokens[, codes_per_token])` int indices.
        """
        if (pixel_values is None) == (image_indices is None):
            raise ValueError("Pass exactly one of pixel_values and image_indices, not both or neither.")
        config = self.config
        commitment = perplexity = usage = None
        if pixel_values is not None:
            # Training: straight-through, EMA update, commitment loss. Evaluation: exactly encode + decode.
            vq = self.alignedvq(self.edge_features(pixel_values))
            recovered, indices = vq.features, vq.indices
            commitment, perplexity, usage = vq.commitment_loss, vq.perplexity, vq.usage
        else:
            indices = self.check_indices(image_indices)
            recovered = self.alignedvq.decode(indices, dtype=self.vision_tower.dtype)

        layers = self._selected_layers(vision_feature_layer)
        hidden = cloud_forward(self.vision_tower, recovered, config.split_layer, config.split_site, layers)
        strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
        selected = [hidden[index] for index in layers]
        if strategy == "default":
            selected = [h[:, 1:] for h in selected]
        selected = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
        image_features = self.multi_modal_projector(selected)
        return AlignedVQImageOutput(
            last_hidden_state=selected,
            pooler_output=list(image_features),
            image_indices=self._public_indices(indices),
            commitment_loss=commitment,
            codebook_perplexity=perplexity,
            codebook_usage=usage,
        )

    def embed_with_image(self, input_ids, inputs_embeds, image_output: AlignedVQImageOutput) -> torch.Tensor:
        """The prompt's input embeddings ``(batch_size, sequence_length, text_hidden_size)`` with the image
        placeholder tokens replaced by ``image_output``'s features (LLaVA's own placeholder check)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass input_ids or inputs_embeds with the image placeholder tokens.")
            inputs_embeds = self.get_input_embeddings()(input_ids)
        features = torch.cat(list(image_output.pooler_output)).to(inputs_embeds.device, inputs_embeds.dtype)
        mask = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=features)
        return inputs_embeds.masked_scatter(mask, features)


class LlavaAlignedVQForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA split by AlignedVQ for edge-cloud inference (arXiv 2411.05961).

    Example:

    ```python
    >>> model = LlavaAlignedVQForConditionalGeneration.from_llava("llava-hf/llava-1.5-7b-hf", codebook_size=4096)
    >>> model.init_codebook(calibration_pixel_batches)
    >>> indices = model.encode_edge(pixel_values)                  # on the device: (batch, 577) ints
    >>> out = model.forward_from_indices(indices, input_ids=input_ids, attention_mask=attention_mask)
    ```
    """

    config_class = AlignedVQConfig
    config: AlignedVQConfig
    # EMA statistics are saved only on request (to resume training); without them they restart from the codebook.
    _keys_to_ignore_on_load_missing = [r"model\.alignedvq\.quantizer\.(cluster_size|embed_sum)"]

    def __init__(self, config: AlignedVQConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = LlavaAlignedVQModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if not _init_alignedvq_weights(self, module):
            super()._init_weights(module)

    # ------------------------------------------------------------------------------------------------
    # conversion and codebook initialisation
    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_llava(
        cls,
        llava: LlavaForConditionalGeneration | str | os.PathLike,
        *,
        load_kwargs: dict | None = None,
        **vq_options,
    ) -> "LlavaAlignedVQForConditionalGeneration":
        """Add AlignedVQ to a LLaVA model.

        Args:
            llava: a loaded `LlavaForConditionalGeneration` (its modules are reused, not copied: do not keep
                using it afterwards), or a Hub id / local folder of a LLaVA checkpoint.
            load_kwargs: passed to `LlavaForConditionalGeneration.from_pretrained` when `llava` is a name
                (`dtype`, `device_map`, `revision`, ...). A checkpoint that leaves a weight of the model
                uninitialised is refused (`hub.CheckpointMismatchError`).
            **vq_options: `AlignedVQConfig` fields (`split_layer`, `split_site`, `codebook_size`, ...).

        Returns the model in the mode `llava` was in (a model loaded from a path is in eval mode). The new
        codebook is random: call `init_codebook` before finetuning.
        """
        if isinstance(llava, (str, os.PathLike)):
            from .hub import load_llava

            llava = load_llava(llava, **(load_kwargs or {}))
        if not isinstance(llava, LlavaForConditionalGeneration):
            raise TypeError(f"from_llava expects a LlavaForConditionalGeneration or a path, got {type(llava).__name__}.")
        config = AlignedVQConfig.from_llava_config(llava.config, **vq_options)
        with torch.device("meta"):
            model = cls(config)
        # Reuse the base modules as they are (weights, buffers, device placement, hooks); only the AlignedVQ
        # layer is new.
        for name in ("vision_tower", "multi_modal_projector", "language_model"):
            setattr(model.model, name, getattr(llava.model, name))
        model.lm_head = llava.lm_head
        reference = llava.model.vision_tower.get_input_embeddings().weight
        layer = build_alignedvq_layer(config)
        if reference.is_meta:
            layer = layer.to("meta")
        else:
            layer = layer.to(device=reference.device, dtype=reference.dtype)
        model.model.alignedvq = layer
        model.generation_config = llava.generation_config
        # The mode of the model given (eval after loading from a path): a forward in training mode moves the
        # EMA codebook, which must never happen by accident.
        return model.train(llava.training)

    @torch.no_grad()
    def init_codebook(self, pixel_batches, *, iters: int = 20, max_features: int = 200_000, seed: int = 0) -> int:
        """K-means initialisation of the codebook(s) on real site features (run before finetuning).

        Args:
            pixel_batches: iterable of `(batch, channels, height, width)` tensors (or dicts with
                `pixel_values`), e.g. a few hundred calibration images.
            iters: Lloyd iterations.
            max_features: at most this many token features are clustered (a random subset).
            seed: seeds the subset and the k-means initialisation.

        Returns the number of features clustered.
        """
        features = []
        for batch in pixel_batches:
            pixels = batch["pixel_values"] if isinstance(batch, dict) else batch
            pixels = pixels.to(self.model.vision_tower.device)
            features.append(self.model.edge_features(pixels).reshape(-1, self.config.vision_config.hidden_size))
        if not features:
            raise ValueError("init_codebook got no calibration batches.")
        features = torch.cat(features).float()
        if features.shape[0] > max_features:
            generator = torch.Generator().manual_seed(seed)
            features = features[torch.randperm(features.shape[0], generator=generator)[:max_features]]
        self.model.alignedvq.init_codebook(features.to(self.model.alignedvq.quantizer.codebook.device), iters=iters, seed=seed)
        return features.shape[0]

    # ------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a full or an adapter-only AlignedVQ checkpoint (see `hub.py`), strictly: a missing, unexpected,
        mis-shaped or mis-typed tensor, or a truncated weights file, raises `hub.CheckpointMismatchError`.
        A plain LLaVA checkpoint is refused with a pointer to `from_llava`."""
        # `from .hub import` (not `from . import hub`): Transformers copies remote-code files it finds that way.
        from .hub import load_adapter_checkpoint, load_full_checkpoint, read_alignedvq_config

        config = kwargs.pop("config", None)
        if not isinstance(config, AlignedVQConfig):
            config = read_alignedvq_config(pretrained_model_name_or_path, kwargs)
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
        include_ema_state: bool = False,
        eval_results: dict | None = None,
        **kwargs,
    ):
        """Save as a `"full"` or `"adapter"` checkpoint (default: `config.checkpoint_kind`), safetensors only.

        Args:
            checkpoint_kind: `"full"` writes every weight; `"adapter"` writes only the codebook, DLP and LoRA
                adapter plus a config naming `config.base_model_name_or_path` / `base_model_revision`.
            merge_lora: merge an injected LoRA adapter into the weights first (full kind).
            include_ema_state: also save the EMA statistics (to resume training); inference needs only the
                codebook.
            eval_results: `{"results": {name: value}, "datasets": [...], "model_name": ...}` for the model card.
        """
        from .hub import save_checkpoint

        kwargs.pop("safe_serialization", None)  # safetensors always
        return save_checkpoint(
            self,
            save_directory,
            kind=checkpoint_kind,
            merge_lora=merge_lora,
            include_ema_state=include_ema_state,
            eval_results=eval_results,
            save_function=LlavaForConditionalGeneration.save_pretrained,
            **kwargs,
        )

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # `push_to_hub` saves through `save_pretrained`, then replaces README.md with a generic card; put ours
        # back (titled with the repo's name) before the upload.
        from .hub import write_model_card

        write_model_card(self, Path(working_dir), kind=self.config.checkpoint_kind, model_name=repo_id.split("/")[-1])
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    # ------------------------------------------------------------------------------------------------
    # edge / cloud entry points
    # ------------------------------------------------------------------------------------------------
    def encode_edge(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """Run only the edge part: pixels -> indices `(batch, num_image_tokens[, codes_per_token])`."""
        return self.model.encode_edge(pixel_values)

    def decode_indices(self, image_indices: torch.Tensor) -> torch.Tensor:
        """Indices -> recovered site features `(batch, num_image_tokens, vision_hidden_size)` (cloud side)."""
        return self.model.decode_indices(image_indices)

    def forward_from_indices(self, image_indices: torch.Tensor, **kwargs) -> LlavaAlignedVQCausalLMOutputWithPast:
        """Cloud forward pass from the edge's indices; `kwargs` as for `forward` (input_ids, labels, ...)."""
        return self(image_indices=image_indices, **kwargs)

    def codebook_fingerprint(self) -> bytes:
        """16-byte fingerprint of the codebook(s); the wire format carries it so a cloud holding a different
        codebook refuses the frame instead of decoding garbage."""
        from .wire import codebook_fingerprint

        return codebook_fingerprint(self.model.alignedvq.quantizer.codebook)

    def edge_encoder(self, image_processor=None):
        """A standalone module with only what the edge needs; see `AlignedVQEdgeEncoder`. Pass the model's
        image processor to record its exact preprocessing (default: the vision tower family's standard one)."""
        from .edge import AlignedVQEdgeEncoder
        from .preprocess import ImagePreprocessing

        preprocessing = None
        if image_processor is not None:
            settings = getattr(image_processor, "image_processor", image_processor)  # a whole processor works too
            settings = settings if isinstance(settings, dict) else settings.to_dict()
            preprocessing = ImagePreprocessing.from_image_processor(settings)
        return AlignedVQEdgeEncoder.from_model(self, preprocessing)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *args,
        image_indices: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> LlavaAlignedVQCausalLMOutputWithPast | tuple:
        r"""
        [`LlavaForConditionalGeneration.forward`] with images given either as `pixel_values`
        `(batch_size, channels, height, width)` (edge and cloud in one pass) or as `image_indices`
        `(batch_size, num_image_tokens[, codes_per_token])` (cloud only). Every other argument goes to the
        parent unchanged.

        In training mode with `pixel_values` and `labels`, `loss = lm_loss + commitment_weight * commitment_loss`
        (Eq. 3). In evaluation mode the result equals `forward_from_indices(encode_edge(pixel_values))` exactly,
        loss included.
        """
        image = None
        if pixel_values is not None or image_indices is not None:
            image = self.model.get_image_features(
                pixel_values=pixel_values,
                image_indices=image_indices,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
            )
            kwargs["inputs_embeds"] = self.model.embed_with_image(input_ids, kwargs.get("inputs_embeds"), image)
            input_ids = None
        outputs = super().forward(input_ids, None, *args, return_dict=True, **kwargs)
        outputs = self._add_alignedvq_fields(outputs, image)
        use_dict = return_dict if return_dict is not None else self.config.return_dict
        return outputs if use_dict else outputs.to_tuple()

    def _add_alignedvq_fields(self, outputs, image: AlignedVQImageOutput | None) -> LlavaAlignedVQCausalLMOutputWithPast:
        """The parent's output, every field it set as it set it, plus ours."""
        fields = dict(outputs.items())
        lm_loss = outputs.loss
        commitment = getattr(image, "commitment_loss", None)
        if lm_loss is not None and commitment is not None:
            fields["loss"] = lm_loss + self.config.commitment_weight * commitment.to(lm_loss.dtype)
        return LlavaAlignedVQCausalLMOutputWithPast(
            **fields,
            lm_loss=lm_loss,
            commitment_loss=commitment,
            codebook_perplexity=getattr(image, "codebook_perplexity", None),
            codebook_usage=getattr(image, "codebook_usage", None),
            image_indices=getattr(image, "image_indices", None),
        )

    def generate(self, *args, image_indices: torch.Tensor | None = None, **kwargs):
        """`GenerationMixin.generate`, with the image as `pixel_values` or as `image_indices`.

        Pixels go through the edge and then the cloud, exactly as indices sent by a device would, in
        either mode (generation never updates the codebook).
        """
        pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is not None or image_indices is not None:
            if pixel_values is not None and image_indices is not None:
                raise ValueError("Pass images either as pixel_values or as image_indices, not both.")
            if image_indices is None:
                image_indices = self.encode_edge(pixel_values)
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            with torch.no_grad():
                image = self.model.get_image_features(image_indices=image_indices)
                kwargs["inputs_embeds"] = self.model.embed_with_image(input_ids, kwargs.get("inputs_embeds"), image)
        return super().generate(*args, **kwargs)

__all__ = [
    "AlignedVQImageOutput",
    "LlavaAlignedVQCausalLMOutputWithPast",
    "LlavaAlignedVQForConditionalGeneration",
    "LlavaAlignedVQModel",
]
