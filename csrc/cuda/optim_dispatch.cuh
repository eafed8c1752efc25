// Host side shared by optim_cuda.cu and the kernels' host emulation
// (tests/cuda_emulation.cpp): the kernels' argument blocks from the op's
// tensors, and the choice of one kernel instantiation from the runtime dtypes
// and flags. `launch(kernel, args, vec)` runs it: a CUDA launch in
// optim_cuda.cu, every (block, thread) in turn on the CPU in the emulation.
// Validation: checked_step_args and the callers' check_states / check_precision (fusedclr/checks.h).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>

#include <fusedclr/checks.h>

#include "optim_kernels.cuh"

#include <optional>

namespace fusedclr {
namespace cuda {
namespace {

inline DeviceScalar device_scalar(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) {
    return DeviceScalar{nullptr, false};
  }
  return DeviceScalar{t->data_ptr(), t->scalar_type() == at::kDouble};
}

// Elements a chunk covers at most on GPUs (fusedclr/optim/_flat.py's chunk
// size), for sizing the split of a launch without states.
constexpr int64_t kNominalChunk = 8192;

inline StepArgs make_step_args(const at::Tensor& segments, const at::Tensor& chunks, int64_t state_numel,
                               const at::Tensor& seg_steps, const at::Tensor& hyper, const at::Tensor& schedule,
                               const at::Tensor& schedule_step, const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf, bool maximize) {
  StepArgs a{};
  a.segments = segments.data_ptr<int64_t>();
  a.n_segments = segments.size(0);
  a.chunks = chunks.data_ptr<int64_t>();
  a.n_chunks = chunks.size(0);
  a.parts = 1;
  a.numel = state_numel >= 0 ? state_numel : a.n_chunks * kNominalChunk;
  a.state_numel = state_numel;
  a.seg_steps = seg_steps.data_ptr<int64_t>();
  a.hyper = hyper.data_ptr<double>();
  a.schedule = schedule.data_ptr<double>();
  a.schedule_step = schedule_step.data_ptr<int64_t>();
  a.grad_scale = device_scalar(grad_scale);
  a.found_inf = device_scalar(found_inf);
  a.maximize = maximize;
  return a;
}

// The per-step checks every op shares (checks.h), then the argument block.
inline StepArgs checked_step_args(const at::Tensor& segments, at::ScalarType param_dtype, const at::Tensor& chunks,
                                  int64_t state_numel, const at::Tensor& seg_steps, const at::Tensor& hyper,
                                  const at::Tensor& schedule, const at::Tensor& schedule_step,
                                  const std::optional<at::Tensor>& grad_scale,
                                  const std::optional<at::Tensor>& found_inf, bool maximize) {
  check_segments(segments, param_dtype, chunks);
  check_step(segments, seg_steps, hyper, schedule, schedule_step, grad_scale, found_inf);
  return make_step_args(segments, chunks, state_numel, seg_steps, hyper, schedule, schedule_step, grad_scale,
                        found_inf, maximize);
}

template <typename Launch>
void dispatch_adam(at::ScalarType param_dtype, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
                   const StepArgs& step, at::ScalarType state_dtype, double beta2, double eps, double weight_decay,
                   bool decoupled, const std::optional<at::Tensor>& master_param, std::optional<int64_t> sr_seed,
                   Launch&& launch) {
  const bool amsgrad = max_exp_avg_sq.has_value();
  const bool has_wd = weight_decay != 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param_dtype, "fusedclr::adam_step_", [&] {
    using param_t = scalar_t;
    FUSEDCLR_BOOL_SWITCH(state_dtype == at::kBFloat16, BF16_STATE, [&] {
      using state_t = state_type<param_t, BF16_STATE>;
      AdamArgs<param_t, state_t> a{};
      a.step = step;
      a.exp_avg = static_cast<state_t*>(exp_avg.data_ptr());
      a.exp_avg_sq = static_cast<state_t*>(exp_avg_sq.data_ptr());
      a.max_exp_avg_sq = amsgrad ? static_cast<state_t*>(max_exp_avg_sq->data_ptr()) : nullptr;
      a.master = master_param.has_value() ? master_param->data_ptr<float>() : nullptr;
      a.sr_seed = sr_seed.value_or(0);
      a.beta2 = beta2;
      a.eps = eps;
      a.weight_decay = weight_decay;
      constexpr int vec = vec_width<param_t, state_t>();
      switch_write<param_t>(master_param.has_value(), sr_seed.has_value(), [&](auto mode) {
        constexpr ParamWrite W = decltype(mode)::value;
        FUSEDCLR_BOOL_SWITCH(has_wd, HAS_WD, [&] {
          FUSEDCLR_BOOL_SWITCH(decoupled, DECOUPLED, [&] {
            FUSEDCLR_BOOL_SWITCH(amsgrad, AMSGRAD, [&] {
              // Decoupled without weight decay is plain Adam: one kernel for both.
              launch(adam_kernel<param_t, state_t, W, HAS_WD, HAS_WD && DECOUPLED, AMSGRAD>, a, vec);
            });
          });
        });
      });
    });
  });
}

template <typename Launch>
void dispatch_sgd(at::ScalarType param_dtype, const std::optional<at::Tensor>& momentum_buffer,
                  const StepArgs& step, at::ScalarType state_dtype, double dampening, double weight_decay,
                  bool nesterov, const std::optional<at::Tensor>& master_param, std::optional<int64_t> sr_seed,
                  Launch&& launch) {
  const bool has_buf = momentum_buffer.has_value();
  const bool has_wd = weight_decay != 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param_dtype, "fusedclr::sgd_step_", [&] {
    using param_t = scalar_t;
    FUSEDCLR_BOOL_SWITCH(has_buf, HAS_BUF, [&] {
      // Without a buffer the state type is moot: one kernel per param dtype.
      FUSEDCLR_BOOL_SWITCH(HAS_BUF && state_dtype == at::kBFloat16, BF16_STATE, [&] {
        constexpr bool kBf16State = HAS_BUF && BF16_STATE;
        using state_t = state_type<param_t, kBf16State>;
        SgdArgs<param_t, state_t> a{};
        a.step = step;
        a.momentum_buffer = HAS_BUF ? static_cast<state_t*>(momentum_buffer->data_ptr()) : nullptr;
        a.master = master_param.has_value() ? master_param->data_ptr<float>() : nullptr;
        a.sr_seed = sr_seed.value_or(0);
        a.dampening = dampening;
        a.weight_decay = weight_decay;
        constexpr int vec = vec_width<param_t, state_t>();
        switch_write<param_t>(master_param.has_value(), sr_seed.has_value(), [&](auto mode) {
          constexpr ParamWrite W = decltype(mode)::value;
          FUSEDCLR_BOOL_SWITCH(has_wd, HAS_WD, [&] {
            FUSEDCLR_BOOL_SWITCH(nesterov, NESTEROV, [&] {
              launch(sgd_kernel<param_t, state_t, W, HAS_BUF, HAS_WD, HAS_BUF && NESTEROV>, a, vec);
            });
          });
        });
      });
    });
  });
}

}  // namespace
}  // namespace cuda
}  // namespace fusedclr

