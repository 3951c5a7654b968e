"""Configuration of a LLaVA model split by AlignedVQ."""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig

from .split import SPLIT_SITES


@strict
class AlignedVQConfig(LlavaConfig):
    r"""
    [`LlavaConfig`] plus where and how the vision tower is vector-quantized (AlignedVQ, arXiv 2411.05961).

    Defaults reproduce the paper's LLaVA-1.5 setup: one codebook of 4096 entries of the full 1024-dim feature,
    placed right after the first LayerNorm of the first vision block, with Dual Linear Projection.

    Split semantics (the vision tower is a stack of pre-norm blocks
    ``h = x + attn(ln1(x)); out = h + mlp(ln2(h))``):

    - ``patch`` (block 0 only): the patch embeddings before the position embeddings and CLIP's pre-LayerNorm,
      which the cloud adds; the edge runs only the patch embedding, and one codebook serves every position;
    - ``input``: the block input ``x``, the residual stream itself (at block 0: the embeddings after CLIP's
      pre-LayerNorm; the edge then runs no transformer block at all);
    - ``ln1``: the output of block ``split_layer``'s first LayerNorm, ``ln1(x)``;
    - ``attn``: the residual stream after the attention sublayer, ``h``;
    - ``ln2``: the output of the second LayerNorm, ``ln2(h)``;
    - ``mlp``: the residual stream after the MLP sublayer, i.e. the block's output ("VQ after block b", the
      paper's vanilla baseline).

    The edge runs the tower up to the site, applies the input DLP and quantizes. The cloud receives only the
    indices: codebook lookup, output DLP, then the rest of the block and all later blocks. At the LayerNorm
    sites the recovered features ``z`` replace the residual stream too (``ln1``: ``h = z + attn(z)``;
    ``ln2``: ``out = z + mlp(z)``), because the unquantized residual never leaves the edge. Training computes
    exactly this.

    Args:
        split_layer (`int`, *optional*, defaults to 0):
            Index (0-based) of the vision block that holds the split site. Every vision feature layer LLaVA
            reads (``vision_feature_layer``) must come after this block.
        split_site (`str`, *optional*, defaults to `"ln1"`):
            One of ``"patch"``, ``"input"``, ``"ln1"``, ``"attn"``, ``"ln2"``, ``"mlp"`` (see above).
        codebook_size (`int`, *optional*, defaults to 4096):
            Codewords per codebook ``K``; an index costs ``ceil(log2 K)`` bits on the wire.
        num_codebooks (`int`, *optional*, defaults to 1):
            Residual VQ depth.
        num_groups (`int`, *optional*, defaults to 1):
            Grouped VQ: the feature is cut into this many slices, each quantized with its own codebook(s).
            Must divide ``codebook_dim``.
        codebook_dim (`int`, *optional*):
            Dimension of the quantized vectors; defaults to the vision hidden size. A smaller value adds a
            linear down-projection before and up-projection after the quantizer.
        use_dlp (`bool`, *optional*, defaults to `True`):
            Wrap the quantizer in Dual Linear Projections (Eq. 2).
        commitment_weight (`float`, *optional*, defaults to 0.25):
            ``beta`` of Eq. 3; the commitment loss times this is added to the language-model loss.
        ema_decay (`float`, *optional*, defaults to 0.99):
            Decay of the EMA codebook updates, in ``(0, 1]``; 1 freezes the codebook.
        dead_code_threshold (`float`, *optional*, defaults to 0.01):
            Codewords whose EMA usage falls below this fraction of the mean codeword's are re-seeded from the
            batch during training; 0 disables. Relative, so it does not depend on the batch size.
        checkpoint_kind (`str`, *optional*, defaults to `"full"`):
            How `save_pretrained`/`push_to_hub` write the model: `"full"` (every weight) or `"adapter"` (only
            what AlignedVQ adds: codebook, DLP and the LoRA adapter, plus this config naming the base).
        base_model_name_or_path (`str`, *optional*):
            The LLaVA checkpoint an adapter-only checkpoint applies to (Hub id or folder).
        base_model_revision (`str`, *optional*):
            The revision (branch, tag or commit) of that base checkpoint.
    """

    model_type = "llava_alignedvq"

    split_layer: int = 0
    split_site: Literal["patch", "input", "ln1", "attn", "ln2", "mlp"] = "ln1"
    codebook_size: int = 4096
    num_codebooks: int = 1
    num_groups: int = 1
    codebook_dim: int | None = None
    use_dlp: bool = True
    commitment_weight: float = 0.25
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.01
    checkpoint_kind: Literal["full", "adapter"] = "full"
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.codebook_dim is None:
            self.codebook_dim = self.vision_config.hidden_size
        # Checked here rather than in a `@strict` class validator so a bad value raises a plain ValueError
        # (strict wraps validator errors in its own exception type, which is not a ValueError).
        self.validate_alignedvq()

    def validate_alignedvq(self):
        """Every AlignedVQ option, checked against the vision tower; raises `ValueError`."""
        for name in ("split_layer", "codebook_size", "num_codebooks", "num_groups", "codebook_dim"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool)):
                raise ValueError(f"{name} must be an int, got {value!r}.")
        for name in ("commitment_weight", "ema_decay", "dead_code_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
                raise ValueError(f"{name} must be a number, got {value!r}.")
        if self.checkpoint_kind not in ("full", "adapter"):
            raise ValueError(f"checkpoint_kind={self.checkpoint_kind!r} must be 'full' or 'adapter'.")
        if not isinstance(self.use_dlp, bool):
            raise ValueError(f"use_dlp must be a bool, got {self.use_dlp!r}.")
        num_layers = self.vision_config.num_hidden_layers
        if not 0 <= self.split_layer < num_layers:
            raise ValueError(f"split_layer={self.split_layer} must be in [0, {num_layers}) (vision blocks).")
        if self.split_site not in SPLIT_SITES:
            raise ValueError(f"split_site={self.split_site!r} must be one of {SPLIT_SITES}.")
        if self.split_site == "patch" and self.split_layer != 0:
            raise ValueError(f"split_site='patch' comes before block 0; got split_layer={self.split_layer}.")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size={self.codebook_size} must be at least 2.")
        for name in ("num_codebooks", "num_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.codebook_dim < 1:
            raise ValueError(f"codebook_dim={self.codebook_dim} must be positive.")
        if self.codebook_dim % self.num_groups:
            raise ValueError(f"codebook_dim={self.codebook_dim} is not divisible by num_groups={self.num_groups}.")
        if not self.commitment_weight >= 0:
            raise ValueError(f"commitment_weight={self.commitment_weight} must be >= 0.")
        if not 0 < self.ema_decay <= 1:
            raise ValueError(f"ema_decay={self.ema_decay} must be in (0, 1].")
        if not self.dead_code_threshold >= 0:
            raise ValueError(f"dead_code_threshold={self.dead_code_threshold} must be >= 0.")
        for layer in self.feature_layer_indices():
            if layer <= self.split_layer:
                raise ValueError(
                    f"vision_feature_layer={self.vision_feature_layer} reads hidden state {layer}, which is computed "
                    f"before the split in block {self.split_layer}; the cloud only has features after it. "
                    f"Use split_layer < {layer}."
                )

    def feature_layer_indices(self) -> list[int]:
        """``vision_feature_layer`` as non-negative indices into the tower's hidden states (0 = embeddings,
        ``i`` = output of block ``i - 1``)."""
        layers = self.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        total = self.vision_config.num_hidden_layers + 1
        out = []
        for layer in layers:
            index = layer + total if layer < 0 else layer
            if not 0 <= index < total:
                raise ValueError(f"vision_feature_layer {layer} is out of range for {total - 1} vision blocks.")
            out.append(index)
        return out

    @property
    def codes_per_token(self) -> int:
        return self.num_codebooks * self.num_groups

    @property
    def num_image_tokens(self) -> int:
        """Tokens the vision tower produces per image (patches + CLS): what the edge sends indices for."""
        vision = self.vision_config
        return (vision.image_size // vision.patch_size) ** 2 + 1

    @classmethod
    def from_llava_config(cls, llava_config: LlavaConfig, **vq_options) -> "AlignedVQConfig":
        """The config of ``llava_config``'s model with AlignedVQ options ``vq_options`` added."""
        values = llava_config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            values.pop(key, None)
        values.update(vq_options)
        return cls(**values)


__all__ = ["AlignedVQConfig", "SPLIT_SITES"]
