// AVX2 + FMA + F16C path (the x86 baseline).  The extension is compiled with -mavx2 -mfma -mf16c where
// the building CPU has them; the pragma below keeps this translation unit AVX2 even when it does not
// (its code then never runs: fused_ops.cpp checks __builtin_cpu_supports first).
//
// Same kernel layout as the AVX-512 path (fused_common.h), decoded in 8-column halves to clean int32
// codes (a load, a shift and a mask per half).  AVX2 has no cheap 16-entry float lookup (vpermps holds 8
// entries), so the GEMV factors scale and zero point out of each group:
//
//   y[o] = sum_g s_g * ( sum_{c in g} (q_c - zi_g) * x_c  -  (z_g - zi_g) * X_g ),   X_g = sum_{c in g} x_c
//
// (X_g precomputed once per call), so the inner loop is shift, shift, convert, FMA.  The two terms cancel
// partly when x has a mean, the more the further q - zi strays from q - z; zi keeps that small:
// 2 and 4 bits take the midpoint zi = 2**(bits-1), subtracted for free while extracting the field (XOR
// with the midpoint, then sign extension), exact for symmetric formats; 3 and 8 bits subtract the nearest
// integer to z in integer arithmetic (one more op).  Without zi a symmetric 8-bit layer of 1536 inputs
// with mean 3 measured 4e-5 * max|y|; with it, <= 5e-6 * max|y| (like the tiled path) for 2/3/4/8-bit
// layers of up to 8192 inputs with means up to 10.
// The tiled path dequantizes to (float(q) - z) * s like the reference.
#include "fused_common.h"

#include <type_traits>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#if defined(__clang__)  // clang ignores "#pragma GCC target" (untested here: no clang on the build machine)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace lowbit_fused {
namespace {

#define LB_INLINE inline __attribute__((always_inline))

LB_INLINE float h2f(uint16_t h) { return _cvtsh_ss(h); }

LB_INLINE __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
LB_INLINE __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
LB_INLINE __m128i load8(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }

// 2- and 4-bit codes come out centred, q - 2**(bits-1), for free: XOR with the midpoint then sign-extend
// the field (shift left to the top, arithmetic shift right) -- the same two shifts a plain extraction
// needs.  3- and 8-bit codes come out as they are.
template <int BITS>
constexpr int kCenter = BITS == 4 ? 8 : BITS == 2 ? 2 : 0;

template <int BITS>
struct Dec {
  const uint8_t* row;
  int64_t vfull;  // 4 bits: vectors in whole 128-column blocks

  static LB_INLINE __m256i flip(__m256i q) {
    return BITS == 4 ? _mm256_xor_si256(q, _mm256_set1_epi32((int)0x88888888u))
                     : _mm256_xor_si256(q, _mm256_set1_epi32((int)0xAAAAAAAAu));
  }

  // int32 codes (centred for 2/4 bits) of the two halves of vector v
  LB_INLINE void operator()(int64_t v, __m256i& q0, __m256i& q1) const {
    if (BITS == 8) {
      q0 = _mm256_cvtepu8_epi32(load8(row + v * 16));
      q1 = _mm256_cvtepu8_epi32(load8(row + v * 16 + 8));
      return;
    }
    __m256i Q0, Q1;
    int sh;
    if (BITS == 4) {
      if (v < vfull) {
        const uint8_t* b = row + (v >> 3) * 64;
        Q0 = load32(b);
        Q1 = load32(b + 32);
        sh = 4 * (int)(v & 7);
      } else {
        const uint8_t* b = row + vfull * 8;
        Q0 = _mm256_cvtepu16_epi32(load16(b));
        Q1 = _mm256_cvtepu16_epi32(load16(b + 16));
        sh = 4 * (int)((v - vfull) & 3);
      }
    } else {
      const uint8_t* b = row + (v >> 2) * (BITS == 2 ? 16 : 24);
      Q0 = _mm256_cvtepu8_epi32(load8(b));
      Q1 = _mm256_cvtepu8_epi32(load8(b + 8));
      sh = 2 * (int)(v & 3);
    }
    if (BITS == 3) {
      const __m128i c = _mm_cvtsi32_si128(sh);
      const __m256i three = _mm256_set1_epi32(3);
      q0 = _mm256_and_si256(_mm256_srl_epi32(Q0, c), three);
      q1 = _mm256_and_si256(_mm256_srl_epi32(Q1, c), three);
      // bit 2 from the block's mask: byte 2j + h holds columns 16j + 8h .. +7
      const uint8_t* hb = row + (v >> 2) * 24 + 16 + 2 * (v & 3);
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), four = _mm256_set1_epi32(4);
      q0 = _mm256_or_si256(q0, _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(hb[0] << 2), lane), four));
      q1 = _mm256_or_si256(q1, _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(hb[1] << 2), lane), four));
      return;
    }
    constexpr int top = 32 - BITS;                    // the field's top bit goes to bit 31
    const __m128i left = _mm_cvtsi32_si128(top - sh);
    q0 = _mm256_srai_epi32(_mm256_sll_epi32(flip(Q0), left), top);
    q1 = _mm256_srai_epi32(_mm256_sll_epi32(flip(Q1), left), top);
  }
};

