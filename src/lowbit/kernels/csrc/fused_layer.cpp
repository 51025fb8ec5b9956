// torch.ops.lowbit.decode_layer: one decode step (one token, batch 1) of a llama-style decoder layer in one
// call, for lowbit.decoding's fused decode path.
//
//   h   = rms_norm(x) * ln1
//   qkv = h @ Wqkv.T (+ bias)               one GEMV over the stacked q/k/v layers (fused_ops.cpp)
//   q, k <- rms_norm per head (qwen3), then rotary embedding with the step's cos/sin (rotate-half form)
//   keys[:, :, pos], values[:, :, pos] = k, v; length += 1      (a transformers StaticLayer's tensors)
//   a   = softmax(scaling * q k^T + mask) v   per head, grouped-query heads sharing their kv head
//   x   = x + a @ Wo.T (+ bias)
//   h   = rms_norm(x) * ln2
//   g, u = h @ Wgu.T                         one GEMV over the stacked gate/up layers
//   x   = x + (silu(g) * u) @ Wd.T
//
// Everything is fp32 and computed in the order transformers computes it, up to summation order: the
// result matches the unfused layer to fp32 rounding.  The GEMVs are the same kernels (and the same
// int8-activation choice) as the layers' own calls; the rest (norms, rotary, attention) is small next to
// them.  The Python side (lowbit/decoding/fused.py) decides when a layer qualifies and passes:
//
//   w:     [ln1, ln2, qkv codes, scale, zero, o codes, scale, zero, gate/up codes, scale, zero,
//           down codes, scale, zero, qkv bias, o bias, q norm, k norm]   (absent: an empty tensor)
//   meta:  [heads, kv heads, head dim, then per linear (qkv, o, gate/up, down): bits, group size, q8]
//          (q8: 0 the fp32-activation kernel, 1 or 2 the int8 one with codes in that repack layout)
//   fmeta: [rms eps, q/k norm eps, attention scaling]
//   mask:  the attention mask row of this token: bool or integer over the first n <= L cache positions
//          (nonzero attends; positions from n on do not: a generate() 2-D mask), or additive float over
//          all L; or none: positions 0 .. pos.
//
// torch.ops.lowbit.decode_layers runs every layer of a model in one call (the lists above concatenated layer
// after layer, one cache tensor of each kind per layer): a per-layer call from Python costs about 8 us of
// argument conversion (18 tensors), a quarter of a 4-bit SmolLM2 layer's non-GEMV time; the mask is read once
// per step instead of once per layer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <strings.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "fused_step.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace lowbit_fused {

namespace {

#if defined(__AVX2__) && defined(__FMA__)
// Horizontal sum of the 8 lanes, as a tree.
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp of 8 floats: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial (Cephes' expf
// coefficients), times 2^n built in the exponent field; about 1 ulp over [-87, 88], inputs clamped there
// (below: a tiny positive value, as for the softmax and SiLU uses here, where it is negligible).
inline __m256 exp8(__m256 x) {
  // operand order: min/max return their second operand when either is NaN, so a NaN stays NaN (as std::exp's)
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// sum_i a[i] * b[i] in independent partial sums reduced as a tree (a single running sum, or a serial sum of the
// partials, is a chain of dependent adds: latency-bound, and attention and the fp32 head make thousands of
// these per token)
float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float t = hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
#else
  float acc[16] = {0.f};
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  float t = acc[0];
#endif
  for (; i < n; ++i) t += a[i] * b[i];
  return t;
}

// y[i] = x[i] / (1 + exp(-x[i])) * u[i]: SiLU of the gate times the up projection
void silu_mul(const float* x, const float* u, int64_t n, float* y) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 e = exp8(_mm256_sub_ps(zero, v));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_div_ps(v, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) y[i] = x[i] / (1.f + std::exp(-x[i])) * u[i];
}

// s[c] <- exp(s[c] - mx); returns their sum
float exp_sum(float* s, int64_t n, float mx) {
  int64_t c = 0;
  float tot = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (; c + 8 <= n; c += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + c), m));
    _mm256_storeu_ps(s + c, e);
    acc = _mm256_add_ps(acc, e);
  }
  tot = hsum8(acc);
#endif
  for (; c < n; ++c) {
    s[c] = std::exp(s[c] - mx);
    tot += s[c];
  }
  return tot;
}

