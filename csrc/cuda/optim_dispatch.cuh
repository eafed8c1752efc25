// Host side shared by optim_cuda.cu and the kernels' host emulation
// (tests/cuda_emulation.cpp): the kernels' argument blocks from the op's
// tensors, and the choice of one kernel instantiation from the runtime dtypes
// and flags. `launch(kernel, args, vec)` runs it: a CUDA launch in
// optim_cuda.cu, every (block, thread) in turn on the CPU in the emulation.
// Validation: check_step_call (fusedclr/checks.h), shared with the CPU op.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>

#include <fusedclr/checks.h>
#include <fusedclr/optimizers.h>

#include "optim_kernels.cuh"

#include <algorithm>
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

// The advance launch's arguments [note: step counters on CUDA].
inline AdvanceArgs make_advance_args(const at::Tensor& seg_steps, const StepArgs& s,
                                     const std::optional<at::Tensor>& seg_scalars, c10::ArrayRef<double> options) {
  AdvanceArgs a{};
  a.seg_steps = seg_steps.data_ptr<int64_t>();
  a.segments = s.segments;
  a.found_inf = s.found_inf;
  a.n = s.n_segments;
  a.seg_scalars = seg_scalars.has_value() ? seg_scalars->data_ptr<double>() : nullptr;
  std::copy(options.begin(), options.end(), a.options);
  a.hyper = s.hyper;
  a.schedule = s.schedule;
  a.schedule_step = s.schedule_step;
  return a;
}

// One step of optimizer Policy, checked (checks.h check_step_call, the one
// check of every backend): `advance(kernel, args)` runs the step counters'
// launch (policies that advance them), then `launch(kernel, args, vec)` the
// update, the kernel instantiation picked from the runtime dtypes, write mode
// and the policy's variant [note: math policies].
template <typename Policy, typename Advance, typename Launch>
void dispatch_step(const char* name, const at::Tensor& segments, at::ScalarType param_dtype,
                   const StateArgs& states, const at::Tensor& seg_steps,
                   const std::optional<at::Tensor>& seg_scalars, const at::Tensor& chunks, const at::Tensor& hyper,
                   const at::Tensor& schedule, const at::Tensor& schedule_step, c10::ArrayRef<double> options,
                   bool maximize, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& master_param,
                   std::optional<int64_t> sr_seed, Advance&& advance, Launch&& launch) {
  const StepCall call = check_step_call<Policy>(name, segments, param_dtype, states, seg_steps, seg_scalars, chunks,
                                                hyper, schedule, schedule_step, options, grad_scale, found_inf,
                                                master_param, sr_seed);
  const StepArgs step = make_step_args(segments, chunks, call.state_numel, seg_steps, hyper, schedule, schedule_step,
                                       grad_scale, found_inf, maximize);
  if constexpr (Policy::kAdvancesSteps) {
    advance(advance_steps_kernel<Policy>, make_advance_args(seg_steps, step, seg_scalars, options));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param_dtype, "fusedclr::step_", [&] {
    using param_t = scalar_t;
    FUSEDCLR_BOOL_SWITCH(call.state_dtype == at::kBFloat16, BF16_STATE, [&] {
      using state_t = state_type<param_t, BF16_STATE>;
      UpdateArgs<state_t> a{};
      a.step = step;
      for (int j = 0; j < Policy::kStates; ++j) {
        a.states[j] = call.has_state[j] ? static_cast<state_t*>(states[j]->data_ptr()) : nullptr;
      }
      a.master = master_param.has_value() ? master_param->data_ptr<float>() : nullptr;
      a.sr_seed = sr_seed.value_or(0);
      a.seg_scalars = seg_scalars.has_value() ? seg_scalars->data_ptr<double>() : nullptr;
      std::copy(options.begin(), options.end(), a.options);
      constexpr int vec = vec_width<param_t, state_t>();
      switch_write<param_t>(master_param.has_value(), sr_seed.has_value(), [&](auto mode) {
        constexpr ParamWrite W = decltype(mode)::value;
        switch_variant<Policy::kVariants>(call.variant, [&](auto variant) {
          constexpr int V = decltype(variant)::value;
          launch(update_kernel<Policy, V, param_t, state_t, W>, a, vec);
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

// The argument block of the ops that only walk the gradients (grad_sumsq,
// grad_zero_), checked as every backend checks them (check_segments).
inline StepArgs grad_walk_args(const at::Tensor& segments, at::ScalarType param_dtype, const at::Tensor& chunks) {
  check_segments(segments, param_dtype, chunks);
  StepArgs s{};
  s.segments = segments.data_ptr<int64_t>();
  s.n_segments = segments.size(0);
  s.chunks = chunks.data_ptr<int64_t>();
  s.n_chunks = chunks.size(0);
  s.numel = s.n_chunks * kNominalChunk;
  s.state_numel = -1;
  return s;
}

// grad_sumsq [note: fused clipping]: one launch of per-thread partials, summed
// by one deterministic reduction. `resident(kernel)` gives the blocks the
// device holds at once; `launch(kernel, blocks, args, partials)` runs it.
template <typename Resident, typename Launch>
at::Tensor grad_sumsq_with(const at::Tensor& segments, at::ScalarType param_dtype, const at::Tensor& chunks,
                           Resident&& resident, Launch&& launch) {
  StepArgs s = grad_walk_args(segments, param_dtype, chunks);
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

// grad_zero_ [note: zeroing through the table]: one launch over the chunk
// table, none when it is empty. `launch(kernel, blocks, args)` runs it.
template <typename Resident, typename Launch>
void grad_zero_with(const at::Tensor& segments, at::ScalarType param_dtype, const at::Tensor& chunks,
                    Resident&& resident, Launch&& launch) {
  StepArgs s = grad_walk_args(segments, param_dtype, chunks);
  if (s.n_chunks == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param_dtype, "fusedclr::grad_zero_", [&] {
    const auto kernel = grad_zero_kernel<scalar_t>;
    constexpr int vec = kPackBytes / sizeof(scalar_t);
    const LaunchPlan plan = plan_launch(s.n_chunks, s.numel, vec, resident(reinterpret_cast<const void*>(kernel)));
    s.parts = plan.parts;
    launch(kernel, plan.blocks, s);
  });
}

}  // namespace
}  // namespace cuda
}  // namespace fusedclr
