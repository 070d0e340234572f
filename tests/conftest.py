"""Hypothesis profiles: random exploration by default; ``HYPOTHESIS_PROFILE=ci`` (set by .ci/run) derandomizes,
so a landing run is reproducible and a failure found while developing is kept as an ``@example``."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
