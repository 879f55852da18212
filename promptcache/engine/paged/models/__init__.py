"""Lean model code for the batched engine: each family's forward over packed tokens, with
attention left to the engine (``Attention``), built from a loaded transformers model.

``from_hf`` picks the family by ``config.model_type``. In the target dtype the lean model
shares the transformers model's storage (fused projections become the source's storage, see
``layers``); converting the dtype copies, so drop the transformers model afterwards.
"""

from __future__ import annotations

from typing import Any

import torch

from promptcache.engine.paged.models.base import Attention, AttnSpec, CausalLM, ModelShape
from promptcache.engine.paged.models.gemma3 import GEMMA3_TYPES, Gemma3, gemma3_from_hf
from promptcache.engine.paged.models.llama import LLAMA_FAMILY, Llama, llama_from_hf

SUPPORTED_MODEL_TYPES = LLAMA_FAMILY + GEMMA3_TYPES


def from_hf(model: Any, dtype: torch.dtype | None = None) -> CausalLM:
    """Build the lean model from a loaded transformers causal LM, in ``dtype`` (default: the
    model's), on the model's device, in eval mode without gradients.

    Raises ``ValueError`` naming the architecture when the family is not supported.
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    if dtype is None:
        dtype = model.get_input_embeddings().weight.dtype
    lean: CausalLM
    with torch.no_grad():
        if model_type in LLAMA_FAMILY:
            lean = llama_from_hf(model, dtype)
        elif model_type in GEMMA3_TYPES:
            lean = gemma3_from_hf(model, dtype)
        else:
            arch = ", ".join(getattr(config, "architectures", None) or [type(model).__name__])
            raise ValueError(
                f"unsupported architecture {arch} (model_type {model_type!r}); "
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
    return lean.eval().requires_grad_(False)


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Attention",
    "AttnSpec",
    "CausalLM",
    "Gemma3",
    "Llama",
    "ModelShape",
    "from_hf",
]
