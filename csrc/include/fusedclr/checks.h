// Host-side validation of an update op's arguments, shared by the CPU op, the
// CUDA op and the CUDA kernels' host emulation, so every backend rejects the
// same inputs with the same messages before anything moves. Host only (ATen);
// reads metadata, never device memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <c10/util/ArrayRef.h>

#include <fusedclr/policy.h>
#include <fusedclr/schedule.h>
#include <fusedclr/segments.h>

#include <array>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>

namespace fusedclr {

inline void check_on(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "fusedclr: ", name, " must be on ", device, " with the bucket's segment table, got ",
              t.device(), "; move it with .to(", device, ")");
}

inline at::ScalarType math_type(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The segment table, the chunk table and the parameter dtype [note: segment
// table]. The parameter dtype is checked first: the step counters advance
// before the update's dtype dispatch, so a dtype no kernel handles must change
// nothing.
inline void check_segments(const at::Tensor& segments, at::ScalarType param_dtype, const at::Tensor& chunks) {
  TORCH_CHECK(param_dtype == at::kFloat || param_dtype == at::kDouble || param_dtype == at::kHalf ||
                  param_dtype == at::kBFloat16,
              "fusedclr: param_dtype is ", param_dtype,
              "; the kernels update Float, Double, Half and BFloat16 parameters (complex ones as their real view)");
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.dim() == 2 && segments.size(1) == seg::WORDS &&
                  segments.is_contiguous(),
              "fusedclr: segments must be a contiguous int64 [n, ", seg::WORDS,
              "] table (param address, grad address, state offset, numel), got ", segments.scalar_type(),
              " of shape ", segments.sizes());
  check_on(chunks, "chunks", segments.device());
  TORCH_CHECK(chunks.scalar_type() == at::kLong && chunks.dim() == 2 && chunks.size(1) == 3 && chunks.is_contiguous(),
              "fusedclr: chunks must be a contiguous int64 [n, 3] table (segment, begin, end), got ",
              chunks.scalar_type(), " of shape ", chunks.sizes());
}

// A flat state buffer of the bucket: 1-D, contiguous, on the table's device.
inline void check_flat(const at::Tensor& t, const char* name, const at::Device& device, int64_t numel) {
  check_on(t, name, device);
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "fusedclr: ", name,
              " must be a contiguous 1-D flat buffer, got shape ", t.sizes(), " with strides ", t.strides());
  TORCH_CHECK(t.numel() == numel, "fusedclr: ", name, " has ", t.numel(), " elements, the bucket's other flat buffers ",
              numel);
}

// States are kept in the math type (float for fp32/bf16/fp16 parameters,
// double for fp64); bf16 parameters may also keep bf16 states [note: precision
// opt-ins]. All states of one call share one dtype and one length, which the
// chunk rows must stay within (check_step_call below).

// master_param and sr_seed [note: precision opt-ins].
// `numel`: the length of the call's state buffers, or -1 without states.
inline void check_precision(at::ScalarType param_dtype, const at::Device& device, int64_t numel,
                            const std::optional<at::Tensor>& master_param, const std::optional<int64_t>& sr_seed) {
  if (master_param.has_value()) {
    TORCH_CHECK(param_dtype == at::kBFloat16 || param_dtype == at::kHalf,
                "fusedclr: master_param is for BFloat16 or Half parameters, got ", param_dtype,
                " parameters; pass master_param=None");
    check_flat(*master_param, "master_param", device, numel < 0 ? master_param->numel() : numel);
    TORCH_CHECK(master_param->scalar_type() == at::kFloat, "fusedclr: master_param must be Float, got ",
                master_param->scalar_type());
  }
  if (sr_seed.has_value()) {
    TORCH_CHECK(param_dtype == at::kBFloat16, "fusedclr: sr_seed (stochastic rounding) is for BFloat16 parameters, got ",
                param_dtype, " parameters; pass sr_seed=None");
    TORCH_CHECK(!master_param.has_value(), "fusedclr: pass master_param or sr_seed, not both: with master weights "
                "the parameter is the master rounded to nearest");
  }
}

// The per-step arguments every update op takes: step counters, lr/momentum,
// schedule and GradScaler's tensors, all on the table's device.
inline void check_step(const at::Tensor& segments, const at::Tensor& seg_steps, const at::Tensor& hyper,
                       const at::Tensor& schedule, const at::Tensor& schedule_step,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const at::Device dev = segments.device();
  check_on(seg_steps, "seg_steps", dev);
  TORCH_CHECK(seg_steps.scalar_type() == at::kLong && seg_steps.dim() == 1 && seg_steps.is_contiguous() &&
                  seg_steps.numel() == segments.size(0),
              "fusedclr: seg_steps must be a contiguous int64 1-D tensor with one step per segment (",
              segments.size(0), "), got ", seg_steps.scalar_type(), " of shape ", seg_steps.sizes());
  check_on(hyper, "hyper", dev);
  TORCH_CHECK(hyper.scalar_type() == at::kDouble && hyper.numel() == 2 && hyper.is_contiguous(),
              "fusedclr: hyper must be a contiguous float64 [2] tensor (lr, momentum-or-beta1), got ",
              hyper.scalar_type(), " of shape ", hyper.sizes());
  check_on(schedule, "schedule", dev);
  TORCH_CHECK(schedule.scalar_type() == at::kDouble && schedule.is_contiguous() &&
                  schedule.numel() >= sched::HEADER_WORDS,
              "fusedclr: schedule must be a contiguous float64 descriptor of at least ", sched::HEADER_WORDS,
              " words, got ", schedule.scalar_type(), " of shape ", schedule.sizes());
  check_on(schedule_step, "schedule_step", dev);
  TORCH_CHECK(schedule_step.scalar_type() == at::kLong && schedule_step.numel() == 1,
              "fusedclr: schedule_step must be an int64 scalar tensor, got ", schedule_step.scalar_type(),
              " of shape ", schedule_step.sizes());
  for (const auto& [t, name] : {std::pair{&grad_scale, "grad_scale"}, std::pair{&found_inf, "found_inf"}}) {
    if (t->has_value()) {
      check_on(**t, name, dev);
      TORCH_CHECK(((*t)->scalar_type() == at::kFloat || (*t)->scalar_type() == at::kDouble) && (*t)->numel() == 1,
                  "fusedclr: ", name, " must be a float32 or float64 tensor with one element (GradScaler's), got ",
                  (*t)->scalar_type(), " of shape ", (*t)->sizes());
    }
  }
}

