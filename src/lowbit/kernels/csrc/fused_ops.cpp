// torch.ops.lowbit.grouped_repack / grouped_linear / fused_cpu_isa: lowbit's fused dequantize-and-multiply
// CPU kernels for the grouped_int format (see fused_common.h for the kernel layout of the codes).
//
//   m <= 8 rows of x ("GEMV"; 16 with AVX-512, in two passes):  every output row decodes its codes group
//       by group in registers and multiplies them into m fp32 accumulators; no dequantized weight is
//       written anywhere.  Rows are split over threads with at::parallel_for (honours
//       torch.set_num_threads); each output element is computed by one thread in a fixed order, so
//       results do not depend on the thread count.
//   more rows ("tiled"):  a tile of output rows is dequantized into a small per-thread buffer
//       (cache-resident, <= 128 KiB) and multiplied by a register-blocked FMA microkernel (12x32 on
//       AVX-512, 6x16 on AVX2) against x packed once per call; tiles are split over threads.  Every
//       output is one FMA chain over k in order, so this path is also thread-count independent.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <chrono>
#include <cstring>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <string>
#include <strings.h>
#include <vector>

#include "fused_common.h"
#include "fused_step.h"

namespace lowbit_fused {
namespace {

// AVX-VNNI (the 256-bit VEX vpdpbusd) and a unit built for it (fused_q8_avxvnni.cpp: GCC 11 or clang 12).
bool cpu_has_avxvnni() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool ok = [] {
    __builtin_cpu_init();
    return q8_avxvnni_built() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni");
  }();
  return ok;
#else
  return false;
#endif
}

int cpu_best_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  static const int best = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
    if (avx512) return (int)ISA_AVX512;
    return avx2 ? (int)(cpu_has_avxvnni() ? ISA_AVXVNNI : ISA_AVX2) : (int)ISA_SCALAR;
  }();
  return best;
#else
  return ISA_SCALAR;
#endif
}

// The int8-activation kernel needs AVX-512 (F, BW, VL) with VNNI.
bool cpu_has_vnni() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool ok = [] {
    __builtin_cpu_init();
    return cpu_best_isa() >= ISA_AVX512 && __builtin_cpu_supports("avx512vnni");
  }();
  return ok;
#else
  return false;
#endif
}

// A request capped at the CPU's best; AVX-VNNI on an AVX-512 CPU without it is AVX2.
int resolve_isa(int64_t requested) {
  const int best = cpu_best_isa();
  if (requested <= ISA_AUTO) return best;
  const int use = (int)std::min<int64_t>(requested, best);
  return use == ISA_AVXVNNI && !cpu_has_avxvnni() ? (int)ISA_AVX2 : use;
}

// LOWBIT_ISA as the Python side reads it (lowbit.kernels._ext.requested_isa, which passes it to every op with an
// isa argument), for the layers bound without one (the fused decode step, time_linear_stream): the same forced
// path as the layers' own calls.
int env_isa() {
  const char* v = std::getenv("LOWBIT_ISA");
  if (!v) return ISA_AUTO;
  if (!strcasecmp(v, "scalar")) return ISA_SCALAR;
  if (!strcasecmp(v, "avx2")) return ISA_AVX2;
  if (!strcasecmp(v, "avxvnni")) return ISA_AVXVNNI;
  if (!strcasecmp(v, "avx512")) return ISA_AVX512;
  return ISA_AUTO;
}

// The int8-activation kernel's ISA for a requested one: ISA_AVX512 (AVX-512 VNNI dot products) where the CPU has
// them and the request allows AVX-512, ISA_AVXVNNI (256-bit vpdpbusd) where it has AVX-VNNI and the request allows
// it, ISA_AVX2 (vpmaddubsw) where it has AVX2, else ISA_SCALAR (none).
int q8_isa(int64_t requested) {
  const int use = resolve_isa(requested);
  if (use >= ISA_AVX512 && cpu_has_vnni()) return ISA_AVX512;
  if (use >= ISA_AVXVNNI && cpu_has_avxvnni()) return ISA_AVXVNNI;
  return use >= ISA_AVX2 ? (int)ISA_AVX2 : (int)ISA_SCALAR;
}

int64_t fused_q8_isa(int64_t requested) { return q8_isa(requested); }

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.scalar_type() << " (";
  for (int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.size(i);
  s << (t.dim() == 1 ? ",)" : ")");
  return s.str();
}

