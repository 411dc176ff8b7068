"""Checks that need only the model's structure, run by the job entry points before Ray or MLflow
start: the model is built on the meta device by the benchmark's own loader (no weight is read,
nothing is written), then wrapped exactly as the workers will wrap it.

    check_model_structure(config)     # raises ConfigError: one line that names the key

What it refuses, each of which would otherwise surface as a traceback inside a Ray task, after a
run was opened in MLflow:
- a ``moram.target_modules`` entry that names no module of the model (the nearest names are
  suggested), or only modules MoRAM cannot wrap (it wraps nn.Linear and transformers' Conv1D);
- target layers whose weights are not floating point (a quantized checkpoint), or not in the
  ``model.dtype`` the config asks for;
- ``moram.r`` above the width of a target layer: a task's r rank-1 atoms would span more
  directions than the layer has (its update cannot have rank above min(d_in, d_out)).
"""
from __future__ import annotations

import difflib
import re

from torch import nn

from moram import get_moram_model
from moram.config import MoRAMConfigError
from moram.layer import MoRAMLayer, base_features, is_projection

from .benchmark import get_benchmark
from .config import ConfigError, JobConfig

DTYPE_NAMES = {"float32": "torch.float32", "bfloat16": "torch.bfloat16"}


def check_model_structure(config: JobConfig, benchmark=None) -> None:
    """Raise ``ConfigError`` for the first structural problem of ``config``'s model (module doc)."""
    benchmark = benchmark or get_benchmark(config.benchmark)
    try:
        model = benchmark.empty_model(config)
    except (OSError, ValueError) as error:      # unreadable model files: the key that names them
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"model.source: {config.model.source!r} cannot be built: {_first_line(error)}") from None
    moram_config = config.moram_config
    _refuse_quantized(model)
    try:   # as the workers wrap it (CLIP's attention is split into q/k/v/out_proj first)
        layers = get_moram_model(model, moram_config).moram_layers
    except MoRAMConfigError:
        layers = {}                             # no target matched: named below, with suggestions
    _check_targets(moram_config.target_modules, _modules(model), layers)
    for name, layer in layers.items():
        _check_layer(name, layer.base, config, moram_config.r)


def _check_targets(targets: list[str] | str, modules: dict[str, nn.Module], wrapped: dict) -> None:
    projections = sorted({name.rsplit(".", 1)[-1] for name, module in modules.items() if is_projection(module)})
    if isinstance(targets, str):
        if not wrapped:
            raise ConfigError(f"moram.target_modules: the regex {targets!r} matches no nn.Linear/Conv1D module "
                              f"of this model; its projections are named {projections}")
        return
    for target in targets:
        matching = [module for name, module in modules.items() if name == target or name.endswith("." + target)]
        if not matching:
            suffixes = sorted({name.rsplit(".", 1)[-1] for name in modules})
            nearest = difflib.get_close_matches(target, projections, n=3, cutoff=0.4) or \
                difflib.get_close_matches(target, suffixes, n=3, cutoff=0.4)
            hint = f"nearest: {nearest}" if nearest else "none is close"
            raise ConfigError(f"moram.target_modules: {target!r} names no module of this model ({hint}; "
                              f"its projections are named {projections})")
        if not any(is_projection(module) for module in matching):
            kinds = sorted({type(module).__name__ for module in matching})
            raise ConfigError(f"moram.target_modules: {target!r} names {'/'.join(kinds)} modules, which MoRAM "
                              f"cannot wrap (it wraps nn.Linear and Conv1D); this model's projections are "
                              f"named {projections}")


def _check_layer(name: str, base: nn.Module, config: JobConfig, r: int) -> None:
    dtype = base.weight.dtype
    if not dtype.is_floating_point:
        raise ConfigError(f"model.source: layer {name} has {dtype} weights (a quantized checkpoint); MoRAM "
                          f"trains on floating-point weights: use the unquantized model")
    wanted = DTYPE_NAMES.get(config.model.dtype)
    if wanted is not None and str(dtype) != wanted:
        raise ConfigError(f"model.dtype: {config.model.dtype!r} asked for, but the loader builds layer {name} "
                          f"in {dtype}")
    d_in, d_out = base_features(base)
    if r > min(d_in, d_out):
        raise ConfigError(f"moram.r: {r} is more than the width of layer {name} ({d_in} -> {d_out}): a task's "
                          f"update of it cannot have rank above {min(d_in, d_out)}; got {r}")


def _refuse_quantized(model: nn.Module) -> None:
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", None)
        raise ConfigError(f"model.source: a quantized checkpoint ({method or 'quantization_config'}); MoRAM "
                          f"trains on floating-point weights: use the unquantized model")


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every named module of the model as it was before wrapping: a MoRAM layer stands for its base."""
    found, wrapped = {}, []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in wrapped):
            continue
        if isinstance(module, MoRAMLayer):
            wrapped.append(name + ".")
            module = module.base
        found[name] = module
    return found


def _first_line(error: BaseException) -> str:
    return re.sub(r"\s+", " ", str(error).strip().splitlines()[0]) if str(error).strip() else type(error).__name__
