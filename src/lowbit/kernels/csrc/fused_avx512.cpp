// AVX-512 (F + BW + VL) path.  cpp_extension.load passes one set of flags to every source, so this
// translation unit raises its own target with `#pragma GCC target` (the equivalent of compiling it with
// -mavx512f -mavx512bw -mavx512vl on top of the -mavx2 -mfma -mf16c baseline); its code only runs after
// the runtime check in fused_ops.cpp (__builtin_cpu_supports).  Everything here except the entry points
// (gemv_avx512, dequant_avx512, gemm_avx512) has internal linkage.
//
// Decoding (layouts in fused_common.h): one load puts column 16v + l of vector v in int32 lane l (4 bits:
// a 64-byte load holds 8 vectors, no widening; 2/3 bits: 16 bytes widened to 4 vectors); a per-lane
// shift brings the code to the low bits and a 16-entry table lookup (vpermps reads the low 4 bits of each
// index) maps it straight to its weight (float(q) - z) * s, bit for bit the reference dequantization, the
// table being built once per group.  2 bits use a table repeated every 4 entries so stray higher bits are
// ignored; 3 bits mask the low two bits and OR in bit 2 from a 16-bit mask.  8 bits convert
// (float(q) - z) * s directly.  Weights live only in registers.
#include "fused_common.h"

#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#if defined(__clang__)  // clang ignores "#pragma GCC target" (untested here: no clang on the build machine)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
#endif

namespace lowbit_fused {
namespace {

#define LB_INLINE inline __attribute__((always_inline))

LB_INLINE float h2f(uint16_t h) { return _cvtsh_ss(h); }

// fp32 scale and zero of one row's groups: converted 16 at a time into a stack buffer when the row has
// few groups, else one by one.
struct RowParams {
  static constexpr int64_t kMax = 64;
  float s[kMax], z[kMax];
  const uint16_t* srow;
  const uint16_t* zrow;
  float zsym;
  bool buffered;

  inline void load(const Args& a, int64_t o) {
    srow = a.scale + o * a.G;
    zrow = a.zero ? a.zero + o * a.G : nullptr;
    zsym = (float)(1 << (a.bits - 1));
    buffered = a.G <= kMax;
    if (!buffered) return;
    for (int64_t g = 0; g < a.G; g += 16) {
      const int64_t n = a.G - g < 16 ? a.G - g : 16;
      const __mmask16 k = (__mmask16)((1u << n) - 1);
      _mm512_storeu_ps(s + g, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, srow + g)));
      if (zrow)
        _mm512_storeu_ps(z + g, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, zrow + g)));
      else
        _mm512_storeu_ps(z + g, _mm512_set1_ps(zsym));
    }
  }
  LB_INLINE float scale(int64_t g) const { return buffered ? s[g] : h2f(srow[g]); }
  LB_INLINE float zero(int64_t g) const { return buffered ? z[g] : (zrow ? h2f(zrow[g]) : zsym); }
};

template <int BITS>
struct Dec {
  __m512 t0, t1;        // table (8 bits: t0 = z, t1 = s)
  const uint8_t* row;
  int64_t vfull;        // 4 bits: vectors in whole 128-column blocks

