// MoRAM's inference update in one call per layer (CPU): for every token row, given the base
// output y (bias included) and the R key responses h (in eval both are views of one GEMM
// x · [W0; A]ᵀ, so their rows are strided),
//     s = h / max(||h||_2, eps)                                    (Eq. 5)
//     keep the k_eff largest h (= largest s), ties to the lowest index (Eq. 6)
//     w = softmax(s_kept / tau); w *= 1[s >= delta] if delta > 0   (Eqs. 7-8)
//     out = y + Σ_kept (w ⊙ h)_j · values[j]                      (Eq. 4, values as rows [R, d_out])
// Arithmetic as moram.kernels.route_value_reference: scores and softmax in float32, w and
// w ⊙ h rounded to h's dtype, the value sum accumulated in float32 and rounded once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename scalar_t>
void route_value_rows(const scalar_t* y_base, int64_t y_stride, const scalar_t* h_base, int64_t h_stride,
                      int64_t d_out, int64_t n_atoms, const scalar_t* values, int64_t k_eff, float tau,
                      float delta, float eps, scalar_t* out, int64_t begin, int64_t end) {
  std::vector<int64_t> kept(k_eff);
  std::vector<float> kept_h(k_eff), coef(k_eff);
  std::vector<float> acc(d_out);
  for (int64_t t = begin; t < end; ++t) {
    const scalar_t* y = y_base + t * y_stride;
    const scalar_t* h = h_base + t * h_stride;
    // Eq. 6: the k_eff largest responses, a sorted insertion (descending); a later index enters
    // only when strictly larger than the k-th kept value, so ties keep the lowest indices.
    int64_t filled = 0;
    float squares = 0.f;
    for (int64_t j = 0; j < n_atoms; ++j) {
      const float value = static_cast<float>(h[j]);
      squares += value * value;
      if (filled == k_eff && !(value > kept_h[k_eff - 1])) continue;
      int64_t at = filled < k_eff ? filled++ : k_eff - 1;
      while (at > 0 && value > kept_h[at - 1]) {
        kept_h[at] = kept_h[at - 1];
        kept[at] = kept[at - 1];
        --at;
      }
      kept_h[at] = value;
      kept[at] = j;
    }
    const float denom = std::max(std::sqrt(squares), eps);          // Eq. 5
    // Eq. 7: softmax of s / tau over the kept atoms (the largest first).
    const float top = (kept_h[0] / denom) / tau;
    float total = 0.f;
    for (int64_t i = 0; i < k_eff; ++i) {
      coef[i] = std::exp((kept_h[i] / denom) / tau - top);
      total += coef[i];
    }
    for (int64_t i = 0; i < k_eff; ++i) {
      float w = coef[i] / total;
      if (delta > 0.f && !((kept_h[i] / denom) >= delta)) w = 0.f;   // Eq. 8, no renormalisation
      const scalar_t w_rounded = static_cast<scalar_t>(w);             // w in h's dtype
      coef[i] = static_cast<float>(static_cast<scalar_t>(static_cast<float>(w_rounded) * kept_h[i]));
    }
    // Eq. 4 and the residual: y + Σ coef_i · values[kept_i], accumulated in float32.
    for (int64_t c = 0; c < d_out; ++c) acc[c] = static_cast<float>(y[c]);
    for (int64_t i = 0; i < k_eff; ++i) {
      const float weight = coef[i];
      if (weight == 0.f) continue;
      const scalar_t* row = values + kept[i] * d_out;
#pragma omp simd
      for (int64_t c = 0; c < d_out; ++c) acc[c] += weight * static_cast<float>(row[c]);
    }
    scalar_t* o = out + t * d_out;
    for (int64_t c = 0; c < d_out; ++c) o[c] = static_cast<scalar_t>(acc[c]);
  }
}

}  // namespace

// y [tokens, d_out], h [tokens, R] (rows may be strided, the last dim contiguous), values
// [R, d_out] contiguous, all of one dtype -> y + Δy [tokens, d_out], a fresh contiguous tensor.
at::Tensor route_value(const at::Tensor& y, const at::Tensor& h, const at::Tensor& values, int64_t k_eff,
                       double tau, double delta, double eps) {
  TORCH_CHECK(y.device().is_cpu() && h.device().is_cpu() && y.dim() == 2 && h.dim() == 2 && y.size(0) == h.size(0) &&
              y.stride(1) == 1 && h.stride(1) == 1, "route_value: y [tokens, d_out] and h [tokens, R] on CPU, last dims contiguous");
  const int64_t d_out = y.size(1), n_atoms = h.size(1);
  TORCH_CHECK(n_atoms > 0 && values.is_contiguous() && values.size(0) == n_atoms && values.size(1) == d_out &&
              values.scalar_type() == y.scalar_type() && h.scalar_type() == y.scalar_type(),
              "route_value: values must be contiguous [R, d_out], all in y's dtype");
  TORCH_CHECK(k_eff >= 1 && k_eff <= n_atoms, "route_value: need 1 <= k_eff <= R");
  const int64_t tokens = y.size(0);
  at::Tensor out = at::empty({tokens, d_out}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "route_value", [&] {
    const scalar_t* y_ptr = y.data_ptr<scalar_t>();
    const scalar_t* h_ptr = h.data_ptr<scalar_t>();
    const scalar_t* values_ptr = values.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const int64_t y_stride = y.stride(0), h_stride = h.stride(0);
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      route_value_rows<scalar_t>(y_ptr, y_stride, h_ptr, h_stride, d_out, n_atoms, values_ptr, k_eff,
                                 static_cast<float>(tau), static_cast<float>(delta), static_cast<float>(eps),
                                 out_ptr, begin, end);
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("route_value", &route_value, "MoRAM inference update: routing, value and residual in one call (CPU)");
}
