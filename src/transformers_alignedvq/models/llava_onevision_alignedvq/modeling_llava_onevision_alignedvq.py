"""LLaVA-OneVision with an AlignedVQ split inside its SigLIP vision tower.

`LlavaOnevisionAlignedVQForConditionalGeneration` is `LlavaOnevisionForConditionalGeneration` with one extra
submodule, ``model.alignedvq``; every base parameter keeps its name.

A OneVision image is a base view plus any-resolution tiles (the processor picks the tile grid from the image
size and ``image_grid_pinpoints``); the tower runs every tile on its own. The edge therefore sends indices per
tile, ``(num_tiles, tokens_per_tile[, codes])`` for the whole batch, tiles in the tower's order (image by image,
base view first), and the cloud needs each image's ``image_sizes`` to know how many tiles belong to it and how
to lay them out (`LlavaOnevisionAdapter.geometry`).

How it extends OneVision: ``model.get_image_features`` is overridden to run the split tower, from pixels or
from indices; the stock forward calls it for pixels, and images given as indices enter through the parent's
own pre-encoded channel ``mm_encoder_outputs`` (which generation also uses), so the language model, the
packing of tiles (un-padding, the anyres_max_9 downsample, newlines) and the placeholder checks are OneVision's.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, LlavaOnevisionForConditionalGeneration
from transformers.models.auto import AutoModel
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionCausalLMOutputWithPast,
    LlavaOnevisionModel,
    LlavaOnevisionMultiModalProjector,
    LlavaOnevisionPreTrainedModel,
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from ..family import FamilyAdapter, FrameGeometry, patch_grid
from ..llava_alignedvq.alignedvq_layer import AlignedVQLayerOutput
from ..llava_alignedvq.modeling_alignedvq import (
    AlignedVQImageOutput,
    _init_alignedvq_weights,
    alignedvq_fields,
    bind_arguments,
    build_alignedvq_layer,
    with_parent_signature,
)
from ..llava_alignedvq.split import check_pixel_values
from .configuration_llava_onevision_alignedvq import LlavaOnevisionAlignedVQConfig

_PARENT_FORWARD = inspect.signature(LlavaOnevisionForConditionalGeneration.forward)
_HAS_MM_ENCODER_OUTPUTS = "mm_encoder_outputs" in _PARENT_FORWARD.parameters


class LlavaOnevisionAdapter(FamilyAdapter):
    """LLaVA-OneVision: SigLIP tiles (base view first, then the any-resolution grid row by row)."""

    name = "llava_onevision"
    parent_classes = ("LlavaOnevisionForConditionalGeneration",)
    model_types = ("llava_onevision",)

    @classmethod
    def geometry(cls, config, image_sizes: Sequence, batch_num_images: Sequence[int] | None = None) -> FrameGeometry:
        """OneVision's own rule (`LlavaOnevisionModel.get_image_features`): an image alone in its sample is
        tiled by the best-fitting pinpoint plus its base view; in a multi-image sample each image is its base
        view only. Counts come from Transformers' own functions, so both ends agree on one release."""
        if image_sizes is None:
            raise ValueError("LLaVA-OneVision needs image_sizes ((height, width) per image) to lay out its tiles.")
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(s) for s in image_sizes]
        if any(len(size) != 2 or min(size) < 1 for size in sizes):
            raise ValueError(f"image_sizes must be (height, width) pairs of positive ints, got {sizes}.")
        if batch_num_images is None:
            tiled = [True] * len(sizes)
        else:
            tiled = [n == 1 for n in batch_num_images for _ in range(n)]
        if len(tiled) != len(sizes):
            raise ValueError(f"batch_num_images sums to {len(tiled)} images, image_sizes has {len(sizes)}.")
        tile, pinpoints = config.vision_config.image_size, config.image_grid_pinpoints
        counts = tuple(image_size_to_num_patches(size, pinpoints, tile) if t else 1 for size, t in zip(sizes, tiled))
        grids = tuple(
            tuple(get_anyres_image_grid_shape(size, pinpoints, tile)) if t else (0, 0) for size, t in zip(sizes, tiled)
        )
        return FrameGeometry(counts, grids, patch_grid(config.vision_config), config.tokens_per_tile)

    @classmethod
    def convert(cls, vlm, **vq_options) -> nn.Module:
        return LlavaOnevisionAlignedVQForConditionalGeneration.from_onevision(vlm, **vq_options)


