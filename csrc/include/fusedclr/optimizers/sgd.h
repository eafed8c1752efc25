// SGD with momentum, dampening and Nesterov, as torch.optim.SGD [note: math policies].
// Options: dampening, weight_decay, nesterov. State: momentum_buffer (absent
// without momentum). The group momentum may come from a schedule.
#pragma once

#include <fusedclr/policy.h>
#include <fusedclr/update.h>

namespace fusedclr {

struct Sgd : PolicyBase {
  static constexpr int kStates = 1;
  static constexpr int kOptions = 3;
  enum : int { kWd = 1, kBuf = 2, kNesterov = 4 };
  static constexpr int kVariants = 8;

  static int variant(const double* opt, const bool* has_state) {
    const bool buf = has_state[0];
    return (opt[1] != 0.0 ? kWd : 0) | (buf ? kBuf : 0) | (buf && opt[2] != 0.0 ? kNesterov : 0);
  }
  template <int V>
  static constexpr bool uses_state(int) {
    return (V & kBuf) != 0;
  }

  template <typename T>
  struct Scalars {
    T lr;
    T momentum;
    T one_minus_dampening;  // computed in double, as torch does
    T weight_decay;
    bool first;         // the segment's first step with momentum: buffer = grad
    bool use_momentum;  // torch takes the momentum path only when momentum != 0
  };

  template <typename T>
  C10_HOST_DEVICE static Scalars<T> scalars(const double* opt, const GroupValues& gv, int64_t step, double) {
    Scalars<T> k;
    k.lr = static_cast<T>(gv.lr);
    k.momentum = static_cast<T>(gv.momentum);
    k.one_minus_dampening = static_cast<T>(1.0 - opt[0]);
    k.weight_decay = static_cast<T>(opt[1]);
    k.first = step <= 1;
    k.use_momentum = gv.momentum != 0.0;
    return k;
  }

  // A schedule may move the momentum to 0: that step runs without the buffer.
  template <int V, typename K, typename Fn>
  C10_HOST_DEVICE static C10_ALWAYS_INLINE void refine(const K& k, Fn&& fn) {
    if constexpr ((V & kBuf) != 0) {
      if (!k.use_momentum) {
        fn(Variant<V & kWd>{});
        return;
      }
    }
    fn(Variant<V>{});
  }

  template <int V, bool FMA, typename T>
  C10_HOST_DEVICE static C10_ALWAYS_INLINE void update(T& p, T g, T (&s)[kStates], const Scalars<T>& k) {
    if constexpr ((V & kWd) != 0) {
      g = mul_add<FMA>(p, k.weight_decay, g);  // grad.add(param, alpha=weight_decay)
    }
    if constexpr ((V & kBuf) != 0) {
      // buf.mul_(momentum).add_(grad, alpha=1 - dampening); grad.add(buf, alpha=momentum)
      s[0] = pick(k.first, g, mul_add<FMA>(g, k.one_minus_dampening, s[0] * k.momentum));
      g = (V & kNesterov) != 0 ? mul_add<FMA>(s[0], k.momentum, g) : s[0];
    }
    p = mul_add<FMA>(g, -k.lr, p);  // param.add_(grad, alpha=-lr)
  }
};

}  // namespace fusedclr
