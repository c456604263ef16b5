"""The quality study v2 of CGGR (issue 15): time-to-quality on the `pycode` corpus; see ``README.md`` and
``PROTOCOL.md`` beside this file.

Modules: :mod:`.pycode` (corpus, one-pass candidate batches, noise chunks, evaluation sets), :mod:`.study` (models,
arms, reference model, the gate, the round plans, the command line), :mod:`.analyze` (paired statistics, m,
time-to-target, plots). The v1 harness (WikiText-2/Tiny Shakespeare, `run.py`/`modes.py`/...) is in git history
at commit e31e6b8.
"""
