"""CARL as a verl recipe: the glue between carl_core and verl 0.9.1 (agent loop, estimator, trainer hook, config)."""
