"""Qwen2.5-VL (its own windowed ViT at native resolution, 2x2 patch merger, 3-D rotary positions in the language
model) with an AlignedVQ split in its vision tower: the configuration (`configuration_qwen2_5_vl_alignedvq.py`),
the split of the windowed tower (`split_qwen2_5_vl.py`) and the model classes with the family's adapter
(`modeling_qwen2_5_vl_alignedvq.py`). The AlignedVQ layer is the LLaVA folder's."""
