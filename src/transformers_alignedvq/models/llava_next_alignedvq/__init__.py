"""LLaVA-NeXT (CLIP tower, any-resolution tiles plus a base view) with an AlignedVQ split in its vision tower:
the configuration (`configuration_llava_next_alignedvq.py`) and the model classes with the family's adapter
(`modeling_llava_next_alignedvq.py`). The tiling logic shared with OneVision is `models/tiled_alignedvq.py`; the
AlignedVQ layer and the split of the tower are the LLaVA folder's."""
