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

One file, as Transformers keeps one modeling file per model (output classes, the few helpers that derive our
signatures from the parent's, the two model classes); it runs past 500 lines because a third of it is the
docstrings a reader of a model file expects.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.auto import AutoModel
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaModelOutputWithPast,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)
from transformers.utils import cached_file

from .alignedvq_layer import AlignedVQLayer, AlignedVQLayerOutput
from .configuration_alignedvq import AlignedVQConfig
from .dlp import DualLinearProjection
from .quantizer import VectorQuantizer
from .split import check_pixel_values, cloud_forward, edge_forward, edge_hidden_states, recorded_attentions


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


@dataclass
class LlavaAlignedVQModelOutputWithPast(LlavaModelOutputWithPast):
    r"""
    [`LlavaModelOutputWithPast`] plus the AlignedVQ terms of [`AlignedVQImageOutput`] (`commitment_loss`,
    `codebook_perplexity`, `codebook_usage`, `image_indices`).
    """

    commitment_loss: torch.FloatTensor | None = None
    codebook_perplexity: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None
    image_indices: torch.LongTensor | None = None


def with_parent_signature(parent_forward, **ours):
    """Give the decorated ``forward(self, *args, **kwargs)`` the signature of ``parent_forward`` (the installed
    release's names, order and defaults) plus our keyword-only arguments ``ours`` (name -> default).

    Transformers reads ``forward``'s signature to decide what to pass: the Trainer keeps the dataset columns
    and finds the ``labels`` it names, generation checks ``logits_to_keep`` / ``inputs_embeds`` and validates
    model kwargs against it. Deriving it from the parent keeps it right on every release we support (the
    cache argument is ``cache`` in 5.24 and ``past_key_values`` before)."""
    parent = inspect.signature(parent_forward)
    named = [p for p in parent.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in parent.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default) for name, default in ours.items()]
    signature = parent.replace(parameters=named + extra + rest)

    def decorate(forward):
        forward.__signature__ = signature
        return forward

    return decorate


def bind_arguments(forward, model, args: tuple, kwargs: dict) -> dict:
    """``forward``'s arguments by name (positional ones included, ``**kwargs`` merged in), without ``self``."""
    bound = forward.__signature__.bind(model, *args, **kwargs)  # set by `with_parent_signature`
    named = {name: value for name, value in bound.arguments.items() if name != "self"}
    named.update(named.pop("kwargs", {}))
    return named


def image_output_fields(output_class, image: AlignedVQImageOutput | None) -> dict:
    """The parent output's own image field, filled: ``image_outputs`` (Transformers >= 5.24) or
    ``image_hidden_states`` (before), whichever the installed class has."""
    if image is None:
        return {}
    names = {field.name for field in dataclasses.fields(output_class)}
    if "image_outputs" in names:
        return {"image_outputs": image}
    if "image_hidden_states" in names:
        return {"image_hidden_states": torch.stack(list(image.pooler_output))}
    return {}


def alignedvq_fields(image: AlignedVQImageOutput | None) -> dict:
    return {
        name: getattr(image, name, None)
        for name in ("commitment_loss", "codebook_perplexity", "codebook_usage", "image_indices")
    }


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


