"""Project exceptions: one type per concern, each message names the file or field and what to do."""


class MoeEdgeError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(MoeEdgeError, ValueError):
    """A config.json (or a setting) that moe-edge cannot use."""


class CheckpointError(MoeEdgeError):
    """A checkpoint folder or weight file that is missing, truncated, unsafe or wrongly shaped."""


class StoreError(MoeEdgeError):
    """The expert store (a cache moe-edge builds from a checkpoint) is damaged or cannot be written."""


class ChatTemplateError(MoeEdgeError):
    """A chat template that fails, or runs past its time, memory or output bound."""
