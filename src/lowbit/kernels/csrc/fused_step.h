// One linear layer of a fused decode step, for a team of threads (fused_layer.cpp's decode_layers).
//
// bind_step_linear checks and binds a layer once (what make_layer does for every call), prepare_step_linear
// prepares its one row of x on one thread (the int8 quantization of the q8 kernel, or the group sums of the
// fp32 AVX2 one) into a workspace, and step_linear_rows computes output rows [o0, o1) from it, on any thread.
// Together they compute exactly what layer_linear computes for one row of x, without a parallel region or an
// allocation per call; step_linear_split gives the rows at::parallel_for would give each thread, so a team
// splits the rows as layer_linear does and the results are the same bits.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "fused_common.h"

namespace lowbit_fused {

// Scratch for the prepared x of one linear at a time (grown as needed, reused layer after layer).
struct StepWorkspace {
  std::vector<int8_t> xq;
  std::vector<float> f;
};

struct StepLinear {
  at::Tensor codes, scale, zero;   // contiguous, kept alive for the step
  Args a;
  Q8Args q;
  bool q8 = false;
  int q8isa = 0;                   // the q8 path (fused_ops.cpp, q8_path): ISA_AVX512, ISA_AVXVNNI or ISA_AVX2
  int layout = 1;                  // the q8 codes' repack layout (1, or 2: fused_common.h)
  int isa = 0;
  int64_t grain = 1;
};

void bind_step_linear(StepLinear& s, const at::Tensor& codes, const at::Tensor& scale,
                      const std::optional<at::Tensor>& zero, int64_t bits, int64_t group_size, int64_t in_features,
                      int64_t q8);   // q8: 0 the fp32-activation kernel, else the int8 one reading layout q8
// Sizes the workspace for every layer bound so far (call before the team starts: no allocation inside it).
void reserve_step_workspace(StepWorkspace& w, const StepLinear& s);
// x: in_features floats; y: out floats, written by step_linear_rows.
void prepare_step_linear(StepLinear& s, StepWorkspace& w, const float* x, float* y);
void step_linear_rows(const StepLinear& s, int64_t o0, int64_t o1);
// All its rows, in one at::parallel_for (a step without a team).
void step_linear_pooled(const StepLinear& s);
// Rows of thread `tid` of `T`, as at::parallel_for(0, out, grain) splits them (empty past its thread count).
void step_linear_split(const StepLinear& s, int64_t tid, int64_t T, int64_t* o0, int64_t* o1);
// The same split for any range and grain.
void parallel_split(int64_t n, int64_t grain, int64_t tid, int64_t T, int64_t* b, int64_t* e);

}  // namespace lowbit_fused
