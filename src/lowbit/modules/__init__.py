"""nn.Module replacements that run quantized weights directly."""

from lowbit.modules.quant_linear import QuantLinear, replace_linears
from lowbit.modules.vq_linear import VQLinear

__all__ = ["QuantLinear", "VQLinear", "replace_linears"]
