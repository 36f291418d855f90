"""moe-edge: run Mixture-of-Experts language models where they do not fit.

`import moe_edge` stays light (no torch import) so that the CLI's --help is instant;
the API is imported on first use.
"""

__version__ = "0.1.0"

_LAZY = {"load": "api", "load_offloaded": "api", "load_auto": "api", "load_model": "api",
         "LoadedModel": "api", "model_info": "info", "ChatSession": "chat",
         "SamplingParams": "generation", "GenerationResult": "generation",
         "ModelConfig": "config", "load_config": "config", "MoeEdgeError": "errors"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'moe_edge' has no attribute {name!r}")
