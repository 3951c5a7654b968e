"""Qwen2.5-VL with an AlignedVQ split inside its windowed vision tower.

`Qwen2_5_VLAlignedVQForConditionalGeneration` is `Qwen2_5_VLForConditionalGeneration` with one extra submodule,
``model.alignedvq``; every base parameter keeps its name.

A Qwen2.5-VL image is one grid of 14-px patches at (close to) its native resolution, ``image_grid_thw`` ``(1, h,
w)``. The edge runs the patch embedding and the windowed blocks before the split site, where every token only
sees its own window, and sends one index per patch: ``(num_patches[, codes])`` for a batch, images in
``image_grid_thw`` order, each image's patches row by row (raster order; `split_qwen2_5_vl`). The cloud, given
the same ``image_grid_thw``, rebuilds the windows and rotary positions, runs the rest of the tower and the merger,
and hands one token per 2x2 patches to the language model.

How it extends Qwen2.5-VL: ``model.get_image_features`` is overridden to run the split tower, from pixels or from
indices; the stock forward calls it for pixels, and images given as indices enter through the parent's own
pre-encoded channel ``mm_encoder_outputs`` (which generation also uses). Placeholders, the 3-D (mrope) positions
(`get_rope_index` over the prompt, each new token one past the last, keeping the prompt's ``rope_deltas``) and the
language model are Qwen's own. The forward plumbing (indices decoded into ``mm_encoder_outputs``, the parent's
forward, the AlignedVQ output fields) is the any-resolution families' `TiledAlignedVQGenerationMixin`; what differs
is that an image is described by its patch grid, not by its size.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLTextModel,
)

from ..family import FamilyAdapter, FrameGeometry
from ..llava_alignedvq.alignedvq_layer import AlignedVQLayerOutput
from ..llava_alignedvq.modeling_alignedvq import (
    AlignedVQImageOutput,
    _init_alignedvq_weights,
    bind_arguments,
    build_alignedvq_layer,
    with_parent_signature,
)
from ..tiled_alignedvq import (
    TiledAlignedVQGenerationMixin,
    checked_indices,
    select_hidden_states,
    vision_output_request,
)
from .configuration_qwen2_5_vl_alignedvq import Qwen2_5_VLAlignedVQConfig, check_local_site
from .split_qwen2_5_vl import TokenLayout, cloud_start, edge_hidden_states, recorded_attentions, token_layout
from .split_qwen2_5_vl import cloud_forward as split_cloud_forward
from .split_qwen2_5_vl import edge_forward as split_edge_forward
from .split_qwen2_5_vl import merge as split_merge

try:  # the output class of the parent's forward: a shared multimodal one from Transformers 5.2x on
    from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast as _ParentOutput
except ImportError:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLCausalLMOutputWithPast as _ParentOutput

_PARENT_FORWARD = inspect.signature(Qwen2_5_VLForConditionalGeneration.forward)
_HAS_MM_ENCODER_OUTPUTS = "mm_encoder_outputs" in _PARENT_FORWARD.parameters


def _grid_rows(image_grid_thw) -> list[list[int]]:
    if image_grid_thw is None:
        raise ValueError("Qwen2.5-VL needs image_grid_thw ((t, h, w) patches per image, from its image processor).")
    if isinstance(image_grid_thw, torch.Tensor):
        if image_grid_thw.is_floating_point() or image_grid_thw.dim() != 2 or image_grid_thw.shape[-1] != 3:
            raise ValueError(f"image_grid_thw must be an integer tensor (num_images, 3), got {image_grid_thw.dtype} "
                             f"{tuple(image_grid_thw.shape)}.")
        return image_grid_thw.tolist()
    rows = [list(row) for row in image_grid_thw]
    if any(not isinstance(v, numbers.Integral) or isinstance(v, bool) for row in rows for v in row):
        raise ValueError(f"image_grid_thw must hold integers, got {rows}.")
    return [[int(v) for v in row] for row in rows]


class Qwen2_5_VLAdapter(FamilyAdapter):
    """Qwen2.5-VL: one patch grid per image, indices per patch in raster order, window-local sites only."""

    name = "qwen2_5_vl"
    parent_classes = ("Qwen2_5_VLForConditionalGeneration",)
    model_types = ("qwen2_5_vl",)

    @staticmethod
    def edge(tower: nn.Module, pixel_values: torch.Tensor, split_layer: int, site: str, *,
             layout: TokenLayout) -> torch.Tensor:
        """Processor-order patches ``(num_patches, patch_dim)`` -> raster-order site features
        ``(num_patches, hidden)`` (``layout``: `token_layout` of the batch's grid); `ValueError` for a site that
        is not window-local."""
        check_local_site(tower.config, split_layer, site)
        return split_edge_forward(tower, pixel_values, layout, split_layer, site)

    @staticmethod
    def cloud(tower: nn.Module, site_features: torch.Tensor, split_layer: int, site: str, wanted: list[int], *,
              layout: TokenLayout) -> dict[int, torch.Tensor]:
        """Raster-order recovered features -> ``{hidden_state_index: (num_patches, hidden)}`` (raster order)."""
        check_local_site(tower.config, split_layer, site)
        return split_cloud_forward(tower, site_features, layout, split_layer, site, wanted)

    @classmethod
    def geometry(cls, config, image_grid_thw, batch_num_images: Sequence[int] | None = None) -> FrameGeometry:
        """Each image is one tile whose patch grid ``(t, h, w)`` is its row of ``image_grid_thw``. A still image
        has ``t = 1`` (the processor folds the two temporal slots into one patch); ``h`` and ``w`` are multiples of
        the merge size, as the processor's ``smart_resize`` makes them."""
        if batch_num_images is not None:
            raise ValueError("Qwen2.5-VL has no batch_num_images; each row of image_grid_thw is one image.")
        rows = _grid_rows(image_grid_thw)
        merge = config.vision_config.spatial_merge_size
        if not rows:
            raise ValueError("image_grid_thw holds no image.")
        for row in rows:
            if len(row) != 3 or min(row) < 1:
                raise ValueError(f"image_grid_thw rows must be (t, h, w) positive ints, got {rows}.")
            if row[0] != 1:
                raise ValueError(f"image_grid_thw has t={row[0]}; a still image has t=1 (videos are not supported).")
            if row[1] % merge or row[2] % merge:
                raise ValueError(f"image_grid_thw {row}: h and w must be multiples of spatial_merge_size={merge}.")
        count = len(rows)
        return FrameGeometry((1,) * count, ((0, 0),) * count, (0, 0), 0,
                             image_patch_grids=tuple(tuple(row) for row in rows))

    @classmethod
    def convert(cls, vlm, **vq_options) -> nn.Module:
        return Qwen2_5_VLAlignedVQForConditionalGeneration.from_qwen(vlm, **vq_options)


@dataclass
class Qwen2_5_VLAlignedVQCausalLMOutputWithPast(_ParentOutput):
    r"""
    The parent's output plus the AlignedVQ terms of [`AlignedVQImageOutput`].

    loss (`torch.FloatTensor` of shape `()`, *optional*):
        `lm_loss + commitment_weight * commitment_loss` when `labels` are given.
    lm_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Next-token loss alone.
    image_indices (`torch.LongTensor` of shape `(num_patches[, codes_per_token])`):
        What crossed (or would cross) the link, images in `image_grid_thw` order, patches row by row.
    """

    lm_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    codebook_perplexity: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None
    image_indices: torch.LongTensor | None = None


class Qwen2_5_VLAlignedVQModel(Qwen2_5_VLModel):
    """[`Qwen2_5_VLModel`] whose vision tower is split by ``self.alignedvq``."""

    config_class = Qwen2_5_VLAlignedVQConfig
    config: Qwen2_5_VLAlignedVQConfig
    adapter = Qwen2_5_VLAdapter

    def __init__(self, config: Qwen2_5_VLAlignedVQConfig):
        # Same submodules, order and names as Qwen2_5_VLModel.__init__, plus `alignedvq`.
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
        self.language_model = Qwen2_5_VLTextModel._from_config(config.text_config)
        self.rope_deltas = None
        self.alignedvq = build_alignedvq_layer(config)
        self.post_init()

    def _init_weights(self, module):
        if not _init_alignedvq_weights(self, module):
            super()._init_weights(module)

    @classmethod
    def is_custom_code(cls) -> bool:
        return False  # our init uses Transformers' init functions; see the LLaVA model's note

    def frame_geometry(self, image_grid_thw) -> FrameGeometry:
        return self.adapter.geometry(self.config, image_grid_thw)

    def _layout(self, geometry: FrameGeometry) -> TokenLayout:
        """The batch's token orders and windows, computed once per pass and shared by the edge, cloud and merger."""
        return token_layout(self.visual, torch.tensor(geometry.image_patch_grids, dtype=torch.long))

    def _check_pixel_values(self, pixel_values, geometry: FrameGeometry) -> None:
        vision = self.config.vision_config
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        expected = (geometry.num_tokens, width)
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
        if tuple(pixel_values.shape) != expected:
            raise ValueError(f"pixel_values must have shape {expected} (patches of these image_grid_thw, flattened as "
                             f"the image processor makes them), got {tuple(pixel_values.shape)}.")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point, got {pixel_values.dtype}.")

    def edge_features(self, pixel_values: torch.Tensor, image_grid_thw) -> torch.Tensor:
        """Site features ``(num_patches, vision_hidden)`` in raster order: the tower up to the split site."""
        geometry = self.frame_geometry(image_grid_thw)
        return self._edge_features(pixel_values, geometry, self._layout(geometry))

    def _edge_features(self, pixel_values: torch.Tensor, geometry: FrameGeometry, layout: TokenLayout) -> torch.Tensor:
        self._check_pixel_values(pixel_values, geometry)
        config = self.config
        pixel_values = pixel_values.to(self.visual.device, self.visual.dtype)
        return self.adapter.edge(self.visual, pixel_values, config.split_layer, config.split_site, layout=layout)

    @torch.no_grad()
    def encode_edge(self, pixel_values: torch.Tensor, image_grid_thw) -> torch.LongTensor:
        """Edge half: the processor's ``pixel_values`` ``(num_patches, patch_dim)`` -> indices
        ``(num_patches[, codes_per_token])`` in raster order."""
        return self._public_indices(self.alignedvq.encode(self.edge_features(pixel_values, image_grid_thw)))

    def check_indices(self, image_indices, geometry: FrameGeometry) -> torch.Tensor:
        """Indices from the wire as ``(num_patches, codes_per_token)`` int64, checked against the geometry;
        `ValueError` naming the problem."""
        return checked_indices(self.alignedvq, image_indices, (geometry.num_tokens,), self.config.codes_per_token,
                               "(patches of these image_grid_thw[, codes])")

    def _public_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return indices.squeeze(-1) if self.config.codes_per_token == 1 else indices

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        image_indices: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AlignedVQImageOutput | tuple:
        r"""
        Image features through the split tower, from `pixel_values` `(num_patches, patch_dim)` (the processor's) or
        from `image_indices` `(num_patches[, codes])` (raster order), with the `image_grid_thw` `(images, 3)` both
        ends share. `pooler_output` holds one `(t * h * w / 4, text_hidden_size)` tensor per image, as the stock
        model's does; `last_hidden_state` is the last block's output `(num_patches, vision_hidden)` in raster order.

        `output_hidden_states` / `output_attentions` (arguments, as the stock forward passes them on, or the vision
        config's flags) return the tower's per-layer outputs in raster order (the stock tower's are in its window
        order): hidden states `0 .. depth`, those before the cloud's first the edge's (before quantization; `None`
        when the image came as indices), and what each attention module that ran here output, as the stock tower
        records it. `output_hidden_states` may also be indices, selecting those states.
        """
        if (pixel_values is None) == (image_indices is None):
            raise ValueError("Pass exactly one of pixel_values and image_indices, not both or neither.")
        config = self.config
        want_hidden = vision_output_request(kwargs, config.vision_config, "output_hidden_states")
        want_attentions = bool(vision_output_request(kwargs, config.vision_config, "output_attentions"))
        geometry = self.frame_geometry(image_grid_thw)
        layout = self._layout(geometry)
        depth = config.vision_config.depth
        first = cloud_start(config.split_layer, config.split_site)
        wanted = list(range(first, depth + 1)) if want_hidden is not None else [depth]
        with recorded_attentions(self.visual, layout, enabled=want_attentions) as attentions:
            vq = self._site_features(pixel_values, image_indices, geometry, layout)
            cloud = self.adapter.cloud(self.visual, vq.features, config.split_layer, config.split_site, wanted,
                                       layout=layout)
        hidden = cloud[depth]
        merged = split_merge(self.visual, hidden, layout)
        sizes = [t * h * w // config.vision_config.spatial_merge_size**2 for t, h, w in geometry.image_patch_grids]
        output = AlignedVQImageOutput(
            last_hidden_state=hidden,
            pooler_output=list(torch.split(merged, sizes)),
            hidden_states=None if want_hidden is None else self._tower_hidden_states(pixel_values, layout, cloud,
                                                                                     want_hidden),
            attentions=tuple(attentions) if want_attentions else None,
            image_indices=self._public_indices(vq.indices),
            commitment_loss=vq.commitment_loss,
            codebook_perplexity=vq.perplexity,
            codebook_usage=vq.usage,
        )
        return output if (return_dict if return_dict is not None else config.return_dict) else output.to_tuple()

    def _tower_hidden_states(self, pixel_values, layout: TokenLayout, cloud: dict, request) -> tuple:
        """Hidden states ``0 .. depth`` in raster order: the edge's (``None`` from indices), then the cloud's."""
        first = cloud_start(self.config.split_layer, self.config.split_site)
        if pixel_values is None:
            edge = [None] * first
        else:
            pixels = pixel_values.to(self.visual.device, self.visual.dtype)
            edge = edge_hidden_states(self.visual, pixels, layout, first)
        return select_hidden_states(edge + [cloud[index] for index in sorted(cloud)], request)

    def _site_features(self, pixel_values, image_indices, geometry: FrameGeometry,
                       layout: TokenLayout) -> AlignedVQLayerOutput:
        """From pixels: the AlignedVQ layer's forward (training: straight-through, EMA, commitment loss;
        evaluation: exactly encode + decode). From indices: decoded."""
        if pixel_values is not None:
            return self.alignedvq(self._edge_features(pixel_values, geometry, layout))
        indices = self.check_indices(image_indices, geometry)
        return AlignedVQLayerOutput(self.alignedvq.decode(indices, dtype=self.visual.dtype), indices)


class Qwen2_5_VLAlignedVQForConditionalGeneration(TiledAlignedVQGenerationMixin, Qwen2_5_VLForConditionalGeneration,
                                                  GenerationMixin):
    """Qwen2.5-VL split by AlignedVQ for edge-cloud inference.

    Example:

    ```python
    >>> model = Qwen2_5_VLAlignedVQForConditionalGeneration.from_qwen(qwen, split_layer=0, codebook_size=4096)
    >>> model.init_codebook([{"pixel_values": pixels, "image_grid_thw": grid}])
    >>> indices = model.encode_edge(pixels, grid)                # on the device: (num_patches,) ints
    >>> out = model.forward_from_indices(indices, image_grid_thw=grid, input_ids=input_ids)
    >>> tokens = model.generate(input_ids=input_ids, image_indices=indices, image_grid_thw=grid)
    ```
    """

    config_class = Qwen2_5_VLAlignedVQConfig
    config: Qwen2_5_VLAlignedVQConfig
    parent_class = Qwen2_5_VLForConditionalGeneration
    output_class = Qwen2_5_VLAlignedVQCausalLMOutputWithPast

    def __init__(self, config: Qwen2_5_VLAlignedVQConfig):
        if not _HAS_MM_ENCODER_OUTPUTS:
            raise ImportError("Qwen2.5-VL with AlignedVQ needs a transformers release whose Qwen2.5-VL forward takes "
                              "mm_encoder_outputs (5.24 has it).")
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.model = Qwen2_5_VLAlignedVQModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_qwen(cls, qwen, *, load_kwargs: dict | None = None, **vq_options):
        """Add AlignedVQ to a `Qwen2_5_VLForConditionalGeneration` (a loaded one, whose modules are reused, or a
        path / Hub id loaded with `load_kwargs`). Returns the model in the mode the base was in; the codebook is
        random."""
        return cls.from_base(qwen, load_kwargs=load_kwargs, **vq_options)

    @staticmethod
    def _adopt_base_modules(model, base) -> torch.Tensor:
        """Qwen2.5-VL's inner modules: its own tower (``visual``, merger included) and the language model."""
        model.model.visual, model.model.language_model = base.model.visual, base.model.language_model
        return base.model.visual.patch_embed.proj.weight

    @torch.no_grad()
    def init_codebook(self, batches, *, iters: int = 20, max_features: int = 200_000, seed: int = 0) -> int:
        """K-means initialisation of the codebook(s) on real site features of every patch.

        Args:
            batches: iterable of dicts with `pixel_values` and `image_grid_thw` (the image processor's output).
            iters, max_features, seed: as for the LLaVA model's `init_codebook`.

        Returns the number of token features clustered.
        """
        features = [self.model.edge_features(batch["pixel_values"], batch["image_grid_thw"]) for batch in batches]
        return self.model.alignedvq.fit_codebook(features, iters=iters, max_features=max_features, seed=seed)

    def encode_edge(self, pixel_values, image_grid_thw) -> torch.LongTensor:
        """Edge half: pixels -> indices `(num_patches[, codes_per_token])`, patches in raster order."""
        return self.model.encode_edge(pixel_values, image_grid_thw)

    def frame_geometry(self, image_grid_thw) -> FrameGeometry:
        """Each image's patch grid `(t, h, w)` from `image_grid_thw` `(images, 3)`."""
        return self.model.frame_geometry(image_grid_thw)

    def forward_from_indices(self, image_indices: torch.Tensor, **kwargs):
        """Cloud forward pass from the edge's indices; `kwargs` as for `forward` (`image_grid_thw` required)."""
        return self(image_indices=image_indices, **kwargs)

    @with_parent_signature(Qwen2_5_VLForConditionalGeneration.forward, image_indices=None)
    def forward(self, *args, **kwargs) -> Qwen2_5_VLAlignedVQCausalLMOutputWithPast | tuple:
        r"""
        [`Qwen2_5_VLForConditionalGeneration.forward`] (same arguments), with the image given as `pixel_values`
        (edge and cloud in one pass) or as `image_indices` `(num_patches[, codes])` (cloud only), `image_grid_thw`
        `(images, 3)` either way. With an image and `input_ids` but no `mm_token_type_ids`, these are derived from
        the image placeholders (as the processor makes them), so the 3-D positions are always computed. In
        evaluation mode the result from pixels equals `forward_from_indices(encode_edge(pixel_values,
        image_grid_thw), image_grid_thw=image_grid_thw)` exactly.
        """
        arguments = bind_arguments(Qwen2_5_VLAlignedVQForConditionalGeneration.forward, self, args, kwargs)
        self._add_token_types(arguments, has_image=any(arguments.get(k) is not None
                                                       for k in ("pixel_values", "image_indices")))
        return self._split_forward(Qwen2_5_VLAlignedVQForConditionalGeneration.forward, (), arguments)

    def _add_token_types(self, arguments: dict, *, has_image: bool) -> None:
        """3-D positions need `input_ids` and `mm_token_type_ids`; without them the parent silently falls back
        to 1-D positions, so the types are derived from the placeholders and a prompt without ids is refused."""
        if not has_image or arguments.get("position_ids") is not None:
            return
        input_ids = arguments.get("input_ids")
        if input_ids is None:
            raise ValueError("Qwen2.5-VL with an image needs input_ids (or position_ids) for its 3-D positions.")
        if arguments.get("mm_token_type_ids") is None:
            arguments["mm_token_type_ids"] = (input_ids == self.config.image_token_id).to(torch.int)

    def _image_from_pixels(self, pixel_values: torch.Tensor, arguments: dict) -> AlignedVQImageOutput:
        return self.model.get_image_features(pixel_values=pixel_values, return_dict=True,
                                             image_grid_thw=arguments.get("image_grid_thw"))

    def _image_from_indices(self, image_indices: torch.Tensor, arguments: dict) -> AlignedVQImageOutput:
        return self.model.get_image_features(image_indices=image_indices, return_dict=True,
                                             image_grid_thw=arguments.get("image_grid_thw"))

    def generate(self, *args, image_indices: torch.Tensor | None = None, **kwargs):
        """`GenerationMixin.generate` with the image as `pixel_values` or `image_indices`, plus `image_grid_thw`.

        Pixels are turned into indices first, as a device would send them, so the result is the same from either
        and generation never moves the EMA codebook. The decoded image enters through `mm_encoder_outputs`, the
        channel generation itself uses for pre-encoded images; the 3-D positions come from the parent's
        `_prepare_position_ids_for_generation` (`get_rope_index` over the prompt; each new token then one past the
        last, which keeps the prompt's `rope_deltas`, as the parent decodes).
        """
        return super().generate(*args, image_indices=image_indices, **kwargs)

    def _geometry_arguments(self, kwargs: dict) -> tuple:
        return (kwargs.get("image_grid_thw"),)

    def _prompt_for_image(self, args: tuple, kwargs: dict) -> tuple:
        """The prompt moved into ``kwargs`` as `input_ids`, with the token types its 3-D positions need."""
        if "inputs" in kwargs:  # generate's first argument is the prompt, by either name or by position
            kwargs["input_ids"] = kwargs.pop("inputs")
        elif args and "input_ids" not in kwargs:
            kwargs["input_ids"], args = args[0], args[1:]
        self._add_token_types(kwargs, has_image=True)
        return args

__all__ = [
    "Qwen2_5_VLAdapter",
    "Qwen2_5_VLAlignedVQCausalLMOutputWithPast",
    "Qwen2_5_VLAlignedVQForConditionalGeneration",
    "Qwen2_5_VLAlignedVQModel",
]
