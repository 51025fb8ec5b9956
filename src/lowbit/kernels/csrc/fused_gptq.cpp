// torch.ops.lowbit.gptq_block: GPTQ's column loop over one lazy block of columns
// (lowbit.quantizers.gptq.gptq, act-order / static groups: every column's scale and zero are known).
//
// For each column i of the block, in order, and each row r (rows are independent):
//
//   q = clamp(round_half_even(w[r, i] / s[r, i] + z[r, i]), 0, maxq)
//   e = (w[r, i] - (q - z[r, i]) * s[r, i]) / u[i, i]
//   w[r, c] = w[r, c] - e * u[i, c]          for c = i .. b - 1
//
// in fp32, each product rounded before the subtraction (no fused multiply-add: this file is compiled with
// contraction off), so the values are the eager loop's (torch.round / clamp_ / sub / div_ and an outer
// product subtracted) bit for bit, whatever the thread count or vector width.  The eager loop costs a few
// operator calls per column (about 0.1 ms each at SmolLM2's shapes: half of GPTQ's own time); here a
// block is one call, split over rows with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <tuple>

#include "rounding.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace lowbit_fused {
namespace {

// wb (out, b) is updated in place; returns the block's codes (as floats) and scaled errors, both (out, b).
std::tuple<at::Tensor, at::Tensor> gptq_block(at::Tensor wb, const at::Tensor& ub, const at::Tensor& sb,
                                              const at::Tensor& zb, int64_t maxq) {
  for (const at::Tensor& t : {std::cref(wb), std::cref(ub), std::cref(sb), std::cref(zb)})
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2,
                "lowbit::gptq_block: every tensor must be a contiguous 2-D fp32 CPU tensor");
  const int64_t out = wb.size(0), b = wb.size(1);
  TORCH_CHECK(ub.size(0) == b && ub.size(1) == b && sb.sizes() == wb.sizes() && zb.sizes() == wb.sizes(),
              "lowbit::gptq_block: u must be (b, b) and s, z (out, b) for w (out, b)");
  at::Tensor qb = at::empty_like(wb), err = at::empty_like(wb);
  float* w = wb.data_ptr<float>();
  const float *u = ub.data_ptr<float>(), *s = sb.data_ptr<float>(), *z = zb.data_ptr<float>();
  float *qd = qb.data_ptr<float>(), *ed = err.data_ptr<float>();
  const float hi = (float)maxq;
  at::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* wr = w + r * b;
      const float *sr = s + r * b, *zr = z + r * b;
      for (int64_t i = 0; i < b; ++i) {
        const float x = wr[i];
        const float q = std::min(std::max(round_half_even(x / sr[i] + zr[i]), 0.f), hi);
        const float back = (q - zr[i]) * sr[i];
        const float e = (x - back) / u[i * b + i];
        qd[r * b + i] = q;
        ed[r * b + i] = e;
        const float* ui = u + i * b;
        for (int64_t c = i; c < b; ++c) {
          const float p = e * ui[c];
          wr[c] = wr[c] - p;
        }
      }
    }
  });
  return {qb, err};
}

}  // namespace
}  // namespace lowbit_fused

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("gptq_block(Tensor(a!) wb, Tensor ub, Tensor sb, Tensor zb, int maxq) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("gptq_block", &lowbit_fused::gptq_block);
}