// Calls f(u, v + u, q0, q1) (u a compile-time index) for the vectors [v, ve) of one group: whole blocks
// are loaded once and decoded with constant shifts (4 bits: 8 vectors per 64-byte block; 2/3 bits and
// 4-bit half blocks: 4 vectors), anything else one vector at a time.
template <int N, class F, size_t... U>
LB_INLINE void unroll(F&& f, std::index_sequence<U...>) {
  (f(std::integral_constant<int, (int)U>()), ...);
}

template <int BITS, class F>
LB_INLINE void for_units(const Dec<BITS>& dec, int64_t v, int64_t ve, F&& f) {
  while (v < ve) {
    if (BITS == 4 && v < dec.vfull && !(v & 7) && v + 8 <= ve) {
      const uint8_t* b = dec.row + (v >> 3) * 64;
      const __m256i Q0 = Dec<BITS>::flip(load32(b)), Q1 = Dec<BITS>::flip(load32(b + 32));
      unroll<8>([&](auto u) __attribute__((always_inline)) {
        constexpr int k = decltype(u)::value;
        f(u, v + k, _mm256_srai_epi32(_mm256_slli_epi32(Q0, 28 - 4 * k), 28),
          _mm256_srai_epi32(_mm256_slli_epi32(Q1, 28 - 4 * k), 28));
      }, std::make_index_sequence<8>());
      v += 8;
    } else if (BITS == 2 && !(v & 3) && v + 4 <= ve) {
      const uint8_t* b = dec.row + (v >> 2) * 16;
      const __m256i Q0 = Dec<BITS>::flip(_mm256_cvtepu8_epi32(load8(b)));
      const __m256i Q1 = Dec<BITS>::flip(_mm256_cvtepu8_epi32(load8(b + 8)));
      unroll<4>([&](auto u) __attribute__((always_inline)) {
        constexpr int k = decltype(u)::value;
        f(u, v + k, _mm256_srai_epi32(_mm256_slli_epi32(Q0, 30 - 2 * k), 30),
          _mm256_srai_epi32(_mm256_slli_epi32(Q1, 30 - 2 * k), 30));
      }, std::make_index_sequence<4>());
      v += 4;
    } else if (BITS == 3 && !(v & 3) && v + 4 <= ve) {
      const uint8_t* b = dec.row + (v >> 2) * 24;
      const __m256i Q0 = _mm256_cvtepu8_epi32(load8(b)), Q1 = _mm256_cvtepu8_epi32(load8(b + 8));
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), four = _mm256_set1_epi32(4);
      const __m256i three = _mm256_set1_epi32(3);
      unroll<4>([&](auto u) __attribute__((always_inline)) {
        constexpr int k = decltype(u)::value;
        __m256i q0 = _mm256_and_si256(_mm256_srli_epi32(Q0, 2 * k), three);
        __m256i q1 = _mm256_and_si256(_mm256_srli_epi32(Q1, 2 * k), three);
        q0 = _mm256_or_si256(q0, _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(b[16 + 2 * k] << 2), lane), four));
        q1 = _mm256_or_si256(q1, _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(b[17 + 2 * k] << 2), lane), four));
        f(u, v + k, q0, q1);
      }, std::make_index_sequence<4>());
      v += 4;
    } else if (v + 2 <= ve) {
      __m256i q[4];
      dec(v, q[0], q[1]);
      dec(v + 1, q[2], q[3]);
      f(std::integral_constant<int, 0>(), v, q[0], q[1]);
      f(std::integral_constant<int, 1>(), v + 1, q[2], q[3]);
      v += 2;
    } else {
      __m256i q0, q1;
      dec(v, q0, q1);
      f(std::integral_constant<int, 0>(), v, q0, q1);
      v += 1;
    }
  }
}

