// Shared by every translation unit of lowbit's fused grouped_int CPU kernels.
//
// No torch headers here: the ISA translation units (fused_avx2.cpp, fused_avx512.cpp) include only
// this file and <immintrin.h>, and every function below has internal linkage (static), so no inline
// function compiled for AVX-512 can be picked by the linker for code that runs on an AVX2 machine.
//
// Kernel layout of a row of codes (built once per layer by repack_row, same byte count as the stored
// row): the first P = 64 * floor(in / 64) columns are stored in blocks, the remaining in - P columns are
// the stored little-endian bit stream itself (it starts on a byte boundary).  "Vector v" is the 16
// consecutive columns 16v .. 16v+15; in every layout below, lane l (0..15) of one aligned load holds
// column 16v + l at a fixed shift, so a vector decodes with one shift per lane.
//
//   bits  block           layout
//     8   16 cols, 16 B   byte l = column l (the stored layout: nothing to repack)
//     4   128 cols, 64 B  16 little-endian 32-bit lanes; nibble j (bits 4j..4j+3) of lane l holds
//                         column 16j + l.  When P % 128 == 64 the last 64 columns form a half block of
//                         32 B: 16 16-bit lanes, nibble j (0..3) of lane l holds column 16j + l.
//     2   64 cols, 16 B   byte l, bits 2j..2j+1 hold column 16j + l (j = 0..3)
//     3   64 cols, 24 B   bytes 0..15: the codes' low two bits as for 2 bits; bytes 16..23: a 64-bit
//                         little-endian mask whose bit c is bit 2 of column c of the block
#pragma once

#include <stdint.h>
#include <string.h>