// An update op's state buffers: the schema's state0..state3, each None where
// the optimizer's options leave it out (csrc/ops.cpp [note: step contract]).
// Four optional arguments rather than one list of optional tensors: torch's
// functionalization (torch.compile with aot_eager or inductor) does not handle
// a None inside a mutable tensor list.
using StateArgs = std::array<std::optional<at::Tensor>, kMaxStates>;

// What check_step_call learned about a valid call.
struct StepCall {
  at::ScalarType state_dtype;  // of every given state (the parameter dtype when there is none)
  int64_t state_numel;         // length of the flat buffers; -1 when the call has none
  bool has_state[kMaxStates];
  int variant;  // the policy's compile-time variant [note: math policies]
};

// Every argument of an update op (csrc/ops.cpp [note: step contract]), for
// optimizer `Policy`: one check that the CPU op, the CUDA op and the CUDA
// host emulation share, so every backend rejects the same inputs with the
// same messages before anything moves.
template <typename Policy>
StepCall check_step_call(const char* optimizer, const at::Tensor& segments, at::ScalarType param_dtype,
                         const StateArgs& states, const at::Tensor& seg_steps,
                         const std::optional<at::Tensor>& seg_scalars, const at::Tensor& chunks,
                         const at::Tensor& hyper, const at::Tensor& schedule, const at::Tensor& schedule_step,
                         c10::ArrayRef<double> options, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& master_param,
                         const std::optional<int64_t>& sr_seed) {
  check_segments(segments, param_dtype, chunks);
  check_step(segments, seg_steps, hyper, schedule, schedule_step, grad_scale, found_inf);
  const at::Device dev = segments.device();
  for (int i = Policy::kStates; i < kMaxStates; ++i) {
    TORCH_CHECK(!states[i].has_value(), "fusedclr: ", optimizer, " takes ", Policy::kStates,
                " state buffers, got state", i);
  }
  TORCH_CHECK(static_cast<int>(options.size()) == Policy::kOptions, "fusedclr: ", optimizer, " takes ",
              Policy::kOptions, " options, got ", options.size());
  Policy::check_options(optimizer, options.data());
  StepCall call{};
  call.state_dtype = param_dtype;
  call.state_numel = -1;
  int first = -1;
  const at::ScalarType math = math_type(param_dtype);
  for (int i = 0; i < Policy::kStates; ++i) {
    const std::optional<at::Tensor>& t = states[i];
    call.has_state[i] = t.has_value();
    if (!t.has_value()) {
      continue;
    }
    const std::string name = "state" + std::to_string(i);
    check_flat(*t, name.c_str(), dev, first < 0 ? t->numel() : call.state_numel);
    const at::ScalarType dt = t->scalar_type();
    TORCH_CHECK(dt == math || (dt == at::kBFloat16 && param_dtype == at::kBFloat16), "fusedclr: ", name, " must be ",
                math, param_dtype == at::kBFloat16 ? " or BFloat16" : "", " for ", param_dtype, " parameters, got ",
                dt);
    if (first < 0) {
      first = i;
      call.state_dtype = dt;
      call.state_numel = t->numel();
    }
    TORCH_CHECK(dt == call.state_dtype, "fusedclr: ", name, " is ", dt, " but state", first, " is ", call.state_dtype,
                "; keep every state of a bucket in one dtype");
  }
  if (call.state_numel < 0 && master_param.has_value()) {
    call.state_numel = master_param->numel();
  }
  check_precision(param_dtype, dev, call.state_numel, master_param, sr_seed);
  if constexpr (Policy::kSegmentScalar) {
    TORCH_CHECK(seg_scalars.has_value(), "fusedclr: ", optimizer, " keeps a per-segment scalar: pass seg_scalars");
    check_on(*seg_scalars, "seg_scalars", dev);
    TORCH_CHECK(seg_scalars->scalar_type() == at::kDouble && seg_scalars->dim() == 1 &&
                    seg_scalars->is_contiguous() && seg_scalars->numel() == segments.size(0),
                "fusedclr: seg_scalars must be a contiguous float64 1-D tensor with one value per segment (",
                segments.size(0), "), got ", seg_scalars->scalar_type(), " of shape ", seg_scalars->sizes());
  } else {
    TORCH_CHECK(!seg_scalars.has_value(), "fusedclr: ", optimizer,
                " keeps no per-segment scalar: pass seg_scalars=None");
  }
  call.variant = Policy::variant(options.data(), call.has_state);
  // The states this variant reads and writes must be there (the options decide which may be None).
  switch_variant<Policy::kVariants>(call.variant, [&](auto variant) {
    constexpr int V = decltype(variant)::value;
    for (int i = 0; i < Policy::kStates; ++i) {
      TORCH_CHECK(!Policy::template uses_state<V>(i) || call.has_state[i], "fusedclr: ", optimizer, " needs state",
                  i, " with these options; pass its flat buffer");
    }
  });
  return call;
}

}  // namespace fusedclr
