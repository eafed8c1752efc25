// The optimizer math policy: what one optimizer contributes to a step.
//
// [note: math policies]
// A step has two halves. The walk, which every optimizer shares and each
// backend implements once (csrc/cpu/optim_cpu.cpp, csrc/cuda/optim_kernels.cuh,
// fusedclr/triton/_walk.py, fusedclr/reference.py): validate, advance the step
// counters, evaluate the schedule, visit every chunk of every active segment,
// load the parameter (through the master under master weights), the unscaled
// and sign-adjusted gradient and the states into registers, and store them back
// (rounding the parameter as the precision opt-ins say). And the policy, one
// struct per optimizer (csrc/include/fusedclr/optimizers/*.h): registers only.
// This is ATen's split of a fused optimizer into its math (adam_math), its
// functor (loads and stores) and multi_tensor_apply (walk and launch).
//
// A policy is a struct with:
//
//   kStates            the number of flat state buffers (at most 4), in the
//                      order of the op's state0..state3 (csrc/ops.cpp) and
//                      of the Python class (_KERNEL_STATES, [note:
//                      optimizer entry])
//   kOptions           the number of float options (the op's `options`)
//   kVariants          compile-time variants: each flag that must not cost a
//                      branch in the inner loop is a bit of the variant
//   variant(opt, has)  host: the variant for these options and given states
//   uses_state<V>(s)   whether variant V reads and writes state s
//   Scalars<T>         what one segment's update needs, in the math type T
//   scalars<T>(opt, group, step, seg_scalar)
//                      a segment's Scalars from the options, the group values
//                      (lr and momentum/beta1 after the schedule) and its step
//   refine<V>(k, fn)   calls fn(integral_constant<V'>) with the variant this
//                      segment runs: a value that only the schedule knows
//                      (SGD's momentum may reach 0) picks a leaner one
//   skip(k)            the segment has nothing to do this step (Lookahead
//                      between synchronisations): nothing is loaded or stored
//   update<V, FMA>(p, g, s, k)
//                      one element: parameter, gradient (already divided by
//                      grad_scale and negated under maximize), states
//   kUsesGrad          whether update reads the gradient (Lookahead does not)
//   kAdvancesSteps     whether the op advances the step counters (Lookahead
//                      reads the ones its inner optimizer advanced)
//   kSegmentScalar     a float64 per-segment scalar state (NAdam's
//                      mu_product), updated by advance() when the segment's
//                      step advances, before scalars() reads it
//   check_options(name, opt)
//                      host: rejects options the update cannot honour
//                      (Lookahead's k < 1), with an error naming them
//
// PolicyBase holds the defaults. Everything is C10_HOST_DEVICE: the CPU loops,
// the CUDA kernels and their host emulation instantiate the same code.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>

namespace fusedclr {

constexpr int kMaxStates = 4;
constexpr int kMaxOptions = 8;

// Values of one step that every segment of a bucket shares: the learning rate
// and the momentum (SGD, RMSprop) or beta1 (the Adam family, Lion), each from
// the schedule or the group.
struct GroupValues {
  double lr;
  double momentum;
};

template <int V>
using Variant = std::integral_constant<int, V>;

struct PolicyBase {
  static constexpr bool kUsesGrad = true;
  static constexpr bool kAdvancesSteps = true;
  static constexpr bool kSegmentScalar = false;

  template <int V, typename K, typename Fn>
  C10_HOST_DEVICE static C10_ALWAYS_INLINE void refine(const K&, Fn&& fn) {
    fn(Variant<V>{});
  }

  template <typename K>
  C10_HOST_DEVICE static C10_ALWAYS_INLINE bool skip(const K&) {
    return false;
  }

  C10_HOST_DEVICE static C10_ALWAYS_INLINE void advance(double&, int64_t, const double*, const GroupValues&) {}

  static void check_options(const char*, const double*) {}
};

// Runs fn(Variant<v>{}) for a runtime v in [0, N).
template <int N, int I = 0, typename Fn>
C10_ALWAYS_INLINE void switch_variant(int v, Fn&& fn) {
  if constexpr (I < N) {
    if (v == I) {
      fn(Variant<I>{});
    } else {
      switch_variant<N, I + 1>(v, fn);
    }
  }
}

}  // namespace fusedclr
