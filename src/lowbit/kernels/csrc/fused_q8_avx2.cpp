// AVX2 path of the int8-activation ("q8") GEMV: torch.ops.lowbit.grouped_linear_q8 on a CPU without
// AVX-512 VNNI.  Same inputs and result as fused_vnni.cpp (x quantized per call, per 32 columns, to int8
// with one fp32 scale; the same repack layouts 1 and 2; the zero point entering once per group through the sum
// of the quantized x), so both paths compute W @ dequant(xq) up to fp32 summation order.
//
// A 32-column half of a 64-column chunk is decoded to 32 unsigned bytes in column order and multiplied
// with x's 32 int8 values by vpmaddubsw (u8 x s8 -> pairs summed in int16) and vpmaddwd with ones (-> 8
// int32 lanes of 4 products each): exact while a pair sum fits int16, |pair| <= 2 * 15 * 127 for 2-4
// bits.  8-bit codes would not fit (2 * 255 * 127), so they are recentred to q - 128 as int8 and
// multiplied as |q - 128| x sign(x, q - 128) (|pair| <= 2 * 128 * 127), the zero point shifted by 128
// to match.  On an AVX2 CPU this replaces the fp32-activation kernel's shift/convert/FMA per 8 columns
// with about five integer ops per 32 columns: the decode GEMVs there are compute-bound, not memory-bound.
//
// Per group the int32 lanes are converted and accumulated with x's block scale (fp32), then scaled by the
// group's weight scale; columns past the last multiple of 64 are computed exactly in fp32 (scalar_dot).
//
// AVX-VNNI (fused_q8_avxvnni.cpp compiles this file again with LOWBIT_Q8_AVXVNNI = 1, for CPUs with the 256-bit
// VEX vpdpbusd but no AVX-512: Intel's client cores since Alder Lake, its E-core Xeons): vpdpbusd sums the 4
// products of a lane straight into int32, so the 8-bit codes stay unsigned (no recentring, no sign trick) and
// layout 2's fields stay in place as in fused_vnni.cpp (their power of two shifted out of the int32 sum, exact),
// instead of vpmaddubsw + vpmaddwd with every field first brought down to 0..15.
#include "fused_common.h"

#ifndef LOWBIT_Q8_AVXVNNI
#define LOWBIT_Q8_AVXVNNI 0
#endif

// AVX-VNNI intrinsics need GCC 11 or clang 12; an older compiler builds the AVX-VNNI unit as stubs (never chosen)
#if LOWBIT_Q8_AVXVNNI && ((defined(__clang__) && __clang_major__ < 12) || \
                          (!defined(__clang__) && defined(__GNUC__) && __GNUC__ < 11))
#define LOWBIT_Q8_STUBS 1
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(LOWBIT_Q8_STUBS)
#include <immintrin.h>

// (the target strings spelled out: GCC does not expand macros in its target pragma)
#if defined(__clang__) && LOWBIT_Q8_AVXVNNI
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avxvnni"))), apply_to = function)
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif LOWBIT_Q8_AVXVNNI
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace lowbit_fused {
namespace {

#define LB_INLINE inline __attribute__((always_inline))
#include "super_dot.h"

constexpr bool kVnni = LOWBIT_Q8_AVXVNNI;

LB_INLINE __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// The 32 codes of half h (columns 32h .. 32h+31) of chunk k (columns 64k .. 64k+63) of a row, as bytes in
// column order: unsigned for 2-4 bits, q - 128 as int8 for 8 bits (unsigned with AVX-VNNI).  Layout 1
// (fused_vnni.cpp's header).
template <int BITS>
LB_INLINE __m256i half_codes(const uint8_t* row, int64_t k, int h, int64_t full4) {
  if (BITS == 8) {
    const __m256i v = load32(row + k * 64 + h * 32);
    return kVnni ? v : _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80));
  }
  const __m256i lo4 = _mm256_set1_epi8(0x0f);
  if (BITS == 4) {
    // a full 128-column block: byte b holds column b (low nibble) and 64 + b (high); the last half block:
    // byte b holds column b (low) and 32 + b (high)
    const bool high = k < full4 ? (k & 1) : h;
    const __m256i v = k < full4 ? load32(row + (k >> 1) * 64 + h * 32) : load32(row + full4 * 32);
    return high ? _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4) : _mm256_and_si256(v, lo4);
  }
  // 2 bits: byte l of the chunk's 16 holds column 16j + l in bits 2j..2j+1; columns 32h + (0..15) are
  // j = 2h, 32h + (16..31) are j = 2h + 1
  const uint8_t* blk = row + k * (BITS == 2 ? 16 : 24);
  const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
  const int s0 = 4 * h;
  const __m256i sh = _mm256_setr_epi32(s0, s0, s0, s0, s0 + 2, s0 + 2, s0 + 2, s0 + 2);
  __m256i q = _mm256_and_si256(_mm256_srlv_epi32(b, sh), _mm256_set1_epi8(3));
  if (BITS == 3) {                                     // bit 2 of column c: bit c of the 64-bit mask
    uint32_t m;
    memcpy(&m, blk + 16 + 4 * h, 4);
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32((int)m), _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                    2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    q = _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(4)));
  }
  return q;
}

