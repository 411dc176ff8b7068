"""Our MoRAM layer against the official TRACE layer's forward on the same inputs (issue 22, stage 4).

The official rule, restated from Artificer-AI-Lab/MoRAM TRACE/utils/my_peft/tuners/moram.py
(MoRAMLinear.forward, l. 100-150): the key responses of the frozen and the new keys together,
projection = dropout(x) · [A_old; A_new]ᵀ; normed = projection / max(||projection||, 1e-8)
(F.normalize over the atoms); keep the k = max(moram_topk, 2) largest signed normed values (at
most R); w = softmax(kept / τ); at inference only, w ← w · 1[normed ≥ t] for t > 0; Δ =
(projection ⊙ w) · [B_old, B_new · scale]ᵀ, B_old as stored (unscaled: l. 79 copies loranew_B as
is). Ours with ``frozen_scale: official`` must give that output, in training and in eval;
``baked`` (our default) gives it with B_old · scale (docs/parity.md M1).
"""
import pytest
import torch
from torch import nn

from moram import MoRAMConfig, get_moram_model


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 5)

    def forward(self, x):
        return self.proj(x)


def official_rule(x, base, A_old, B_old, A_new, B_new, scale, k, tau, threshold, training):
    projection = x @ torch.cat([A_old, A_new]).t()
    normed = projection / projection.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    k_eff = min(max(k, 2), normed.shape[-1])
    top = normed.topk(k_eff, dim=-1)
    logits = torch.full_like(normed, float("-inf")).scatter(-1, top.indices, top.values)
    weights = torch.softmax(logits / tau, dim=-1)
    if not training and threshold > 0:
        weights = weights * (normed >= threshold).to(weights.dtype)
    delta = (projection * weights) @ torch.cat([B_old, B_new * scale], dim=1).t()
    return base(x) + delta


@pytest.mark.parametrize("frozen_scale", ["official", "baked"])
def test_our_layer_is_the_official_forward_on_the_same_inputs(frozen_scale):
    torch.manual_seed(0)
    r, k, tau, delta, alpha = 2, 3, 0.1, 0.2, 4.0          # scale alpha / r = 2
    config = MoRAMConfig(method="moram", target_modules=["proj"], r=r, alpha=alpha, k=k, tau=tau, delta=delta,
                         dropout=0.0, prune_mass=None, frozen_scale=frozen_scale)
    model = get_moram_model(OneLinear(), config)
    layer = model.moram_layers["proj"]
    trained = []
    for task in range(2):
        model.begin_task(f"t{task}")
        with torch.no_grad():
            layer.A.copy_(torch.randn(r, 6))
            layer.B.copy_(torch.randn(5, r))
        trained.append((layer.A.detach().clone(), layer.B.detach().clone()))
        layer.current_trained = True
        if task == 0:
            model.end_task(prune=False)
    (A_old, B_old), (A_new, B_new) = trained
    B_frozen = B_old * (alpha / r) if frozen_scale == "baked" else B_old
    x = torch.randn(3, 7, 6)
    base = layer.base
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            ours = model(x)
        expected = official_rule(x, base, A_old, B_frozen, A_new, B_new, alpha / r, k, tau, delta, training)
        assert ours == pytest.approx(expected, abs=1e-5), f"training={training}"
    # the inference gate matters on these inputs: without it the eval output would differ
    ungated = official_rule(x, base, A_old, B_frozen, A_new, B_new, alpha / r, k, tau, 0.0, False)
    assert (ungated - ours).abs().max() > 1e-3