def _initialises_like_transformers() -> bool:
    """Our answer to `PreTrainedModel.is_custom_code`: False. Transformers treats classes outside its own
    package as custom code and then skips `_init_weights` for modules without parameters of their own, in case
    custom code writes weights in place; CLIP initialises its attention and MLP projections from those container
    modules, so `init_weights()` on a model built on the meta device gave the vision tower the wrong scale. Our
    `_init_weights` uses Transformers' init functions throughout, which is what the check protects."""
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

    @classmethod
    def is_custom_code(cls) -> bool:
        return _initialises_like_transformers()

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
        return_dict: bool | None = None,
        **kwargs,
    ) -> AlignedVQImageOutput | tuple:
        """Projected image features from pixels (edge + cloud) or from indices (cloud only).

        Args:
            pixel_values: `(batch_size, channels, height, width)`.
            image_indices: `(batch_size, num_image_tokens[, codes_per_token])` int indices.
            return_dict: `False` (or `config.return_dict = False`) returns the fields as a tuple, as LLaVA's does.
            output_hidden_states / output_attentions: the vision tower's per-layer outputs (or the vision
                config's flags). Hidden states up to the split block's input are the edge's, before
                quantization, and exist only when the image came as pixels; from indices the tuple holds the
                cloud's, from hidden state `split_layer + 1` on. Attentions likewise (eager attention only).

        `last_hidden_state` holds the selected features, `pooler_output` one projected
        `(num_selected_tokens, text_hidden_size)` tensor per image.
        """
        if (pixel_values is None) == (image_indices is None):
            raise ValueError("Pass exactly one of pixel_values and image_indices, not both or neither.")
        config = self.config
        want_hidden, want_attentions = (self._vision_flag(kwargs, name) for name in ("output_hidden_states", "output_attentions"))
        layers = self._selected_layers(vision_feature_layer)
        last = config.vision_config.num_hidden_layers
        run = list(range(config.split_layer + 1, last + 1)) if want_hidden or want_attentions else layers
        with recorded_attentions(self.vision_tower, enabled=want_attentions) as attentions:
            vq = self._site_features(pixel_values, image_indices)
            hidden = cloud_forward(self.vision_tower, vq.features, config.split_layer, config.split_site, run)
        selected = self._select(hidden, layers, vision_feature_select_strategy)
        output = AlignedVQImageOutput(
            last_hidden_state=selected,
            pooler_output=list(self.multi_modal_projector(selected)),
            hidden_states=self._tower_hidden_states(pixel_values, hidden) if want_hidden else None,
            attentions=tuple(attentions) if want_attentions else None,
            image_indices=self._public_indices(vq.indices),
            commitment_loss=vq.commitment_loss,
            codebook_perplexity=vq.perplexity,
            codebook_usage=vq.usage,
        )
        return output if (return_dict if return_dict is not None else config.return_dict) else output.to_tuple()

    def _vision_flag(self, kwargs: dict, name: str) -> bool:
        value = kwargs.get(name)
        return bool(value if value is not None else getattr(self.config.vision_config, name, False))

    def _site_features(self, pixel_values, image_indices) -> AlignedVQLayerOutput:
        """Recovered site features: from pixels (training: straight-through, EMA update, commitment loss;
        evaluation: exactly encode + decode) or decoded from indices."""
        if pixel_values is not None:
            return self.alignedvq(self.edge_features(pixel_values))
        indices = self.check_indices(image_indices)
        return AlignedVQLayerOutput(self.alignedvq.decode(indices, dtype=self.vision_tower.dtype), indices)

    def _select(self, hidden: dict, layers: list[int], strategy: str | None) -> torch.Tensor:
        """LLaVA's selection: the feature layer(s) concatenated, the CLS token dropped for "default"."""
        selected = [hidden[index] for index in layers]
        if (strategy or self.config.vision_feature_select_strategy) == "default":
            selected = [h[:, 1:] for h in selected]
        return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)

    def _tower_hidden_states(self, pixel_values, cloud: dict) -> tuple[torch.Tensor, ...]:
        edge = edge_hidden_states(self.vision_tower, pixel_values, self.config.split_layer) if pixel_values is not None else []
        return tuple(edge) + tuple(cloud[index] for index in sorted(cloud))

    def take_image(self, arguments: dict) -> AlignedVQImageOutput | None:
        """Pop the image (``pixel_values`` or ``image_indices``) from a forward's ``arguments`` and put its
        features into ``arguments["inputs_embeds"]`` (``input_ids`` set to ``None``), so the parent's forward
        runs the language model on them unchanged. Returns the image output, or ``None`` without an image."""
        pixel_values, image_indices = arguments.pop("pixel_values", None), arguments.pop("image_indices", None)
        if pixel_values is None and image_indices is None:
            return None
        image = self.get_image_features(
            pixel_values=pixel_values,
            image_indices=image_indices,
            vision_feature_layer=arguments.get("vision_feature_layer"),
            vision_feature_select_strategy=arguments.get("vision_feature_select_strategy"),
        )
        arguments["inputs_embeds"] = self.embed_with_image(arguments.get("input_ids"), arguments.get("inputs_embeds"), image)
        arguments["input_ids"] = None
        return image

    @with_parent_signature(LlavaModel.forward, image_indices=None)
    def forward(self, *args, **kwargs) -> LlavaAlignedVQModelOutputWithPast | tuple:
        r"""
        [`LlavaModel.forward`] (same arguments), with the image given as `pixel_values`
        `(batch_size, channels, height, width)` or as `image_indices`
        `(batch_size, num_image_tokens[, codes_per_token])`.
        """
        arguments = bind_arguments(LlavaAlignedVQModel.forward, self, args, kwargs)
        return_dict = arguments.pop("return_dict", None)
        image = self.take_image(arguments)
        outputs = super().forward(**arguments, return_dict=True)
        fields = {**dict(outputs.items()), **image_output_fields(type(outputs), image), **alignedvq_fields(image)}
        outputs = LlavaAlignedVQModelOutputWithPast(**fields)
        return outputs if (return_dict if return_dict is not None else self.config.return_dict) else outputs.to_tuple()

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


