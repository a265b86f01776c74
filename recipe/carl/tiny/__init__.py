"""The parts of the CPU demo that run without verl's trainer: the tiny policy (``policy``), its SFT warm start
(``sft``), held-out evaluation with batched HF generation (``evaluate``) and the two pictures (``plots``).

Nothing is imported here, so importing one module does not load the others' dependencies.
"""
