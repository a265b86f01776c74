"""SynthHop: a small, fully offline multi-hop search task for CPU demos, tests and benchmarks.

Modules, one concept each: ``kb`` (fictional knowledge base and corpus), ``questions`` (1-3-hop questions with
oracle paths), ``env`` (local BM25 search and turn logic), ``agent`` (scripted reference agent and demonstrations),
``tokenizer`` (word-level HF tokenizer with a chat template) and ``make_data`` (the CLI that writes a data set).
Nothing is imported here, so ``import recipe.carl.synthhop.kb`` stays free of transformers.
"""
