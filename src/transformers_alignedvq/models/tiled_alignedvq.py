"""What the any-resolution families (LLaVA-NeXT, LLaVA-OneVision) share once split by AlignedVQ.

Both cut an image into a base view plus a grid of tiles, run every tile through a CLIP/SigLIP tower on its own,
project each tile's features and pack them (un-padding, newlines; OneVision also downsamples) before the
language model. So the edge sends indices per tile, ``(num_tiles, tokens_per_tile[, codes])`` for a batch, tiles
in the tower's order (image by image, base view first), and the cloud needs each image's ``image_sizes`` to know
which tiles are whose (the family adapter's ``geometry``).

The two mixins below are bases placed before the family's Transformers classes: `TiledAlignedVQModelMixin`
overrides ``get_image_features`` to run the split tower from pixels or from indices (the stock forward calls it
for pixels); `TiledAlignedVQGenerationMixin` brings images given as indices in through the parent's own
pre-encoded channel, ``mm_encoder_outputs`` (which generation also uses), and adds the conversion, k-means
initialisation and the edge entry point. A family file supplies its adapter, config, output class, the model's
``__init__`` and ``pack`` (its own packing call), and a ``forward`` carrying the parent's signature.
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch
from torch import nn

from .family import FamilyAdapter, FrameGeometry
from .llava_alignedvq.alignedvq_layer import AlignedVQLayerOutput
from .llava_alignedvq.modeling_alignedvq import (
    AlignedVQImageOutput,
    _init_alignedvq_weights,
    alignedvq_fields,
    bind_arguments,
    build_alignedvq_layer,
)
from .llava_alignedvq.split import check_pixel_values, edge_hidden_states, recorded_attentions

try:  # the package's strict checkpoints (both kinds, edge files, cards); `checkpoints/mixin.py`
    from transformers_alignedvq.checkpoints.mixin import FamilyCheckpointMixin as _CheckpointMixin
except ModuleNotFoundError as missing:  # remote code without the package: Transformers' own loading and saving
    if missing.name != "transformers_alignedvq":
        raise
    from .llava_alignedvq.modeling_alignedvq import _CheckpointMixin as _StockCheckpoints

    class _CheckpointMixin(_StockCheckpoints):
        """The LLaVA folder's refusals (adapter-only kind, unmerged LoRA) and ``from_base``'s plain loader."""

        @classmethod
        def _load_base(cls, path, **load_kwargs):
            return cls.parent_class.from_pretrained(path, **load_kwargs)

# The forward arguments that shape an image's features, passed on when it is decoded from indices.
IMAGE_ARGUMENTS = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio",
                   "batch_num_images")


class TiledAlignedVQModelMixin:
    """The split tower for the family's inner model (``LlavaNextModel``, ``LlavaOnevisionModel``)."""

    adapter: ClassVar[type[FamilyAdapter]]

    def _init_weights(self, module):
        if not _init_alignedvq_weights(self, module):
            super()._init_weights(module)

    @classmethod
    def is_custom_code(cls) -> bool:
        return False  # our init uses Transformers' init functions; see the LLaVA model's note

    def pack(self, projected: list[torch.Tensor], image_sizes, strategy: str, aspect_ratio: str | None) -> list:
        """The family's packing of each image's projected tiles into its prompt features."""
        raise NotImplementedError

    def frame_geometry(self, image_sizes, batch_num_images=None) -> FrameGeometry:
        return self.adapter.geometry(self.config, image_sizes, batch_num_images)

    def pixel_tiles(self, pixel_values: torch.Tensor, geometry: FrameGeometry) -> torch.Tensor:
        """The tower's batch ``(num_tiles, channels, size, size)`` from the processor's padded
        ``(images, max_tiles, channels, size, size)`` or already-flat tiles."""
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 5:
            counts = geometry.tiles_per_image
            if pixel_values.shape[0] != len(counts):
                raise ValueError(f"pixel_values hold {pixel_values.shape[0]} images, image_sizes {len(counts)}.")
            if pixel_values.shape[1] < max(counts):
                raise ValueError(f"pixel_values hold {pixel_values.shape[1]} tiles per image; image_sizes need up to "
                                 f"{max(counts)}.")
            pixel_values = torch.cat([image[:count] for image, count in zip(pixel_values, counts)])
        self._check_tiles(pixel_values)
        if pixel_values.shape[0] != geometry.num_tiles:
            raise ValueError(f"pixel_values hold {pixel_values.shape[0]} tiles; image_sizes make {geometry.num_tiles}.")
        return pixel_values

    def _check_tiles(self, tiles) -> None:
        vision = self.config.vision_config
        check_pixel_values(tiles, num_channels=vision.num_channels, image_size=vision.image_size)

    def edge_features(self, pixel_tiles: torch.Tensor) -> torch.Tensor:
        """Site features ``(num_tiles, tokens_per_tile, vision_hidden)`` of flat tiles."""
        self._check_tiles(pixel_tiles)
        config = self.config
        return self.adapter.edge(self.vision_tower, pixel_tiles, config.split_layer, config.split_site)

    @torch.no_grad()
    def encode_edge(self, pixel_values, image_sizes, batch_num_images=None) -> torch.LongTensor:
        """Edge half: pixels -> indices ``(num_tiles, tokens_per_tile[, codes_per_token])``."""
        tiles = self.pixel_tiles(pixel_values, self.frame_geometry(image_sizes, batch_num_images))
        return self._public_indices(self.alignedvq.encode(self.edge_features(tiles)))

    def check_indices(self, image_indices, geometry: FrameGeometry) -> torch.Tensor:
        """Indices from the wire as ``(num_tiles, tokens_per_tile, codes_per_token)`` int64, checked against the
        geometry; `ValueError` naming the problem."""
        return checked_indices(self.alignedvq, image_indices, (geometry.num_tiles, geometry.tokens_per_tile),
                               self.config.codes_per_token, "(tiles, tokens per tile[, codes]) for these image_sizes")

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
        The family's image features through the split tower, from `pixel_values` (`(images, max_tiles, channels,
        size, size)` or flat tiles) or from `image_indices` (`(num_tiles, tokens_per_tile[, codes])`), with the
        `image_sizes` `(images, 2)` both ends share. `pooler_output` holds one packed
        `(image_tokens, text_hidden_size)` tensor per image, as the stock model's does.

        `output_hidden_states` / `output_attentions` (or the vision config's flags) return the tower's per-layer
        outputs over all tiles, as the LLaVA model does: hidden states up to the split block's input are the edge's
        (before quantization) and are `None` when the image came as indices; attentions (eager attention only) are
        those of the blocks that ran here. `output_hidden_states` may also be indices, selecting those states.
        """
        if (pixel_values is None) == (image_indices is None):
            raise ValueError("Pass exactly one of pixel_values and image_indices, not both or neither.")
        config = self.config
        want_hidden = vision_output_request(kwargs, config.vision_config, "output_hidden_states")
        want_attentions = bool(vision_output_request(kwargs, config.vision_config, "output_attentions"))
        geometry = self.frame_geometry(image_sizes, batch_num_images)
        tiles = None if pixel_values is None else self.pixel_tiles(pixel_values, geometry)
        layers = self._selected_layers(vision_feature_layer)
        last = config.vision_config.num_hidden_layers
        run = list(range(config.split_layer + 1, last + 1)) if want_hidden is not None or want_attentions else layers
        with recorded_attentions(self.vision_tower, enabled=want_attentions) as attentions:
            vq = self._site_features(tiles, image_indices, geometry)
            hidden = self.adapter.cloud(self.vision_tower, vq.features, config.split_layer, config.split_site, run)
        selected = torch.cat([hidden[index] for index in layers], dim=-1)
        strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
        if strategy == "default":
            selected = selected[:, 1:]  # the CLS token, as the stock models drop it (SigLIP has none to drop)
        projected = torch.split(self.multi_modal_projector(selected), list(geometry.tiles_per_image), dim=0)
        output = AlignedVQImageOutput(
            last_hidden_state=selected,
            pooler_output=list(self.pack(projected, image_sizes, strategy, vision_aspect_ratio)),
            hidden_states=None if want_hidden is None else self._tower_hidden_states(tiles, hidden, want_hidden),
            attentions=tuple(attentions) if want_attentions else None,
            image_indices=self._public_indices(vq.indices),
            commitment_loss=vq.commitment_loss,
            codebook_perplexity=vq.perplexity,
            codebook_usage=vq.usage,
        )
        return output if (return_dict if return_dict is not None else config.return_dict) else output.to_tuple()

    def _tower_hidden_states(self, tiles, cloud: dict, request) -> tuple:
        """Hidden states ``0 .. num_hidden_layers``: the edge's (``None`` from indices), then the cloud's."""
        split = self.config.split_layer
        edge = edge_hidden_states(self.vision_tower, tiles, split) if tiles is not None else [None] * (split + 1)
        return select_hidden_states(edge + [cloud[index] for index in sorted(cloud)], request)

    def _selected_layers(self, vision_feature_layer) -> list[int]:
        if vision_feature_layer is None or vision_feature_layer == self.config.vision_feature_layer:
            return self.config.feature_layer_indices()
        values = {**self.config.to_dict(), "vision_feature_layer": vision_feature_layer}
        for key in ("model_type", "architectures", "transformers_version"):
            values.pop(key, None)
        return type(self.config)(**values).feature_layer_indices()  # validated as the config validates it

    def _site_features(self, tiles, image_indices, geometry: FrameGeometry) -> AlignedVQLayerOutput:
        """From flat pixel tiles: the AlignedVQ layer's forward (training: straight-through, EMA, commitment loss;
        evaluation: exactly encode + decode). From indices: decoded."""
        if tiles is not None:
            return self.alignedvq(self.edge_features(tiles))
        indices = self.check_indices(image_indices, geometry)
        return AlignedVQLayerOutput(self.alignedvq.decode(indices, dtype=self.vision_tower.dtype), indices)


class TiledAlignedVQGenerationMixin(_CheckpointMixin):
    """Conversion, codebook initialisation and the edge/cloud entry points for the family's conditional
    generation class; the family's ``forward`` (with its parent's signature) calls `_split_forward`. Checkpoints
    (strict loading, the adapter-only kind, edge files, card) come from the package's `FamilyCheckpointMixin`."""

    parent_class: ClassVar[type]
    output_class: ClassVar[type]
    _keys_to_ignore_on_load_missing = [r"model\.alignedvq\.quantizer\.(cluster_size|embed_sum)"]
    # A full checkpoint keeps an unmerged LoRA in its weights too (for the Trainer); the package applies it from
    # lora/ after the load, strictly, so the parent's loader must not report those tensors as unexpected.
    _keys_to_ignore_on_load_unexpected = [r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\."]

    def _init_weights(self, module):
        if not _init_alignedvq_weights(self, module):
            super()._init_weights(module)

    @classmethod
    def is_custom_code(cls) -> bool:
        return False

    @classmethod
    def from_base(cls, base, *, load_kwargs: dict | None = None, **vq_options):
        """Add AlignedVQ to a model of `parent_class` (a loaded one, whose modules are reused, or a path / Hub id
        loaded with `load_kwargs`). Returns the model in the mode the base was in; the codebook is random."""
        reference = None
        if isinstance(base, (str, os.PathLike)):
            reference = cls._base_reference(base, (load_kwargs or {}).get("revision"))
            base = cls._load_base(base, **(load_kwargs or {}))
        if not isinstance(base, cls.parent_class) or hasattr(base.model, "alignedvq"):
            raise TypeError(f"{cls.__name__} converts a {cls.parent_class.__name__} or a path, got "
                            f"{type(base).__name__}.")
        values = base.config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            values.pop(key, None)
        config = cls.config_class(**{**values, **vq_options})
        if reference is not None and not config.base_model_name_or_path:
            config.base_model_name_or_path, config.base_model_revision = reference
        with torch.device("meta"):
            model = cls(config)
        weight = cls._adopt_base_modules(model, base)
        model.lm_head = base.lm_head
        layer = build_alignedvq_layer(config)
        model.model.alignedvq = layer.to("meta") if weight.is_meta else layer.to(weight.device, weight.dtype)
        model.generation_config = base.generation_config
        return model.train(base.training)

    @staticmethod
    def _adopt_base_modules(model, base) -> torch.Tensor:
        """Move the base's inner modules into ``model``; returns a weight of the vision tower (its device and
        dtype are the AlignedVQ layer's)."""
        for name in ("vision_tower", "multi_modal_projector", "language_model", "image_newline"):
            setattr(model.model, name, getattr(base.model, name))
        return base.model.vision_tower.get_input_embeddings().weight

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
            tiles = batch
            if isinstance(batch, dict):
                geometry = self.model.frame_geometry(batch["image_sizes"], batch.get("batch_num_images"))
                tiles = self.model.pixel_tiles(batch["pixel_values"], geometry)
            tiles = tiles.to(self.model.vision_tower.device)
            features.append(self.model.edge_features(tiles))
        return self.model.alignedvq.fit_codebook(features, iters=iters, max_features=max_features, seed=seed)

    def encode_edge(self, pixel_values, image_sizes, batch_num_images=None) -> torch.LongTensor:
        """Edge half: pixels -> indices `(num_tiles, tokens_per_tile[, codes_per_token])`."""
        return self.model.encode_edge(pixel_values, image_sizes, batch_num_images)

    def frame_geometry(self, image_sizes, batch_num_images=None) -> FrameGeometry:
        """Tiles per image, tile grid and tokens per tile for images of `image_sizes` `(images, 2)`."""
        return self.model.frame_geometry(image_sizes, batch_num_images)

    def forward_from_indices(self, image_indices: torch.Tensor, **kwargs):
        """Cloud forward pass from the edge's indices; `kwargs` as for `forward` (`image_sizes` required)."""
        return self(image_indices=image_indices, **kwargs)

    def _split_forward(self, forward, args: tuple, kwargs: dict):
        """The body of the family's ``forward``: indices decoded into ``mm_encoder_outputs``, the parent's forward,
        and its output with the AlignedVQ fields added (the commitment term in the loss)."""
        arguments = bind_arguments(forward, self, args, kwargs)
        self._refuse_unsplit_inputs(arguments)
        return_dict = arguments.pop("return_dict", None)
        image_indices = arguments.pop("image_indices", None)
        if image_indices is not None and arguments.get("pixel_values") is not None:
            raise ValueError("Pass images either as pixel_values or as image_indices, not both.")
        encoded = None
        if image_indices is not None or (arguments.get("pixel_values") is not None and not self._returns_image()):
            # Indices enter as pre-encoded images. So do pixels where the parent's output has no `image_outputs`
            # (Qwen2.5-VL in Transformers 5.19): the commitment loss and the indices are read off it.
            encoded = dict(arguments.get("mm_encoder_outputs") or {})
            encoded["image"] = (self._image_from_indices(image_indices, arguments) if image_indices is not None
                                else self._image_from_pixels(arguments.pop("pixel_values"), arguments))
            arguments["mm_encoder_outputs"] = encoded
        outputs = self.parent_class.forward(self, **arguments, return_dict=True)
        image = outputs.get("image_outputs") or (encoded or {}).get("image")
        ours = alignedvq_fields(image if isinstance(image, AlignedVQImageOutput) else None)
        fields = {**dict(outputs.items()), **ours}
        lm_loss, commitment = outputs.get("loss"), fields["commitment_loss"]
        if lm_loss is not None and commitment is not None:
            fields["loss"] = lm_loss + self.config.commitment_weight * commitment.to(lm_loss.dtype)
        outputs = self.output_class(**fields, lm_loss=lm_loss)
        return outputs if (return_dict if return_dict is not None else self.config.return_dict) else outputs.to_tuple()

    def _refuse_unsplit_inputs(self, arguments: dict) -> None:
        """Inputs that would run the stock, unsplit tower are refused rather than silently not split."""
        if arguments.get("pixel_values_videos") is not None:
            raise ValueError(f"{type(self).__name__} splits images only; pixel_values_videos is not supported.")

    def _returns_image(self) -> bool:
        """Whether the parent's forward returns the image encoder's output (``image_outputs``)."""
        return "image_outputs" in getattr(self.output_class, "__dataclass_fields__", ())

    def _image_from_pixels(self, pixel_values: torch.Tensor, arguments: dict) -> AlignedVQImageOutput:
        return self.model.get_image_features(pixel_values=pixel_values, return_dict=True,
                                             **{name: arguments.get(name) for name in IMAGE_ARGUMENTS})

    def _image_from_indices(self, image_indices: torch.Tensor, arguments: dict) -> AlignedVQImageOutput:
        return self.model.get_image_features(image_indices=image_indices, return_dict=True,
                                             **{name: arguments.get(name) for name in IMAGE_ARGUMENTS})

    def generate(self, *args, image_indices: torch.Tensor | None = None, **kwargs):
        """`GenerationMixin.generate` with the image as `pixel_values` or `image_indices`, plus `image_sizes`.

        Pixels are turned into indices first, as a device would send them, so the result is the same from
        either and generation never moves the EMA codebook. The decoded image enters through
        `mm_encoder_outputs`, the channel generation itself uses for pre-encoded images.
        """
        self._refuse_unsplit_inputs(kwargs)
        pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is not None:
            if image_indices is not None:
                raise ValueError("Pass images either as pixel_values or as image_indices, not both.")
            image_indices = self.encode_edge(pixel_values, *self._geometry_arguments(kwargs))
        if image_indices is not None:
            args = self._prompt_for_image(args, kwargs)
            with torch.no_grad():
                image = self._image_from_indices(image_indices, kwargs)
            kwargs["mm_encoder_outputs"] = {**(kwargs.get("mm_encoder_outputs") or {}), "image": image}
        return super().generate(*args, **kwargs)

    def _geometry_arguments(self, kwargs: dict) -> tuple:
        """What `encode_edge` takes beside the pixels, from `generate`'s arguments."""
        return kwargs.get("image_sizes"), kwargs.get("batch_num_images")

    def _prompt_for_image(self, args: tuple, kwargs: dict) -> tuple:
        """`generate`'s positional arguments, with whatever the family needs beside an image added to ``kwargs``
        (none for these families)."""
        return args


def checked_indices(layer: nn.Module, image_indices, tokens: tuple[int, ...], codes: int, meaning: str) -> torch.Tensor:
    """``image_indices`` from the wire as ``(*tokens, codes)`` int64 on ``layer``'s codebook device; `ValueError`
    naming the problem (not a tensor, another shape than ``(*tokens[, codes])`` described by ``meaning``, a value
    ``layer``'s quantizer refuses)."""
    if not isinstance(image_indices, torch.Tensor):
        raise ValueError(f"image_indices must be a torch.Tensor, got {type(image_indices).__name__}.")
    expected = tokens + ((codes,) if codes > 1 else ())
    if tuple(image_indices.shape) != expected:
        raise ValueError(f"image_indices must have shape {expected} {meaning}, got {tuple(image_indices.shape)}.")
    layer.quantizer.validate_indices(image_indices)
    device = layer.quantizer.codebook.device
    return image_indices.to(device=device, dtype=torch.long).reshape(*tokens, codes)


def vision_output_request(kwargs: dict, vision_config, name: str):
    """``output_hidden_states`` / ``output_attentions`` as asked (the argument, else the vision config's flag):
    ``None`` when not asked, else ``True`` or the hidden-state indices asked for."""
    value = kwargs.get(name)
    value = getattr(vision_config, name, False) if value is None else value
    return None if value is False or value is None else value


def select_hidden_states(states: list, request) -> tuple:
    """``states`` as Transformers returns them for ``output_hidden_states=request``: all of them for ``True``;
    for indices (negative ones counting from the end), those, and ``None`` in place of the others."""
    if request is True:
        return tuple(states)
    count = len(states)
    picks = [request] if isinstance(request, int) else list(request)
    kept = {index % count for index in picks if -count <= index < count}
    return tuple(state if index in kept else None for index, state in enumerate(states))


def tile_modules(model: nn.Module, config) -> None:
    """The any-resolution families' inner-model submodules, in their own order and names, plus `alignedvq`."""
    from transformers.models.auto import AutoModel

    model.vision_tower = AutoModel.from_config(config.vision_config)
    model.multi_modal_projector = model.projector_class(config)
    embed_std = 1 / config.text_config.hidden_size**0.5
    model.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=model.dtype) * embed_std)
    model.vocab_size = config.text_config.vocab_size
    model.language_model = AutoModel.from_config(config.text_config)
    model.alignedvq = build_alignedvq_layer(config)


__all__ = [
    "TiledAlignedVQGenerationMixin",
    "TiledAlignedVQModelMixin",
    "checked_indices",
    "select_hidden_states",
    "tile_modules",
    "vision_output_request",
]