std::string layer_str(int64_t out, int64_t in, int64_t bits, int64_t group_size) {
  std::ostringstream s;
  s << "a " << out << "x" << in << " " << bits << "-bit layer";
  if (group_size != 0) s << " (group " << group_size << ")";
  return s.str();
}

// The layer description is only formatted when a check fails (TORCH_CHECK evaluates its message lazily).
void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t d0, int64_t d1,
                  int64_t out, int64_t in, int64_t bits, int64_t group_size) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "lowbit fused kernel: ", name, " of ", layer_str(out, in, bits, group_size),
                    " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == d0 && t.size(1) == d1 && t.scalar_type() == dtype,
                    "lowbit fused kernel: ", name, " of ", layer_str(out, in, bits, group_size), " must be ", dtype,
                    " (", d0, ", ", d1, "), got ", shape_str(t),
                    "; the packed tensors are corrupt or belong to another layer");
}

struct Layer {
  Args a;
  at::Tensor codes, scale, zero;  // contiguous, kept alive for the call
};

Layer make_layer(const at::Tensor& codes, const at::Tensor& scale, const std::optional<at::Tensor>& zero,
                 int64_t bits, int64_t group_size, int64_t in) {
  TORCH_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4 || bits == 8, "lowbit fused kernel: bits=", bits,
                    " unsupported (2, 3, 4 or 8)");
  TORCH_CHECK_VALUE(in >= 1, "lowbit fused kernel: in_features=", in, " must be >= 1");
  TORCH_CHECK_VALUE(group_size == -1 || group_size >= 1, "lowbit fused kernel: group_size=", group_size,
                    " must be -1 or >= 1");
  TORCH_CHECK_VALUE(codes.dim() == 2, "lowbit fused kernel: codes must be 2-D (out, bytes), got ", shape_str(codes));
  const int64_t out = codes.size(0);
  const int64_t gw = group_size == -1 ? in : std::min<int64_t>(group_size, in);
  const int64_t G = (in + gw - 1) / gw;
  const int64_t row_bytes = (in * bits + 7) / 8;
  check_tensor(codes, "codes", at::kByte, out, row_bytes, out, in, bits, group_size);
  check_tensor(scale, "scale", at::kHalf, out, G, out, in, bits, group_size);
  if (zero.has_value()) check_tensor(*zero, "zero", at::kHalf, out, G, out, in, bits, group_size);

  Layer L;
  L.codes = codes.contiguous();
  L.scale = scale.contiguous();
  if (zero.has_value()) L.zero = zero->contiguous();
  Args& a = L.a;
  a.x = nullptr;
  a.m = 0;
  a.ldx = in;
  a.xsum = nullptr;
  a.codes = L.codes.data_ptr<uint8_t>();
  a.row_bytes = row_bytes;
  a.scale = reinterpret_cast<const uint16_t*>(L.scale.data_ptr<at::Half>());
  a.zero = zero.has_value() ? reinterpret_cast<const uint16_t*>(L.zero.data_ptr<at::Half>()) : nullptr;
  a.bits = (int)bits;
  a.in = in;
  a.out = out;
  a.gw = gw;
  a.G = G;
  a.P = prefix_cols(in);
  a.y = nullptr;
  a.ldy = out;
  return L;
}

// ---- ISA dispatch ------------------------------------------------------------------------------------

void gemv_dispatch(const Args& a, int isa, int64_t o0, int64_t o1) {
  if (vector_groups(a)) {
    if (isa >= ISA_AVX512 && gemv_avx512(a, o0, o1)) return;
    if (isa >= ISA_AVX2 && gemv_avx2(a, o0, o1)) return;
  }
  gemv_scalar(a, o0, o1);
}

void dequant_dispatch(const Args& a, int isa, int64_t o0, int64_t o1, float* w) {
  if (vector_groups(a)) {
    if (isa >= ISA_AVX512 && dequant_avx512(a, o0, o1, w)) return;
    if (isa >= ISA_AVX2 && dequant_avx2(a, o0, o1, w)) return;
  }
  dequant_scalar(a, o0, o1, w);
}

// ---- paths -------------------------------------------------------------------------------------------

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float, AlignedFree>;

