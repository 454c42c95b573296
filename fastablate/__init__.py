"""fastablate: lesion, noise and adversarial robustness studies of ResNets and VGGs.

Importing the package is cheap (no torch); the library lives in its submodules:
``fastablate.models``, ``fastablate.data``, ``fastablate.units``, ``fastablate.ops``,
``fastablate.engines``.
"""
__version__ = "0.1.0"
