// AVX-512 VNNI path with int8 activations ("q8"): torch.ops.lowbit.grouped_linear_q8.
//
// Each row of x is quantized per call, per 32 columns, to int8 with one fp32 scale (absmax / 127, round
// to nearest even), as llama.cpp does for its Q8_0 activations.  A 64-column chunk of a weight row is
// decoded to 64 unsigned bytes in column order and multiplied with the chunk of x by one vpdpbusd
// (16 int32 lanes, lane l = the 4 products of columns 4l..4l+3: exact), converted to fp32 and scaled per
// lane by its 32-column block's x scale; per group the sum is scaled by the group's weight scale, and
// the zero point enters once per group through the sum of the quantized x over the group, so the result
// is the fp32 product of the weight with the dequantized x, xh_c = sx_b xq_c (up to fp32 rounding):
//     sum_c (q_c - z) s xh_c  =  s * sum_b sx_b * sum_{c in b} q_c xq_c  -  s z sum_b sx_b sum_{c in b} xq_c.
// Columns past the last multiple of 64 are computed exactly in fp32 (scalar_dot).
//
// Layout (fused_common.h) as the fp32 kernels, except 4 bits (repack layout 1): a 128-column block of
// 64 bytes holds column b in the low nibble of byte b and column 64 + b in its high nibble; a last half
// block of 64 columns (in % 128 >= 64) 32 bytes, column b low, 32 + b high.  The high nibbles of a whole block are
// masked in place (16 q: one instruction instead of a shift and a mask) and that chunk's x scales divided by 16,
// which leaves every product exactly as it was.  2 bits: 16 bytes per 64
// columns, bits 2j..2j+1 of byte l = column 16j + l, so broadcasting the 16 bytes to the four 128-bit
// lanes and shifting lane j by 2j yields the columns in order; 3 bits add bit 2 from the 64-bit mask with
// one masked byte add.  Groups: per channel, or a multiple of 64 columns (the Python side offers this
// kernel only for those).
//
// Layout 2 (fused_common.h, what lowbit prepares where this kernel runs): the first 512 * floor(P / 512)
// columns in super-chunks whose chunk k gives lane i the columns 32i + 4k .. 32i + 4k + 3, so that over the
// 8 chunks of a super-chunk lane i sums exactly x's block i: its vpdpbusd sums stay in int32 for 512 columns
// and are converted and scaled once (by x's block scale times the weight scale of the lane's group), where
// layout 1 converts, scales and adds in fp32 after every chunk.  Each chunk is masked in place (1 instruction;
// 2 bits: 1; 3 bits: 1, and 3 for two chunks in eight) and its power-of-two factor shifted out of the int32
// sum (exact).  Per 64 columns and row that is about 2 vector operations at 4 bits, 2.5 at 3 and 2.4 at 2,
// against 5, 7 and 6 in layout 1 (measured, Intel Xeon with AVX-512 VNNI, weights in cache, 1 thread, q8_rows2
// below: 0.70-0.89x layout 1's time at 4 bits, 0.58-0.73x at 3, 0.62-0.71x at 2; the 3-bit GEMVs now as fast
// as the 4-bit ones).  The remaining chunks (P % 512) run as layout 1 (3 bits: the rest's arrangement in
// fused_common.h), the last in % 64 columns in fp32.
#include "fused_common.h"

#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#endif

namespace lowbit_fused {
namespace {

#define LB_INLINE inline __attribute__((always_inline))
#include "super_dot.h"

// 64 codes of chunk k (columns 64k .. 64k+63) of a row, as unsigned bytes in column order.
template <int BITS>
LB_INLINE __m512i chunk_codes(const uint8_t* row, int64_t k, int64_t full4) {
  if (BITS == 8) return _mm512_loadu_si512(row + k * 64);
  const __m512i lo4 = _mm512_set1_epi8(0x0f);
  if (BITS == 4) {
    if (k < full4) {
      const __m512i v = _mm512_loadu_si512(row + (k >> 1) * 64);
      // a high nibble is left in place (16 q, exact in the int32 sums): q8_rows scales that chunk's x by 1/16
      return _mm512_and_si512(v, (k & 1) ? _mm512_set1_epi8((char)0xf0) : lo4);
    }
    // a half block: its 32 bytes in both halves, the high nibbles of the upper half masked in place (16 q)
    const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + full4 * 32)));
    return _mm512_and_si512(v, _mm512_inserti64x4(lo4, _mm256_set1_epi8((char)0xf0), 1));
  }
  const uint8_t* blk = row + k * (BITS == 2 ? 16 : 24);
  const __m512i b = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
  const __m512i sh = _mm512_set_epi32(0x60006, 0x60006, 0x60006, 0x60006, 0x40004, 0x40004, 0x40004, 0x40004,
                                      0x20002, 0x20002, 0x20002, 0x20002, 0, 0, 0, 0);  // lane j: 2j per 16 bits
  __m512i q = _mm512_and_si512(_mm512_srlv_epi16(b, sh), _mm512_set1_epi8(3));
  if (BITS == 3) {
    uint64_t m;
    memcpy(&m, blk + 16, 8);
    q = _mm512_mask_add_epi8(q, (__mmask64)m, q, _mm512_set1_epi8(4));
  }
  return q;
}

