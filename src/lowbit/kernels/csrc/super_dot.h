// Layout 2's super-chunk dot product with int32 vpdpbusd sums (fused_common.h has the layout), shared by the
// AVX-512 VNNI path (fused_vnni.cpp, 64-byte vectors: the whole super-chunk) and the AVX-VNNI one
// (fused_q8_avx2.cpp compiled as fused_q8_avxvnni.cpp, 32-byte vectors: half h of each vector, w and xt already
// offset by 32 h).  Each chunk is masked in place and its power-of-two factor shifted out of the int32 sum (exact:
// every product of that sum carries the factor).  Included inside a unit's target region, after its Ops:
//   V; zero(); load(p); set1(byte); and_(a, b); add(a, b); sra(a, n); dot(acc, u8 codes, s8 x) = vpdpbusd;
//   with_bit2<SHIFT>(c, v2, m): c plus 32 in every byte whose bit m of v2 is set (that bit shifted left by SHIFT
//   lands on bit 5, the way a unit without byte masks adds it).
#pragma once

template <int BITS, class O>
inline __attribute__((always_inline)) typename O::V super_dot_of(const uint8_t* w, const int8_t* xt) {
  using V = typename O::V;
  const V z = O::zero();
  auto X = [&](int k) __attribute__((always_inline)) { return O::load(xt + 64 * k); };
  auto W = [&](int j) __attribute__((always_inline)) { return O::load(w + 64 * j); };
  auto M = [](int m) __attribute__((always_inline)) { return O::set1(m); };
  if constexpr (BITS == 4) {          // W0..W3: chunk j low nibble, chunk j + 4 high nibble (16 q)
    V a1 = z, a16 = z;
    for (int j = 0; j < 4; ++j) {
      const V v = W(j);
      a1 = O::dot(a1, O::and_(v, M(0x0f)), X(j));
      a16 = O::dot(a16, O::and_(v, M(0xf0)), X(j + 4));
    }
    return O::add(a1, O::sra(a16, 4));
  } else if constexpr (BITS == 3) {   // W0 = c0, c6 bits 0-1 at 3, c1 at 5; W1 = c2, c7 bits 0-1, c3; W2 = c4, c6
    const V v0 = W(0), v1 = W(1), v2 = W(2);                         // bit 2 at 3, c7 bit 2 at 4, c5
    V a1 = O::dot(z, O::and_(v0, M(0x07)), X(0));
    V a32 = O::dot(z, O::and_(v0, M(0xe0)), X(1));
    a1 = O::dot(a1, O::and_(v1, M(0x07)), X(2));
    a32 = O::dot(a32, O::and_(v1, M(0xe0)), X(3));
    a1 = O::dot(a1, O::and_(v2, M(0x07)), X(4));
    a32 = O::dot(a32, O::and_(v2, M(0xe0)), X(5));
    // chunks 6 and 7: two low bits in place (8 q), bit 2 from W2 added as 32
    const V c6 = O::template with_bit2<2>(O::and_(v0, M(0x18)), v2, M(0x08));
    const V c7 = O::template with_bit2<1>(O::and_(v1, M(0x18)), v2, M(0x10));
    const V a8 = O::dot(O::dot(z, c6, X(6)), c7, X(7));
    return O::add(O::add(a1, O::sra(a32, 5)), O::sra(a8, 3));
  } else {                            // W0 = c0..c3 as bit pairs 0-1 .. 6-7, W1 = c4..c7
    const V v0 = W(0), v1 = W(1);
    V a[4];
    for (int j = 0; j < 4; ++j) {
      const V m = M(3 << (2 * j));
      a[j] = O::dot(O::dot(z, O::and_(v0, m), X(j)), O::and_(v1, m), X(j + 4));
    }
    return O::add(O::add(a[0], O::sra(a[1], 2)), O::add(O::sra(a[2], 4), O::sra(a[3], 6)));
  }
}
