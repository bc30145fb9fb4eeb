"""Full-model runs: synthetic Gemma 4 checkpoints, the vLLM runner, prediction vs measurement.

- ``layout``: the tensors a Gemma 4 text checkpoint holds, derived from its config (one table
  for the writer, the tests and the runner's pre-flight check).
- ``packing``: int4 round-to-nearest quantization and GPTQ / AWQ packing.
- ``synth``: writes a random-weight checkpoint (bf16, gptq, awq) with the real config.
- ``workload`` (pure) plans generate calls; ``runner`` runs one ``worker`` subprocess per
  quantization and writes ``model.jsonl``.
- ``reconcile`` predicts linear-layer energy per token from a kernel profile and compares it
  with the measured J/token; ``plot.plot_reconciliation`` draws it.
"""