  LB_INLINE void init(float s, float z) {
    const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z);
    if (BITS == 8) {
      t0 = zv;
      t1 = sv;
    } else if (BITS == 4) {
      const __m512 k = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      t0 = _mm512_mul_ps(_mm512_sub_ps(k, zv), sv);
    } else if (BITS == 3) {       // index: the code (bit 3 is zero)
      const __m512 k = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
      t0 = _mm512_mul_ps(_mm512_sub_ps(k, zv), sv);
    } else {
      const __m512 k = _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
      t0 = _mm512_mul_ps(_mm512_sub_ps(k, zv), sv);
    }
  }

  // Largest unit (vectors decoded from one load) that may start at vector v.
  LB_INLINE int max_unit(int64_t v) const { return (BITS == 4 && v < vfull) ? 8 : 4; }

  // N consecutive vectors from v (v % N == 0, all from one load) -> w[0..N)
  template <int N>
  LB_INLINE void unit(int64_t v, __m512* w) const {
    if (BITS == 8) {
      for (int u = 0; u < N; ++u) {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (v + u) * 16)));
        w[u] = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q), t0), t1);
      }
      return;
    }
    __m512i q;
    int j0;
    __mmask64 hm = 0;
    if (BITS == 4) {
      if (v < vfull) {
        q = _mm512_loadu_si512(row + (v >> 3) * 64);
        j0 = (int)(v & 7);
      } else {
        q = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + vfull * 8)));
        j0 = (int)((v - vfull) & 3);
      }
      if (j0) q = _mm512_srl_epi32(q, _mm_cvtsi32_si128(4 * j0));
      for (int u = 0; u < N; ++u) w[u] = _mm512_permutexvar_ps(u ? _mm512_srli_epi32(q, 4 * u) : q, t0);
      return;
    }
    const uint8_t* blk = row + (v >> 2) * (BITS == 2 ? 16 : 24);
    q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    j0 = (int)(v & 3);
    if (j0) q = _mm512_srl_epi32(q, _mm_cvtsi32_si128(2 * j0));
    if (BITS == 3) {
      uint64_t m;
      memcpy(&m, blk + 16, 8);
      hm = (__mmask64)(m >> (16 * j0));
    }
    for (int u = 0; u < N; ++u) {
      __m512i qs = u ? _mm512_srli_epi32(q, 2 * u) : q;
      if (BITS == 3)  // low two bits, then bit 2 from the mask
        qs = _mm512_mask_or_epi32(_mm512_and_si512(qs, _mm512_set1_epi32(3)), (__mmask16)(hm >> (16 * u)),
                                  _mm512_and_si512(qs, _mm512_set1_epi32(3)), _mm512_set1_epi32(4));
      w[u] = _mm512_permutexvar_ps(qs, t0);
    }
  }
};

// Calls f(N, v, w) for the vectors [v, ve) of one group, in units as large as alignment allows.
template <int BITS, class F>
LB_INLINE void for_units(const Dec<BITS>& d, int64_t v, int64_t ve, F&& f) {
  while (v < ve) {
    const int mu = d.max_unit(v);
    if (mu == 8 && !(v & 7) && v + 8 <= ve) {
      __m512 w[8];
      d.template unit<8>(v, w);
      f(std::integral_constant<int, 8>(), v, w);
      v += 8;
    } else if (!(v & 3) && v + 4 <= ve) {
      __m512 w[4];
      d.template unit<4>(v, w);
      f(std::integral_constant<int, 4>(), v, w);
      v += 4;
    } else if (!(v & 1) && v + 2 <= ve) {
      __m512 w[2];
      d.template unit<2>(v, w);
      f(std::integral_constant<int, 2>(), v, w);
      v += 2;
    } else {
      __m512 w[1];
      d.template unit<1>(v, w);
      f(std::integral_constant<int, 1>(), v, w);
      v += 1;
    }
  }
}