// x's 16 lane scales sx of chunk k as chunk_codes<4> leaves the chunk: a high nibble masked in place is 16 q (the odd
// chunk of a whole block, the upper 32 columns of a half block), so its lanes' scales are divided by 16 (exact).
LB_INLINE __m512 q4_sx(__m512 sx, int64_t k, int64_t full4) {
  if (k >= full4) return _mm512_mul_ps(sx, _mm512_mask_mov_ps(_mm512_set1_ps(1.f), 0xff00, _mm512_set1_ps(0.0625f)));
  return (k & 1) ? _mm512_mul_ps(sx, _mm512_set1_ps(0.0625f)) : sx;
}

// The 64 codes of a chunk of layout 2's 3-bit rest (fused_common.h, 24 bytes at c), in column order with the
// fields left in place: lanes 4-7 and 14-15 hold 32 q, lanes 8-11 8 q (rest3_sx gives x's scales to match).
LB_INLINE __m512i rest3_codes(const uint8_t* c) {
  const __m512i f = _mm512_castsi256_si512(_mm256_maskz_loadu_epi8(0x00ffffff, c));   // F0 F1 F2, no read past
  const __m512i w = _mm512_and_si512(_mm512_permutexvar_epi64(_mm512_set_epi64(2, 2, 1, 0, 1, 0, 1, 0), f),
                                     _mm512_set_epi64(0xe0e0e0e0e0e0e0e0ll, 0x0707070707070707ll, 0x1818181818181818ll,
                                                      0x1818181818181818ll, 0xe0e0e0e0e0e0e0e0ll, 0xe0e0e0e0e0e0e0e0ll,
                                                      0x0707070707070707ll, 0x0707070707070707ll));
  uint64_t f2;
  memcpy(&f2, c + 16, 8);
  // bit 2 of columns 32-39 (F2 bit 3) and 40-47 (F2 bit 4): 4 at their 8 q, i.e. 32
  const __m512i bit2 = _mm512_set_epi64(0, 0, 0x1010101010101010ll, 0x0808080808080808ll, 0, 0, 0, 0);
  const __mmask64 hi = _mm512_test_epi8_mask(_mm512_set1_epi64((long long)f2), bit2);
  return _mm512_mask_add_epi8(w, hi, w, _mm512_set1_epi8(32));
}
LB_INLINE __m512 rest3_sx(__m512 sx) {
  const float a = 1.f / 32, b = 1.f / 8;
  return _mm512_mul_ps(sx, _mm512_set_ps(a, a, 1, 1, b, b, b, b, a, a, a, a, 1, 1, 1, 1));
}

// The sums of the 16 lanes of a, b, c and d, in that order (one transposed reduction: 12 instructions where four
// _mm512_reduce_add_ps take about 32).
LB_INLINE __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // each 128 bits: a b a b
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));       // each 128 bits: a b c d
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// One super-chunk (layout 2, fused_common.h) of a row against one row of x in super-chunk order: the int32
// sums of its 16 lanes (lane i: x's 32-column block i of the super-chunk), super_dot.h on 64-byte vectors.
struct Ops512 {
  using V = __m512i;
  static LB_INLINE V zero() { return _mm512_setzero_si512(); }
  static LB_INLINE V load(const void* p) { return _mm512_loadu_si512(p); }
  static LB_INLINE V set1(int m) { return _mm512_set1_epi8((char)m); }
  static LB_INLINE V and_(V a, V b) { return _mm512_and_si512(a, b); }
  static LB_INLINE V add(V a, V b) { return _mm512_add_epi32(a, b); }
  static LB_INLINE V sra(V a, int n) { return _mm512_srai_epi32(a, n); }
  static LB_INLINE V dot(V acc, V c, V x) { return _mm512_dpbusd_epi32(acc, c, x); }
  template <int SHIFT>
  static LB_INLINE V with_bit2(V c, V v2, V m) {   // v2's bit as a byte mask, one masked add
    return _mm512_mask_add_epi8(c, _mm512_test_epi8_mask(v2, m), c, _mm512_set1_epi8(0x20));
  }
};

