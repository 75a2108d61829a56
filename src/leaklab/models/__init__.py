"""Model registry and family adapters."""

from leaklab.models.adapter import FamilyAdapter, LayerProjections, Projection
from leaklab.models.device import current_device, device_record, resolve_device, set_device, use_device
from leaklab.models.registry import PACKAGED, TASKS, LoadedModel, ModelRef, load_model, model_names

__all__ = [
    "PACKAGED",
    "TASKS",
    "FamilyAdapter",
    "LayerProjections",
    "LoadedModel",
    "ModelRef",
    "Projection",
    "current_device",
    "device_record",
    "load_model",
    "model_names",
    "resolve_device",
    "set_device",
    "use_device",
]