LB_INLINE float hsum(__m256 s) {
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  t = _mm_add_ss(t, _mm_movehdup_ps(t));
  return _mm_cvtss_f32(t);
}

// M rows of x.  Per group: C chains of (q - zi) . x per row, folded into the row's total with the scale.
template <int BITS, int M>
void gemv_rows(const Args& a, int64_t o0, int64_t o1) {
  constexpr int C = M == 1 ? 4 : M <= 3 ? 2 : 1;        // chains per row (2 halves x pairs of vectors)
  constexpr bool VEC_TOTAL = M <= 3;                     // totals in registers (else scalar)
  constexpr bool SUB = BITS == 8 || BITS == 3;          // subtract the zero point's integer part first
  const int64_t nvec = a.P >> 4;
  const int64_t vpg = a.G == 1 ? (nvec > 0 ? nvec : 1) : a.gw >> 4;
  const float* x = a.x;
  const int64_t ldx = a.ldx;
  const float zsym = (float)(1 << (BITS - 1));
  Dec<BITS> dec;
  dec.vfull = (a.P & ~int64_t(127)) >> 4;
  prefetch_rows(a.codes, a.row_bytes, o0, o0 + kPrefetchRows, o1);      // a call starts cold
  for (int64_t o = o0; o < o1; ++o) {
    prefetch_rows(a.codes, a.row_bytes, o + kPrefetchRows, o + kPrefetchRows + 1, o1);
    dec.row = a.codes + o * a.row_bytes;
    const uint16_t* srow = a.scale + o * a.G;
    const uint16_t* zrow = a.zero ? a.zero + o * a.G : nullptr;
    __m256 tot[M];
    float out[M];
    for (int r = 0; r < M; ++r) {
      tot[r] = _mm256_setzero_ps();
      out[r] = 0.f;
    }
    int64_t v = 0;
    for (int64_t g = 0; v < nvec; ++g) {
      const float s = h2f(srow[g]);
      const float z = zrow ? h2f(zrow[g]) : zsym;
      const int zi = SUB ? _mm_cvtss_si32(_mm_set_ss(z)) : kCenter<BITS>;   // nearest integer / the centre
      const float zf = z - (float)zi;
      const __m256i ziv = _mm256_set1_epi32(zi);
      const int64_t ve = v + vpg < nvec ? v + vpg : nvec;
      __m256 acc[M][C];
      for (int r = 0; r < M; ++r)
        for (int j = 0; j < C; ++j) acc[r][j] = _mm256_setzero_ps();
      for_units(dec, v, ve, [&](auto u, int64_t vv, __m256i q0, __m256i q1) __attribute__((always_inline)) {
        constexpr int k = decltype(u)::value;
        const __m256 f0 = _mm256_cvtepi32_ps(SUB ? _mm256_sub_epi32(q0, ziv) : q0);
        const __m256 f1 = _mm256_cvtepi32_ps(SUB ? _mm256_sub_epi32(q1, ziv) : q1);
        for (int r = 0; r < M; ++r) {
          acc[r][(2 * k) % C] = _mm256_fmadd_ps(f0, _mm256_loadu_ps(x + r * ldx + vv * 16), acc[r][(2 * k) % C]);
          acc[r][(2 * k + 1) % C] =
              _mm256_fmadd_ps(f1, _mm256_loadu_ps(x + r * ldx + vv * 16 + 8), acc[r][(2 * k + 1) % C]);
        }
      });
      v = ve;
      const __m256 sv = _mm256_set1_ps(s);
      for (int r = 0; r < M; ++r) {
        __m256 t = acc[r][0];
        for (int j = 1; j < C; ++j) t = _mm256_add_ps(t, acc[r][j]);
        if (VEC_TOTAL)
          tot[r] = _mm256_fmadd_ps(t, sv, tot[r]);
        else
          out[r] += s * hsum(t);
        out[r] -= s * zf * a.xsum[r * a.G + g];
      }
    }
    for (int r = 0; r < M; ++r)
      if (VEC_TOTAL) out[r] += hsum(tot[r]);
    if (a.P < a.in) scalar_dot(a, o, a.P, a.in, M, out);
    for (int r = 0; r < M; ++r) a.y[r * a.ldy + o] = out[r];
  }
}