// Half h of a chunk of layout 2's 3-bit rest (fused_common.h, 24 bytes at c): its 32 codes in column order.
LB_INLINE __m256i rest3_half(const uint8_t* c, int h) {
  const __m256i f01 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));  // F0 F1 F0 F1
  if (h == 0) return _mm256_and_si256(_mm256_srlv_epi64(f01, _mm256_setr_epi64x(0, 0, 5, 5)), _mm256_set1_epi8(7));
  uint64_t f2;
  memcpy(&f2, c + 16, 8);
  const __m256i lo = _mm256_and_si256(_mm256_srli_epi64(f01, 3),
                                      _mm256_setr_epi64x(0x0303030303030303ll, 0x0303030303030303ll, 0, 0));
  const __m256i f2s = _mm256_srlv_epi64(_mm256_set1_epi64x((long long)f2), _mm256_setr_epi64x(1, 2, 0, 5));
  const __m256i hi = _mm256_and_si256(f2s,
                                      _mm256_setr_epi64x(0x0404040404040404ll, 0x0404040404040404ll,
                                                         0x0707070707070707ll, 0x0707070707070707ll));
  return _mm256_or_si256(lo, hi);
}

LB_INLINE float hsum(__m256 s) {
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  t = _mm_add_ss(t, _mm_movehdup_ps(t));
  return _mm_cvtss_f32(t);
}

// 8 int32 lanes, each the sum of 4 products of codes w and int8 x (BITS == 8: w is q - 128, signed, and wabs
// its absolute value; with AVX-VNNI w is unsigned for every width and wabs unused)
template <int BITS>
LB_INLINE __m256i dot32(__m256i w, __m256i wabs, __m256i x) {
#if LOWBIT_Q8_AVXVNNI
  (void)wabs;
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, x);
#else
  const __m256i p = BITS == 8 ? _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w)) : _mm256_maddubs_epi16(w, x);
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

