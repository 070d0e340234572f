"""The collapse-scenario benchmark behind ``topo-callbacks bench``: scenarios, detectors replayed on recorded runs."""