template <int BITS>
LB_INLINE __m512i super_dot(const uint8_t* w, const int8_t* xt) { return super_dot_of<BITS, Ops512>(w, xt); }

// Layout 2's super-chunks of R rows for M rows of x, into acc: per lane, the int32 sum over a super-chunk is
// converted once and scaled by its x block's scale times the weight scale of the lane's group.  svl[i]: row i's
// weight scales of the 16 groups from the last super-chunk's first on (0 past the row's groups), for the rest.
template <int BITS, int M, int R>
LB_INLINE void q8_super(const Q8Args& q, int64_t o, const uint8_t* const* row, __m512 (*acc)[M], __m512* svl) {
  const Args& a = q.a;
  const int64_t S = super_cols(a.P), nb = a.P >> 5;
  // lane i's group: (c0 + 32 i) / gw, computed as (c0 + 32 i + 16) / gw in fp32 -- 16 / gw from any integer, so
  // exact while in < 2**26 (checked where the layer is bound)
  const __m512 mid = _mm512_set_ps(496, 464, 432, 400, 368, 336, 304, 272, 240, 208, 176, 144, 112, 80, 48, 16);
  const __m512 inv_gw = _mm512_set1_ps(1.f / (float)a.gw);
  for (int64_t c0 = 0; c0 < S; c0 += kSuper) {
    const int64_t g0 = c0 / a.gw, ng = a.G - g0 < 16 ? a.G - g0 : 16;
    const __mmask16 gm = (__mmask16)((1u << ng) - 1);
    const __m512i gi = _mm512_sub_epi32(
        _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_add_ps(_mm512_set1_ps((float)c0), mid), inv_gw)),
        _mm512_set1_epi32((int)g0));
    for (int i = 0; i < R; ++i) {
      svl[i] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, a.scale + (o + i) * a.G + g0));
      const __m512 sv = _mm512_permutexvar_ps(gi, svl[i]);
      const uint8_t* w = row[i] + c0 / 8 * BITS;
      for (int r = 0; r < M; ++r) {
        const __m512i t = super_dot<BITS>(w, q.xt + r * S + c0);
        const __m512 sx = _mm512_loadu_ps(q.sxb + r * nb + (c0 >> 5));
        acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(sx, sv), acc[i][r]);
      }
    }
  }
}

// Rows o .. o + R - 1 of y from their sums (acc) less the zero point's terms (zacc), plus the fp32 tail.
template <int M, int R>
LB_INLINE void store_rows(const Args& a, int64_t o, __m512 (*acc)[M], __m512 (*zacc)[M]) {
  if constexpr (R == 4 && M == 1) {           // the four rows' sums in one transposed reduction
    float out[4];
    _mm_storeu_ps(out, reduce4(_mm512_sub_ps(acc[0][0], zacc[0][0]), _mm512_sub_ps(acc[1][0], zacc[1][0]),
                               _mm512_sub_ps(acc[2][0], zacc[2][0]), _mm512_sub_ps(acc[3][0], zacc[3][0])));
    for (int i = 0; i < 4; ++i) {
      if (a.P < a.in) scalar_dot(a, o + i, a.P, a.in, 1, out + i);
      a.y[o + i] = out[i];
    }
  } else {
    for (int i = 0; i < R; ++i) {
      float out[M];
      for (int r = 0; r < M; ++r) out[r] = _mm512_reduce_add_ps(_mm512_sub_ps(acc[i][r], zacc[i][r]));
      if (a.P < a.in) scalar_dot(a, o + i, a.P, a.in, M, out);
      for (int r = 0; r < M; ++r) a.y[r * a.ldy + o + i] = out[r];
    }
  }
}