// Layout 2 (fused_common.h), read as two 256-bit halves per chunk: half h of chunk k gives lane i (0..7) columns of
// x's block 8h + i.  vpmaddubsw's pair sums stay in int16 over the 8 chunks of a super-chunk (each chunk's codes
// brought down to 0..15 first: |pair| <= 2 * 15 * 127, eight of them 30480 < 32767, exact), then one vpmaddwd
// with ones gives the int32 sums of the 8 lanes.
//
// With AVX-VNNI: super_dot.h on 256-bit halves, each field masked in place and its power of two shifted out of the
// int32 sum (exact); chunks 6 and 7 at 3 bits take bit 2 from V2 (bit 3, bit 4) shifted to bit 5.
#if LOWBIT_Q8_AVXVNNI
struct OpsVnni256 {
  using V = __m256i;
  static LB_INLINE V zero() { return _mm256_setzero_si256(); }
  static LB_INLINE V load(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static LB_INLINE V set1(int m) { return _mm256_set1_epi8((char)m); }
  static LB_INLINE V and_(V a, V b) { return _mm256_and_si256(a, b); }
  static LB_INLINE V add(V a, V b) { return _mm256_add_epi32(a, b); }
  static LB_INLINE V sra(V a, int n) { return _mm256_srai_epi32(a, n); }
  static LB_INLINE V dot(V acc, V c, V x) { return _mm256_dpbusd_avx_epi32(acc, c, x); }
  template <int SHIFT>
  static LB_INLINE V with_bit2(V c, V v2, V m) {   // no byte masks: the bit shifted to bit 5 (16-bit shift, masked first)
    return _mm256_or_si256(c, _mm256_slli_epi16(_mm256_and_si256(v2, m), SHIFT));
  }
};
#endif

template <int BITS>
LB_INLINE __m256i super_half_dot(const uint8_t* w, const int8_t* xt) {
#if LOWBIT_Q8_AVXVNNI
  return super_dot_of<BITS, OpsVnni256>(w, xt);
#else
  auto X = [&](int k) __attribute__((always_inline)) { return load32(reinterpret_cast<const uint8_t*>(xt) + 64 * k); };
  auto V = [&](int j) __attribute__((always_inline)) { return load32(w + 64 * j); };
  auto field = [](__m256i v, int shift, int mask) __attribute__((always_inline)) {
    return _mm256_and_si256(shift ? _mm256_srli_epi16(v, shift) : v, _mm256_set1_epi8((char)mask));
  };
  __m256i a;
  if constexpr (BITS == 4) {
    a = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      const __m256i v = V(j);
      a = _mm256_add_epi16(a, _mm256_maddubs_epi16(field(v, 0, 15), X(j)));
      a = _mm256_add_epi16(a, _mm256_maddubs_epi16(field(v, 4, 15), X(j + 4)));
    }
  } else if constexpr (BITS == 3) {
    const __m256i v0 = V(0), v1 = V(1), v2 = V(2);
    a = _mm256_maddubs_epi16(field(v0, 0, 7), X(0));
    a = _mm256_add_epi16(a, _mm256_maddubs_epi16(field(v0, 5, 7), X(1)));
    a = _mm256_add_epi16(a, _mm256_maddubs_epi16(field(v1, 0, 7), X(2)));
    a = _mm256_add_epi16(a, _mm256_maddubs_epi16(field(v1, 5, 7), X(3)));
    a = _mm256_add_epi16(a, _mm256_maddubs_epi16(field(v2, 0, 7), X(4)));
    a = _mm256_add_epi16(a, _mm256_maddubs_epi16(field(v2, 5, 7), X(5)));
    const __m256i c6 = _mm256_or_si256(field(v0, 3, 3), field(v2, 1, 4));   // bits 0-1 of V0 at 3, bit 2 of V2 at 3
    const __m256i c7 = _mm256_or_si256(field(v1, 3, 3), field(v2, 2, 4));   // bits 0-1 of V1 at 3, bit 2 of V2 at 4
    a = _mm256_add_epi16(a, _mm256_maddubs_epi16(c6, X(6)));
    a = _mm256_add_epi16(a, _mm256_maddubs_epi16(c7, X(7)));
  } else {
    const __m256i v0 = V(0), v1 = V(1);
    a = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      a = _mm256_add_epi16(a, _mm256_maddubs_epi16(field(v0, 2 * j, 3), X(j)));
      a = _mm256_add_epi16(a, _mm256_maddubs_epi16(field(v1, 2 * j, 3), X(j + 4)));
    }
  }
  return _mm256_madd_epi16(a, _mm256_set1_epi16(1));
#endif
}

// 8 of a row's fp16 values from group g0 on (lanes past its G groups: whatever follows, never faulting).
LB_INLINE __m256 groups8(const Args& a, const uint16_t* t, int64_t o, int64_t g0) {
  const uint16_t* p = t + o * a.G + g0;
  if (o * a.G + g0 + 8 <= a.out * a.G) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  float f[8];
  for (int l = 0; l < 8; ++l) f[l] = g0 + l < a.G ? _cvtsh_ss(p[l]) : 0.f;
  return _mm256_loadu_ps(f);
}

