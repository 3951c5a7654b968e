"""LLaVA with an AlignedVQ split in its vision tower: the configuration (`configuration_alignedvq.py`), the
model classes (`modeling_alignedvq.py`), the AlignedVQ layer (`alignedvq_layer.py`: the quantizer of
`quantizer.py` between the two Dual Linear Projections of `dlp.py`) and the split of the vision tower
(`split.py`). The files of this folder are what a checkpoint carries as remote code; nothing here imports the
rest of the package except, optionally, its checkpoint code (`checkpointing.py`)."""
