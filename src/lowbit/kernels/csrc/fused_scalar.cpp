// Portable path: any CPU, any group size (also used on x86 for group sizes that are not a multiple of
// 16).  Decodes 64 columns of codes at a time into a small array of codes (never of weights), then
// accumulates (float(q) - z) * s * x in fp32, one column at a time.
#include "fused_common.h"

namespace lowbit_fused {

namespace {

// codes of columns [c0, c0 + n) of `row` (c0 % 64 == 0, n <= 64) into q
void decode_codes(const Args& a, const uint8_t* row, int64_t c0, int64_t n, uint8_t* q) {
  if (a.bits == 8) {
    memcpy(q, row + c0, (size_t)n);
    return;
  }
  if (c0 >= a.P) {
    for (int64_t i = 0; i < n; ++i) q[i] = (uint8_t)layout_code(row, c0 + i, a.bits, a.P, a.row_bytes);
    return;
  }
  if (a.bits == 4) {
    const int64_t full = a.P & ~int64_t(127);
    if (c0 < full) {                                  // half h of a 128-column block: nibbles 4h .. 4h+3
      const uint8_t* b = row + (c0 >> 7) * 64;
      const int h = (int)((c0 >> 6) & 1);
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 16; ++l) q[16 * j + l] = (b[4 * l + 2 * h + (j >> 1)] >> (4 * (j & 1))) & 15;
    } else {                                          // the half block
      const uint8_t* b = row + full / 2;
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 16; ++l) q[16 * j + l] = (b[2 * l + (j >> 1)] >> (4 * (j & 1))) & 15;
    }
    return;
  }
  const uint8_t* b = row + (c0 >> 6) * block_bytes(a.bits);
  for (int j = 0; j < 4; ++j)
    for (int l = 0; l < 16; ++l) q[16 * j + l] = (b[l] >> (2 * j)) & 3;
  if (a.bits == 3) {
    uint64_t hi;
    memcpy(&hi, b + 16, 8);
    for (int c = 0; c < 64; ++c) q[c] |= (uint8_t)(((hi >> c) & 1) << 2);
  }
}

// 8 partial sums per row (lane k takes columns i with i % 8 == k within each run of 8), so the compiler
// can keep them in one SIMD register and the additions do not wait on each other; summed in a fixed
// order at the end.
template <int M>
void rows(const Args& a, int64_t o0, int64_t o1) {
  uint8_t q[64];
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = a.codes + o * a.row_bytes;
    float part[M][8];
    for (int r = 0; r < M; ++r)
      for (int k = 0; k < 8; ++k) part[r][k] = 0.f;
    for (int64_t c0 = 0; c0 < a.in; c0 += 64) {
      const int64_t n = a.in - c0 < 64 ? a.in - c0 : 64;
      decode_codes(a, row, c0, n, q);
      int64_t i = 0;
      while (i < n) {
        const int64_t g = (c0 + i) / a.gw;
        const int64_t ge = ((g + 1) * a.gw - c0) < n ? (g + 1) * a.gw - c0 : n;
        const float s = scale_of(a, o, g), z = zero_of(a, o, g);
        for (; i + 8 <= ge; i += 8) {
          float w[8];
          for (int k = 0; k < 8; ++k) w[k] = ((float)q[i + k] - z) * s;
          for (int r = 0; r < M; ++r) {
            const float* xr = a.x + r * a.ldx + c0 + i;
            for (int k = 0; k < 8; ++k) part[r][k] += w[k] * xr[k];
          }
        }
        for (; i < ge; ++i) {
          const float w = ((float)q[i] - z) * s;
          for (int r = 0; r < M; ++r) part[r][0] += w * a.x[r * a.ldx + c0 + i];
        }
      }
    }
    for (int r = 0; r < M; ++r) {
      const float t = ((part[r][0] + part[r][4]) + (part[r][1] + part[r][5])) +
                      ((part[r][2] + part[r][6]) + (part[r][3] + part[r][7]));
      a.y[r * a.ldy + o] = t;
    }
  }
}

}  // namespace

void gemv_scalar(const Args& a, int64_t o0, int64_t o1) {
  switch (a.m) {
    case 1: rows<1>(a, o0, o1); break;
    case 2: rows<2>(a, o0, o1); break;
    case 3: rows<3>(a, o0, o1); break;
    case 4: rows<4>(a, o0, o1); break;
    case 5: rows<5>(a, o0, o1); break;
    case 6: rows<6>(a, o0, o1); break;
    case 7: rows<7>(a, o0, o1); break;
    default: rows<8>(a, o0, o1); break;
  }
}

void dequant_scalar(const Args& a, int64_t o0, int64_t o1, float* w) {
  uint8_t q[64];
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = a.codes + o * a.row_bytes;
    float* dst = w + (o - o0) * a.in;
    for (int64_t c0 = 0; c0 < a.in; c0 += 64) {
      const int64_t n = a.in - c0 < 64 ? a.in - c0 : 64;
      decode_codes(a, row, c0, n, q);
      int64_t i = 0;
      while (i < n) {
        const int64_t g = (c0 + i) / a.gw;
        const int64_t ge = ((g + 1) * a.gw - c0) < n ? (g + 1) * a.gw - c0 : n;
        const float s = scale_of(a, o, g), z = zero_of(a, o, g);
        for (; i < ge; ++i) dst[c0 + i] = ((float)q[i] - z) * s;
      }
    }
  }
}

}  // namespace lowbit_fused