// Layout 2's super-chunks of R rows for M rows of x, into tot: per half super-chunk and lane, the int32 sum
// converted once and scaled by its x block's scale times the weight scale of the lane's group.
template <int BITS, int M, int R>
LB_INLINE void q8_super(const Q8Args& q, int64_t o, const uint8_t* const* row, __m256 (*tot)[M]) {
  const Args& a = q.a;
  const int64_t S = super_cols(a.P), nb = a.P >> 5;
  const __m256 mid = _mm256_setr_ps(16, 48, 80, 112, 144, 176, 208, 240);
  const __m256 inv_gw = _mm256_set1_ps(1.f / (float)a.gw);
  for (int64_t c0 = 0; c0 < S; c0 += kSuper) {
    for (int h = 0; h < 2; ++h) {
      const int64_t ch = c0 + 256 * h;
      // each lane's group from the half's first (gw >= 64: 4 groups at most), (ch + 32 l + 16) / gw in fp32 as
      // fused_vnni.cpp's q8_super computes it (exact while in < 2**26, checked where the layer is bound)
      const int64_t gh = ch / a.gw;
      const __m256i gi = _mm256_sub_epi32(
          _mm256_cvttps_epi32(_mm256_mul_ps(_mm256_add_ps(_mm256_set1_ps((float)ch), mid), inv_gw)),
          _mm256_set1_epi32((int)gh));
      for (int i = 0; i < R; ++i) {
        const __m256 sv = _mm256_permutevar8x32_ps(groups8(a, a.scale, o + i, gh), gi);   // lanes' groups < G
        const uint8_t* w = row[i] + c0 / 8 * BITS + 32 * h;
        for (int r = 0; r < M; ++r) {
          const __m256i t = super_half_dot<BITS>(w, q.xt + r * S + c0 + 32 * h);
          const __m256 sx = _mm256_loadu_ps(q.sxb + r * nb + (ch >> 5));
          tot[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(sx, sv), tot[i][r]);
        }
      }
    }
  }
}

// The zero point's term s z sum(xhat) of every group of R rows, 8 groups at a time, added to zt.
template <int M, int R>
LB_INLINE void zero_terms(const Q8Args& q, int64_t o, float zsym, float (*zt)[M]) {
  const Args& a = q.a;
  for (int i = 0; i < R; ++i) {
    __m256 zacc[M];
    for (int r = 0; r < M; ++r) zacc[r] = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < a.G; g0 += 8) {
      const int n = a.G - g0 < 8 ? (int)(a.G - g0) : 8;
      const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      const __m256 z = a.zero ? groups8(a, a.zero, o + i, g0) : _mm256_set1_ps(zsym);
      const __m256 sz = _mm256_mul_ps(groups8(a, a.scale, o + i, g0), z);
      for (int r = 0; r < M; ++r)
        zacc[r] = _mm256_fmadd_ps(sz, _mm256_maskload_ps(q.xs + r * a.G + g0, live), zacc[r]);
    }
    for (int r = 0; r < M; ++r) zt[i][r] += hsum(zacc[r]);
  }
}

// Rows o .. o + R - 1 of y from their sums (tot) less the zero point's terms (zt), plus the fp32 tail.
template <int M, int R>
LB_INLINE void store_rows(const Args& a, int64_t o, __m256 (*tot)[M], float (*zt)[M]) {
  for (int i = 0; i < R; ++i) {
    float out[M];
    for (int r = 0; r < M; ++r) out[r] = hsum(tot[i][r]) - zt[i][r];
    if (a.P < a.in) scalar_dot(a, o + i, a.P, a.in, M, out);
    for (int r = 0; r < M; ++r) a.y[r * a.ldy + o + i] = out[r];
  }
}

