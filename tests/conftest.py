"""Suite-wide settings."""

from __future__ import annotations

import os

from hypothesis import settings

# CI runs a fixed set of examples so that main stays green for a reason that can be
# reproduced; developers get fresh random examples on every run.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
