"""Model registry: ``build_model(name, num_classes, ...)`` and checkpoints.

Every model is wrapped in :class:`NormalizedModel`, so engines feed inputs in [0, 1] and
normalization travels with the weights. The families below register themselves on import.
"""
from fastablate.models import cifar_resnet, external, torchvision_nets  # noqa: F401,E402  (they register their models)
from fastablate.models.checkpoint import load_model, save_checkpoint  # noqa: E402
from fastablate.models.registry import (MODELS, ModelSpec, NormalizedModel, build_model, count_parameters,
                                        default_stem, get_spec, is_external, model_names, register_model, runs_code)

__all__ = ["MODELS", "ModelSpec", "NormalizedModel", "build_model", "count_parameters", "default_stem", "get_spec",
           "is_external", "load_model", "model_names", "register_model", "runs_code", "save_checkpoint"]
