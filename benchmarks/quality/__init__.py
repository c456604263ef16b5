"""The honest quality/throughput harness of CGGR (``python -m benchmarks.quality.run``; see ``README.md``).

Modules: :mod:`.data` (corpora, local BPE tokenizer, batches), :mod:`.flops` (FLOPs accounting),
:mod:`.modes` (the run variants and the PyTorch trainer), :mod:`.jax_modes` (the JAX/Flax trainer),
:mod:`.run` (the command line), :mod:`.report` (``results.md`` and the plots).
"""