template <int BITS>
void dequant_rows(const Args& a, int64_t o0, int64_t o1, float* wout) {
  const int64_t nvec = a.P >> 4;
  const int64_t vpg = a.G == 1 ? (nvec > 0 ? nvec : 1) : a.gw >> 4;
  const float zsym = (float)(1 << (BITS - 1));
  Dec<BITS> dec;
  dec.vfull = (a.P & ~int64_t(127)) >> 4;
  for (int64_t o = o0; o < o1; ++o) {
    dec.row = a.codes + o * a.row_bytes;
    const uint16_t* srow = a.scale + o * a.G;
    const uint16_t* zrow = a.zero ? a.zero + o * a.G : nullptr;
    float* dst = wout + (o - o0) * a.in;
    int64_t v = 0;
    for (int64_t g = 0; v < nvec; ++g) {
      const __m256 sv = _mm256_set1_ps(h2f(srow[g]));
      const __m256 zv = _mm256_set1_ps((zrow ? h2f(zrow[g]) : zsym) - (float)kCenter<BITS>);   // codes come centred
      const int64_t ve = v + vpg < nvec ? v + vpg : nvec;
      for_units(dec, v, ve, [&](auto, int64_t vv, __m256i q0, __m256i q1) __attribute__((always_inline)) {
        _mm256_storeu_ps(dst + vv * 16, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q0), zv), sv));
        _mm256_storeu_ps(dst + vv * 16 + 8, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q1), zv), sv));
      });
      v = ve;
    }
    if (a.P < a.in) scalar_dequant(a, o, a.P, a.in, dst);
  }
}

// ---- tiled path: 6 x 16 register-blocked microkernel --------------------------------------------------

template <int MR>
inline void micro256(const float* xp, int64_t K, const float* w, float* tmp) {
  __m256 c[MR][2];
  for (int i = 0; i < MR; ++i) c[i][0] = c[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(xp + k * kPw256), b1 = _mm256_loadu_ps(xp + k * kPw256 + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_set1_ps(w[i * K + k]);
      c[i][0] = _mm256_fmadd_ps(av, b0, c[i][0]);
      c[i][1] = _mm256_fmadd_ps(av, b1, c[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(tmp + i * kPw256, c[i][0]);
    _mm256_storeu_ps(tmp + i * kPw256 + 8, c[i][1]);
  }
}

template <int BITS>
void gemv_m(const Args& a, int64_t o0, int64_t o1) {
  LOWBIT_BY_ROWS(a.m, gemv_rows, gemv_rows, BITS, a, o0, o1)
}

}  // namespace

bool gemv_avx2(const Args& a, int64_t o0, int64_t o1) {
  LOWBIT_BY_BITS(a.bits, gemv_m, a, o0, o1)
  return true;
}

bool dequant_avx2(const Args& a, int64_t o0, int64_t o1, float* w) {
  LOWBIT_BY_BITS(a.bits, dequant_rows, a, o0, o1, w)
  return true;
}

bool gemm_avx2(const float* xp, int64_t m, int64_t K, const float* w, int64_t n, float* y, int64_t ldy) {
  LOWBIT_GEMM_TILES(kMr256, kPw256, micro256<kMr256>, xp, m, K, w, n, y, ldy);
  return true;
}

}  // namespace lowbit_fused

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64

namespace lowbit_fused {
bool gemv_avx2(const Args&, int64_t, int64_t) { return false; }
bool dequant_avx2(const Args&, int64_t, int64_t, float*) { return false; }
bool gemm_avx2(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t) { return false; }
}  // namespace lowbit_fused

#endif