namespace lowbit_fused {

// Ordered: a request is capped at the CPU's best (fused_ops.cpp, resolve_isa).  ISA_AVXVNNI: AVX2 with the 256-bit
// VEX vpdpbusd; only the int8-activation kernel has a path of its own for it, the fp32 kernels run AVX2's.
enum Isa : int { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVXVNNI = 3, ISA_AVX512 = 4 };

struct Args {
  const float* x;          // (m, in) fp32, row stride ldx
  int64_t m, ldx;
  const float* xsum;       // (m, G): sum of x over each group's columns below P (AVX2 path only)
  const uint8_t* codes;    // (out, row_bytes) in the kernel layout above
  int64_t row_bytes;
  const uint16_t* scale;   // (out, G) fp16 bits
  const uint16_t* zero;    // (out, G) fp16 bits, or nullptr: symmetric, zero = 2**(bits-1)
  int bits;
  int64_t in, out, gw, G;  // gw: columns per group (in for per-channel), G groups
  int64_t P;               // columns held in blocks
  float* y;                // (m, out) fp32, row stride ldy
  int64_t ldy;
};

// The int8-activation (q8) GEMV's extra inputs (fused_vnni.cpp, fused_q8_avx2.cpp): x quantized per 32 columns of the first P.
struct Q8Args {
  Args a;                  // a.x is only read for the columns from P on (exact tail)
  const int8_t* xq;        // (m, P) int8
  const float* sxv;        // (m, P / 64, 16): lane l of chunk k = scale of x's 32-column block 2k + l / 8
  const float* xs;         // (m, G): sum of the dequantized x over each group's columns below P
  int layout = 1;          // the codes' repack layout: 1, or 2 (super-chunks, below)
  const int8_t* xt = nullptr;   // layout 2: (m, S) x's first S = 512 * floor(P / 512) codes, super-chunk order
  const float* sxb = nullptr;   // layout 2: (m, P / 32) the scale of each 32-column block of x
};

// Layout 2 (both q8 kernels', 2-4 bits): the first S = 512 * floor(P / 512) columns of a row form
// super-chunks of 512 columns and 64 * bits bytes.  Chunk k (0..7) of a super-chunk is 64 byte lanes;
// byte 4i + b of chunk k holds column 32i + 4k + b, so the 32-bit lane i of every chunk covers x's
// 32-column block i alone and its integer sums can run over the whole super-chunk (int32 with VNNI, int16
// pair sums with AVX2: one conversion and one scaling per 512 or 256 columns instead of per 64 or 32).  x is handed over in the same order
// (Q8Args::xt).  Bytes of a super-chunk, one 64-byte vector V after another:
//   4 bits: V0..V3; chunk j (0..3) in the low nibbles of Vj, chunk j + 4 in the high nibbles (16 q)
//   3 bits: V0 = c0 | c6 bits 0-1 << 3 | c1 << 5;  V1 = c2 | c7 bits 0-1 << 3 | c3 << 5;
//           V2 = c4 | c6 bit 2 << 3 | c7 bit 2 << 4 | c5 << 5   (each chunk masked in place: 1, 8 or 32 q)
//   2 bits: V0 = c0 | c1 << 2 | c2 << 4 | c3 << 6;  V1 = c4 | c5 << 2 | c6 << 4 | c7 << 6
// The columns from S to P follow as a row of in - S columns in layout 1, then the stored tail as ever (a row of
// fewer than 512 columns is layout 1 throughout); except at 3 bits after a super-chunk, whose chunks there (24 bytes each) are three 8-byte fields F0, F1, F2, byte j of each holding:
//   F0: column j in bits 0-2, column 32 + j's bits 0-1 in bits 3-4, column 16 + j in bits 5-7
//   F1: column 8 + j in bits 0-2, column 40 + j's bits 0-1 in bits 3-4, column 24 + j in bits 5-7
//   F2: column 48 + j in bits 0-2, bit 2 of column 32 + j in bit 3, of column 40 + j in bit 4, column 56 + j in bits 5-7
// so that 8-byte fields shifted per 64-bit lane give the chunk's columns in order: 3 operations for 32 columns with
// AVX2 (layout 1's bit-2 mask costs 5 more), 4 for 64 with VNNI (layout 1: 3).
constexpr int64_t kSuper = 512;
static inline int64_t super_cols(int64_t P) { return P & ~(kSuper - 1); }

// Layout 2's order of x: the 4-column group k of x's block b (b < S / 32, quantized into xq) goes to lane b % 16 of
// chunk k of its super-chunk in xt.
static inline void super_x_block(int8_t* xt, const int8_t* xq, int64_t b) {
  int8_t* d = xt + (32 * b & ~(kSuper - 1)) + 4 * (b & 15);
  for (int k = 0; k < 8; ++k) memcpy(d + 64 * k, xq + 32 * b + 4 * k, 4);
}

// Byte offset (within its super-chunk) and bit shift of the 3 or fewer bits of column c's code that sit
// there, for layout 2; *hi_shift >= 0 where 3 bits keep bit 2 of the code elsewhere (at the same byte of V2).
static inline int64_t super_pos(int64_t c, int bits, int* shift, int* lo_bits, int* hi_shift) {
  const int64_t w = c & (kSuper - 1);
  const int i = (int)(w >> 5), k = (int)((w >> 2) & 7), b = (int)(w & 3);
  const int64_t p = 4 * i + b;
  *hi_shift = -1;
  *lo_bits = bits;
  if (bits == 4) {
    *shift = 4 * (k >> 2);
    return 64 * (k & 3) + p;
  }
  if (bits == 2) {
    *shift = 2 * (k & 3);
    return 64 * (k >> 2) + p;
  }
  if (k < 6) {
    *shift = 5 * (k & 1);
    return 64 * (k >> 1) + p;
  }
  *shift = 3;
  *lo_bits = 2;
  *hi_shift = k == 6 ? 3 : 4;
  return 64 * (k - 6) + p;
}

// Software prefetch of the code rows [r0, r1) (clamped to r_end) into L1 or L2.  A decode GEMV streams its
// weights from memory once per token, a few hundred KB per call: too short a stream for the hardware
// prefetcher to reach speed.  The AVX2 GEMVs (and the VNNI one, into L2) prefetch kPrefetchRows rows ahead of the row they compute,
// and each thread's first rows when it starts (measured cache-cold on an AVX2 EPYC, 2 threads: the 28 MB
// int8 head 2.2 ms -> 0.8 ms per call with int8 activations).
// HINT: __builtin_prefetch's locality, 3 = into L1 (prefetcht0), 2 = into L2 (prefetcht1); see fused_vnni.cpp.
constexpr int64_t kPrefetchRows = 32;
template <int HINT = 3>
static inline void prefetch_rows(const uint8_t* codes, int64_t row_bytes, int64_t r0, int64_t r1, int64_t r_end) {
  if (r1 > r_end) r1 = r_end;
  if (r0 >= r1) return;
  const char* e = reinterpret_cast<const char*>(codes + r1 * row_bytes);
  for (const char* b = reinterpret_cast<const char*>(codes + r0 * row_bytes); b < e; b += 64)
    __builtin_prefetch(b, 0, HINT);
}

static inline int64_t block_bytes(int bits) { return 8 * bits; }   // per 64 columns
static inline int64_t prefix_cols(int64_t in) { return in & ~int64_t(63); }

// True when every 16-column vector of the block region lies inside one group.
static inline bool vector_groups(const Args& a) { return a.G == 1 || a.gw % 16 == 0; }

static inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);                    // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);           // normal
  } else if (man == 0) {
    bits = sign;                                                // zero
  } else {                                                      // subnormal: normalise
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400u));
    bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline float zero_of(const Args& a, int64_t o, int64_t g) {
  return a.zero ? half_to_float(a.zero[o * a.G + g]) : (float)(1 << (a.bits - 1));
}
static inline float scale_of(const Args& a, int64_t o, int64_t g) { return half_to_float(a.scale[o * a.G + g]); }

