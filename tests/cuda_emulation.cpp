// Host emulation of the fusedclr CUDA kernels, for tests/test_cuda_emulated.py.
//
// csrc/cuda/optim_kernels.cuh is compiled here as plain C++ and every launch
// runs each (block, thread) of its grid in turn on the CPU. That is exact for
// these kernels: no thread reads what another writes (no shared memory,
// barriers, shuffles or atomics), so any execution order gives the GPU's
// result up to floating-point contraction. The kernel selection and argument
// blocks are optim_cuda.cu's own (optim_dispatch.cuh), the buffer checks the
// shared ones (fusedclr/checks.h); only the launch itself differs. The ops
// take CPU tensors and one extra argument, the number of resident blocks the
// emulated device holds (it sizes the grid and the chunk split exactly as the
// occupancy query does on a GPU).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <fusedclr/checks.h>
#include <fusedclr/schedule.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

// The CUDA built-ins the kernels use, as host stand-ins.
struct EmulatedDim3 {
  unsigned x = 0, y = 1, z = 1;
};
thread_local EmulatedDim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __noinline__
#define __launch_bounds__(...)

#include "optim_dispatch.cuh"

namespace fusedclr {
namespace cuda {
namespace {

template <typename Kernel, typename... Args>
void run_grid(int64_t blocks, Kernel kernel, const Args&... args) {
  gridDim.x = static_cast<unsigned>(blocks);
  blockDim.x = kThreads;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int t = 0; t < kThreads; ++t) {
      blockIdx.x = static_cast<unsigned>(b);
      threadIdx.x = static_cast<unsigned>(t);
      kernel(args...);
    }
  }
}

// optim_cuda.cu's launches, with `resident` in place of the occupancy query.
void step(c10::string_view optimizer, const at::Tensor& segments, at::ScalarType param_dtype,
          const std::optional<at::Tensor>& state0, const std::optional<at::Tensor>& state1,
          const std::optional<at::Tensor>& state2, const std::optional<at::Tensor>& state3,
          const at::Tensor& seg_steps, const std::optional<at::Tensor>& seg_scalars, const at::Tensor& chunks,
          const at::Tensor& hyper,
          const at::Tensor& schedule, const at::Tensor& schedule_step, c10::ArrayRef<double> options, bool maximize,
          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
          const std::optional<at::Tensor>& master_param, std::optional<int64_t> sr_seed, int64_t resident) {
  const StateArgs states{state0, state1, state2, state3};
  const std::string name(optimizer.data(), optimizer.size());
  with_policy(name, [&](auto policy) {
    dispatch_step<decltype(policy)>(
        name.c_str(), segments, param_dtype, states, seg_steps, seg_scalars, chunks, hyper, schedule, schedule_step,
        options, maximize, grad_scale, found_inf, master_param, sr_seed,
        [](auto kernel, const AdvanceArgs& args) {
          if (args.n > 0) {
            run_grid(std::min<int64_t>(kAdvanceMaxBlocks, ceil_div(args.n, kThreads)), kernel, args);
          }
        },
        [resident](auto kernel, auto args, int vec) {
          if (args.step.n_chunks == 0) {
            return;
          }
          const LaunchPlan plan = plan_launch(args.step.n_chunks, args.step.numel, vec, resident);
          args.step.parts = plan.parts;
          run_grid(plan.blocks, kernel, args);
        });
  });
}

at::Tensor grad_sumsq(const at::Tensor& segments, at::ScalarType param_dtype, const at::Tensor& chunks,
                      int64_t resident) {
  return grad_sumsq_with(segments, param_dtype, chunks, [resident](const void*) { return resident; },
                         [](auto kernel, int64_t blocks, const StepArgs& args, double* partials) {
                           run_grid(blocks, kernel, args, partials);
                         });
}

void grad_zero(const at::Tensor& segments, at::ScalarType param_dtype, const at::Tensor& chunks, int64_t resident) {
  grad_zero_with(segments, param_dtype, chunks, [resident](const void*) { return resident; },
                 [](auto kernel, int64_t blocks, const StepArgs& args) { run_grid(blocks, kernel, args); });
}

at::Tensor schedule_eval(const at::Tensor& schedule, const at::Tensor& schedule_step) {
  at::Tensor out = at::empty({4}, schedule.options());
  run_grid(1, schedule_eval_kernel, schedule.data_ptr<double>(), schedule_step.data_ptr<int64_t>(),
           out.data_ptr<double>());
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fusedclr

TORCH_LIBRARY(fusedclr_emulated, m) {
  m.def(
      "step_(str optimizer, Tensor segments, ScalarType param_dtype, Tensor(a!)? state0, Tensor(b!)? state1, "
      "Tensor(c!)? state2, Tensor(d!)? state3, Tensor(e!) seg_steps, Tensor(f!)? seg_scalars, Tensor chunks, "
      "Tensor hyper, Tensor schedule, Tensor schedule_step, float[] options, bool maximize=False, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor(g!)? master_param=None, int? sr_seed=None, "
      "int resident=4) -> ()");
  m.def("schedule_eval(Tensor schedule, Tensor schedule_step) -> Tensor");
  m.def("grad_sumsq(Tensor segments, ScalarType param_dtype, Tensor chunks, int resident=4) -> Tensor");
  m.def("grad_zero_(Tensor segments, ScalarType param_dtype, Tensor chunks, int resident=4) -> ()");
}

TORCH_LIBRARY_IMPL(fusedclr_emulated, CPU, m) {
  m.impl("step_", &fusedclr::cuda::step);
  m.impl("schedule_eval", &fusedclr::cuda::schedule_eval);
  m.impl("grad_sumsq", &fusedclr::cuda::grad_sumsq);
  m.impl("grad_zero_", &fusedclr::cuda::grad_zero);
}
