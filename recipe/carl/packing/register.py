"""Importing this registers `TreePackedFSDPEngine`: the recipe plugin imports it right after `verl.workers.engine`.

A plain module import (no `from ... import`): when `recipe.carl.packing.engine` is imported first (tests), its own
import of verl's engine package runs this hook while the engine module is still half-initialised; the engine module
registers itself once it is complete.
"""

import recipe.carl.packing.engine  # noqa: F401