Buffer aligned_floats(int64_t n) {
  const size_t bytes = ((size_t)n * sizeof(float) + 63) / 64 * 64;
  Buffer b(static_cast<float*>(std::aligned_alloc(64, bytes ? bytes : 64)));
  TORCH_CHECK(b, "lowbit fused kernel: out of memory (", bytes, " bytes)");
  return b;
}

// Sum of x over each group's columns below P, (m, G): the AVX2 GEMV factors the scale out of a group.
void group_sums(const Args& a, const float* x, int64_t m, float* xs) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t g = 0; g < a.G; ++g) {
      const int64_t c0 = g * a.gw, c1 = std::min(std::min((g + 1) * a.gw, a.in), a.P);
      float t = 0.f;
      for (int64_t c = c0; c < c1; ++c) t += x[r * a.ldx + c];
      xs[r * a.G + g] = t;
    }
}

// Output rows per GEMV task: at least ~64K weights (a few microseconds), so tiny layers stay on the calling
// thread, where waking a second one costs more than it saves.
int64_t gemv_grain(const Args& a, int64_t m) {
  return std::max<int64_t>(16, (int64_t(1) << 16) / std::max<int64_t>(a.in * std::min<int64_t>(m, 8), 1));
}

// x must be fp32 (rows, in_features) on the CPU; returns it contiguous.
at::Tensor checked_x(const at::Tensor& x, const Args& a, int64_t in_features) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == in_features,
                    "lowbit fused kernel: x must be float32 (rows, ", in_features, ") on the CPU for a ",
                    a.out, "x", in_features, " layer, got ", shape_str(x));
  return x.contiguous();
}

void run_gemv(Args a, int isa, const at::Tensor& x, at::Tensor& y) {
  const int64_t m = x.size(0), out = a.out;
  const int64_t grain = gemv_grain(a, m);
  Buffer xs;
  if (isa >= ISA_AVX2 && vector_groups(a)) {   // needed by the AVX2 GEMV; m * in additions
    xs = aligned_floats(m * a.G);
    group_sums(a, x.data_ptr<float>(), m, xs.get());
  }
  for (int64_t r0 = 0; r0 < m; r0 += 8) {
    a.m = std::min<int64_t>(8, m - r0);
    a.x = x.data_ptr<float>() + r0 * a.ldx;
    a.xsum = xs ? xs.get() + r0 * a.G : nullptr;
    a.y = y.data_ptr<float>() + r0 * a.ldy;
    at::parallel_for(0, out, grain, [&](int64_t o0, int64_t o1) { gemv_dispatch(a, isa, o0, o1); });
  }
}

// Tiles of output rows: dequantize into a per-thread buffer of ~128 KiB, multiply with the ISA's
// register-blocked microkernel against x packed once per call.  Without AVX2, at::mm per tile.
void run_tiled(Args a, int isa, const at::Tensor& x, at::Tensor& y) {
  const int64_t out = a.out, K = a.in, m = x.size(0);
  const float* xd = x.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  if (isa < ISA_AVX2) {
    const int64_t T = std::max<int64_t>(16, std::min<int64_t>(out, (int64_t(1) << 16) / std::max<int64_t>(K, 1)));
    Buffer buf = aligned_floats(T * K);
    for (int64_t o0 = 0; o0 < out; o0 += T) {
      const int64_t n = std::min<int64_t>(T, out - o0);
      at::parallel_for(o0, o0 + n, 4, [&](int64_t b, int64_t e) {
        dequant_dispatch(a, isa, b, e, buf.get() + (b - o0) * K);
      });
      const at::Tensor w = at::from_blob(buf.get(), {n, K}, x.options());
      at::Tensor yv = y.narrow(1, o0, n);
      at::mm_out(yv, x, w.t());
    }
    return;
  }
  const int PW = isa >= ISA_AVX512 ? kPw512 : kPw256, MR = isa >= ISA_AVX512 ? kMr512 : kMr256;
  const int64_t npan = (m + PW - 1) / PW;
  Buffer xp = aligned_floats(npan * K * PW);
  at::parallel_for(0, npan, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* dst = xp.get() + p * K * PW;
      for (int64_t j = 0; j < PW; ++j) {
        const int64_t r = p * PW + j;
        if (r < m) {
          const float* src = xd + r * K;
          for (int64_t k = 0; k < K; ++k) dst[k * PW + j] = src[k];
        } else {
          for (int64_t k = 0; k < K; ++k) dst[k * PW + j] = 0.f;
        }
      }
    }
  });
  const int64_t T = std::max<int64_t>(MR, ((int64_t(1) << 15) / std::max<int64_t>(K, 1)) / MR * MR);
  const int64_t ntiles = (out + T - 1) / T;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    Buffer buf = aligned_floats(T * K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * T, n = std::min<int64_t>(T, out - o0);
      const int64_t npad = (n + MR - 1) / MR * MR;
      dequant_dispatch(a, isa, o0, o0 + n, buf.get());
      if (npad > n) std::memset(buf.get() + n * K, 0, sizeof(float) * (size_t)((npad - n) * K));
      if (isa >= ISA_AVX512)
        gemm_avx512(xp.get(), m, K, buf.get(), n, yd + o0, a.ldy);
      else
        gemm_avx2(xp.get(), m, K, buf.get(), n, yd + o0, a.ldy);
    }
  });
}

