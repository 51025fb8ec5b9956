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
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace lowbit_fused {

at::Tensor layer_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                        const std::optional<at::Tensor>& zero, int64_t bits, int64_t group_size, int64_t in_features,
                        bool q8);

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
void prefetch_cache(const at::Tensor& keys, const at::Tensor& values, int64_t nkv, int64_t Lmax, int64_t hd,
                    int64_t pos) {
  const char* K = reinterpret_cast<const char*>(keys.data_ptr<float>());
  const char* V = reinterpret_cast<const char*>(values.data_ptr<float>());
  const int64_t row = hd * (int64_t)sizeof(float), bytes = std::min<int64_t>(pos, 256) * row;
  for (int64_t j = 0; j < nkv; ++j)
    for (int64_t b = 0; b < bytes; b += 64) {
      __builtin_prefetch(K + j * Lmax * row + b, 0, 2);
      __builtin_prefetch(V + j * Lmax * row + b, 0, 2);
    }
}

struct Linear {
  const at::Tensor *codes, *scale;
  std::optional<at::Tensor> zero;
  int64_t bits, group_size;
  bool q8;
};

at::Tensor run(const Linear& L, const at::Tensor& x) {
  return layer_linear(x, *L.codes, *L.scale, L.zero, L.bits, L.group_size, x.size(1), L.q8);
}

// One layer; `A` caches the attended positions between the layers of one step (recomputed when the cache
// length or position differs from the one it was built for).
at::Tensor layer_step(const at::Tensor& x, at::TensorList w, at::IntArrayRef meta, at::ArrayRef<double> fmeta,
                      const at::Tensor& keys, const at::Tensor& values, const at::Tensor& length, const at::Tensor& cos,
                      const at::Tensor& sin, const std::optional<at::Tensor>& mask, Attend& A) {
  TORCH_CHECK_VALUE(w.size() == 18 && meta.size() == 15 && fmeta.size() == 3,
                    "lowbit decode_layer: expected 18 tensors, 15 ints and 3 floats");
  const int64_t nh = meta[0], nkv = meta[1], hd = meta[2];
  TORCH_CHECK_VALUE(nh > 0 && nkv > 0 && nh % nkv == 0 && hd > 0 && hd % 2 == 0,
                    "lowbit decode_layer: bad head counts ", nh, "/", nkv, " x ", hd);
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && x.numel() == x.size(-1), "lowbit decode_layer: x must be "
                    "float32 with one row, got ", x.sizes());
  const int64_t H = x.size(-1);
  TORCH_CHECK_VALUE(keys.dim() == 4 && keys.size(0) == 1 && keys.size(1) == nkv && keys.size(3) == hd &&
                        keys.is_contiguous() && keys.scalar_type() == at::kFloat && values.sizes() == keys.sizes() &&
                        values.is_contiguous() && values.scalar_type() == at::kFloat,
                    "lowbit decode_layer: the cache must be contiguous float32 (1, ", nkv, ", L, ", hd, ")");
  TORCH_CHECK_VALUE(length.numel() == 1 && length.scalar_type() == at::kLong, "lowbit decode_layer: length must be "
                    "one int64");
  const int64_t Lmax = keys.size(2);
  int64_t* lenp = length.data_ptr<int64_t>();
  const int64_t pos = *lenp;
  TORCH_CHECK_VALUE(pos >= 0 && pos < Lmax, "lowbit decode_layer: cache position ", pos, " outside the cache of ",
                    Lmax, " tokens");
  auto lin = [&](int i) {
    Linear L;
    L.codes = &w[2 + 3 * i];
    L.scale = &w[3 + 3 * i];
    if (present(w[4 + 3 * i])) L.zero = w[4 + 3 * i];
    L.bits = meta[3 + 3 * i];
    L.group_size = meta[4 + 3 * i];
    L.q8 = meta[5 + 3 * i] != 0;
    return L;
  };
  const Linear qkv_l = lin(0), o_l = lin(1), gu_l = lin(2), down_l = lin(3);
  const float* ln1 = floats(w[0], H, "input norm weight");
  const float* ln2 = floats(w[1], H, "post-attention norm weight");
  const int64_t nq = nh * hd, nk = nkv * hd;
  const float* cs = floats(cos, hd, "cos");
  const float* sn = floats(sin, hd, "sin");
  const at::Tensor xc = x.reshape({1, H}).contiguous();
  const float* xd = xc.data_ptr<float>();

  prefetch_cache(keys, values, nkv, Lmax, hd, pos);
  // attention block
  at::Tensor h = at::empty({1, H}, xc.options());
  rms_norm(xd, ln1, H, fmeta[0], h.data_ptr<float>());
  at::Tensor qkv = run(qkv_l, h);
  TORCH_CHECK_VALUE(qkv.size(1) == nq + 2 * nk, "lowbit decode_layer: q/k/v give ", qkv.size(1), " values, expected ",
                    nq + 2 * nk);
  float* q = qkv.data_ptr<float>();
  float* k = q + nq;
  const float* v = k + nk;
  if (present(w[14])) {
    const float* b = floats(w[14], nq + 2 * nk, "q/k/v bias");
    for (int64_t i = 0; i < nq + 2 * nk; ++i) q[i] += b[i];
  }
  if (present(w[16])) {
    const float* qn = floats(w[16], hd, "q norm weight");
    const float* kn = floats(w[17], hd, "k norm weight");
    for (int64_t i = 0; i < nh; ++i) rms_norm(q + i * hd, qn, hd, fmeta[1], q + i * hd);
    for (int64_t i = 0; i < nkv; ++i) rms_norm(k + i * hd, kn, hd, fmeta[1], k + i * hd);
  }
  for (int64_t i = 0; i < nh; ++i) rotary(q + i * hd, cs, sn, hd);
  for (int64_t i = 0; i < nkv; ++i) rotary(k + i * hd, cs, sn, hd);
  float* K = keys.data_ptr<float>();
  float* V = values.data_ptr<float>();
  for (int64_t j = 0; j < nkv; ++j) {
    std::copy(k + j * hd, k + (j + 1) * hd, K + (j * Lmax + pos) * hd);
    std::copy(v + j * hd, v + (j + 1) * hd, V + (j * Lmax + pos) * hd);
  }
  *lenp = pos + 1;

  // which cache positions this token attends to, and their additive bias
  if (A.Lmax != Lmax || A.pos != pos) attend_positions(mask, Lmax, pos, A);
  const std::vector<int64_t>& live = A.live;
  const float* bias = A.bias.empty() ? nullptr : A.bias.data();
  at::Tensor att = at::zeros({1, nq}, xc.options());
  float* ad = att.data_ptr<float>();
  const float scaling = (float)fmeta[2];
  const int64_t group = nh / nkv, n = (int64_t)live.size();
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(n * hd, 1));
  at::parallel_for(0, nh, grain, [&](int64_t h0, int64_t h1) {
    std::vector<float> s((size_t)std::max<int64_t>(n, 1));
    for (int64_t i = h0; i < h1; ++i) {
      const float* qi = q + i * hd;
      const float* Kj = K + (i / group) * Lmax * hd;
      const float* Vj = V + (i / group) * Lmax * hd;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < n; ++c) {
        const float* kt = Kj + live[c] * hd;
        s[c] = dot(qi, kt, hd) * scaling + (bias ? bias[live[c]] : 0.f);
        mx = std::max(mx, s[c]);
      }
      if (n == 0 || mx == -std::numeric_limits<float>::infinity()) continue;   // nothing to attend: zeros
      const float tot = exp_sum(s.data(), n, mx);
      float* out = ad + i * hd;
      for (int64_t c = 0; c < n; ++c) {
        const float p = s[c] / tot;
        const float* vt = Vj + live[c] * hd;
        for (int64_t e = 0; e < hd; ++e) out[e] += p * vt[e];
      }
    }
  });
  at::Tensor o = run(o_l, att);
  TORCH_CHECK_VALUE(o.size(1) == H, "lowbit decode_layer: o_proj gives ", o.size(1), " values, expected ", H);
  at::Tensor x2 = at::empty({1, H}, xc.options());
  float* x2d = x2.data_ptr<float>();
  const float* od = o.data_ptr<float>();
  const float* ob = present(w[15]) ? floats(w[15], H, "o bias") : nullptr;
  for (int64_t i = 0; i < H; ++i) x2d[i] = xd[i] + (ob ? od[i] + ob[i] : od[i]);

  // MLP block
  rms_norm(x2d, ln2, H, fmeta[0], h.data_ptr<float>());
  at::Tensor gu = run(gu_l, h);
  TORCH_CHECK_VALUE(gu.size(1) % 2 == 0, "lowbit decode_layer: gate/up give an odd ", gu.size(1), " values");
  const int64_t I = gu.size(1) / 2;
  at::Tensor act = at::empty({1, I}, xc.options());
  silu_mul(gu.data_ptr<float>(), gu.data_ptr<float>() + I, I, act.data_ptr<float>());
  at::Tensor d = run(down_l, act);
  TORCH_CHECK_VALUE(d.size(1) == H, "lowbit decode_layer: down_proj gives ", d.size(1), " values, expected ", H);
  const float* dd = d.data_ptr<float>();
  for (int64_t i = 0; i < H; ++i) x2d[i] += dd[i];
  return x2.view(x.sizes());
}

