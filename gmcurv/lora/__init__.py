"""LoRA adapters (Learning on LoRAs, Putterman et al., 2024): GL(r)-invariant features of
the update ``ΔW = s B A`` and the curvature of a base model's loss along it.

- `gmcurv.lora.adapter`: adapters in memory (config, low-rank layers, validation); files
  are read and written by `gmcurv.io.adapter`;
- `gmcurv.lora.features`: singular values from two QRs and an r x r SVD, norms, ranks,
  the canonical (SVD) factorisation;
- `gmcurv.lora.mapping`: adapted modules -> base-model parameters, the update ``dθ``;
- `gmcurv.lora.curvature`: ``gᵀdθ``, ``dθᵀF dθ`` from decomposed factors, ``dθᵀH dθ`` from
  one HVP, predicted vs measured loss change when merged at several scales.

The package itself imports nothing: `gmcurv.io.adapter` builds on `gmcurv.lora.adapter`
without pulling in the estimators.
"""