// R output rows at a time (sharing each half chunk of x), M rows of x.
template <int BITS, int M, int R>
void q8_rows(const Q8Args& q, int64_t o0, int64_t o1) {
  const Args& a = q.a;
  const int64_t nch = a.P >> 6;
  const int64_t cpg = a.G == 1 ? (nch > 0 ? nch : 1) : a.gw >> 6;
  const int64_t full4 = (a.P & ~int64_t(127)) >> 6;
  const float zsym = (float)(1 << (a.bits - 1)), zoff = BITS == 8 && !kVnni ? 128.f : 0.f;
  int64_t o = o0;
  prefetch_rows(a.codes, a.row_bytes, o0, o0 + kPrefetchRows, o1);      // a call starts cold
  for (; o + R <= o1; o += R) {
    prefetch_rows(a.codes, a.row_bytes, o + kPrefetchRows, o + kPrefetchRows + R, o1);
    const uint8_t* row[R];
    __m256 tot[R][M];
    float zt[R][M];
    for (int i = 0; i < R; ++i) {
      row[i] = a.codes + (o + i) * a.row_bytes;
      for (int r = 0; r < M; ++r) {
        tot[i][r] = _mm256_setzero_ps();
        zt[i][r] = 0.f;
      }
    }
    int64_t k = 0;
    for (int64_t g = 0; k < nch; ++g) {
      const int64_t ke = k + cpg < nch ? k + cpg : nch;
      __m256 acc[R][M];
      float s[R];
      for (int i = 0; i < R; ++i) {
        s[i] = _cvtsh_ss(a.scale[(o + i) * a.G + g]);
        const float z = a.zero ? _cvtsh_ss(a.zero[(o + i) * a.G + g]) : zsym;
        for (int r = 0; r < M; ++r) {
          zt[i][r] += s[i] * (z - zoff) * q.xs[r * a.G + g];
          acc[i][r] = _mm256_setzero_ps();
        }
      }
      for (; k < ke; ++k) {
        for (int h = 0; h < 2; ++h) {
          __m256i w[R], wabs[R];
          for (int i = 0; i < R; ++i) {
            w[i] = half_codes<BITS>(row[i], k, h, full4);
            wabs[i] = BITS == 8 && !kVnni ? _mm256_abs_epi8(w[i]) : w[i];
          }
          for (int r = 0; r < M; ++r) {
            const __m256i xk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.xq + r * a.P + k * 64 + h * 32));
            const __m256 sx = _mm256_loadu_ps(q.sxv + (r * nch + k) * 16 + h * 8);
            for (int i = 0; i < R; ++i)
              acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32<BITS>(w[i], wabs[i], xk)), sx, acc[i][r]);
          }
        }
      }
      for (int i = 0; i < R; ++i) {
        const __m256 sv = _mm256_set1_ps(s[i]);
        for (int r = 0; r < M; ++r) tot[i][r] = _mm256_fmadd_ps(acc[i][r], sv, tot[i][r]);
      }
    }
    store_rows<M, R>(a, o, tot, zt);
  }
  if (R > 1 && o < o1) q8_rows<BITS, M, 1>(q, o, o1);
}

// Layout 2 (2-4 bits, P >= 512), R output rows at a time, M rows of x: the super-chunks, the zero point's terms of
// every group, then the chunks past the last super-chunk (layout 1 of the rest of the row; 3 bits: rest3_half) one
// by one, each with its group's weight scale joined to x's scales.
template <int BITS, int M, int R>
void q8_rows2(const Q8Args& q, int64_t o0, int64_t o1) {
  const Args& a = q.a;
  const int64_t nch = a.P >> 6, kb = super_cols(a.P) >> 6;
  const int64_t full4 = ((a.P - kb * 64) & ~int64_t(127)) >> 6;    // of the rest
  int64_t tg[kSuper / 64];                                          // the group of each chunk of the rest (<= 7)
  for (int64_t k = kb; k < nch; ++k) tg[k - kb] = k * 64 / a.gw;
  int64_t o = o0;
  prefetch_rows(a.codes, a.row_bytes, o0, o0 + kPrefetchRows, o1);
  for (; o + R <= o1; o += R) {
    prefetch_rows(a.codes, a.row_bytes, o + kPrefetchRows, o + kPrefetchRows + R, o1);
    const uint8_t* row[R];
    __m256 tot[R][M];
    float zt[R][M];
    for (int i = 0; i < R; ++i) {
      row[i] = a.codes + (o + i) * a.row_bytes;
      for (int r = 0; r < M; ++r) {
        tot[i][r] = _mm256_setzero_ps();
        zt[i][r] = 0.f;
      }
    }
    q8_super<BITS, M, R>(q, o, row, tot);
    zero_terms<M, R>(q, o, (float)(1 << (BITS - 1)), zt);
    for (int64_t k = kb; k < nch; ++k) {
      const int64_t g = tg[k - kb];
      __m256 sv[R];
      for (int i = 0; i < R; ++i)
        sv[i] = _mm256_cvtph_ps(_mm_set1_epi16((short)a.scale[(o + i) * a.G + g]));
      for (int h = 0; h < 2; ++h) {
        __m256i w[R];
        for (int i = 0; i < R; ++i)
          w[i] = BITS == 3 ? rest3_half(row[i] + k * 24, h)
                           : half_codes<BITS>(row[i] + kb * 8 * BITS, k - kb, h, full4);
        for (int r = 0; r < M; ++r) {
          const __m256i xk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.xq + r * a.P + k * 64 + h * 32));
          const __m256 sx = _mm256_loadu_ps(q.sxv + (r * nch + k) * 16 + h * 8);
          for (int i = 0; i < R; ++i)
            tot[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32<BITS>(w[i], w[i], xk)), _mm256_mul_ps(sx, sv[i]),
                                        tot[i][r]);
        }
      }
    }
    store_rows<M, R>(a, o, tot, zt);
  }
  if (R > 1 && o < o1) q8_rows2<BITS, M, 1>(q, o, o1);
}

