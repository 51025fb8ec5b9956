// Round half to even in fp32, as torch.round does (shared by the learned-rounding and GPTQ loops).
#pragma once

#include <cmath>

namespace lowbit_fused {

inline float round_half_even(float x) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_roundevenf(x);
#else
  return std::nearbyint(x);  // the default rounding mode: to nearest, ties to even
#endif
}

}  // namespace lowbit_fused
