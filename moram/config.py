"""MoRAMConfig: every knob of the method, validated at construction (pydantic v2).

A bad value raises ``MoRAMConfigError`` with one ``key: message, got value`` line per bad key
(``moram.validation.format_errors``); a config nested in a job config reports the same
messages under its own prefix (``moram.tau: must be > 0, got -1``).
"""
from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import ConfigDict, Field, field_validator, model_validator

from .methods import METHODS
from .validation import check_integer, check_real, format_errors

# Attention projections of LLaMA-family models (LLaMA, SmolLM2, Gemma, Qwen, Mistral).
LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class MoRAMConfigError(ValueError):
    """A config value is outside its allowed range; the message names the field."""


class MoRAMConfig(pydantic.BaseModel):
    """Configuration of MoRAM and of the baselines that share its layer (``moram.methods``)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, description="Atoms added per task per layer (the rank of a task's update).")
    k: int = Field(8, description="Routing budget: top-k over all atoms, k_eff = min(max(k, 2), R) (Eq. 6).")
    tau: float = Field(0.03, description="Softmax temperature of MoRAM's routing (Eq. 7).")
    delta: float = Field(0.2, description="Inference-time activation threshold on normalised scores (Eq. 8); 0 disables it.")
    target_modules: list[str] | str = Field(
        default_factory=lambda: list(LLAMA_ATTENTION),
        description="Module-name suffixes to wrap (\"q_proj\" matches \"...self_attn.q_proj\"), or one regex matched against full names.")
    alpha: float | None = Field(
        None, description="LoRA-style scale numerator: a training block is scaled by alpha/r (baked into B at freeze). Default: 2r for MoRAM, 4r (32 at r 8) for the LoRA baselines, as the official code.")
    dropout: float = Field(0.1, description="Dropout on the layer input of the atom branch (training only).")
    method: str = Field(
        "moram", description="moram, or a baseline on the same layer: seqlora, inclora, moelora, olora (see moram.methods).")
    prune_mass: float | None = Field(
        None, description="Post-pruning coverage (paper Sec. 3.3.4, e.g. 0.99): keep the fewest atoms of a task carrying this share of its activation mass; null (the default, as the official code, which does not prune) disables.")
    collect_stats: bool = Field(True, description="Accumulate per-atom activation mass while a task trains (pruning needs it).")
    eps: float = Field(1e-6, description="Floor of the L2 norm of the key responses (Eq. 5).")
    seed: int = Field(0, description="Seeds each task's fresh atoms (per task and layer), identical on every data-parallel worker.")
    moe_top_k: int | None = Field(
        None, description="MoE-LoRA: experts kept per token by the router (top-k before the softmax); null keeps all.")
    moe_tau: float = Field(1.0, description="MoE-LoRA: temperature of the router's softmax (1 = plain softmax).")
    frozen_scale: Literal["baked", "official"] = Field(
        "baked", description="baked: alpha/r is baked into B at freeze; official: B is frozen unscaled as in the official code (frozen atoms weigh r/alpha as much).")
    route_untrained: bool = Field(
        False, description="Evaluate as the official TRACE code does: the evaluated model carries the next task's fresh, never-trained block (B = 0), which takes part in routing (MoRAM, MoE-LoRA; docs/parity.md, M3).")
    fast_path: Literal["auto", "off"] = Field(
        "auto", description="auto: the measured fast layer (frozen bank and trainable block apart, no weight concatenation; MoRAM routes in compact form, Triton on CUDA, and reads only the kept values once R >= 8 k_eff); off: the equations as written (docs/performance.md).")
    olora_lambda1: float = Field(0.5, description="O-LoRA: weight of the L1 orthogonality loss |A_old · A_newᵀ| (official default 0.5).")
    olora_lambda2: float = Field(0.0, description="O-LoRA: weight of the L2 norm of the new adapter's A and B (official default 0).")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except pydantic.ValidationError as error:
            raise MoRAMConfigError(_describe(error)) from None

    # -- validation (messages start with the rule; the formatter prefixes the key) ---------
    @field_validator("r", "k", mode="before")
    @classmethod
    def _positive_int(cls, value: Any) -> int:
        return check_integer(value, minimum=1)

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> int:
        return check_integer(value, minimum=0)

    @field_validator("moe_top_k", mode="before")
    @classmethod
    def _moe_top_k(cls, value: Any) -> int | None:
        return None if value is None else check_integer(value, minimum=1)

    @field_validator("tau", "alpha", "eps", "moe_tau", mode="before")
    @classmethod
    def _positive(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        if value is None and info.field_name == "alpha":
            return None  # the method's default_scale x r, filled in once r is known
        return check_real(value, "must be > 0", lambda v: v > 0)

    @field_validator("olora_lambda1", "olora_lambda2", mode="before")
    @classmethod
    def _non_negative(cls, value: Any, info: pydantic.ValidationInfo) -> float:
        return check_real(value, "must be >= 0", lambda v: v >= 0)

    @field_validator("delta", mode="before")
    @classmethod
    def _delta(cls, value: Any) -> float:
        return check_real(value, "must be in [0, 1]", lambda v: 0 <= v <= 1)

    @field_validator("dropout", mode="before")
    @classmethod
    def _dropout(cls, value: Any) -> float:
        return check_real(value, "must be in [0, 1)", lambda v: 0 <= v < 1)

    @field_validator("prune_mass", mode="before")
    @classmethod
    def _prune_mass(cls, value: Any) -> float | None:
        return None if value is None else check_real(value, "must be in (0, 1] or null", lambda v: 0 < v <= 1)

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> str:
        if not isinstance(value, str) or value not in METHODS:
            raise ValueError(f"unknown method {value!r}; choose one of {list(METHODS)}")
        return value

    @field_validator("collect_stats", "route_untrained", mode="before")
    @classmethod
    def _bool(cls, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value

    @field_validator("frozen_scale", mode="before")
    @classmethod
    def _frozen_scale(cls, value: Any) -> str:
        if value not in ("baked", "official"):
            raise ValueError("must be 'baked' or 'official'")
        return value

    @field_validator("fast_path", mode="before")
    @classmethod
    def _fast_path(cls, value: Any) -> str:
        if value not in ("auto", "off"):
            raise ValueError("must be 'auto' or 'off'")
        return value

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> list[str] | str:
        if isinstance(value, str):
            if not value:
                raise ValueError("empty regular expression")
            return value
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
            raise ValueError("must be a non-empty list of module-name suffixes or a regex string")
        return value

    @model_validator(mode="after")
    def _default_alpha(self) -> "MoRAMConfig":
        if self.alpha is None:
            self.alpha = METHODS[self.method].default_scale * self.r
        return self

    # -- derived ---------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return float(self.alpha) / self.r

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MoRAMConfig":
        return cls(**values)

    def replace(self, **changes: Any) -> "MoRAMConfig":
        return MoRAMConfig.from_dict({**self.to_dict(), **changes})


def _describe(error: pydantic.ValidationError) -> str:
    """One line per bad key; an unknown key also lists the known ones."""
    lines = format_errors(error).splitlines()
    known = sorted(MoRAMConfig.model_fields)
    return "\n".join(
        line.replace(": unknown key", ": unknown MoRAM config key", 1) + f" (known keys: {known})"
        if ": unknown key" in line else line
        for line in lines)
