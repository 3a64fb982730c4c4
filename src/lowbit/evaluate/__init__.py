"""Measuring what quantization cost: perplexity and KL divergence to the original model."""

from lowbit.evaluate.perplexity import EvalResult, ReferenceLogProbs, evaluate, windows_of

__all__ = ["EvalResult", "ReferenceLogProbs", "evaluate", "windows_of"]