// Code of column c of the stored little-endian bit stream `s` (c counted from the stream's start).
static inline unsigned stream_code(const uint8_t* s, int64_t c, int bits, int64_t nbytes) {
  const int64_t bit = c * bits, byte = bit >> 3;
  unsigned w = s[byte];
  if (byte + 1 < nbytes) w |= (unsigned)s[byte + 1] << 8;
  return (w >> (bit & 7)) & ((1u << bits) - 1);
}

// Byte offset and shift of column c (< P) of a row in the kernel layout (3 bits: of its low two bits).
static inline int64_t layout_pos(int64_t c, int bits, int64_t P, int* shift) {
  if (bits == 8) {
    *shift = 0;
    return c;
  }
  const int l = (int)(c & 15);
  if (bits == 4) {
    const int64_t full = P & ~int64_t(127);
    if (c < full) {                                   // 128-column block, 32-bit lanes
      const int j = (int)((c & 127) >> 4);
      *shift = 4 * (j & 1);
      return (c >> 7) * 64 + 4 * l + (j >> 1);
    }
    const int j = (int)((c - full) >> 4);             // half block, 16-bit lanes
    *shift = 4 * (j & 1);
    return full / 2 + 2 * l + (j >> 1);
  }
  *shift = 2 * (int)((c & 63) >> 4);
  return (c >> 6) * block_bytes(bits) + l;
}

// Code of column c of a row in the kernel layout.
static inline unsigned layout_code(const uint8_t* row, int64_t c, int bits, int64_t P, int64_t row_bytes) {
  if (c >= P) {
    const int64_t off = P * bits / 8;
    return stream_code(row + off, c - P, bits, row_bytes - off);
  }
  int sh;
  const int64_t pos = layout_pos(c, bits, P, &sh);
  if (bits != 3) return (row[pos] >> sh) & ((1u << bits) - 1);
  const int64_t j = c & 63;
  const unsigned hi = (row[(c >> 6) * 24 + 16 + (j >> 3)] >> (j & 7)) & 1u;
  return ((row[pos] >> sh) & 3u) | (hi << 2);
}