// M rows of x; A independent accumulator chains per row hide the FMA latency.
template <int BITS, int M>
void gemv_rows(const Args& a, int64_t o0, int64_t o1) {
  constexpr int A = M == 1 ? 4 : M <= 3 ? 2 : 1;
  const int64_t nvec = a.P >> 4;
  const int64_t vpg = a.G == 1 ? (nvec > 0 ? nvec : 1) : a.gw >> 4;
  const float* x = a.x;
  const int64_t ldx = a.ldx;
  RowParams p;
  Dec<BITS> d;
  d.vfull = (a.P & ~int64_t(127)) >> 4;
  for (int64_t o = o0; o < o1; ++o) {
    d.row = a.codes + o * a.row_bytes;
    p.load(a, o);
    __m512 acc[M][A];
    for (int r = 0; r < M; ++r)
      for (int j = 0; j < A; ++j) acc[r][j] = _mm512_setzero_ps();
    int64_t v = 0;
    for (int64_t g = 0; v < nvec; ++g) {
      d.init(p.scale(g), p.zero(g));
      const int64_t ve = v + vpg < nvec ? v + vpg : nvec;
      for_units(d, v, ve, [&](auto n, int64_t v0, const __m512* w) __attribute__((always_inline)) {
        constexpr int N = decltype(n)::value;
        const float* xv = x + v0 * 16;
        for (int u = 0; u < N; ++u)
          for (int r = 0; r < M; ++r)
            acc[r][u % A] = _mm512_fmadd_ps(w[u], _mm512_loadu_ps(xv + r * ldx + u * 16), acc[r][u % A]);
      });
      v = ve;
    }
    float out[M];
    for (int r = 0; r < M; ++r) {
      __m512 s = acc[r][0];
      for (int j = 1; j < A; ++j) s = _mm512_add_ps(s, acc[r][j]);
      out[r] = _mm512_reduce_add_ps(s);
    }
    if (a.P < a.in) scalar_dot(a, o, a.P, a.in, M, out);
    for (int r = 0; r < M; ++r) a.y[r * a.ldy + o] = out[r];
  }
}

// Two output rows at once for M >= 2 rows of x: each load of x feeds two FMAs, which halves the loads
// per FMA (the bound once several rows of x share each decoded vector).  Units of at most 4 vectors
// keep 2 x 4 weights + 2 x M accumulators in registers.
template <int BITS, int M>
void gemv_rows2(const Args& a, int64_t o0, int64_t o1) {
  const int64_t nvec = a.P >> 4;
  const int64_t vpg = a.G == 1 ? (nvec > 0 ? nvec : 1) : a.gw >> 4;
  const float* x = a.x;
  const int64_t ldx = a.ldx;
  RowParams p[2];
  Dec<BITS> d[2];
  d[0].vfull = d[1].vfull = (a.P & ~int64_t(127)) >> 4;
  int64_t o = o0;
  for (; o + 2 <= o1; o += 2) {
    for (int i = 0; i < 2; ++i) {
      d[i].row = a.codes + (o + i) * a.row_bytes;
      p[i].load(a, o + i);
    }
    __m512 acc[2][M];
    for (int i = 0; i < 2; ++i)
      for (int r = 0; r < M; ++r) acc[i][r] = _mm512_setzero_ps();
    int64_t v = 0;
    for (int64_t g = 0; v < nvec; ++g) {
      d[0].init(p[0].scale(g), p[0].zero(g));
      d[1].init(p[1].scale(g), p[1].zero(g));
      const int64_t ve = v + vpg < nvec ? v + vpg : nvec;
      while (v < ve) {
        if (!(v & 3) && v + 4 <= ve) {
          __m512 w0[4], w1[4];
          d[0].template unit<4>(v, w0);
          d[1].template unit<4>(v, w1);
          for (int u = 0; u < 4; ++u)
            for (int r = 0; r < M; ++r) {
              const __m512 xr = _mm512_loadu_ps(x + r * ldx + (v + u) * 16);
              acc[0][r] = _mm512_fmadd_ps(w0[u], xr, acc[0][r]);
              acc[1][r] = _mm512_fmadd_ps(w1[u], xr, acc[1][r]);
            }
          v += 4;
        } else {
          __m512 w0[1], w1[1];
          d[0].template unit<1>(v, w0);
          d[1].template unit<1>(v, w1);
          for (int r = 0; r < M; ++r) {
            const __m512 xr = _mm512_loadu_ps(x + r * ldx + v * 16);
            acc[0][r] = _mm512_fmadd_ps(w0[0], xr, acc[0][r]);
            acc[1][r] = _mm512_fmadd_ps(w1[0], xr, acc[1][r]);
          }
          v += 1;
        }
      }
    }
    for (int i = 0; i < 2; ++i) {
      float out[M];
      for (int r = 0; r < M; ++r) out[r] = _mm512_reduce_add_ps(acc[i][r]);
      if (a.P < a.in) scalar_dot(a, o + i, a.P, a.in, M, out);
      for (int r = 0; r < M; ++r) a.y[r * a.ldy + o + i] = out[r];
    }
  }
  if (o < o1) gemv_rows<BITS, M>(a, o, o1);
}

