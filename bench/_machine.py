"""The line every benchmark's JSON carries about where it ran (the library's, so that
`moe-edge bench` and these scripts say the same)."""

from moe_edge.info import machine

__all__ = ["machine"]