// R output rows at a time (sharing each chunk of x), M rows of x.  Each chunk costs one vpdpbusd, one conversion
// and one FMA per (output row, x row): by x's per-lane scales times the group's weight scale for groups of 64 or
// 128 columns, by x's scales alone into a group sum that the weight scale multiplies once for longer groups.  The
// scales and zero points of 16 groups are converted at a time, and the zero point's term is a vector of 16
// groups' terms subtracted before the final reduction.
template <int BITS, int M, int R>
void q8_rows(const Q8Args& q, int64_t o0, int64_t o1) {
  const Args& a = q.a;
  const int64_t nch = a.P >> 6;
  const int64_t cpg = a.G == 1 ? (nch > 0 ? nch : 1) : a.gw >> 6;
  const int64_t full4 = (a.P & ~int64_t(127)) >> 6;
  const __m512i zero = _mm512_setzero_si512();
  const float zsym = (float)(1 << (a.bits - 1));
  int64_t o = o0;
  // Rows are prefetched kPrefetchRows ahead into L2 (prefetcht1).  R > 1 rows read side by side are R short
  // streams, which the hardware prefetcher follows poorly once a row spans several cache lines (measured on an
  // AVX-512 EPYC, 2 threads, weights from memory: 4-bit 1536->576 41 -> 23 us per call).  One row at a time (the
  // 8-bit head) is one stream, yet the loads and the arithmetic hardly overlap without it: the 28 MB int8 head
  // 1.08 -> 0.90 ms per call with 2 threads, 1.7-2.0 -> 1.3-1.5 ms with one (standalone, median of 30 calls).
  // Into L1 (prefetcht0) the same prefetches gained nothing for the head and no more than L2 at 4 bits.
  prefetch_rows<2>(a.codes, a.row_bytes, o0, o0 + kPrefetchRows, o1);      // a call starts cold
  for (; o + R <= o1; o += R) {
    prefetch_rows<2>(a.codes, a.row_bytes, o + kPrefetchRows, o + kPrefetchRows + R, o1);
    const uint8_t* row[R];
    __m512 acc[R][M], zacc[R][M];   // zacc lane j: the zero point's term s z sum(x) of group j of each 16
    for (int i = 0; i < R; ++i) {
      row[i] = a.codes + (o + i) * a.row_bytes;
      for (int r = 0; r < M; ++r) acc[i][r] = zacc[i][r] = _mm512_setzero_ps();
    }
    int64_t k = 0;
    for (int64_t g0 = 0; k < nch; g0 += 16) {
      // the scales and zero points of up to 16 groups, converted 16 at a time (lanes past the row's groups: 0)
      const int64_t ng = a.G - g0 < 16 ? a.G - g0 : 16;
      const __mmask16 gm = (__mmask16)((1u << ng) - 1);
      __m512 svec[R];
      for (int i = 0; i < R; ++i) {
        svec[i] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, a.scale + (o + i) * a.G + g0));
        const __m512 zv = a.zero ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, a.zero + (o + i) * a.G + g0))
                                 : _mm512_set1_ps(zsym);
        const __m512 sz = _mm512_mul_ps(svec[i], zv);
        for (int r = 0; r < M; ++r)
          zacc[i][r] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(gm, q.xs + r * a.G + g0), zacc[i][r]);
      }
      for (int64_t g = 0; g < ng && k < nch; ++g) {
        const int64_t ke = k + cpg < nch ? k + cpg : nch;
        const __m512i gi = _mm512_set1_epi32((int)g);
        __m512 sv[R], gacc[R][M];
        for (int i = 0; i < R; ++i) sv[i] = _mm512_permutexvar_ps(gi, svec[i]);
        // Groups of 64 or 128 columns (direct): the weight scale joins x's scales chunk by chunk, into acc
        // (measured against the group-sum form for 128 columns, Intel Xeon with AVX-512, 2 threads: no difference).
        // Longer groups (per channel included): the group's sum in x's scales only, times its weight scale once.
        const bool direct = ke - k <= 2;
        auto step = [&](auto direct_c, int64_t kk, const __m512i* w) __attribute__((always_inline)) {
          for (int r = 0; r < M; ++r) {
            const __m512i xk = _mm512_loadu_si512(q.xq + r * a.P + kk * 64);
            __m512 sx = _mm512_loadu_ps(q.sxv + (r * nch + kk) * 16);
            // the high nibbles of a whole 4-bit block are 16 q: x's scale / 16 (exact) gives the same products
            if (BITS == 4) sx = q4_sx(sx, kk, full4);
            for (int i = 0; i < R; ++i) {
              const __m512 d = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, w[i], xk));
              if constexpr (decltype(direct_c)::value)
                acc[i][r] = _mm512_fmadd_ps(d, _mm512_mul_ps(sx, sv[i]), acc[i][r]);
              else
                gacc[i][r] = _mm512_fmadd_ps(d, sx, gacc[i][r]);
            }
          }
        };
        // the group's chunks [k, ke), both chunks of a whole 4-bit block from one load
        auto chunks = [&](auto direct_c) __attribute__((always_inline)) {
          if (BITS == 4)
            for (; k + 2 <= ke && k < full4 && !(k & 1); k += 2) {
              __m512i lo[R], hi[R];
              for (int i = 0; i < R; ++i) {
                const __m512i v = _mm512_loadu_si512(row[i] + (k >> 1) * 64);
                lo[i] = _mm512_and_si512(v, _mm512_set1_epi8(0x0f));
                hi[i] = _mm512_and_si512(v, _mm512_set1_epi8((char)0xf0));   // 16 q, as in chunk_codes
              }
              step(direct_c, k, lo);
              step(direct_c, k + 1, hi);
            }
          for (; k < ke; ++k) {
            __m512i w[R];
            for (int i = 0; i < R; ++i) w[i] = chunk_codes<BITS>(row[i], k, full4);
            step(direct_c, k, w);
          }
        };
        if (direct) {
          chunks(std::true_type());
          continue;
        }
        for (int i = 0; i < R; ++i)
          for (int r = 0; r < M; ++r) gacc[i][r] = _mm512_setzero_ps();
        chunks(std::false_type());
        for (int i = 0; i < R; ++i)
          for (int r = 0; r < M; ++r) acc[i][r] = _mm512_fmadd_ps(gacc[i][r], sv[i], acc[i][r]);
      }
    }
    store_rows<M, R>(a, o, acc, zacc);
  }
  if (R > 1 && o < o1) q8_rows<BITS, M, 1>(q, o, o1);
}

