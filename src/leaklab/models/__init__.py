"""Model registry and family adapters."""

from leaklab.models.adapter import FamilyAdapter, LayerProjections, Projection
from leaklab.models.registry import PACKAGED, TASKS, LoadedModel, ModelRef, load_model, model_names

__all__ = [
    "PACKAGED",
    "TASKS",
    "FamilyAdapter",
    "LayerProjections",
    "LoadedModel",
    "ModelRef",
    "Projection",
    "load_model",
    "model_names",
]