@dataclass
class LlavaOnevisionAlignedVQCausalLMOutputWithPast(LlavaOnevisionCausalLMOutputWithPast):
    r"""
    [`LlavaOnevisionCausalLMOutputWithPast`] plus the AlignedVQ terms of [`AlignedVQImageOutput`].

    loss (`torch.FloatTensor` of shape `()`, *optional*):
        `lm_loss + commitment_weight * commitment_loss` when `labels` are given.
    lm_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Next-token loss alone.
    image_indices (`torch.LongTensor` of shape `(num_tiles, tokens_per_tile[, codes_per_token])`):
        What crossed (or would cross) the link, tiles in the tower's order.
    """

    lm_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    codebook_perplexity: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None
    image_indices: torch.LongTensor | None = None


class LlavaOnevisionAlignedVQModel(LlavaOnevisionModel):
    """[`LlavaOnevisionModel`] whose vision tower is split by ``self.alignedvq``."""

    config_class = LlavaOnevisionAlignedVQConfig
    config: LlavaOnevisionAlignedVQConfig

    def __init__(self, config: LlavaOnevisionAlignedVQConfig):
        # LlavaOnevisionModel.__init__'s submodules, same order and names, plus `alignedvq`.
        LlavaOnevisionPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaOnevisionMultiModalProjector(config)
        embed_std = 1 / config.text_config.hidden_size**0.5
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=self.dtype) * embed_std)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = AutoModel.from_config(config.text_config)
        self.alignedvq = build_alignedvq_layer(config)
        self.post_init()

    def _init_weights(self, module):
        if not _init_alignedvq_weights(self, module):
            super()._init_weights(module)

    @classmethod
    def is_custom_code(cls) -> bool:
        return False  # our init uses Transformers' init functions; see the LLaVA model's note

    def frame_geometry(self, image_sizes, batch_num_images=None) -> FrameGeometry:
        return LlavaOnevisionAdapter.geometry(self.config, image_sizes, batch_num_images)

    def pixel_tiles(self, pixel_values: torch.Tensor, geometry: FrameGeometry) -> torch.Tensor:
        """The tower's batch ``(num_tiles, channels, size, size)`` from the processor's padded
        ``(images, max_tiles, channels, size, size)`` or already-flat tiles."""
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(geometry.tiles_per_image):
                raise ValueError(f"pixel_values hold {pixel_values.shape[0]} images, image_sizes "
                                 f"{len(geometry.tiles_per_image)}.")
            if pixel_values.shape[1] < max(geometry.tiles_per_image):
                raise ValueError(f"pixel_values hold {pixel_values.shape[1]} tiles per image; image_sizes need up to "
                                 f"{max(geometry.tiles_per_image)}.")
            pixel_values = torch.cat([image[:count] for image, count in zip(pixel_values, geometry.tiles_per_image)])
        vision = self.config.vision_config
        check_pixel_values(pixel_values, num_channels=vision.num_channels, image_size=vision.image_size)
        if pixel_values.shape[0] != geometry.num_tiles:
            raise ValueError(f"pixel_values hold {pixel_values.shape[0]} tiles; image_sizes make {geometry.num_tiles}.")
        return pixel_values

    def edge_features(self, pixel_tiles: torch.Tensor) -> torch.Tensor:
        """Site features ``(num_tiles, tokens_per_tile, vision_hidden)`` of flat tiles."""
        vision = self.config.vision_config
        check_pixel_values(pixel_tiles, num_channels=vision.num_channels, image_size=vision.image_size)
        config = self.config
        return LlavaOnevisionAdapter.edge(self.vision_tower, pixel_tiles, config.split_layer, config.split_site)

    @torch.no_grad()
    def encode_edge(self, pixel_values, image_sizes, batch_num_images=None) -> torch.LongTensor:
        """Edge half: pixels -> indices ``(num_tiles, tokens_per_tile[, codes_per_token])``."""
        tiles = self.pixel_tiles(pixel_values, self.frame_geometry(image_sizes, batch_num_images))
        return self._public_indices(self.alignedvq.encode(self.edge_features(tiles)))

    def check_indices(self, image_indices, geometry: FrameGeometry) -> torch.Tensor:
        """Indices from the wire as ``(num_tiles, tokens_per_tile, codes_per_token)`` int64, checked against the
        geometry; `ValueError` naming the problem."""
        codes = self.config.codes_per_token
        if not isinstance(image_indices, torch.Tensor):
            raise ValueError(f"image_indices must be a torch.Tensor, got {type(image_indices).__name__}.")
        expected = (geometry.num_tiles, geometry.tokens_per_tile) + ((codes,) if codes > 1 else ())
        if tuple(image_indices.shape) != expected:
            raise ValueError(f"image_indices must have shape {expected} (tiles, tokens per tile[, codes]) for these "
                             f"image_sizes, got {tuple(image_indices.shape)}.")
        self.alignedvq.quantizer.validate_indices(image_indices)
        device = self.alignedvq.quantizer.codebook.device
        return image_indices.to(device=device, dtype=torch.long).reshape(*expected[:2], codes)

    def _public_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return indices.squeeze(-1) if self.config.codes_per_token == 1 else indices

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.LongTensor | None = None,
        image_indices: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AlignedVQImageOutput | tuple:
        r"""
        OneVision's image features through the split tower, from `pixel_values` (`(images, max_tiles, channels,
        size, size)` or flat tiles) or from `image_indices` (`(num_tiles, tokens_per_tile[, codes])`), with the
        `image_sizes` `(images, 2)` both ends share. `pooler_output` holds one packed
        `(image_tokens, text_hidden_size)` tensor per image, as the stock model's does.
        """
        if (pixel_values is None) == (image_indices is None):
            raise ValueError("Pass exactly one of pixel_values and image_indices, not both or neither.")
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            raise ValueError("The split OneVision tower does not return per-layer vision outputs yet.")
        config = self.config
        geometry = self.frame_geometry(image_sizes, batch_num_images)
        vq = self._site_features(pixel_values, image_indices, geometry)
        layers = self._selected_layers(vision_feature_layer)
        tower = self.vision_tower
        hidden = LlavaOnevisionAdapter.cloud(tower, vq.features, config.split_layer, config.split_site, layers)
        selected = torch.cat([hidden[index] for index in layers], dim=-1)
        if (vision_feature_select_strategy or config.vision_feature_select_strategy) == "default":
            selected = selected[:, 1:]  # as the stock model does, although SigLIP has no CLS token
        projected = torch.split(self.multi_modal_projector(selected), list(geometry.tiles_per_image), dim=0)
        packed, _ = self.pack_image_features(projected, image_sizes, image_newline=self.image_newline,
                                             vision_aspect_ratio=vision_aspect_ratio or config.vision_aspect_ratio)
        output = AlignedVQImageOutput(
            last_hidden_state=selected,
            pooler_output=list(packed),
            image_indices=self._public_indices(vq.indices),
            commitment_loss=vq.commitment_loss,
            codebook_perplexity=vq.perplexity,
            codebook_usage=vq.usage,
        )
        return output if (return_dict if return_dict is not None else config.return_dict) else output.to_tuple()

    def _selected_layers(self, vision_feature_layer) -> list[int]:
        if vision_feature_layer is None or vision_feature_layer == self.config.vision_feature_layer:
            return self.config.feature_layer_indices()
        probe = LlavaOnevisionAlignedVQConfig.from_onevision_config(
            self.config, vision_feature_layer=vision_feature_layer
        )
        return probe.feature_layer_indices()

    def _site_features(self, pixel_values, image_indices, geometry: FrameGeometry) -> AlignedVQLayerOutput:
        """From pixels: the AlignedVQ layer's forward (training: straight-through, EMA, commitment loss;
        evaluation: exactly encode + decode). From indices: decoded."""
        if pixel_values is not None:
            return self.alignedvq(self.edge_features(self.pixel_tiles(pixel_values, geometry)))
        indices = self.check_indices(image_indices, geometry)
        return AlignedVQLayerOutput(self.alignedvq.decode(indices, dtype=self.vision_tower.dtype), indices)


