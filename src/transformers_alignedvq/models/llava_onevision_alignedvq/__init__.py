"""LLaVA-OneVision (SigLIP tower, any-resolution tiles plus a base view) with an AlignedVQ split in its vision
tower: the configuration (`configuration_llava_onevision_alignedvq.py`) and the model classes with the family's
adapter (`modeling_llava_onevision_alignedvq.py`). The AlignedVQ layer and the split of the tower are the LLaVA
folder's, imported from there."""