template <int BITS, int M, int R>
LB_INLINE void q8_rows_of(const Q8Args& q, int64_t o0, int64_t o1) {
  if constexpr (BITS != 8) {
    if (q.layout == 2 && q.a.P >= kSuper) return q8_rows2<BITS, M, R>(q, o0, o1);
  }
  q8_rows<BITS, M, R>(q, o0, o1);
}

template <int BITS>
void q8_m(const Q8Args& q, int64_t o0, int64_t o1) {
  switch (q.a.m) {
    case 1: q8_rows_of<BITS, 1, BITS == 8 ? 2 : 4>(q, o0, o1); break;
    case 2: q8_rows_of<BITS, 2, 2>(q, o0, o1); break;
    case 3: q8_rows_of<BITS, 3, 1>(q, o0, o1); break;
    case 4: q8_rows_of<BITS, 4, 1>(q, o0, o1); break;
    case 5: q8_rows_of<BITS, 5, 1>(q, o0, o1); break;
    case 6: q8_rows_of<BITS, 6, 1>(q, o0, o1); break;
    case 7: q8_rows_of<BITS, 7, 1>(q, o0, o1); break;
    default: q8_rows_of<BITS, 8, 1>(q, o0, o1); break;
  }
}

}  // namespace

#if LOWBIT_Q8_AVXVNNI
bool gemv_q8_avxvnni(const Q8Args& q, int64_t o0, int64_t o1) {
  LOWBIT_BY_BITS(q.a.bits, q8_m, q, o0, o1)
  return true;
}

bool q8_avxvnni_built() { return true; }
#else
// As quantize_x_vnni: a row of x (first P columns, P % 64 == 0) -> int8 codes, each chunk's 16 per-lane
// scales (lanes 0-7 block 2k, 8-15 block 2k + 1), each 32-column block's dequantized sum.  Scale absmax /
// 127; round half to even (MXCSR default).
void quantize_x_avx2(const float* x, int64_t P, int8_t* xq, float* sxv, float* bsum, int8_t* xt, float* sxb) {
  const int64_t S = super_cols(P);
  const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < P / 32; ++b) {
    __m256 v[4];
    __m256 mx = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(x + 32 * b + 8 * j);
      mx = _mm256_max_ps(mx, _mm256_and_ps(v[j], nosign));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float sx = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    const __m256 iv = _mm256_set1_ps(inv);
    __m256i qi[4];
    __m256i sum = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      qi[j] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[j], iv)), lo), hi);
      sum = _mm256_add_epi32(sum, qi[j]);
    }
    const __m256i packed = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3])), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + 32 * b), packed);
    _mm256_storeu_ps(sxv + (b >> 1) * 16 + (b & 1) * 8, _mm256_set1_ps(sx));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    bsum[b] = sx * (float)_mm_cvtsi128_si32(s4);
    if (sxb) sxb[b] = sx;
    if (xt && 32 * b < S) super_x_block(xt, xq, b);
  }
}

bool gemv_q8_avx2(const Q8Args& q, int64_t o0, int64_t o1) {
  LOWBIT_BY_BITS(q.a.bits, q8_m, q, o0, o1)
  return true;
}
#endif

}  // namespace lowbit_fused

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64, or an AVX-VNNI unit this compiler cannot build

namespace lowbit_fused {
#if LOWBIT_Q8_AVXVNNI
bool gemv_q8_avxvnni(const Q8Args&, int64_t, int64_t) { return false; }
bool q8_avxvnni_built() { return false; }
#else
bool gemv_q8_avx2(const Q8Args&, int64_t, int64_t) { return false; }
void quantize_x_avx2(const float*, int64_t, int8_t*, float*, float*, int8_t*, float*) {}
#endif
}  // namespace lowbit_fused

#endif