// Stored row (bit stream of `in` codes, row_bytes bytes) -> kernel layout (same bytes).
static inline void repack_row(const uint8_t* src, uint8_t* dst, int bits, int64_t in, int64_t row_bytes) {
  const int64_t P = prefix_cols(in);
  if (bits == 8) {
    memcpy(dst, src, (size_t)row_bytes);
    return;
  }
  const int64_t pre = P * bits / 8;
  memset(dst, 0, (size_t)pre);
  for (int64_t c = 0; c < P; ++c) {
    const unsigned q = stream_code(src, c, bits, row_bytes);
    int sh;
    const int64_t pos = layout_pos(c, bits, P, &sh);
    dst[pos] |= (uint8_t)((q & (bits == 3 ? 3u : 15u)) << sh);
    if (bits == 3) {
      const int64_t j = c & 63;
      dst[(c >> 6) * 24 + 16 + (j >> 3)] |= (uint8_t)(((q >> 2) & 1u) << (j & 7));
    }
  }
  memcpy(dst + pre, src + pre, (size_t)(row_bytes - pre));
}

// Layout 1 (the q8 kernel's 4-bit layout): column b of a 128-column block in the low nibble of byte b,
// column 64 + b in its high nibble; a last half block (P % 128 == 64): column b low, 32 + b high.
static inline void repack_row_q4n(const uint8_t* src, uint8_t* dst, int64_t in, int64_t row_bytes) {
  const int64_t P = prefix_cols(in), full = P & ~int64_t(127);
  for (int64_t c = 0; c < P; ++c) {
    const unsigned q = stream_code(src, c, 4, row_bytes);
    int64_t pos;
    int sh;
    if (c < full) {
      pos = (c >> 7) * 64 + (c & 63);
      sh = (c & 64) ? 4 : 0;
    } else {
      pos = full / 2 + ((c - full) & 31);
      sh = ((c - full) & 32) ? 4 : 0;
    }
    if (!sh) dst[pos] = 0;
    dst[pos] |= (uint8_t)(q << sh);
  }
  memcpy(dst + P / 2, src + P / 2, (size_t)(row_bytes - P / 2));
}

// Byte offset (within its 24-byte chunk) and shift of column c's code (c < 64) in layout 2's 3-bit rest (above):
// bits 0-2 there, or at 3 bits its low two and *hi_shift >= 0: bit 2 at that shift of byte 16 + c % 8.
static inline int64_t rest3_pos(int64_t c, int* shift, int* hi_shift) {
  static const int kField[8] = {0, 8, 0, 8, 0, 8, 16, 16}, kShift[8] = {0, 0, 5, 5, 3, 3, 0, 5};
  const int q = (int)(c >> 3);
  *shift = kShift[q];
  *hi_shift = q == 4 ? 3 : q == 5 ? 4 : -1;
  return kField[q] + (c & 7);
}

