"""Post-training weight/activation quantization of the split model (Q-VLM, Wang et al., NeurIPS 2024).

* `layers.py`: fake-quantized linear layers (`QuantLinear`), which layers belong to which part, and the strict
  ``ptq_config.json`` + ``ptq.safetensors`` files a quantized checkpoint carries.
* `steps.py`: the model as a list of steps, and the activation entropy and output errors the search measures.
* `calibration.py`: the three calibration methods (round to nearest, a layer-wise clipping search, Q-VLM's
  entropy-guided block search with the visual-encoder optimization) behind `quantize_model`.
"""

from .calibration import METHODS, Calibrator, PTQConfig, dependency_analysis, optimize_visual_encoder, quantize_model
from .layers import (
    PARTS,
    PTQ_CONFIG_NAME,
    PTQ_FORMAT,
    PTQ_FORMAT_VERSION,
    PTQ_WEIGHTS_NAME,
    SUPPORTED_BITS,
    QuantLinear,
    activation_qparams,
    apply_ptq,
    check_bits,
    edge_quantizers,
    fake_quantize,
    is_quantized,
    load_ptq,
    model_bits,
    ptq_state,
    quant_layers,
    quantizers_disabled,
    replace_linear,
    save_ptq,
    weight_range,
    weight_scales,
)
from .steps import model_steps, r_squared, token_entropy

__all__ = [
    "METHODS", "PARTS", "PTQ_CONFIG_NAME", "PTQ_FORMAT", "PTQ_FORMAT_VERSION", "PTQ_WEIGHTS_NAME", "SUPPORTED_BITS",
    "Calibrator", "PTQConfig", "QuantLinear", "activation_qparams", "apply_ptq", "check_bits", "dependency_analysis",
    "edge_quantizers", "fake_quantize", "is_quantized", "load_ptq", "model_bits", "model_steps",
    "optimize_visual_encoder", "ptq_state", "quant_layers", "quantize_model", "quantizers_disabled", "r_squared",
    "replace_linear", "save_ptq", "token_entropy", "weight_range", "weight_scales",
]