void rms_norm(const float* x, const float* w, int64_t n, double eps, float* y) {
  const float ss = dot(x, x, n);
  const float r = 1.f / std::sqrt(ss / (float)n + (float)eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

// x (d) <- x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[d/2:], x[:d/2])
void rotary(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t h = d / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * cos[i] - b * sin[i];
    x[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

bool present(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

const float* floats(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n,
                    "lowbit decode_layer: ", name, " must be contiguous float32 with ", n, " elements, got ",
                    t.scalar_type(), " with ", t.numel());
  return t.data_ptr<float>();
}

// The cache positions one token attends to and their additive bias (empty: none).
struct Attend {
  std::vector<int64_t> live;
  std::vector<float> bias;     // per cache position, for an additive float mask only
  int64_t Lmax = -1, pos = -1;
};

void attend_positions(const std::optional<at::Tensor>& mask, int64_t Lmax, int64_t pos, Attend& A) {
  A.Lmax = Lmax;
  A.pos = pos;
  A.live.clear();
  A.bias.clear();
  if (!(mask.has_value() && mask->defined())) {
    for (int64_t t = 0; t <= pos; ++t) A.live.push_back(t);
    return;
  }
  const at::Tensor mc = mask->reshape({-1}).contiguous();
  if (mc.is_floating_point()) {                         // additive, over the whole cache
    TORCH_CHECK_VALUE(mc.numel() == Lmax, "lowbit decode_layer: an additive mask covers ", mc.numel(),
                      " positions, the cache ", Lmax);
    const at::Tensor mf = mc.scalar_type() == at::kFloat ? mc : mc.to(at::kFloat);
    const float* m = mf.data_ptr<float>();
    A.bias.assign(m, m + Lmax);
    for (int64_t t = 0; t < Lmax; ++t)
      if (m[t] != -std::numeric_limits<float>::infinity()) A.live.push_back(t);
    return;
  }
  // bool / integer: nonzero attends; none past its end
  TORCH_CHECK_VALUE(mc.numel() <= Lmax, "lowbit decode_layer: the mask covers ", mc.numel(),
                    " positions, more than the cache's ", Lmax);
  const int64_t n = mc.numel();
  auto take = [&](const auto* m) {
    for (int64_t t = 0; t < n; ++t)
      if (m[t]) A.live.push_back(t);
  };
  switch (mc.scalar_type()) {                           // generate()'s masks are int64: read them as they are
    case at::kLong: take(mc.data_ptr<int64_t>()); break;
    case at::kInt: take(mc.data_ptr<int32_t>()); break;
    case at::kBool: take(mc.data_ptr<bool>()); break;
    default: {
      const at::Tensor mb = mc.to(at::kBool);
      take(mb.data_ptr<bool>());
    }
  }
}

// Prefetch (into L2) the cache rows of the positions before `pos` (at most 256 of them) for every kv head, at
// the start of a layer: between one token's visits to a layer the GEMVs stream tens of MB through the caches,
// so attention would otherwise wait on memory for every key and value row (measured on SmolLM2, 40 positions:
// attention 5.8 -> 4.1 us a layer, the rows arriving during the q/k/v GEMV).
void prefetch_cache(const float* keys, const float* values, int64_t nkv, int64_t Lmax, int64_t hd, int64_t pos) {
  const char* K = reinterpret_cast<const char*>(keys);
  const char* V = reinterpret_cast<const char*>(values);
  const int64_t row = hd * (int64_t)sizeof(float), bytes = std::min<int64_t>(pos, 256) * row;
  for (int64_t j = 0; j < nkv; ++j)
    for (int64_t b = 0; b < bytes; b += 64) {
      __builtin_prefetch(K + j * Lmax * row + b, 0, 2);
      __builtin_prefetch(V + j * Lmax * row + b, 0, 2);
    }
}

// A spin-wait hint to the core.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_ia32_pause();
#endif
}

// ---- one decode step over every layer ------------------------------------------------------------------
//
// A step is planned first (every tensor checked and every linear bound: nothing below the plan throws), then
// run by a team of at::get_num_threads() threads inside one parallel region: thread 0 does the serial parts
// (norms, x's int8 quantization, rotary, the cache write, residuals) while the others prefetch into L2 the
// rows of the GEMV they compute next; the GEMV rows and the attention heads are split over the team exactly
// as at::parallel_for splits them, and spin barriers separate the stages.  One parallel region per token
// instead of five per layer, and weight rows arriving while the serial parts run.  Every output element is
// computed by the same code in the same order as with one parallel region per stage (the "pooled" run, used
// where no team forms: one thread, inside another parallel region, LOWBIT_DECODE_TEAM=0), so both give the
// same bits.

// Everything one layer's step reads and writes.
struct LayerPlan {
  StepLinear qkv, o, gu, down;
  const float *ln1, *ln2, *qkv_bias = nullptr, *o_bias = nullptr, *q_norm = nullptr, *k_norm = nullptr;
  float *K, *V;
  int64_t* lenp;
  int64_t nh, nkv, hd, Lmax, pos, I;
  double eps, qk_eps;
  float scaling;
  size_t attend;               // index into the step's attended-position lists
};

LayerPlan plan_layer(int64_t H, at::TensorList w, at::IntArrayRef meta, at::ArrayRef<double> fmeta,
                     const at::Tensor& keys, const at::Tensor& values, const at::Tensor& length) {
  TORCH_CHECK_VALUE(w.size() == 18 && meta.size() == 15 && fmeta.size() == 3,
                    "lowbit decode_layer: expected 18 tensors, 15 ints and 3 floats");
  LayerPlan P;
  P.nh = meta[0], P.nkv = meta[1], P.hd = meta[2];
  TORCH_CHECK_VALUE(P.nh > 0 && P.nkv > 0 && P.nh % P.nkv == 0 && P.hd > 0 && P.hd % 2 == 0,
                    "lowbit decode_layer: bad head counts ", P.nh, "/", P.nkv, " x ", P.hd);
  TORCH_CHECK_VALUE(keys.dim() == 4 && keys.size(0) == 1 && keys.size(1) == P.nkv && keys.size(3) == P.hd &&
                        keys.is_contiguous() && keys.scalar_type() == at::kFloat && values.sizes() == keys.sizes() &&
                        values.is_contiguous() && values.scalar_type() == at::kFloat,
                    "lowbit decode_layer: the cache must be contiguous float32 (1, ", P.nkv, ", L, ", P.hd, ")");
  TORCH_CHECK_VALUE(length.numel() == 1 && length.scalar_type() == at::kLong, "lowbit decode_layer: length must be "
                    "one int64");
  P.Lmax = keys.size(2);
  P.lenp = length.data_ptr<int64_t>();
  P.pos = *P.lenp;
  TORCH_CHECK_VALUE(P.pos >= 0 && P.pos < P.Lmax, "lowbit decode_layer: cache position ", P.pos,
                    " outside the cache of ", P.Lmax, " tokens");
  P.K = keys.data_ptr<float>();
  P.V = values.data_ptr<float>();
  auto bind = [&](StepLinear& s, int i, int64_t in) {
    std::optional<at::Tensor> zero;
    if (present(w[4 + 3 * i])) zero = w[4 + 3 * i];
    bind_step_linear(s, w[2 + 3 * i], w[3 + 3 * i], zero, meta[3 + 3 * i], meta[4 + 3 * i], in, meta[5 + 3 * i]);
  };
  const int64_t nq = P.nh * P.hd, nk = P.nkv * P.hd;
  bind(P.qkv, 0, H);
  TORCH_CHECK_VALUE(P.qkv.a.out == nq + 2 * nk, "lowbit decode_layer: q/k/v give ", P.qkv.a.out,
                    " values, expected ", nq + 2 * nk);
  bind(P.o, 1, nq);
  TORCH_CHECK_VALUE(P.o.a.out == H, "lowbit decode_layer: o_proj gives ", P.o.a.out, " values, expected ", H);
  bind(P.gu, 2, H);
  TORCH_CHECK_VALUE(P.gu.a.out % 2 == 0, "lowbit decode_layer: gate/up give an odd ", P.gu.a.out, " values");
  P.I = P.gu.a.out / 2;
  bind(P.down, 3, P.I);
  TORCH_CHECK_VALUE(P.down.a.out == H, "lowbit decode_layer: down_proj gives ", P.down.a.out, " values, expected ",
                    H);
  P.ln1 = floats(w[0], H, "input norm weight");
  P.ln2 = floats(w[1], H, "post-attention norm weight");
  if (present(w[14])) P.qkv_bias = floats(w[14], nq + 2 * nk, "q/k/v bias");
  if (present(w[15])) P.o_bias = floats(w[15], H, "o bias");
  if (present(w[16])) {
    P.q_norm = floats(w[16], P.hd, "q norm weight");
    P.k_norm = floats(w[17], P.hd, "k norm weight");
  }
  P.eps = fmeta[0];
  P.qk_eps = fmeta[1];
  P.scaling = (float)fmeta[2];
  return P;
}

// Pauses a barrier spins before it yields the core at every turn (about 100 us: a stage of a decode step
// takes 1-30 us, so a yield means the team's threads outnumber the free cores).
constexpr int64_t kSpins = 1 << 12;

// A spin barrier for a team of T threads.  While it waits, a thread calls idle() until idle() returns false.
struct Team {
  int64_t T = 1;
  alignas(64) std::atomic<int64_t> state{0};      // threads checked in, or -1: no team (they all leave)
  alignas(64) std::atomic<int64_t> count{0};
  alignas(64) std::atomic<uint64_t> gen{0};

  template <class Idle>
  void sync(Idle&& idle) {
    if (T == 1) return;
    const uint64_t g = gen.load(std::memory_order_acquire);
    if (count.fetch_add(1, std::memory_order_acq_rel) == T - 1) {
      count.store(0, std::memory_order_relaxed);
      gen.store(g + 1, std::memory_order_release);
      return;
    }
    bool more = true;
    for (int64_t spins = 0; gen.load(std::memory_order_acquire) == g; ++spins) {
      if (more)
        more = idle();
      else if (spins < kSpins)
        cpu_relax();
      else                                         // more threads than free cores: let the others run
        std::this_thread::yield();
    }
  }

  // Every thread of the region calls this first: true once all T have arrived, false (for all) when one of
  // them holds more than one task (fewer threads than T) or they do not all arrive within 20 ms (a pool that
  // runs the tasks one after another); no thread has done any work by then.
  bool check_in(bool one_task) {
    int64_t s = state.load();
    while (true) {
      if (s < 0) return false;
      if (state.compare_exchange_weak(s, one_task ? s + 1 : -1)) break;
    }
    if (!one_task) return false;
    const auto t0 = std::chrono::steady_clock::now();
    while (true) {
      s = state.load();
      if (s == T) return true;
      if (s < 0) return false;
      if (std::chrono::steady_clock::now() - t0 > std::chrono::milliseconds(20) &&
          state.compare_exchange_strong(s, -1))
        return false;
      cpu_relax();
    }
  }
};

// Prefetches (into L2) this thread's rows of a linear's codes, a few lines per call, up to kTeamPrefetch bytes.
constexpr int64_t kTeamPrefetch = 256 << 10;
struct RowPrefetch {
  const char *p = nullptr, *end = nullptr;
  void aim(const StepLinear& s, int64_t tid, int64_t T) {
    int64_t o0, o1;
    step_linear_split(s, tid, T, &o0, &o1);
    p = reinterpret_cast<const char*>(s.a.codes + o0 * s.a.row_bytes);
    end = p + std::min<int64_t>((o1 - o0) * s.a.row_bytes, kTeamPrefetch);
  }
  bool operator()() {
    for (int i = 0; i < 8 && p < end; ++i, p += 64) __builtin_prefetch(p, 0, 2);
    return p < end;
  }
};

// What a step's threads share.
struct Step {
  std::vector<LayerPlan> plans;
  std::vector<Attend> attends;
  StepWorkspace ws;
  std::vector<float> x, h, qkv, att, o, gu, act, d, scores;   // scores: per thread, max_live floats each
  int64_t H = 0, max_live = 1;
  const float *cos = nullptr, *sin = nullptr;
};

// The step's stages for thread `tid` of a team of T (pooled: one thread, every parallel stage through
// at::parallel_for as before).
void run_step(Step& S, Team& team, int64_t tid, bool pooled) {
  const int64_t T = pooled ? 1 : team.T;
  const bool lead = tid == 0;
  RowPrefetch pf;
  auto nothing = [] { return false; };
  auto rows = [&](const StepLinear& s) {
    if (pooled) {
      step_linear_pooled(s);
    } else {
      int64_t o0, o1;
      step_linear_split(s, tid, T, &o0, &o1);
      step_linear_rows(s, o0, o1);
    }
  };
  const StepLinear* aimed = nullptr;
  auto wait_for = [&](const StepLinear& next) {         // a barrier, prefetching this thread's rows of `next`
    if (T == 1) return;
    if (!lead && aimed != &next) {
      pf.aim(next, tid, T);
      aimed = &next;
    }
    if (lead)
      team.sync(nothing);
    else
      team.sync(pf);
  };
  const int64_t H = S.H;
  float* x = S.x.data();
  float* h = S.h.data();
  for (size_t l = 0; l < S.plans.size(); ++l) {
    LayerPlan& P = S.plans[l];
    const int64_t nq = P.nh * P.hd, nk = P.nkv * P.hd;
    float* q = S.qkv.data();
    float* k = q + nq;
    const float* v = k + nk;
    if (lead) {
      prefetch_cache(P.K, P.V, P.nkv, P.Lmax, P.hd, P.pos);
      rms_norm(x, P.ln1, H, P.eps, h);
      prepare_step_linear(P.qkv, S.ws, h, q);
    }
    wait_for(P.qkv);
    rows(P.qkv);
    wait_for(P.o);
    if (lead) {
      if (P.qkv_bias)
        for (int64_t i = 0; i < nq + 2 * nk; ++i) q[i] += P.qkv_bias[i];
      if (P.q_norm) {
        for (int64_t i = 0; i < P.nh; ++i) rms_norm(q + i * P.hd, P.q_norm, P.hd, P.qk_eps, q + i * P.hd);
        for (int64_t i = 0; i < P.nkv; ++i) rms_norm(k + i * P.hd, P.k_norm, P.hd, P.qk_eps, k + i * P.hd);
      }
      for (int64_t i = 0; i < P.nh; ++i) rotary(q + i * P.hd, S.cos, S.sin, P.hd);
      for (int64_t i = 0; i < P.nkv; ++i) rotary(k + i * P.hd, S.cos, S.sin, P.hd);
      for (int64_t j = 0; j < P.nkv; ++j) {
        std::copy(k + j * P.hd, k + (j + 1) * P.hd, P.K + (j * P.Lmax + P.pos) * P.hd);
        std::copy(v + j * P.hd, v + (j + 1) * P.hd, P.V + (j * P.Lmax + P.pos) * P.hd);
      }
      *P.lenp = P.pos + 1;
      std::fill(S.att.begin(), S.att.begin() + nq, 0.f);
    }
    wait_for(P.o);
    // attention, heads split as at::parallel_for splits them
    {
      const Attend& A = S.attends[P.attend];
      const int64_t n = (int64_t)A.live.size();
      const float* bias = A.bias.empty() ? nullptr : A.bias.data();
      const int64_t group = P.nh / P.nkv;
      const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(n * P.hd, 1));
      auto heads = [&](int64_t h0, int64_t h1, float* s) {
        for (int64_t i = h0; i < h1; ++i) {
          const float* qi = q + i * P.hd;
          const float* Kj = P.K + (i / group) * P.Lmax * P.hd;
          const float* Vj = P.V + (i / group) * P.Lmax * P.hd;
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t c = 0; c < n; ++c) {
            s[c] = dot(qi, Kj + A.live[c] * P.hd, P.hd) * P.scaling + (bias ? bias[A.live[c]] : 0.f);
            mx = std::max(mx, s[c]);
          }
          if (n == 0 || mx == -std::numeric_limits<float>::infinity()) continue;   // nothing to attend: zeros
          const float tot = exp_sum(s, n, mx);
          float* out = S.att.data() + i * P.hd;
          for (int64_t c = 0; c < n; ++c) {
            const float p = s[c] / tot;
            const float* vt = Vj + A.live[c] * P.hd;
            for (int64_t e = 0; e < P.hd; ++e) out[e] += p * vt[e];
          }
        }
      };
      if (pooled) {
        at::parallel_for(0, P.nh, grain, [&](int64_t h0, int64_t h1) {
          std::vector<float> s((size_t)std::max<int64_t>(n, 1));
          heads(h0, h1, s.data());
        });
      } else {
        int64_t h0, h1;
        parallel_split(P.nh, grain, tid, T, &h0, &h1);
        heads(h0, h1, S.scores.data() + tid * S.max_live);
      }
    }
    wait_for(P.o);
    if (lead) prepare_step_linear(P.o, S.ws, S.att.data(), S.o.data());
    wait_for(P.o);
    rows(P.o);
    wait_for(P.gu);
    if (lead) {
      for (int64_t i = 0; i < H; ++i) x[i] += P.o_bias ? S.o[i] + P.o_bias[i] : S.o[i];
      rms_norm(x, P.ln2, H, P.eps, h);
      prepare_step_linear(P.gu, S.ws, h, S.gu.data());
    }
    wait_for(P.gu);
    rows(P.gu);
    wait_for(P.down);
    if (lead) {
      silu_mul(S.gu.data(), S.gu.data() + P.I, P.I, S.act.data());
      prepare_step_linear(P.down, S.ws, S.act.data(), S.d.data());
    }
    wait_for(P.down);
    rows(P.down);
    wait_for(l + 1 < S.plans.size() ? S.plans[l + 1].qkv : P.down);
    if (lead)
      for (int64_t i = 0; i < H; ++i) x[i] += S.d[i];
  }
}

bool team_wanted() {
  const char* e = std::getenv("LOWBIT_DECODE_TEAM");
  return !(e && (!std::strcmp(e, "0") || !strcasecmp(e, "false") || !strcasecmp(e, "no") || !strcasecmp(e, "off")));
}

std::atomic<bool> team_failed{false};   // a team did not form once: this process runs pooled from then on
std::atomic<int64_t> last_team{0};      // threads of the last step's team (1: pooled; 0: no step yet)

int64_t decode_team_threads() { return last_team.load(); }

at::Tensor decode_layers(const at::Tensor& x, at::TensorList w, at::IntArrayRef meta, at::ArrayRef<double> fmeta,
                         at::TensorList keys, at::TensorList values, at::TensorList lengths, const at::Tensor& cos,
                         const at::Tensor& sin, const std::optional<at::Tensor>& mask) {
  const int64_t n = (int64_t)keys.size();
  TORCH_CHECK_VALUE(n > 0 && (int64_t)values.size() == n && (int64_t)lengths.size() == n &&
                        (int64_t)w.size() == 18 * n && (int64_t)meta.size() == 15 * n && (int64_t)fmeta.size() == 3 * n,
                    "lowbit decode_layers: expected per layer 18 tensors, 15 ints, 3 floats and one keys, values and "
                    "length tensor, got ", w.size(), ", ", meta.size(), ", ", fmeta.size(), " for ", n, " layers");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && x.numel() == x.size(-1), "lowbit decode_layer: x must be "
                    "float32 with one row, got ", x.sizes());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j)
      TORCH_CHECK_VALUE(!lengths[i].is_same(lengths[j]) && !keys[i].is_same(keys[j]),
                        "lowbit decode_layers: layers ", j, " and ", i, " share a cache tensor");
  Step S;
  S.H = x.size(-1);
  S.plans.reserve((size_t)n);
  int64_t max_qkv = 1, max_nq = 1, max_gu = 1, max_I = 1;
  for (int64_t i = 0; i < n; ++i) {
    S.plans.push_back(plan_layer(S.H, w.slice(18 * i, 18), meta.slice(15 * i, 15), fmeta.slice(3 * i, 3), keys[i],
                                 values[i], lengths[i]));
    LayerPlan& P = S.plans.back();
    size_t a = 0;
    while (a < S.attends.size() && !(S.attends[a].Lmax == P.Lmax && S.attends[a].pos == P.pos)) ++a;
    if (a == S.attends.size()) {
      S.attends.emplace_back();
      attend_positions(mask, P.Lmax, P.pos, S.attends.back());
    }
    P.attend = a;
    S.max_live = std::max<int64_t>(S.max_live, (int64_t)S.attends[a].live.size());
    for (const StepLinear* s : {&P.qkv, &P.o, &P.gu, &P.down}) reserve_step_workspace(S.ws, *s);
    max_qkv = std::max(max_qkv, P.qkv.a.out);
    max_nq = std::max(max_nq, P.nh * P.hd);
    max_gu = std::max(max_gu, P.gu.a.out);
    max_I = std::max(max_I, P.I);
    floats(cos, P.hd, "cos");
    floats(sin, P.hd, "sin");
  }
  S.cos = cos.data_ptr<float>();
  S.sin = sin.data_ptr<float>();
  const at::Tensor xc = x.reshape({1, S.H}).contiguous();
  S.x.assign(xc.data_ptr<float>(), xc.data_ptr<float>() + S.H);
  S.h.resize((size_t)S.H);
  S.qkv.resize((size_t)max_qkv);
  S.att.resize((size_t)max_nq);
  S.o.resize((size_t)S.H);
  S.gu.resize((size_t)max_gu);
  S.act.resize((size_t)max_I);
  S.d.resize((size_t)S.H);

  Team team;
  const int64_t T = at::get_num_threads();
  bool done = false;
  if (T > 1 && !at::in_parallel_region() && team_wanted() && !team_failed.load()) {
    team.T = T;
    S.scores.resize((size_t)(T * S.max_live));
    at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
      if (team.check_in(e - b == 1)) run_step(S, team, b, false);
    });
    done = team.state.load() == T;
    if (!done) {                                 // nothing ran: the pooled run below starts from the same state
      team_failed.store(true);
      TORCH_WARN_ONCE("lowbit decode_layers: no team of ", T, " threads formed in one parallel region; decoding "
                      "with a parallel region per stage from now on");
    }
  }
  if (!done) run_step(S, team, 0, true);
  last_team.store(done ? T : 1);
  at::Tensor y = at::empty_like(xc);
  std::copy(S.x.begin(), S.x.end(), y.data_ptr<float>());
  return y.view(x.sizes());
}

