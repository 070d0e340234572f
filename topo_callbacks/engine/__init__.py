"""The MMHM engine: a fixed-scale Vietoris-Rips complex kept on the points' device under sparse edits."""

from topo_callbacks.engine.mmhm import MMHMEngine

__all__ = ["MMHMEngine"]