at::Tensor decode_layer(const at::Tensor& x, at::TensorList w, at::IntArrayRef meta, at::ArrayRef<double> fmeta,
                        at::Tensor& keys, at::Tensor& values, at::Tensor& length, const at::Tensor& cos,
                        const at::Tensor& sin, const std::optional<at::Tensor>& mask) {
  Attend A;
  return layer_step(x, w, meta, fmeta, keys, values, length, cos, sin, mask, A);
}

at::Tensor decode_layers(const at::Tensor& x, at::TensorList w, at::IntArrayRef meta, at::ArrayRef<double> fmeta,
                         at::TensorList keys, at::TensorList values, at::TensorList lengths, const at::Tensor& cos,
                         const at::Tensor& sin, const std::optional<at::Tensor>& mask) {
  const int64_t n = (int64_t)keys.size();
  TORCH_CHECK_VALUE(n > 0 && (int64_t)values.size() == n && (int64_t)lengths.size() == n &&
                        (int64_t)w.size() == 18 * n && (int64_t)meta.size() == 15 * n && (int64_t)fmeta.size() == 3 * n,
                    "lowbit decode_layers: expected per layer 18 tensors, 15 ints, 3 floats and one keys, values and "
                    "length tensor, got ", w.size(), ", ", meta.size(), ", ", fmeta.size(), " for ", n, " layers");
  Attend A;
  at::Tensor h = x;
  for (int64_t i = 0; i < n; ++i)
    h = layer_step(h, w.slice(18 * i, 18), meta.slice(15 * i, 15), fmeta.slice(3 * i, 3), keys[i], values[i],
                   lengths[i], cos, sin, mask, A);
  return h;
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
