// CUDA kernels of the fusedclr ops (schemas and contract: csrc/ops.cpp,
// [note: flat-buffer step contract]). One update launch per op call whatever
// the number of parameters, plus one tiny launch that advances the step
// counters [note: step counters on CUDA]. Nothing here reads device memory
// from the host or synchronizes, so a step is CUDA-graph capturable.
//
// [note: step counters on CUDA]
// The contract increments seg_steps before the update uses it. Inside one
// launch that races: a warp that bumped segment s could be followed by another
// warp reading s for a later chunk and seeing the new value. We pay one tiny
// launch instead (advance_steps_kernel: n_segments x 8 bytes, grid-stride,
// ~the cost of an empty kernel), which is stream-ordered before the update
// kernel, so the update reads settled values. The alternative, a last-block-
// done counter, needs a zeroed global counter at every launch: zeroing it is
// itself a memset on the stream (no cheaper than this launch), and a
// persistent self-resetting counter breaks as soon as two streams or two
// replayed graphs step at once. found_inf is read on the device by both
// kernels, so a skipped step changes neither the counters nor the buffers.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <fusedclr/checks.h>

#include "optim_dispatch.cuh"

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>

namespace fusedclr {
namespace cuda {
namespace {

// Blocks of `kernel` the current device holds at once. The occupancy query
// costs a few microseconds, so it is cached per (kernel, device).
int64_t resident_blocks(const void* kernel) {
  const int device = c10::cuda::current_device();
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, device);
  const auto found = cache.find(key);
  if (found != cache.end()) {
    return found->second;
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int64_t blocks =
      static_cast<int64_t>(std::max(per_sm, 1)) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  cache.emplace(key, blocks);
  return blocks;
}

// Launches `kernel` once over the whole chunk table [note: chunk walk on CUDA].
template <typename Args>
void launch_update(void (*kernel)(Args), Args args, int vec, cudaStream_t stream) {
  StepArgs& s = args.step;
  if (s.n_chunks == 0) {
    return;
  }
  const LaunchPlan plan = plan_launch(s.n_chunks, s.numel, vec, resident_blocks(reinterpret_cast<const void*>(kernel)));
  s.parts = plan.parts;
  kernel<<<static_cast<unsigned>(plan.blocks), kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void require_cuda(const at::Tensor& segments) {
  TORCH_CHECK(segments.is_cuda(), "fusedclr: segments must be a CUDA tensor for the CUDA kernels, got ",
              segments.device());
}

// fusedclr::step_ on CUDA (csrc/ops.cpp [note: step contract]): the step
// counters' launch, then one update launch over the chunk table.
void step_cuda(c10::string_view optimizer, const at::Tensor& segments, at::ScalarType param_dtype,
               const std::optional<at::Tensor>& state0, const std::optional<at::Tensor>& state1,
               const std::optional<at::Tensor>& state2, const std::optional<at::Tensor>& state3,
               const at::Tensor& seg_steps, const std::optional<at::Tensor>& seg_scalars, const at::Tensor& chunks,
               const at::Tensor& hyper,
               const at::Tensor& schedule, const at::Tensor& schedule_step, c10::ArrayRef<double> options,
               bool maximize, const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
               const std::optional<at::Tensor>& master_param, std::optional<int64_t> sr_seed) {
  const StateArgs states{state0, state1, state2, state3};
  require_cuda(segments);
  const c10::cuda::CUDAGuard guard(segments.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const std::string name(optimizer.data(), optimizer.size());
  with_policy(name, [&](auto policy) {
    dispatch_step<decltype(policy)>(
        name.c_str(), segments, param_dtype, states, seg_steps, seg_scalars, chunks, hyper, schedule, schedule_step,
        options, maximize, grad_scale, found_inf, master_param, sr_seed,
        [&](auto kernel, const AdvanceArgs& args) {
          if (args.n == 0) {
            return;
          }
          const int64_t blocks = std::min<int64_t>(kAdvanceMaxBlocks, ceil_div(args.n, kThreads));
          kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        },
        [&](auto kernel, auto args, int vec) { launch_update(kernel, args, vec, stream); });
  });
}

at::Tensor grad_sumsq_cuda(const at::Tensor& segments, at::ScalarType param_dtype, const at::Tensor& chunks) {
  require_cuda(segments);
  const c10::cuda::CUDAGuard guard(segments.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  return grad_sumsq_with(segments, param_dtype, chunks, resident_blocks,
                         [&](auto kernel, int64_t blocks, const StepArgs& args, double* partials) {
                           kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args, partials);
                           C10_CUDA_KERNEL_LAUNCH_CHECK();
                         });
}

// fusedclr::grad_zero_ on CUDA: one launch over the bucket's chunk table,
// reading the device segment table [note: zeroing through the table].
void grad_zero_cuda(const at::Tensor& segments, at::ScalarType param_dtype, const at::Tensor& chunks) {
  require_cuda(segments);
  const c10::cuda::CUDAGuard guard(segments.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  grad_zero_with(segments, param_dtype, chunks, resident_blocks,
                 [&](auto kernel, int64_t blocks, const StepArgs& args) {
                   kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
                   C10_CUDA_KERNEL_LAUNCH_CHECK();
                 });
}

at::Tensor schedule_eval_cuda(const at::Tensor& schedule, const at::Tensor& schedule_step) {
  TORCH_CHECK(schedule.is_cuda(), "fusedclr: schedule must be a CUDA tensor for the CUDA kernel, got ",
              schedule.device());
  TORCH_CHECK(schedule.scalar_type() == at::kDouble && schedule.is_contiguous() &&
                  schedule.numel() >= sched::HEADER_WORDS,
              "fusedclr: schedule must be a contiguous float64 descriptor of at least ", sched::HEADER_WORDS,
              " words, got ", schedule.scalar_type(), " of shape ", schedule.sizes());
  check_on(schedule_step, "schedule_step", schedule.device());
  TORCH_CHECK(schedule_step.scalar_type() == at::kLong && schedule_step.numel() == 1,
              "fusedclr: schedule_step must be an int64 scalar tensor, got ", schedule_step.scalar_type(),
              " of shape ", schedule_step.sizes());
  const c10::cuda::CUDAGuard guard(schedule.device());
  at::Tensor out = at::empty({4}, schedule.options());
  schedule_eval_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(
      schedule.data_ptr<double>(), schedule_step.data_ptr<int64_t>(), out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fusedclr, CUDA, m) {
  m.impl("step_", &cuda::step_cuda);
  m.impl("schedule_eval", &cuda::schedule_eval_cuda);
  m.impl("grad_sumsq", &cuda::grad_sumsq_cuda);
  m.impl("grad_zero_", &cuda::grad_zero_cuda);
}

}  // namespace fusedclr
