"""Pretraining methods: the registry (one entry per variant) and the tasks the engine's loop trains."""

from semanticmim.methods.registry import (
    METHODS,
    Method,
    PretrainRecipe,
    build_task,
    build_transform,
    build_variant,
    encoder_config,
    method,
    resolve_recipe,
)

__all__ = ["METHODS", "Method", "PretrainRecipe", "build_task", "build_transform", "build_variant", "encoder_config",
           "method", "resolve_recipe"]