try:
    from transformers_alignedvq.checkpoints.mixin import AlignedVQCheckpointMixin as _CheckpointMixin
except ModuleNotFoundError as missing:  # remote code without the package: Transformers' own loading and saving
    if missing.name != "transformers_alignedvq":
        raise

    class _CheckpointMixin:
        """What `from_llava` needs when the package (strict checkpoints, the edge files, cards) is absent, and a
        clear refusal of the adapter-only kind, which only the package can compose with its base. The other
        families' classes, shipped with this file, use it too."""

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
            config = kwargs.get("config")
            if config is None and pretrained_model_name_or_path is not None:
                config = cls.config_class.from_pretrained(pretrained_model_name_or_path)
            if getattr(config, "checkpoint_kind", "full") == "adapter":
                raise OSError(
                    f"{pretrained_model_name_or_path} is an adapter-only AlignedVQ checkpoint (AlignedVQ weights and "
                    "LoRA for a base model named in its config): `pip install transformers-alignedvq` to load it"
                )
            if cached_file(pretrained_model_name_or_path, "lora/adapter_config.json",
                           _raise_exceptions_for_missing_entries=False) is not None:
                raise OSError(
                    f"{pretrained_model_name_or_path} keeps an unmerged LoRA in lora/, which only the package applies: "
                    "`pip install transformers-alignedvq`, or save the model with merge_lora=True"
                )
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

        @classmethod
        def _load_llava(cls, path, **load_kwargs):
            return LlavaForConditionalGeneration.from_pretrained(path, **load_kwargs)

        @staticmethod
        def _base_reference(path, revision):
            return str(path), revision


