"""MoRAMConfig: every knob of the method, validated at construction."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

METHODS = ("moram", "seqlora", "inclora", "moelora")

# Attention projections of LLaMA-family models (LLaMA, SmolLM2, Gemma, Qwen, Mistral).
LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class MoRAMConfigError(ValueError):
    """A config value is outside its allowed range; the message names the field."""


@dataclass
class MoRAMConfig:
    """Configuration of MoRAM and of the baselines that share its layer.

    r: atoms added per task (rank of a task's update).
    k: activation budget, top-k over all atoms (k_eff = min(max(k, 2), R)).
    tau: softmax temperature of the routing.
    delta: inference-time activation threshold (0 disables it).
    target_modules: module-name suffixes (``"q_proj"`` matches ``...self_attn.q_proj``) or one
        regular expression string matched against the full module name.
    alpha: LoRA-style scale numerator; the update is scaled by alpha / r while a task trains
        and the scale is baked into B when the task's atoms are frozen. Default 2r.
    dropout: dropout on the layer input of the atom branch (training only).
    method: "moram", or a baseline run through the same layer: "seqlora" (one rank-r adapter
        trained on every task in turn), "inclora" (a new rank-r adapter per task, old ones
        frozen, all summed), "moelora" (a rank-r expert per task mixed by a learned router).
    prune_mass: post-pruning coverage, e.g. 0.99 keeps the smallest set of a task's atoms
        carrying >= 99% of its activation mass; None disables pruning.
    collect_stats: accumulate per-atom activation mass while a task trains (needed for pruning).
    eps: floor of the L2 norm in Eq. 5.
    seed: seeds the initialisation of each task's atoms (per task and layer), so every worker
        of a data-parallel job builds the same fresh atoms.
    """

    r: int = 8
    k: int = 8
    tau: float = 0.03
    delta: float = 0.2
    target_modules: list[str] | str = field(default_factory=lambda: list(LLAMA_ATTENTION))
    alpha: float | None = None
    dropout: float = 0.1
    method: str = "moram"
    prune_mass: float | None = 0.99
    collect_stats: bool = True
    eps: float = 1e-6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.alpha is None:
            self.alpha = 2.0 * self.r if isinstance(self.r, int) and not isinstance(self.r, bool) else None
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.validate()

    # -- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        _check_int("r", self.r, minimum=1)
        _check_int("k", self.k, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_real("tau", self.tau, "tau must be > 0", lambda v: v > 0)
        _check_real("delta", self.delta, "delta must be in [0, 1]", lambda v: 0 <= v <= 1)
        _check_real("alpha", self.alpha, "alpha must be > 0", lambda v: v > 0)
        _check_real("dropout", self.dropout, "dropout must be in [0, 1)", lambda v: 0 <= v < 1)
        _check_real("eps", self.eps, "eps must be > 0", lambda v: v > 0)
        if self.prune_mass is not None:
            _check_real("prune_mass", self.prune_mass, "prune_mass must be in (0, 1] or null",
                        lambda v: 0 < v <= 1)
        if self.method not in METHODS:
            raise MoRAMConfigError(f"method: unknown method {self.method!r}; choose one of {list(METHODS)}")
        if not isinstance(self.collect_stats, bool):
            raise MoRAMConfigError(f"collect_stats: must be true or false, got {self.collect_stats!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise MoRAMConfigError("target_modules: empty regular expression")
        elif not targets or not all(isinstance(t, str) and t for t in targets):
            raise MoRAMConfigError(
                f"target_modules: must be a non-empty list of module-name suffixes or a regex string, got {targets!r}"
            )

    # -- derived ---------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return float(self.alpha) / self.r

    @property
    def routed(self) -> bool:
        """MoRAM routes atoms with top-k and tau; the LoRA baselines sum them."""
        return self.method == "moram"

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MoRAMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MoRAMConfigError(f"{unknown[0]}: unknown MoRAM config key; known keys: {sorted(known)}")
        return cls(**values)

    def replace(self, **changes: Any) -> "MoRAMConfig":
        return MoRAMConfig.from_dict({**self.to_dict(), **changes})


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MoRAMConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise MoRAMConfigError(f"{name}: must be an integer >= {minimum}, got {value}")


def _check_real(name: str, value: Any, rule: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise MoRAMConfigError(f"{name}: {rule}, got {value!r}")