template <int BITS>
void dequant_rows(const Args& a, int64_t o0, int64_t o1, float* wout) {
  const int64_t nvec = a.P >> 4;
  const int64_t vpg = a.G == 1 ? (nvec > 0 ? nvec : 1) : a.gw >> 4;
  RowParams p;
  Dec<BITS> d;
  d.vfull = (a.P & ~int64_t(127)) >> 4;
  for (int64_t o = o0; o < o1; ++o) {
    d.row = a.codes + o * a.row_bytes;
    p.load(a, o);
    float* dst = wout + (o - o0) * a.in;
    int64_t v = 0;
    for (int64_t g = 0; v < nvec; ++g) {
      d.init(p.scale(g), p.zero(g));
      const int64_t ve = v + vpg < nvec ? v + vpg : nvec;
      for_units(d, v, ve, [&](auto n, int64_t v0, const __m512* w) __attribute__((always_inline)) {
        constexpr int N = decltype(n)::value;
        for (int u = 0; u < N; ++u) _mm512_storeu_ps(dst + (v0 + u) * 16, w[u]);
      });
      v = ve;
    }
    if (a.P < a.in) scalar_dequant(a, o, a.P, a.in, dst);
  }
}

// ---- tiled path: 12 x 32 register-blocked microkernel --------------------------------------------------

template <int MR>
inline void micro512(const float* xp, int64_t K, const float* w, float* tmp) {
  __m512 c[MR][2];
  for (int i = 0; i < MR; ++i) c[i][0] = c[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(xp + k * kPw512), b1 = _mm512_loadu_ps(xp + k * kPw512 + 16);
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(w[i * K + k]);
      c[i][0] = _mm512_fmadd_ps(av, b0, c[i][0]);
      c[i][1] = _mm512_fmadd_ps(av, b1, c[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(tmp + i * kPw512, c[i][0]);
    _mm512_storeu_ps(tmp + i * kPw512 + 16, c[i][1]);
  }
}

template <int BITS>
void gemv_m(const Args& a, int64_t o0, int64_t o1) {
  LOWBIT_BY_ROWS(a.m, gemv_rows, gemv_rows2, BITS, a, o0, o1)
}

}  // namespace

bool gemv_avx512(const Args& a, int64_t o0, int64_t o1) {
  LOWBIT_BY_BITS(a.bits, gemv_m, a, o0, o1)
  return true;
}

bool dequant_avx512(const Args& a, int64_t o0, int64_t o1, float* w) {
  LOWBIT_BY_BITS(a.bits, dequant_rows, a, o0, o1, w)
  return true;
}

bool gemm_avx512(const float* xp, int64_t m, int64_t K, const float* w, int64_t n, float* y, int64_t ldy) {
  LOWBIT_GEMM_TILES(kMr512, kPw512, micro512<kMr512>, xp, m, K, w, n, y, ldy);
  return true;
}

}  // namespace lowbit_fused

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: no AVX-512 path

namespace lowbit_fused {
bool gemv_avx512(const Args&, int64_t, int64_t) { return false; }
bool dequant_avx512(const Args&, int64_t, int64_t, float*) { return false; }
bool gemm_avx512(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t) { return false; }
}  // namespace lowbit_fused

#endif
