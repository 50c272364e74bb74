"""omni-runtime: a fast runtime for Qwen3-Omni. Public API: ``OmniModel`` and ``SamplingParams``."""
from omni_runtime.api import GenerationOutput, OmniModel
from omni_runtime.sampling import SamplingParams

__all__ = ["GenerationOutput", "OmniModel", "SamplingParams"]