// ---- ops ---------------------------------------------------------------------------------------------

at::Tensor grouped_repack(const at::Tensor& codes, int64_t bits, int64_t in, int64_t layout) {
  TORCH_CHECK_VALUE(layout >= 0 && layout <= 2, "lowbit fused kernel: repack layout=", layout, " unknown (0, 1 or 2)");
  TORCH_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4 || bits == 8, "lowbit fused kernel: bits=", bits,
                    " unsupported (2, 3, 4 or 8)");
  TORCH_CHECK_VALUE(codes.dim() == 2, "lowbit fused kernel: codes must be 2-D (out, bytes), got ", shape_str(codes));
  const int64_t row_bytes = (in * bits + 7) / 8;
  check_tensor(codes, "codes", at::kByte, codes.size(0), row_bytes, codes.size(0), in, bits, 0);
  const at::Tensor src = codes.contiguous();
  at::Tensor dst = at::empty_like(src, at::MemoryFormat::Contiguous);
  const uint8_t* s = src.data_ptr<uint8_t>();
  uint8_t* d = dst.data_ptr<uint8_t>();
  at::parallel_for(0, src.size(0), 64, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      if (layout == 2)
        repack_row_super(s + o * row_bytes, d + o * row_bytes, (int)bits, in, row_bytes);
      else if (layout == 1 && bits == 4)
        repack_row_q4n(s + o * row_bytes, d + o * row_bytes, in, row_bytes);
      else
        repack_row(s + o * row_bytes, d + o * row_bytes, (int)bits, in, row_bytes);
    }
  });
  return dst;
}

// mode: 0 = automatic (GEMV for m <= 8, or 16 with AVX-512; tiled above), 1 = GEMV (any m, 8 rows of x
// at a time), 2 = tiled.
// isa: 0 = best this CPU has, 1 = scalar, 2 = AVX2, 3 = AVX-512 (clamped to what the CPU has).
at::Tensor grouped_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                          const std::optional<at::Tensor>& zero, int64_t bits, int64_t group_size,
                          int64_t in_features, int64_t isa, int64_t mode) {
  Layer L = make_layer(codes, scale, zero, bits, group_size, in_features);
  const at::Tensor xc = checked_x(x, L.a, in_features);
  const int64_t m = xc.size(0);
  at::Tensor y = at::empty({m, L.a.out}, xc.options());
  if (m == 0 || L.a.out == 0) return y.zero_();
  const int use = resolve_isa(isa);
  // GEMV up to 16 rows with AVX-512 (two passes of 8 still beat a 32-row tile), 8 otherwise
  const bool tiled = mode == 2 || (mode == 0 && m > (use >= ISA_AVX512 ? 16 : 8));
  if (tiled)
    run_tiled(L.a, use, xc, y);
  else
    run_gemv(L.a, use, xc, y);
  return y;
}

