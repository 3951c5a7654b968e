"""The edge half as a standalone module: what a camera or phone runs, and nothing else.

`AlignedVQEdgeEncoder` holds the vision embeddings, the blocks before the split, the split block only up to
the site, and the input side of AlignedVQ (input DLP, optional down-projection, codebook). No language
model, projector, output DLP or EMA state. It is saved as ``edge_config.json`` + ``edge_model.safetensors``
and loads without the rest of the checkpoint.

Imports only PyTorch, safetensors and Transformers' vision configuration/modeling.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..edge_config import (
    EDGE_CONFIG_NAME,
    EDGE_FORMAT_VERSION,
    EDGE_SETTINGS,
    EDGE_WEIGHTS_NAME,
    read_edge_config,
    write_edge_config,
)
from ..errors import EdgeCheckpointError
from ..models.llava_alignedvq import split
from ..models.llava_alignedvq.alignedvq_layer import AlignedVQLayer, fold_codebook
from ..preprocess import ImagePreprocessing, read_preprocessing
from .search import CodewordSearch, ResidualCodewordSearch, SearchConfig

# Submodules of the split block the edge never runs, by site.
_UNUSED_AT_SITE = {
    "patch": ("layer_norm1", "self_attn", "layer_norm2", "mlp"),
    "input": ("layer_norm1", "self_attn", "layer_norm2", "mlp"),
    "ln1": ("self_attn", "layer_norm2", "mlp"),
    "attn": ("layer_norm2", "mlp"),
    "ln2": ("mlp",),
    "mlp": (),
}


def folded_search(layer: AlignedVQLayer, config: SearchConfig) -> nn.Module | None:
    """The search of ``layer``'s codebook with its input DLP folded in, on the codebook's device: one codebook
    (`CodewordSearch`) or residual stages (`ResidualCodewordSearch`); None for grouped codebooks, which have none."""
    with torch.no_grad():
        if layer.can_fold:
            folded, offsets = fold_codebook(layer.quantizer.codebook[0, 0], *layer._pre_quantization_affine())
            return CodewordSearch(folded, offsets, config).to(layer.quantizer.codebook.device)
        if layer.quantizer.num_groups == 1:
            codebooks, (weight, bias) = layer.quantizer.codebook[:, 0], layer._pre_quantization_affine()
            return ResidualCodewordSearch(codebooks, weight, bias, config).to(codebooks.device)
    return None


class AlignedVQEdgeEncoder(nn.Module):
    """Pixels -> AlignedVQ indices, with only the edge's weights.

    Args:
        vision_config: the vision tower's config (a `PretrainedConfig` or its dict).
        settings: AlignedVQ settings: `split_layer`, `split_site`, `codebook_size`, `codebook_dim`,
            `num_codebooks`, `num_groups`, `use_dlp`.
        preprocessing: how images become pixels (`preprocess.ImagePreprocessing`); defaults to the standard
            one of the tower's family at its image size.
        search: how codewords are found (`search.SearchConfig`: exact by default, or a shortlist re-ranked
            exactly). The search tables are derived from the weights (`refresh_search`), never saved.
    """

    def __init__(self, vision_config, settings: dict, preprocessing: ImagePreprocessing | None = None,
                 search: SearchConfig | None = None):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if isinstance(vision_config, dict):
            values = dict(vision_config)
            vision_config = AutoConfig.for_model(values.pop("model_type"), **values)
        self.vision_config = vision_config
        self.settings = dict(settings)
        self.preprocessing = preprocessing or ImagePreprocessing.for_vision_config(
            vision_config.model_type, vision_config.image_size
        )
        self.search_config = search or SearchConfig()
        split_layer, site = settings["split_layer"], settings["split_site"]
        # Blocks are built on the meta device and materialised empty (weights are loaded afterwards); the
        # embeddings are built for real because they hold non-persistent buffers (position ids) that no
        # checkpoint carries.
        with torch.device("meta"):
            tower = AutoModel.from_config(vision_config)
        self.embeddings = type(tower.embeddings)(vision_config)
        if getattr(tower, "pre_layrnorm", None) is not None:
            self.pre_layrnorm = tower.pre_layrnorm
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(split.vision_blocks(tower)[: split_layer + 1])
        for name in _UNUSED_AT_SITE[site]:
            delattr(self.encoder.layers[split_layer], name)
        layer = AlignedVQLayer(
            vision_config.hidden_size,
            settings["codebook_size"],
            codebook_dim=settings["codebook_dim"],
            num_codebooks=settings["num_codebooks"],
            num_groups=settings["num_groups"],
            use_dlp=settings["use_dlp"],
        )
        layer.dlp_out = None
        layer.project_out = None
        layer.quantizer.cluster_size = None
        layer.quantizer.embed_sum = None
        self.alignedvq = layer
        for name, child in self.named_children():
            if name != "embeddings":
                child.to_empty(device="cpu")
        self.search = None

    @property
    def codes_per_token(self) -> int:
        return self.settings["num_codebooks"] * self.settings["num_groups"]

    def refresh_search(self, config: SearchConfig | None = None) -> "AlignedVQEdgeEncoder":
        """(Re)build the search tables from the current weights, optionally with another search config.
        Residual codebooks get the folded residual search; grouped ones keep the generic exact search."""
        self.search_config = config or self.search_config
        self.search = folded_search(self.alignedvq, self.search_config)
        if self.search is None and self.search_config.method != "exact":
            raise ValueError("grouped codebooks support only the exact search")
        return self

    @classmethod
    def from_model(cls, model, preprocessing: ImagePreprocessing | None = None,
                   search: SearchConfig | None = None) -> "AlignedVQEdgeEncoder":
        """Copy the edge part out of a `LlavaAlignedVQForConditionalGeneration` (``preprocessing`` and
        ``search``: see the class)."""
        config = model.config
        settings = {key: getattr(config, key) for key in EDGE_SETTINGS}
        # The new modules draw initial weights that are overwritten below; drawing them from a forked random
        # stream keeps a save (every Trainer checkpoint copies the edge) from shifting a training run's stream.
        with torch.random.fork_rng(devices=[]):
            edge = cls(config.vision_config, settings, preprocessing, search)
        source = {f"model.vision_tower.{k}": v for k, v in model.model.vision_tower.state_dict().items()}
        source.update({f"model.alignedvq.{k}": v for k, v in model.model.alignedvq.state_dict().items()})
        wanted = edge.state_dict()
        edge.load_state_dict(
            {k: source[f"model.vision_tower.{k}" if not k.startswith("alignedvq.") else f"model.{k}"].detach().cpu() for k in wanted}
        )
        device = model.model.alignedvq.quantizer.codebook.device
        return edge.to(device).refresh_search().eval()

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """Pixels ``(batch, channels, size, size)`` -> indices ``(batch, tokens[, codes_per_token])``."""
        vision = self.vision_config
        split.check_pixel_values(pixel_values, num_channels=vision.num_channels, image_size=vision.image_size)
        z = split.edge_forward(self, pixel_values, self.settings["split_layer"], self.settings["split_site"])
        if self.search is not None:
            return self.search(z)
        indices = self.alignedvq.encode(z)
        return indices.squeeze(-1) if self.codes_per_token == 1 else indices

    encode = forward

    def num_bytes(self) -> int:
        """Bytes of weights and buffers the edge holds."""
        tensors = list(self.parameters()) + list(self.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def codebook(self) -> torch.Tensor:
        """The fp32 codebook ``(num_codebooks, num_groups, K, dim)``."""
        return self.alignedvq.quantizer.codebook

    def codebook_fingerprint(self) -> bytes:
        """16-byte codebook fingerprint, equal to the full model's (see the wire format)."""
        from ..wire import codebook_fingerprint

        return codebook_fingerprint(self.codebook())

    # ------------------------------------------------------------------------------------------------
    def edge_config(self) -> dict:
        """What ``edge_config.json`` holds: the split settings, the vision tower's config, the image
        preprocessing, the search, and the codebook fingerprint frames must carry."""
        return {
            "format": "alignedvq-edge",
            "format_version": EDGE_FORMAT_VERSION,
            "vision_config": self.vision_config.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "search": self.search_config.to_dict(),
            "codebook_fingerprint": self.codebook_fingerprint().hex(),
            **self.settings,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``edge_config.json`` and ``edge_model.safetensors`` into ``directory``; returns the weights path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_edge_config(directory, self.edge_config())
        weights = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        path = directory / EDGE_WEIGHTS_NAME
        save_file(weights, str(path), metadata={"format": "pt"})
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "AlignedVQEdgeEncoder":
        """Load an edge encoder saved by `save_pretrained` (or shipped inside a full checkpoint)."""
        directory = Path(directory)
        config = read_edge_config(directory)
        weights_path = directory / EDGE_WEIGHTS_NAME
        if not weights_path.is_file():
            raise EdgeCheckpointError(f"{weights_path.name} not found in {directory}; is this a PyTorch edge folder?")
        try:
            preprocessing = read_preprocessing(directory, config)
            search = SearchConfig.from_dict(config.get("search"))
        except ValueError as exc:
            raise EdgeCheckpointError(f"{EDGE_CONFIG_NAME}: {exc}") from exc
        edge = cls(config["vision_config"], {key: config[key] for key in EDGE_SETTINGS}, preprocessing, search)
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise EdgeCheckpointError(f"{weights_path.name} cannot be read (truncated or corrupt?): {exc}") from exc
        expected = edge.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise EdgeCheckpointError(
                f"{weights_path.name} does not match {EDGE_CONFIG_NAME}: missing {missing[:5]}, unexpected {unexpected[:5]}."
            )
        wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
        if wrong:
            raise EdgeCheckpointError(f"{weights_path.name} has tensors of the wrong shape: {wrong[:5]}.")
        edge.load_state_dict(state)
        edge.refresh_search()
        recorded = config.get("codebook_fingerprint")
        if recorded is not None and recorded != edge.codebook_fingerprint().hex():
            raise EdgeCheckpointError(
                f"{weights_path.name} holds another codebook than {EDGE_CONFIG_NAME} records "
                f"(fingerprint {edge.codebook_fingerprint().hex()} vs {recorded}); the files do not belong together."
            )
        return edge.eval()


__all__ = [
    "AlignedVQEdgeEncoder",
    "folded_search",
]