def refuse_videos(arguments: dict) -> None:
    """Videos would run the stock, unsplit tower (`get_video_features`): refused rather than silently not split."""
    if arguments.get("pixel_values_videos") is not None:
        raise ValueError("LLaVA-OneVision with AlignedVQ splits images only; pixel_values_videos is not supported.")


class LlavaOnevisionAlignedVQForConditionalGeneration(LlavaOnevisionForConditionalGeneration, GenerationMixin):
    """LLaVA-OneVision split by AlignedVQ for edge-cloud inference.

    Example:

    ```python
    >>> model = LlavaOnevisionAlignedVQForConditionalGeneration.from_onevision(onevision, codebook_size=4096)
    >>> model.init_codebook([{"pixel_values": pixels, "image_sizes": sizes}])
    >>> indices = model.encode_edge(pixels, sizes)               # on the device: (num_tiles, 729) ints
    >>> out = model.forward_from_indices(indices, image_sizes=sizes, input_ids=input_ids)
    >>> tokens = model.generate(input_ids=input_ids, image_indices=indices, image_sizes=sizes)
    ```
    """

    config_class = LlavaOnevisionAlignedVQConfig
    config: LlavaOnevisionAlignedVQConfig
    _keys_to_ignore_on_load_missing = [r"model\.alignedvq\.quantizer\.(cluster_size|embed_sum)"]

    def __init__(self, config: LlavaOnevisionAlignedVQConfig):
        if not _HAS_MM_ENCODER_OUTPUTS:
            raise ImportError("LLaVA-OneVision with AlignedVQ needs transformers>=5.19 (forward's mm_encoder_outputs).")
        LlavaOnevisionPreTrainedModel.__init__(self, config)
        self.model = LlavaOnevisionAlignedVQModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if not _init_alignedvq_weights(self, module):
            super()._init_weights(module)

    @classmethod
    def is_custom_code(cls) -> bool:
        return False

    @classmethod
    def from_onevision(
        cls, onevision: LlavaOnevisionForConditionalGeneration | str | os.PathLike, *, load_kwargs: dict | None = None,
        **vq_options,
    ) -> "LlavaOnevisionAlignedVQForConditionalGeneration":
        """Add AlignedVQ to a LLaVA-OneVision model (a loaded one, whose modules are reused, or a path / Hub id
        loaded with `load_kwargs`). Returns the model in the mode the base was in; the codebook is random."""
        base = None
        if isinstance(onevision, (str, os.PathLike)):
            base = str(onevision), (load_kwargs or {}).get("revision")
            onevision = LlavaOnevisionForConditionalGeneration.from_pretrained(onevision, **(load_kwargs or {}))
        if not isinstance(onevision, LlavaOnevisionForConditionalGeneration) or hasattr(onevision.model, "alignedvq"):
            raise TypeError(f"from_onevision expects a LlavaOnevisionForConditionalGeneration or a path, got "
                            f"{type(onevision).__name__}.")
        config = LlavaOnevisionAlignedVQConfig.from_onevision_config(onevision.config, **vq_options)
        if base is not None and not config.base_model_name_or_path:
            config.base_model_name_or_path, config.base_model_revision = base
        with torch.device("meta"):
            model = cls(config)
        for name in ("vision_tower", "multi_modal_projector", "language_model", "image_newline"):
            setattr(model.model, name, getattr(onevision.model, name))
        model.lm_head = onevision.lm_head
        reference = onevision.model.vision_tower.get_input_embeddings().weight
        layer = build_alignedvq_layer(config)
        model.model.alignedvq = layer.to("meta") if reference.is_meta else layer.to(reference.device, reference.dtype)
        model.generation_config = onevision.generation_config
        return model.train(onevision.training)

    @torch.no_grad()
    def init_codebook(self, batches, *, iters: int = 20, max_features: int = 200_000, seed: int = 0) -> int:
        """K-means initialisation of the codebook(s) on real site features of every tile.

        Args:
            batches: iterable of dicts with `pixel_values` and `image_sizes` (the processor's output), or of
                flat tile tensors `(num_tiles, channels, size, size)`.
            iters, max_features, seed: as for the LLaVA model's `init_codebook`.

        Returns the number of token features clustered.
        """
        features = []
        for batch in batches:
            if isinstance(batch, dict):
                geometry = self.model.frame_geometry(batch["image_sizes"], batch.get("batch_num_images"))
                tiles = self.model.pixel_tiles(batch["pixel_values"], geometry)
            else:
                tiles = batch
            tiles = tiles.to(self.model.vision_tower.device)
            features.append(self.model.edge_features(tiles).reshape(-1, self.config.vision_config.hidden_size))
        if not features:
            raise ValueError("init_codebook got no calibration batches.")
        features = torch.cat(features).float()
        if features.shape[0] > max_features:
            generator = torch.Generator().manual_seed(seed)
            features = features[torch.randperm(features.shape[0], generator=generator)[:max_features]]
        quantizer = self.model.alignedvq.quantizer
        self.model.alignedvq.init_codebook(features.to(quantizer.codebook.device), iters=iters, seed=seed)
        return features.shape[0]

    def encode_edge(self, pixel_values, image_sizes, batch_num_images=None) -> torch.LongTensor:
        """Edge half: pixels -> indices `(num_tiles, tokens_per_tile[, codes_per_token])`."""
        return self.model.encode_edge(pixel_values, image_sizes, batch_num_images)

    def frame_geometry(self, image_sizes, batch_num_images=None) -> FrameGeometry:
        """Tiles per image, tile grid and tokens per tile for images of `image_sizes` `(images, 2)`."""
        return self.model.frame_geometry(image_sizes, batch_num_images)

    def forward_from_indices(
        self, image_indices: torch.Tensor, **kwargs
    ) -> LlavaOnevisionAlignedVQCausalLMOutputWithPast:
        """Cloud forward pass from the edge's indices; `kwargs` as for `forward` (`image_sizes` required)."""
        return self(image_indices=image_indices, **kwargs)

    @with_parent_signature(LlavaOnevisionForConditionalGeneration.forward, image_indices=None)
    def forward(self, *args, **kwargs) -> LlavaOnevisionAlignedVQCausalLMOutputWithPast | tuple:
        r"""
        [`LlavaOnevisionForConditionalGeneration.forward`] (same arguments), with the image given as
        `pixel_values` (edge and cloud in one pass) or as `image_indices` `(num_tiles, tokens_per_tile[, codes])`
        (cloud only), `image_sizes` `(images, 2)` either way. In evaluation mode the result from pixels equals
        `forward_from_indices(encode_edge(pixel_values, image_sizes), image_sizes=image_sizes)` exactly.
        """
        arguments = bind_arguments(LlavaOnevisionAlignedVQForConditionalGeneration.forward, self, args, kwargs)
        refuse_videos(arguments)
        return_dict = arguments.pop("return_dict", None)
        image_indices = arguments.pop("image_indices", None)
        if image_indices is not None:
            if arguments.get("pixel_values") is not None:
                raise ValueError("Pass images either as pixel_values or as image_indices, not both.")
            encoded = dict(arguments.get("mm_encoder_outputs") or {})
            encoded["image"] = self._image_from_indices(image_indices, arguments)
            arguments["mm_encoder_outputs"] = encoded
        outputs = super().forward(**arguments, return_dict=True)
        image = outputs.get("image_outputs")
        ours = alignedvq_fields(image if isinstance(image, AlignedVQImageOutput) else None)
        fields = {**dict(outputs.items()), **ours}
        lm_loss, commitment = outputs.get("loss"), fields["commitment_loss"]
        if lm_loss is not None and commitment is not None:
            fields["loss"] = lm_loss + self.config.commitment_weight * commitment.to(lm_loss.dtype)
        outputs = LlavaOnevisionAlignedVQCausalLMOutputWithPast(**fields, lm_loss=lm_loss)
        return outputs if (return_dict if return_dict is not None else self.config.return_dict) else outputs.to_tuple()

    def _image_from_indices(self, image_indices: torch.Tensor, arguments: dict) -> AlignedVQImageOutput:
        names = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio",
                 "batch_num_images")
        return self.model.get_image_features(image_indices=image_indices, return_dict=True,
                                             **{name: arguments.get(name) for name in names})

    def generate(self, *args, image_indices: torch.Tensor | None = None, **kwargs):
        """`GenerationMixin.generate` with the image as `pixel_values` or `image_indices`, plus `image_sizes`.

        Pixels are turned into indices first, as a device would send them, so the result is the same from
        either and generation never moves the EMA codebook. The decoded image enters through
        `mm_encoder_outputs`, the channel generation itself uses for pre-encoded images.
        """
        refuse_videos(kwargs)
        pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is not None:
            if image_indices is not None:
                raise ValueError("Pass images either as pixel_values or as image_indices, not both.")
            image_indices = self.encode_edge(pixel_values, kwargs.get("image_sizes"), kwargs.get("batch_num_images"))
        if image_indices is not None:
            with torch.no_grad():
                image = self._image_from_indices(image_indices, kwargs)
            kwargs["mm_encoder_outputs"] = {**(kwargs.get("mm_encoder_outputs") or {}), "image": image}
        return super().generate(*args, **kwargs)


__all__ = [
    "LlavaOnevisionAdapter",
    "LlavaOnevisionAlignedVQCausalLMOutputWithPast",
    "LlavaOnevisionAlignedVQForConditionalGeneration",
    "LlavaOnevisionAlignedVQModel",
]
