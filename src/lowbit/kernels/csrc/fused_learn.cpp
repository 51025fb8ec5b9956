// torch.ops.lowbit.fake_quant / fake_quant_backward: the fake-quantized weight of learned rounding
// (lowbit.quantizers.learned.LearnedWeight) and its gradients, one pass over the weight each.
//
//   x = w / s + z + v,  r = round_half_even(x),  q = clamp(r, 0, maxq),  w_hat = (q - z) * s
//
// s and z are per group (out, G) of gw columns (the last group may be shorter); v is per weight.  The
// round is straight-through and the clamp passes the gradient where 0 <= r <= maxq (torch.clamp's rule),
// so with g = dL/dw_hat and gx = g * s * [0 <= r <= maxq]:
//
//   dL/dv = gx,   dL/dz = sum over the group (gx - g * s),   dL/ds = sum over the group ((q - z) * g - gx * w / (s * s))
//
// exactly the terms autograd forms for the eager expression; the forward computes it in the same order, so its
// values are the eager ones bit for bit, and the gradients differ only in the order of the group sums.  The eager
// form reads and writes the (out, in) tensors once per operation (about ten passes forward, more backward);
// on SmolLM2's blocks it was a fifth of a learning step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "rounding.h"

namespace lowbit_fused {
namespace {

constexpr int kLanes = 16;

struct FQ {
  const float *w, *v, *s, *z;
  int64_t out, in, G, gw;
  float maxq;
};

FQ checked(const at::Tensor& w, const at::Tensor& v, const at::Tensor& s, const at::Tensor& z, int64_t gw,
           int64_t maxq) {
  TORCH_CHECK_VALUE(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous() && w.device().is_cpu(),
                    "lowbit fake_quant: w must be a contiguous 2-D float32 CPU tensor");
  const int64_t out = w.size(0), in = w.size(1);
  TORCH_CHECK_VALUE(gw >= 1 && maxq >= 1, "lowbit fake_quant: group width and maxq must be >= 1");
  const int64_t G = (in + gw - 1) / gw;
  TORCH_CHECK_VALUE(v.sizes() == w.sizes() && v.scalar_type() == at::kFloat && v.is_contiguous(),
                    "lowbit fake_quant: v must be contiguous float32 of w's shape");
  for (const at::Tensor* t : {&s, &z})
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == out && t->size(1) == G && t->scalar_type() == at::kFloat &&
                          t->is_contiguous(),
                      "lowbit fake_quant: scale and zero must be contiguous float32 (", out, ", ", G, ")");
  return FQ{w.data_ptr<float>(), v.data_ptr<float>(), s.data_ptr<float>(), z.data_ptr<float>(), out, in, G, gw,
            (float)maxq};
}

at::Tensor fake_quant(const at::Tensor& w, const at::Tensor& v, const at::Tensor& s, const at::Tensor& z, int64_t gw,
                      int64_t maxq) {
  const FQ f = checked(w, v, s, z, gw, maxq);
  at::Tensor y = at::empty_like(w);
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, f.out, std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(f.in, 1)),
                   [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t g = 0; g < f.G; ++g) {
        const float sg = f.s[o * f.G + g], zg = f.z[o * f.G + g];
        const int64_t c0 = g * f.gw, c1 = std::min(c0 + f.gw, f.in);
        const float* wr = f.w + o * f.in;
        const float* vr = f.v + o * f.in;
        float* yr = yd + o * f.in;
        for (int64_t c = c0; c < c1; ++c) {
          const float x = wr[c] / sg + zg + vr[c];
          const float q = std::min(std::max(round_half_even(x), 0.f), f.maxq);
          yr[c] = (q - zg) * sg;
        }
      }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward(const at::Tensor& grad, const at::Tensor& w,
                                                                   const at::Tensor& v, const at::Tensor& s,
                                                                   const at::Tensor& z, int64_t gw, int64_t maxq) {
  const FQ f = checked(w, v, s, z, gw, maxq);
  const at::Tensor gc = grad.to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(gc.sizes() == w.sizes(), "lowbit fake_quant_backward: the gradient must have w's shape");
  at::Tensor gv = at::empty_like(w), gs = at::empty_like(s), gz = at::empty_like(z);
  const float* gd = gc.data_ptr<float>();
  float *gvd = gv.data_ptr<float>(), *gsd = gs.data_ptr<float>(), *gzd = gz.data_ptr<float>();
  at::parallel_for(0, f.out, std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(f.in, 1)),
                   [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t g = 0; g < f.G; ++g) {
        const float sg = f.s[o * f.G + g], zg = f.z[o * f.G + g], ss = sg * sg;
        const int64_t c0 = g * f.gw, c1 = std::min(c0 + f.gw, f.in);
        const float* wr = f.w + o * f.in;
        const float* vr = f.v + o * f.in;
        const float* gr = gd + o * f.in;
        float* gvr = gvd + o * f.in;
        // the group sums in kLanes independent partial sums (so the compiler vectorizes the loop), then a tree
        float ps[kLanes] = {0.f}, pz[kLanes] = {0.f};
        auto one = [&](int64_t c, int l) __attribute__((always_inline)) {
          const float x = wr[c] / sg + zg + vr[c];
          const float r = round_half_even(x);
          const float q = std::min(std::max(r, 0.f), f.maxq);
          const float gy = gr[c] * sg;
          const float gx = (r >= 0.f && r <= f.maxq) ? gy : 0.f;
          gvr[c] = gx;
          pz[l] += gx - gy;
          ps[l] += (q - zg) * gr[c] - gx * wr[c] / ss;
        };
        int64_t c = c0;
        for (; c + kLanes <= c1; c += kLanes)
          for (int l = 0; l < kLanes; ++l) one(c + l, l);
        for (int l = 0; c < c1; ++c, ++l) one(c, l);
        for (int w = kLanes / 2; w >= 1; w /= 2)
          for (int l = 0; l < w; ++l) {
            ps[l] += ps[l + w];
            pz[l] += pz[l + w];
          }
        gsd[o * f.G + g] = ps[0];
        gzd[o * f.G + g] = pz[0];
      }
  });
  return {gv, gs, gz};
}

}  // namespace
}  // namespace lowbit_fused

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("fake_quant(Tensor w, Tensor v, Tensor s, Tensor z, int gw, int maxq) -> Tensor");
  m.def("fake_quant_backward(Tensor grad, Tensor w, Tensor v, Tensor s, Tensor z, int gw, int maxq) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("fake_quant", &lowbit_fused::fake_quant);
  m.impl("fake_quant_backward", &lowbit_fused::fake_quant_backward);
}
