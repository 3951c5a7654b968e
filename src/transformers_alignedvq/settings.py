"""The AlignedVQ settings of a split model, named once. No imports: the device reads the split settings from
``edge_config.json``, and the cloud from the model's config (`AlignedVQConfig`, where each is documented)."""

#: What the edge and the cloud must agree on: where the tower is split and how sites are coded.
SPLIT_SETTINGS = ("split_layer", "split_site", "codebook_size", "codebook_dim", "num_codebooks", "num_groups", "use_dlp")
#: What frames and `alignedvq info` describe of a split (the edge's settings less how codewords are searched).
FRAME_SETTINGS = ("split_layer", "split_site", "codebook_size", "num_codebooks", "num_groups")
#: What the finetune also needs to continue training (the loss weight and the EMA codebook's updates).
TRAINING_SETTINGS = ("commitment_weight", "ema_decay", "dead_code_threshold")

__all__ = ["FRAME_SETTINGS", "SPLIT_SETTINGS", "TRAINING_SETTINGS"]
