"""The bundled sample checkpoints, their data and the pretrained GradMetaNet head (data only).

Shipped as package data of ``gmcurv.sample_models``; ``gmcurv.io.samples`` gives their paths.
"""