namespace fusedclr {
namespace cuda {
namespace {

// grad_sumsq [note: fused clipping]: one launch of per-thread partials, summed
// by one deterministic reduction. `resident(kernel)` gives the blocks the
// device holds at once; `launch(kernel, blocks, args, partials)` runs it.
template <typename Resident, typename Launch>
at::Tensor grad_sumsq_with(const at::Tensor& segments, at::ScalarType param_dtype, const at::Tensor& chunks,
                           Resident&& resident, Launch&& launch) {
  check_segments(segments, param_dtype, chunks);
  StepArgs s{};
  s.segments = segments.data_ptr<int64_t>();
  s.n_segments = segments.size(0);
  s.chunks = chunks.data_ptr<int64_t>();
  s.n_chunks = chunks.size(0);
  s.numel = s.n_chunks * kNominalChunk;
  s.state_numel = -1;
  at::Tensor partials;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param_dtype, "fusedclr::grad_sumsq", [&] {
    const auto kernel = grad_sumsq_kernel<scalar_t>;
    const LaunchPlan plan =
        plan_launch(std::max<int64_t>(s.n_chunks, 1), s.numel, 1, resident(reinterpret_cast<const void*>(kernel)));
    s.parts = plan.parts;
    partials = at::empty({plan.blocks * kThreads}, segments.options().dtype(at::kDouble));
    launch(kernel, plan.blocks, s, partials.data_ptr<double>());
  });
  return partials.sum();
}

}  // namespace
}  // namespace cuda
}  // namespace fusedclr
