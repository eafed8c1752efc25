// Adagrad (lr_decay, initial_accumulator_value), as torch.optim.Adagrad
// [note: math policies]. Options: lr_decay, weight_decay, eps. State: sum
// (its initial value is set when the state is created, on the host).
#pragma once

#include <fusedclr/policy.h>
#include <fusedclr/update.h>

namespace fusedclr {

struct Adagrad : PolicyBase {
  static constexpr int kStates = 1;
  static constexpr int kOptions = 3;
  enum : int { kWd = 1 };
  static constexpr int kVariants = 2;

  static int variant(const double* opt, const bool*) {
    return opt[1] != 0.0 ? kWd : 0;
  }
  template <int V>
  static constexpr bool uses_state(int) {
    return true;
  }

  template <typename T>
  struct Scalars {
    T clr;  // lr / (1 + (step - 1) * lr_decay)
    T weight_decay;
    T eps;
  };

  template <typename T>
  C10_HOST_DEVICE static Scalars<T> scalars(const double* opt, const GroupValues& gv, int64_t step, double) {
    Scalars<T> k;
    k.clr = static_cast<T>(gv.lr / (1.0 + static_cast<double>(step - 1) * opt[0]));
    k.weight_decay = static_cast<T>(opt[1]);
    k.eps = static_cast<T>(opt[2]);
    return k;
  }

  template <int V, bool FMA, typename T>
  C10_HOST_DEVICE static C10_ALWAYS_INLINE void update(T& p, T g, T (&s)[kStates], const Scalars<T>& k) {
    if constexpr ((V & kWd) != 0) {
      g = mul_add<FMA>(p, k.weight_decay, g);
    }
    s[0] = mul_add<FMA>(g, g, s[0]);  // state_sum.addcmul_(grad, grad, value=1)
    const T std = sqrt_t(s[0]) + k.eps;
    p = p + -k.clr * g / std;  // param.addcdiv_(grad, std, value=-clr)
  }
};

}  // namespace fusedclr
