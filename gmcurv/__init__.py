"""gmcurv: curvature and loss-landscape analysis for PyTorch models.

The engine is importable on its own (no printing, no exiting); the command line lives in
`gmcurv.cli`. Start with `gmcurv.io.checkpoint.load_model`, `gmcurv.io.data.load_data`,
`gmcurv.objective.Objective` and `gmcurv.capture.capture`.
"""

__version__ = "0.1.0"