// Layout 2 (the q8 kernels', 2-4 bits; Q8Args above): super-chunks, then the rest of the row in layout 1 (3 bits:
// its chunks as rest3_pos places them).
static inline void repack_row_super(const uint8_t* src, uint8_t* dst, int bits, int64_t in, int64_t row_bytes) {
  const int64_t S = super_cols(prefix_cols(in)), head = S / 8 * bits;
  memset(dst, 0, (size_t)head);
  for (int64_t c = 0; c < S; ++c) {
    const unsigned q = stream_code(src, c, bits, row_bytes);
    int sh, lo, hs;
    uint8_t* blk = dst + (c / kSuper) * 64 * bits;
    const int64_t pos = super_pos(c, bits, &sh, &lo, &hs);
    blk[pos] |= (uint8_t)((q & ((1u << lo) - 1)) << sh);
    if (hs >= 0) blk[128 + (pos & 63)] |= (uint8_t)(((q >> 2) & 1u) << hs);
  }
  if (bits == 4) {
    repack_row_q4n(src + head, dst + head, in - S, row_bytes - head);
  } else if (bits == 3 && S > 0) {
    const int64_t R = prefix_cols(in - S), rest = R / 8 * 3;
    memset(dst + head, 0, (size_t)rest);
    for (int64_t c = 0; c < R; ++c) {
      const unsigned q = stream_code(src + head, c, 3, row_bytes - head);
      int sh, hs;
      uint8_t* chunk = dst + head + (c >> 6) * 24;
      chunk[rest3_pos(c & 63, &sh, &hs)] |= (uint8_t)((q & (hs >= 0 ? 3u : 7u)) << sh);
      if (hs >= 0) chunk[16 + (c & 7)] |= (uint8_t)(((q >> 2) & 1u) << hs);
    }
    memcpy(dst + head + rest, src + head + rest, (size_t)(row_bytes - head - rest));
  } else {
    repack_row(src + head, dst + head, bits, in - S, row_bytes - head);
  }
}

// sum_{c in [c0, c1)} w[o, c] * x[r, c] for r < m, added to acc[r]; w computed exactly as the reference
// dequantization does: (float(q) - z) * s in fp32.  Scalar; used for tails and irregular groups.
static inline void scalar_dot(const Args& a, int64_t o, int64_t c0, int64_t c1, int64_t m, float* acc) {
  const uint8_t* row = a.codes + o * a.row_bytes;
  int64_t c = c0;
  while (c < c1) {
    const int64_t g = c / a.gw;
    const int64_t ge = (g + 1) * a.gw < c1 ? (g + 1) * a.gw : c1;
    const float s = scale_of(a, o, g), z = zero_of(a, o, g);
    for (; c < ge; ++c) {
      const float w = ((float)layout_code(row, c, a.bits, a.P, a.row_bytes) - z) * s;
      for (int64_t r = 0; r < m; ++r) acc[r] += w * a.x[r * a.ldx + c];
    }
  }
}

static inline void scalar_dequant(const Args& a, int64_t o, int64_t c0, int64_t c1, float* w) {
  const uint8_t* row = a.codes + o * a.row_bytes;
  int64_t c = c0;
  while (c < c1) {
    const int64_t g = c / a.gw;
    const int64_t ge = (g + 1) * a.gw < c1 ? (g + 1) * a.gw : c1;
    const float s = scale_of(a, o, g), z = zero_of(a, o, g);
    for (; c < ge; ++c) w[c] = ((float)layout_code(row, c, a.bits, a.P, a.row_bytes) - z) * s;
  }
}

// Tiled path microkernels: y[r, i] = sum_k x[r, k] * w[i, k] for r < m, i < n, with x packed in panels
// of PW rows (xp[p][k][j] = x[p * PW + j, k], zero beyond m) and w row-major (ldw = K) holding a
// multiple of MR rows (rows >= n zero-filled).  Each output is one fp32 FMA chain over k in order.
constexpr int kPw512 = 32, kMr512 = 12;
constexpr int kPw256 = 16, kMr256 = 6;

// Per-ISA boilerplate, written once.  The macros expand inside each ISA's target region, so the code
// they call is compiled for that ISA.  LOWBIT_BY_BITS: FN<2|3|4|8>(args...) for the stored width.
// LOWBIT_BY_ROWS: ONE<BITS, 1> for one row, MANY<BITS, m> for 2..8 rows (a GEMV call has m <= 8).
#define LOWBIT_BY_BITS(bits, FN, ...)               \
  switch (bits) {                                   \
    case 2: FN<2>(__VA_ARGS__); break;              \
    case 3: FN<3>(__VA_ARGS__); break;              \
    case 4: FN<4>(__VA_ARGS__); break;              \
    default: FN<8>(__VA_ARGS__); break;             \
  }
