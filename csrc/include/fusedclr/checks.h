// Host-side validation of the flat buffers, shared by the CPU and CUDA ops so
// both reject the same inputs with the same messages. Host only (ATen).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <utility>

namespace fusedclr {

inline void check_flat(const at::Tensor& t, const char* name, const at::Tensor& param) {
  TORCH_CHECK(t.device() == param.device(), "fusedclr: ", name, " must be on ", param.device(),
              " with the parameters, got ", t.device(), "; move it with .to(param.device)");
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "fusedclr: ", name,
              " must be a contiguous 1-D flat buffer, got shape ", t.sizes(), " with strides ", t.strides());
  TORCH_CHECK(t.numel() == param.numel(), "fusedclr: ", name, " has ", t.numel(),
              " elements, the parameter buffer has ", param.numel());
}

// States are kept in the math type (float for fp32/bf16/fp16 parameters,
// double for fp64); bf16 parameters may also keep bf16 states [note: precision
// opt-ins]. All states of one call share one dtype, which is returned.
inline at::ScalarType check_states(const at::Tensor& param,
                                   std::initializer_list<std::pair<const at::Tensor*, const char*>> states) {
  const at::ScalarType math = param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::ScalarType first = states.begin()->first->scalar_type();
  for (const auto& [t, name] : states) {
    check_flat(*t, name, param);
    const at::ScalarType dt = t->scalar_type();
    TORCH_CHECK(dt == math || (dt == at::kBFloat16 && param.scalar_type() == at::kBFloat16), "fusedclr: ", name,
                " must be ", math, param.scalar_type() == at::kBFloat16 ? " or BFloat16" : "", " for ",
                param.scalar_type(), " parameters, got ", dt);
    TORCH_CHECK(dt == first, "fusedclr: ", name, " is ", dt, " but ", states.begin()->second, " is ", first,
                "; keep every state of a bucket in one dtype");
  }
  return first;
}

// The parameter dtype, master_param and sr_seed [note: precision opt-ins]. Every
// op calls this before anything moves (the step counters advance before the
// update's dtype dispatch), so a parameter dtype no kernel handles changes nothing.
inline void check_precision(const at::Tensor& param, const std::optional<at::Tensor>& master_param,
                            const std::optional<int64_t>& sr_seed) {
  const at::ScalarType dt = param.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "fusedclr: param has dtype ", dt, "; the kernels update Float, Double, Half and BFloat16 parameters");
  if (master_param.has_value()) {
    TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf, "fusedclr: master_param is for BFloat16 or Half parameters, "
                "got ", dt, " parameters; pass master_param=None");
    check_flat(*master_param, "master_param", param);
    TORCH_CHECK(master_param->scalar_type() == at::kFloat, "fusedclr: master_param must be Float, got ",
                master_param->scalar_type());
  }
  if (sr_seed.has_value()) {
    TORCH_CHECK(dt == at::kBFloat16, "fusedclr: sr_seed (stochastic rounding) is for BFloat16 parameters, got ", dt,
                " parameters; pass sr_seed=None");
    TORCH_CHECK(!master_param.has_value(), "fusedclr: pass master_param or sr_seed, not both: with master weights "
                "the parameter is the master rounded to nearest");
  }
}

}  // namespace fusedclr
