"""Grounding DINO backend. Importing this package does not import torch; submodules that need it do, and so does
the first use of `grounding_dino.Detector` (grounding_dino.detector)."""


def __getattr__(name: str):
    if name in ("Detector", "Prediction"):
        from grounding_dino import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'grounding_dino' has no attribute {name!r}")
