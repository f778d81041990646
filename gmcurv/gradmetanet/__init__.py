"""The learned curvature head: GradMetaNet (Gelberg et al., NeurIPS 2025) on decomposed gradients.

- `features`: captured per-example gradients of an MLP -> per-neuron ``(a, delta)`` sets;
- `layers` / `model`: the equivariant network (Eq. 9 of the paper);
- `targets`: exact large-sample curvature the head learns to predict;
- `zoo` / `train`: the model zoo and the training loop;
- `pretrained` / `predict`: the shipped head and ``--method learned``.
"""
