"""Ways to fill an expert slot with weights: the shared slot layout, and the
safetensors disk loader used when no live replica of an expert is left."""

from loaders.layout import CheckpointPart, ExpertLayout, SlotTensor, moe_layout
from loaders.checkpoint.naming import NamingScheme, get_scheme
from loaders.checkpoint.safetensors_source import ExpertRequest, LoadReport, SafetensorsExpertSource

__all__ = [
    "CheckpointPart",
    "ExpertLayout",
    "ExpertRequest",
    "LoadReport",
    "NamingScheme",
    "SafetensorsExpertSource",
    "SlotTensor",
    "get_scheme",
    "moe_layout",
]
