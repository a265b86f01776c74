"""Importing this registers `TreePackedFSDPEngine` (the recipe plugin imports it right after `verl.workers.engine`)."""

from recipe.carl.packing.engine import register_engine

register_engine()