class LlavaAlignedVQForConditionalGeneration(_CheckpointMixin, LlavaForConditionalGeneration, GenerationMixin):
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
    # A full checkpoint keeps an unmerged LoRA in its weights too (for the Trainer); the package applies it from
    # lora/ after the load, strictly, so the parent's loader must not report those tensors as unexpected.
    _keys_to_ignore_on_load_unexpected = [r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\."]

    def __init__(self, config: AlignedVQConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = LlavaAlignedVQModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if not _init_alignedvq_weights(self, module):
            super()._init_weights(module)

    @classmethod
    def is_custom_code(cls) -> bool:
        return _initialises_like_transformers()

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
        base = None
        if isinstance(llava, (str, os.PathLike)):
            base = cls._base_reference(llava, (load_kwargs or {}).get("revision"))
            llava = cls._load_llava(llava, **(load_kwargs or {}))
        if not isinstance(llava, LlavaForConditionalGeneration):
            raise TypeError(f"from_llava expects a LlavaForConditionalGeneration or a path, got {type(llava).__name__}.")
        config = AlignedVQConfig.from_llava_config(llava.config, **vq_options)
        if base is not None and not config.base_model_name_or_path:  # named for the card and adapter checkpoints
            config.base_model_name_or_path, config.base_model_revision = base
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
            features.append(self.model.edge_features(pixels))
        return self.model.alignedvq.fit_codebook(features, iters=iters, max_features=max_features, seed=seed)

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

    @with_parent_signature(LlavaForConditionalGeneration.forward, image_indices=None)
    def forward(self, *args, **kwargs) -> LlavaAlignedVQCausalLMOutputWithPast | tuple:
        r"""
        [`LlavaForConditionalGeneration.forward`] (same arguments, names and defaults as the installed release),
        with images given either as `pixel_values` `(batch_size, channels, height, width)` (edge and cloud in
        one pass) or as `image_indices` `(batch_size, num_image_tokens[, codes_per_token])` (cloud only).

        In training mode with `pixel_values` and `labels`, `loss = lm_loss + commitment_weight * commitment_loss`
        (Eq. 3). In evaluation mode the result equals `forward_from_indices(encode_edge(pixel_values))` exactly,
        loss included.
        """
        arguments = bind_arguments(LlavaAlignedVQForConditionalGeneration.forward, self, args, kwargs)
        return_dict = arguments.pop("return_dict", None)
        image = self.model.take_image(arguments)
        outputs = super().forward(**arguments, return_dict=True)
        outputs = self._add_alignedvq_fields(outputs, image)
        return outputs if (return_dict if return_dict is not None else self.config.return_dict) else outputs.to_tuple()

    def _add_alignedvq_fields(self, outputs, image: AlignedVQImageOutput | None) -> LlavaAlignedVQCausalLMOutputWithPast:
        """The parent's output, every field it set as it set it, plus ours."""
        if image is None and isinstance(outputs.get("image_outputs"), AlignedVQImageOutput):
            image = outputs["image_outputs"]  # passed in as `mm_encoder_outputs` (generation does)
        fields = {**dict(outputs.items()), **image_output_fields(type(outputs), image), **alignedvq_fields(image)}
        lm_loss = outputs.loss
        commitment = fields["commitment_loss"]
        if lm_loss is not None and commitment is not None:
            fields["loss"] = lm_loss + self.config.commitment_weight * commitment.to(lm_loss.dtype)
        return LlavaAlignedVQCausalLMOutputWithPast(**fields, lm_loss=lm_loss)

    @with_parent_signature(LlavaForConditionalGeneration.prepare_inputs_for_generation, image_indices=None)
    def prepare_inputs_for_generation(self, *args, **kwargs):
        """LLaVA's preparation (same signature: generation reads it); the image's indices, like its pixels, go
        to the first step only, or to every step without a cache."""
        arguments = bind_arguments(LlavaAlignedVQForConditionalGeneration.prepare_inputs_for_generation, self, args, kwargs)
        image_indices = arguments.pop("image_indices", None)
        inputs = super().prepare_inputs_for_generation(**arguments)
        if image_indices is not None and (arguments.get("is_first_iteration") or not arguments.get("use_cache", True)):
            inputs["image_indices"] = image_indices
        return inputs

    def generate(self, *args, image_indices: torch.Tensor | None = None, **kwargs):
        """`GenerationMixin.generate`, with the image as `pixel_values` or as `image_indices`.

        Pixels are turned into indices first, as a device would send them: the result is the same as from
        pixels in evaluation mode, and generation never moves the EMA codebook, whatever the model's mode.
        """
        pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is not None:
            if image_indices is not None:
                raise ValueError("Pass images either as pixel_values or as image_indices, not both.")
            image_indices = self.encode_edge(pixel_values)
        if image_indices is not None:
            kwargs.update(self._image_for_generation(image_indices))
        return super().generate(*args, **kwargs)

    def _image_for_generation(self, image_indices: torch.Tensor) -> dict:
        """Generation's own channel for an image: from Transformers 5.24 on, `generate` encodes images before
        the prefill into ``mm_encoder_outputs`` (by calling `get_image_features` on pixels), which every
        decoding mode then carries (beams expand it, assistants and chunked prefill slice it); we hand it the
        image decoded from its indices the same way. Earlier releases take ``image_indices`` to the first
        step through `prepare_inputs_for_generation`."""
        if "mm_encoder_outputs" not in inspect.signature(LlavaForConditionalGeneration.forward).parameters:
            return {"image_indices": image_indices}
        with torch.no_grad():
            return {"mm_encoder_outputs": {"image": self.model.get_image_features(image_indices=image_indices)}}

__all__ = [
    "AlignedVQImageOutput",
    "LlavaAlignedVQCausalLMOutputWithPast",
    "LlavaAlignedVQModelOutputWithPast",
    "LlavaAlignedVQForConditionalGeneration",
    "LlavaAlignedVQModel",
]
