"""Fast paths for the MoRAM layer, each tested against moram.functional (the specification).

- fused_route_mix(h, k, tau, delta, eps) -> w ⊙ h [..., R]: routing (Eqs. 5-8) and the mix in
  one Triton kernel on CUDA; plain PyTorch (moram.functional.route) elsewhere.
- fused_route_topk(h, k, tau, delta, eps) -> (coef [..., k_eff], idx [..., k_eff]): the same,
  keeping only the atoms each token selected (return_weights=True adds the kept w).
- sparse_value(coef, idx, B, current_B=None) -> Δy [..., d_out]: [B | current_B] · (w ⊙ h) from
  the selected atoms only, dense below SPARSE_MIN_ATOMS_PER_K · k_eff atoms
  (SPARSE_MIN_ATOMS_PER_K_TRAINING · k_eff where a backward follows: the layer's choice).
- route_value(y, h, values, k, tau, delta, eps) -> y + Δy: MoRAM's inference update over the
  frozen bank in one call (routing, the kept atoms' values, the residual); the C++ op of
  csrc/route_value.cpp on CPU where it is built (``cpu_op``), route_value_reference elsewhere.
- training_update(x, y, frozen_keys, A, frozen_values, current_values, k, tau) -> (y + Δy, idx, w):
  MoRAM's training update (keys, routing, value) as one autograd function, on CPU
  (``uses_training_update``); the composed path (fused_route_topk + sparse_value) elsewhere.
See docs/performance.md.
"""
from .routing import BACKENDS, fused_route_mix, fused_route_topk, route_topk_reference
from .routing_triton import triton_available
from .sparse_value import SPARSE_MIN_ATOMS_PER_K, SPARSE_MIN_ATOMS_PER_K_TRAINING, dense_value, sparse_value
from .route_value import route_value, route_value_reference, uses_cpu_op
from .train_update import training_update, uses_training_update

__all__ = [
    "BACKENDS", "SPARSE_MIN_ATOMS_PER_K", "SPARSE_MIN_ATOMS_PER_K_TRAINING", "dense_value", "fused_route_mix", "fused_route_topk",
    "route_topk_reference", "route_value", "route_value_reference", "sparse_value", "training_update",
    "triton_available", "uses_cpu_op", "uses_training_update",
]