// Layout 2 (2-4 bits, P >= 512), R output rows at a time, M rows of x: the super-chunks, the zero point's terms of
// every group (16 at a time), then the chunks past the last super-chunk (layout 1 of the rest of the row; 3 bits:
// rest3_codes) one by one, each with its group's weight scale joined to x's scales (a permute of the last
// super-chunk's converted scales).  A function of its own: run inside q8_rows's group
// loop (skipping the groups the super-chunks cover) the super-chunks took 0.84x layout 1's time at 4 bits and
// 0.75-0.79x at 2 (1 thread, weights in cache); here 0.70-0.89x and 0.62-0.71x, 3 bits the same (0.58-0.73x).
template <int BITS, int M, int R>
void q8_rows2(const Q8Args& q, int64_t o0, int64_t o1) {
  const Args& a = q.a;
  const int64_t nch = a.P >> 6, kb = super_cols(a.P) >> 6;
  const int64_t full4 = ((a.P - kb * 64) & ~int64_t(127)) >> 6;   // of the rest
  const __m512 zsym = _mm512_set1_ps((float)(1 << (BITS - 1)));
  // the group of each chunk of the rest (at most 7), as an index into q8_super's svl: (kb * 64 + 447) / gw less the
  // last super-chunk's first group (kb * 64 - 512) / gw is at most 15 for gw >= 64
  __m512i tix[kSuper / 64];
  for (int64_t k = kb; k < nch; ++k) tix[k - kb] = _mm512_set1_epi32((int)(k * 64 / a.gw - (kb * 64 - kSuper) / a.gw));
  int64_t o = o0;
  prefetch_rows<2>(a.codes, a.row_bytes, o0, o0 + kPrefetchRows, o1);
  for (; o + R <= o1; o += R) {
    prefetch_rows<2>(a.codes, a.row_bytes, o + kPrefetchRows, o + kPrefetchRows + R, o1);
    const uint8_t* row[R];
    __m512 acc[R][M], zacc[R][M];
    for (int i = 0; i < R; ++i) {
      row[i] = a.codes + (o + i) * a.row_bytes;
      for (int r = 0; r < M; ++r) acc[i][r] = zacc[i][r] = _mm512_setzero_ps();
    }
    __m512 svl[R];
    q8_super<BITS, M, R>(q, o, row, acc, svl);
    for (int64_t g0 = 0; g0 < a.G; g0 += 16) {
      const int64_t ng = a.G - g0 < 16 ? a.G - g0 : 16;
      const __mmask16 gm = (__mmask16)((1u << ng) - 1);
      for (int i = 0; i < R; ++i) {
        const __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, a.scale + (o + i) * a.G + g0));
        const __m512 zv = a.zero ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, a.zero + (o + i) * a.G + g0)) : zsym;
        const __m512 sz = _mm512_mul_ps(sv, zv);
        for (int r = 0; r < M; ++r)
          zacc[i][r] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(gm, q.xs + r * a.G + g0), zacc[i][r]);
      }
    }
    for (int64_t k = kb; k < nch; ++k) {
      const int64_t kr = k - kb;
      __m512 sv[R];
      __m512i w[R];
      for (int i = 0; i < R; ++i) {
        sv[i] = _mm512_permutexvar_ps(tix[kr], svl[i]);
        w[i] = BITS == 3 ? rest3_codes(row[i] + kb * 24 + kr * 24)
                         : chunk_codes<BITS>(row[i] + kb * 8 * BITS, kr, full4);
      }
      for (int r = 0; r < M; ++r) {
        const __m512i xk = _mm512_loadu_si512(q.xq + r * a.P + k * 64);
        __m512 sx = _mm512_loadu_ps(q.sxv + (r * nch + k) * 16);
        if (BITS == 4) sx = q4_sx(sx, kr, full4);
        if (BITS == 3) sx = rest3_sx(sx);
        for (int i = 0; i < R; ++i)
          acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w[i], xk)),
                                      _mm512_mul_ps(sx, sv[i]), acc[i][r]);
      }
    }
    store_rows<M, R>(a, o, acc, zacc);
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
    case 1: q8_rows_of<BITS, 1, BITS == 8 ? 1 : 4>(q, o0, o1); break;  // measured: four weight rows
      // at a time are faster for 2-4 bits, slower for 8 (SmolLM2's 49152x576 head: 2.5 ms against 1.2)
    case 2: q8_rows_of<BITS, 2, 2>(q, o0, o1); break;
    case 3: q8_rows_of<BITS, 3, 2>(q, o0, o1); break;
    case 4: q8_rows_of<BITS, 4, 1>(q, o0, o1); break;
    case 5: q8_rows_of<BITS, 5, 1>(q, o0, o1); break;
    case 6: q8_rows_of<BITS, 6, 1>(q, o0, o1); break;
    case 7: q8_rows_of<BITS, 7, 1>(q, o0, o1); break;
    default: q8_rows_of<BITS, 8, 1>(q, o0, o1); break;
  }
}

}  // namespace