// One row of x for the int8-activation kernel: its first P columns quantized (xq, sxv) and the sum of the
// quantized x over each group (xs, through bsum: P / 32 floats of scratch).  The zero point's term uses that
// sum, so the result is exactly W @ dequant(xq): its error scales with q - z, not with q.
// Layout 2 also takes x in super-chunk order (xt, super_cols(P) bytes) and the blocks' scales (sxb, P / 32).
void quantize_row_q8(const Args& a, int q8isa, const float* x, int8_t* xq, float* sxv, float* xs, float* bsum,
                     int8_t* xt = nullptr, float* sxb = nullptr) {
  (q8isa == ISA_AVX512 ? quantize_x_vnni : quantize_x_avx2)(x, a.P, xq, sxv, bsum, xt, sxb);
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t b0 = g * a.gw / 32, b1 = std::min((g + 1) * a.gw, a.P) / 32;
    float t = 0.f;
    for (int64_t b = b0; b < b1; ++b) t += bsum[b];
    xs[g] = t;
  }
}

// The int8-activation kernel's checks for a layer: this CPU runs it (AVX2 at least) and the groups are per channel
// or a multiple of 64 columns, codes in layout 1 or 2.  Returns the path: ISA_AVX512 (fused_vnni.cpp), ISA_AVXVNNI
// (fused_q8_avxvnni.cpp) or ISA_AVX2 (fused_q8_avx2.cpp).
int q8_path(const Args& a, int64_t isa, int64_t group_size, int64_t layout) {
  const int q8isa = q8_isa(isa);
  TORCH_CHECK(q8isa != ISA_SCALAR, "lowbit fused kernel: the int8-activation kernel needs AVX2 (or AVX-512 VNNI), "
              "which this CPU lacks");
  TORCH_CHECK_VALUE(a.G == 1 || a.gw % 64 == 0, "lowbit fused kernel: the int8-activation kernel needs per-channel "
                    "scales or groups of a multiple of 64 columns, got group ", group_size);
  TORCH_CHECK_VALUE(layout == 1 || layout == 2, "lowbit fused kernel: the int8-activation kernel reads repack "
                    "layout 1 or 2, got ", layout);
  TORCH_CHECK_VALUE(a.in < (int64_t(1) << 26), "lowbit fused kernel: in_features=", a.in, " too large for the "
                    "int8-activation kernel (2**26 at most)");
  return q8isa;
}

// Rows [o0, o1) of the int8-activation GEMV on the path q8_path chose.
void gemv_q8(const Q8Args& q, int q8isa, int64_t o0, int64_t o1) {
  if (q8isa == ISA_AVX512)
    gemv_q8_vnni(q, o0, o1);
  else if (q8isa == ISA_AVXVNNI)
    gemv_q8_avxvnni(q, o0, o1);
  else
    gemv_q8_avx2(q, o0, o1);
}

// x @ W.T with x quantized to int8 per 32 columns (the path q8_path picks, gemv_q8); codes in repack
// layout 1 or 2.  Rows of x are taken 8 at a time; groups must be per channel or a multiple of 64 columns.
at::Tensor grouped_linear_q8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                             const std::optional<at::Tensor>& zero, int64_t bits, int64_t group_size,
                             int64_t in_features, int64_t isa, int64_t layout) {
  Layer L = make_layer(codes, scale, zero, bits, group_size, in_features);
  Args& a = L.a;
  const int q8isa = q8_path(a, isa, group_size, layout);
  const bool super = layout == 2 && bits != 8;
  const at::Tensor xc = checked_x(x, a, in_features);
  const int64_t m = xc.size(0), P = a.P, nch = P / 64, nb = P / 32, S = super ? super_cols(P) : 0;
  at::Tensor y = at::empty({m, a.out}, xc.options());
  if (m == 0 || a.out == 0) return y.zero_();
  const float* xd = xc.data_ptr<float>();
  // per-thread scratch, grown as needed: a decode step calls this hundreds of times
  thread_local std::vector<int8_t> xq_buf;
  thread_local std::vector<float> f_buf;
  xq_buf.resize((size_t)std::max<int64_t>(m * (P + S), 1));
  f_buf.resize((size_t)(m * nch * 16 + m * a.G + nb + 1 + (super ? m * nb : 0)));
  int8_t* xq = xq_buf.data();
  int8_t* xt = xq + m * P;
  float* sxv = f_buf.data();
  float* xs = sxv + m * nch * 16;
  float* bsum = xs + m * a.G;
  float* sxb = bsum + nb + 1;
  for (int64_t r = 0; r < m; ++r)
    quantize_row_q8(a, q8isa, xd + r * in_features, xq + r * P, sxv + r * nch * 16, xs + r * a.G, bsum,
                    super ? xt + r * S : nullptr, super ? sxb + r * nb : nullptr);
  const int64_t grain = gemv_grain(a, m);
  for (int64_t r0 = 0; r0 < m; r0 += 8) {
    Q8Args q;
    q.a = a;
    q.a.m = std::min<int64_t>(8, m - r0);
    q.a.x = xd + r0 * a.ldx;
    q.a.y = y.data_ptr<float>() + r0 * a.ldy;
    q.xq = xq + r0 * P;
    q.sxv = sxv + r0 * nch * 16;
    q.xs = xs + r0 * a.G;
    q.layout = super ? 2 : 1;
    q.xt = xt + r0 * S;
    q.sxb = sxb + r0 * nb;
    at::parallel_for(0, a.out, grain, [&](int64_t o0, int64_t o1) { gemv_q8(q, q8isa, o0, o1); });
  }
  return y;
}


