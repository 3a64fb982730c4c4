"""nn.Module replacements that run quantized weights directly."""

from lowbit.modules.quant_linear import QuantLinear, replace_linears

__all__ = ["QuantLinear", "replace_linears"]
