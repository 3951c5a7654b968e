"""Edge export: the part of a model the device runs, and the files it runs from.

* `edge.py`: `AlignedVQEdgeEncoder`, the edge part of a model as a standalone module (embeddings, the blocks
  before the split, the split block up to its site, the input DLP folded into the codebook search).
* `search.py`: the codeword search the edge runs (exact, or a low-rank shortlist re-ranked exactly).
* `edge_onnx.py`, `onnx_search.py`: the edge as one ONNX graph (the search written directly as ONNX), with an
  optional int8 front.
* `edge_export.py`: edge folders from checkpoints (`export_edge`, ``alignedvq export-edge``), the edge files a
  checkpoint carries, and `describe_checkpoint` (``alignedvq info``).
"""
