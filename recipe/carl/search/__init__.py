"""The search environment for CARL's multi-turn QA agent.

Modules (import them directly; this package imports nothing heavy on its own):

* ``actions``: ``parse_action`` / ``render_observation`` for Search-R1's ``<search>``, ``<answer>`` and
  ``<information>`` tags.
* ``reward``: ``compute_score`` (format + answer F1, EM) for verl's ``reward.custom_reward_function``.
* ``client``: ``RetrievalClient.search`` (async, retries, per-tree ``SearchCache``), no verl needed.
* ``search_tool``: ``CarlSearchTool``, the same client as a verl ``BaseTool``.
* ``retriever``: corpus, BM25/dense indexes and their verified cache; ``server``: the HTTP server and its CLI
  (``python -m recipe.carl.search.server``). ``server`` imports ``retriever``, never the other way round.
"""
