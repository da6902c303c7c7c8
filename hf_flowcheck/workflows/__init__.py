"""Research workflows: answer generation, dataset extraction, training, comparison, ablations.

Beside the runtime path: nothing under ``hf_flowcheck`` outside ``workflows`` and ``cli`` imports it.
"""

__all__: list[str] = []  # import the submodules (answers, corpus, extract, training, ...) themselves
