"""The config-driven MoE decoder (see DESIGN.md, 'The model we target first')."""

from .attention import KVCache
from .decoder import MoEForCausalLM
from .moe import ExpertProvider, MoEBlock, ResidentExperts, Router

__all__ = ["KVCache", "MoEForCausalLM", "ExpertProvider", "MoEBlock", "ResidentExperts", "Router"]