int64_t fused_cpu_isa(int64_t requested) { return resolve_isa(requested); }

// How many threads at::parallel_for uses here for n tasks of one item each (it should follow
// torch.set_num_threads: the library shares PyTorch's OpenMP runtime).
int64_t fused_parallel_threads(int64_t n) {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, std::max<int64_t>(n, 1), 1, [&](int64_t, int64_t) {
    seen.fetch_or(uint64_t(1) << (at::get_thread_num() & 63));
  });
  return (int64_t)__builtin_popcountll(seen.load());
}

}  // namespace

// ---- one linear of a fused decode step, for a team of threads (fused_step.h) ---------------------------

void parallel_split(int64_t n, int64_t grain, int64_t tid, int64_t T, int64_t* b, int64_t* e) {
  *b = *e = 0;
  if (n <= 0) return;
  if (n <= grain || n == 1 || T <= 1) {                 // at::parallel_for runs it on the calling thread
    if (tid == 0) *e = n;
    return;
  }
  const int64_t nt = std::min<int64_t>(T, (n + grain - 1) / std::max<int64_t>(grain, 1));
  const int64_t chunk = (n + nt - 1) / nt;
  *b = std::min(n, tid * chunk);
  *e = std::min(n, *b + chunk);
}

void bind_step_linear(StepLinear& s, const at::Tensor& codes, const at::Tensor& scale,
                      const std::optional<at::Tensor>& zero, int64_t bits, int64_t group_size, int64_t in_features,
                      int64_t q8) {
  Layer L = make_layer(codes, scale, zero, bits, group_size, in_features);
  s.codes = L.codes;
  s.scale = L.scale;
  s.zero = L.zero;
  s.a = L.a;
  s.a.m = 1;
  s.q8 = q8 != 0;
  s.layout = q8 == 2 && bits != 8 ? 2 : 1;
  const int isa = env_isa();
  if (q8) s.q8isa = q8_path(s.a, isa, group_size, s.layout);
  s.isa = resolve_isa(isa);
  s.grain = gemv_grain(s.a, 1);
}

void reserve_step_workspace(StepWorkspace& w, const StepLinear& s) {
  const int64_t nch = s.a.P / 64, nb = s.a.P / 32, S = s.layout == 2 ? super_cols(s.a.P) : 0;
  w.xq.resize(std::max<size_t>(w.xq.size(), (size_t)std::max<int64_t>(s.a.P + S, 1)));
  w.f.resize(std::max<size_t>(w.f.size(), (size_t)(nch * 16 + s.a.G + 2 * nb + 1)));
}

void prepare_step_linear(StepLinear& s, StepWorkspace& w, const float* x, float* y) {
  Args& a = s.a;
  a.x = x;
  a.y = y;
  if (s.q8) {
    const int64_t nch = a.P / 64, nb = a.P / 32;
    const bool super = s.layout == 2;
    float* sxv = w.f.data();
    float* xs = sxv + nch * 16;
    float* sxb = xs + a.G + nb + 1;
    int8_t* xt = w.xq.data() + a.P;
    quantize_row_q8(a, s.q8isa, x, w.xq.data(), sxv, xs, xs + a.G, super ? xt : nullptr, super ? sxb : nullptr);
    s.q.a = a;
    s.q.xq = w.xq.data();
    s.q.sxv = sxv;
    s.q.xs = xs;
    s.q.layout = s.layout;
    s.q.xt = xt;
    s.q.sxb = sxb;
  } else if (s.isa >= ISA_AVX2 && vector_groups(a)) {   // the AVX2 GEMV's group sums, as run_gemv
    group_sums(a, x, 1, w.f.data());
    a.xsum = w.f.data();
  } else {
    a.xsum = nullptr;
  }
}