// Row of x (first P columns, P % 64 == 0) -> int8 codes, per-lane scales of each chunk, and each 32-column
// block's dequantized sum (sx * sum xq).  Scale absmax / 127; round half to even (MXCSR default).
void quantize_x_vnni(const float* x, int64_t P, int8_t* xq, float* sxv, float* bsum, int8_t* xt, float* sxb) {
  const int64_t S = super_cols(P);
  for (int64_t b = 0; b < P / 32; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float sx = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    const __m512 iv = _mm512_set1_ps(inv);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    const __m512i q0 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v0, iv)), lo), hi);
    const __m512i q1 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v1, iv)), lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + 32 * b), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + 32 * b + 16), _mm512_cvtepi32_epi8(q1));
    _mm256_storeu_ps(sxv + (b >> 1) * 16 + (b & 1) * 8, _mm256_set1_ps(sx));
    bsum[b] = sx * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    if (sxb) sxb[b] = sx;
    if (xt && 32 * b < S) super_x_block(xt, xq, b);
  }
}

bool gemv_q8_vnni(const Q8Args& q, int64_t o0, int64_t o1) {
  LOWBIT_BY_BITS(q.a.bits, q8_m, q, o0, o1)
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
bool gemv_q8_vnni(const Q8Args&, int64_t, int64_t) { return false; }
void quantize_x_vnni(const float*, int64_t, int8_t*, float*, float*, int8_t*, float*) {}
}  // namespace lowbit_fused

#endif
