"""The memlm model: a plain single-device nn.Module assembled from a ModelConfig."""

from memlm.model.lm import LanguageModel, ModelOutput

__all__ = ["LanguageModel", "ModelOutput"]