void step_linear_rows(const StepLinear& s, int64_t o0, int64_t o1) {
  if (o0 >= o1) return;
  if (s.q8) {
    gemv_q8(s.q, s.q8isa, o0, o1);
  } else {
    gemv_dispatch(s.a, s.isa, o0, o1);
  }
}

void step_linear_pooled(const StepLinear& s) {
  at::parallel_for(0, s.a.out, s.grain, [&](int64_t b, int64_t e) { step_linear_rows(s, b, e); });
}

void step_linear_split(const StepLinear& s, int64_t tid, int64_t T, int64_t* o0, int64_t* o1) {
  parallel_split(s.a.out, s.grain, tid, T, o0, o1);
}

// Seconds per call, for each of `passes` passes, of one-row GEMVs over copies of a layer called back to back
// (the kernels benchmark's "in C++" stream figure: what a decode step pays per linear without a Python call
// around it).  Every call is what a decode step's pooled stage does: x prepared on this thread, then the rows
// in one at::parallel_for.  zeros[i] empty: symmetric.
std::vector<double> time_linear_stream(const at::Tensor& x, at::TensorList codes, at::TensorList scales,
                                       at::TensorList zeros, int64_t bits, int64_t group_size, int64_t in_features,
                                       int64_t q8, int64_t passes) {
  const size_t n = codes.size();
  TORCH_CHECK_VALUE(n > 0 && scales.size() == n && zeros.size() == n && passes >= 1,
                    "lowbit time_linear_stream: one scale and zero tensor per codes tensor, passes >= 1");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() == in_features,
                    "lowbit time_linear_stream: x must be one contiguous float32 row of ", in_features);
  std::vector<StepLinear> lin(n);
  StepWorkspace ws;
  int64_t out = 0;
  for (size_t i = 0; i < n; ++i) {
    std::optional<at::Tensor> zero;
    if (zeros[i].defined() && zeros[i].numel() > 0) zero = zeros[i];
    bind_step_linear(lin[i], codes[i], scales[i], zero, bits, group_size, in_features, q8);
    reserve_step_workspace(ws, lin[i]);
    out = std::max(out, lin[i].a.out);
  }
  std::vector<float> y((size_t)out);
  std::vector<double> per_call;
  for (int64_t p = 0; p < passes; ++p) {
    const auto t0 = std::chrono::steady_clock::now();
    for (size_t i = 0; i < n; ++i) {
      prepare_step_linear(lin[i], ws, x.data_ptr<float>(), y.data());
      step_linear_pooled(lin[i]);
    }
    per_call.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / (double)n);
  }
  return per_call;
}

}  // namespace lowbit_fused

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def(
      "time_linear_stream(Tensor x, Tensor[] codes, Tensor[] scales, Tensor[] zeros, int bits, int group_size, "
      "int in_features, int q8, int passes) -> float[]");
  m.def("grouped_repack(Tensor codes, int bits, int in_features, int layout=0) -> Tensor");
  m.def(
      "grouped_linear_q8(Tensor x, Tensor codes, Tensor scale, Tensor? zero, int bits, int group_size, "
      "int in_features, int isa=0, int layout=1) -> Tensor");
  m.def("fused_q8_isa(int requested=0) -> int", &lowbit_fused::fused_q8_isa);
  m.def(
      "grouped_linear(Tensor x, Tensor codes, Tensor scale, Tensor? zero, int bits, int group_size, "
      "int in_features, int isa=0, int mode=0) -> Tensor");
  m.def("fused_cpu_isa(int requested=0) -> int", &lowbit_fused::fused_cpu_isa);
  m.def("fused_parallel_threads(int n) -> int", &lowbit_fused::fused_parallel_threads);
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("grouped_repack", &lowbit_fused::grouped_repack);
  m.impl("grouped_linear", &lowbit_fused::grouped_linear);
  m.impl("grouped_linear_q8", &lowbit_fused::grouped_linear_q8);
  m.impl("time_linear_stream", &lowbit_fused::time_linear_stream);
}