#define LOWBIT_BY_ROWS(m, ONE, MANY, BITS, ...)     \
  switch (m) {                                      \
    case 1: ONE<BITS, 1>(__VA_ARGS__); break;       \
    case 2: MANY<BITS, 2>(__VA_ARGS__); break;      \
    case 3: MANY<BITS, 3>(__VA_ARGS__); break;      \
    case 4: MANY<BITS, 4>(__VA_ARGS__); break;      \
    case 5: MANY<BITS, 5>(__VA_ARGS__); break;      \
    case 6: MANY<BITS, 6>(__VA_ARGS__); break;      \
    case 7: MANY<BITS, 7>(__VA_ARGS__); break;      \
    default: MANY<BITS, 8>(__VA_ARGS__); break;     \
  }

// The tiled product around an ISA's MR x PW microkernel: MICRO(xp panel, K, w + i0 * K, tmp) leaves
// tmp[i * PW + r] = y[p0 + r, i0 + i]; this copies each tile's valid part out.
#define LOWBIT_GEMM_TILES(MR, PW, MICRO, xp, m, K, w, n, y, ldy)                              \
  do {                                                                                        \
    float tmp_[(MR) * (PW)];                                                                  \
    for (int64_t p0 = 0; p0 < (m); p0 += (PW)) {                                              \
      const float* xpp = (xp) + (p0 / (PW)) * (K) * (PW);                                     \
      const int64_t rows = (m) - p0 < (PW) ? (m) - p0 : (PW);                                 \
      for (int64_t i0 = 0; i0 < (n); i0 += (MR)) {                                            \
        MICRO(xpp, (K), (w) + i0 * (K), tmp_);                                                \
        const int64_t ni = (n) - i0 < (MR) ? (n) - i0 : (MR);                                 \
        for (int64_t r = 0; r < rows; ++r)                                                    \
          for (int64_t i = 0; i < ni; ++i) (y)[(p0 + r) * (ldy) + i0 + i] = tmp_[i * (PW) + r]; \
      }                                                                                       \
    }                                                                                         \
  } while (0)

// Entry points of each ISA (rows [o0, o1)).  gemv: a.m <= 8, y[r, o] for those rows.  dequant: rows into
// w (row-major, (o1 - o0) x in).  The AVX variants return false when they were not compiled in.
void gemv_scalar(const Args& a, int64_t o0, int64_t o1);
void dequant_scalar(const Args& a, int64_t o0, int64_t o1, float* w);
bool gemv_avx2(const Args& a, int64_t o0, int64_t o1);
bool dequant_avx2(const Args& a, int64_t o0, int64_t o1, float* w);
bool gemv_avx512(const Args& a, int64_t o0, int64_t o1);
bool dequant_avx512(const Args& a, int64_t o0, int64_t o1, float* w);
bool gemv_q8_vnni(const Q8Args& q, int64_t o0, int64_t o1);
// xt, sxb: layout 2's x in super-chunk order and per-block scales (Q8Args), or nullptr
void quantize_x_vnni(const float* x, int64_t P, int8_t* xq, float* sxv, float* bsum, int8_t* xt, float* sxb);
bool gemv_q8_avx2(const Q8Args& q, int64_t o0, int64_t o1);
bool gemv_q8_avxvnni(const Q8Args& q, int64_t o0, int64_t o1);   // fused_q8_avxvnni.cpp; x from quantize_x_avx2
bool q8_avxvnni_built();                                          // false: the compiler could not build it
void quantize_x_avx2(const float* x, int64_t P, int8_t* xq, float* sxv, float* bsum, int8_t* xt, float* sxb);
bool gemm_avx2(const float* xp, int64_t m, int64_t K, const float* w, int64_t n, float* y, int64_t ldy);
bool gemm_avx512(const float* xp, int64_t m, int64_t K, const float* w, int64_t n, float* y, int64_t ldy);

}  // namespace lowbit_fused