at::Tensor decode_layer(const at::Tensor& x, at::TensorList w, at::IntArrayRef meta, at::ArrayRef<double> fmeta,
                        at::Tensor& keys, at::Tensor& values, at::Tensor& length, const at::Tensor& cos,
                        const at::Tensor& sin, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK_VALUE(w.size() == 18 && meta.size() == 15 && fmeta.size() == 3,
                    "lowbit decode_layer: expected 18 tensors, 15 ints and 3 floats");
  return decode_layers(x, w, meta, fmeta, {keys}, {values}, {length}, cos, sin, mask);
}

// y = x @ w.T (+ bias) for a few rows of x and an fp32 weight: a memory-bound GEMV over output rows split
// across threads (for an fp32 head read once per decoded token: 113 MB on SmolLM2, where at::linear's
// matrix-vector path reads about 12 GB/s on this machine's two cores).
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && w.dim() == 2 &&
                        x.size(-1) == w.size(1) && x.device().is_cpu() && w.device().is_cpu(),
                    "lowbit linear_f32: x (..., in) and w (out, in) must be float32 on the CPU");
  const int64_t in = w.size(1), out = w.size(0);
  const at::Tensor xc = x.reshape({-1, in}).contiguous();
  const at::Tensor wc = w.contiguous();
  const int64_t m = xc.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  at::Tensor y = at::empty({m, out}, xc.options());
  const float* bd = nullptr;
  at::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    bc = bias->to(at::kFloat).contiguous();
    TORCH_CHECK_VALUE(bc.numel() == out, "lowbit linear_f32: bias has ", bc.numel(), " values, expected ", out);
    bd = bc.data_ptr<float>();
  }
  const float* xd = xc.data_ptr<float>();
  const float* wd = wc.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(16, (int64_t(1) << 15) / std::max<int64_t>(in, 1));
  at::parallel_for(0, out, grain, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t r = 0; r < m; ++r) yd[r * out + o] = dot(xd + r * in, wd + o * in, in) + (bd ? bd[o] : 0.f);
  });
  return y.view(shape);
}

}  // namespace
}  // namespace lowbit_fused

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("linear_f32(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("decode_team_threads() -> int", &lowbit_fused::decode_team_threads);
  m.def(
      "decode_layer(Tensor x, Tensor[] w, int[] meta, float[] fmeta, Tensor(a!) keys, Tensor(b!) values, "
      "Tensor(c!) length, Tensor cos, Tensor sin, Tensor? mask) -> Tensor");
  m.def(
      "decode_layers(Tensor x, Tensor[] w, int[] meta, float[] fmeta, Tensor(a!)[] keys, Tensor(b!)[] values, "
      "Tensor(c!)[] lengths, Tensor cos, Tensor sin, Tensor? mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("decode_layer", &lowbit_fused::decode_layer);
  m.impl("decode_layers", &lowbit_fused::decode_layers);
  m.impl("linear_f32", &lowbit_fused::linear_f32);
}
