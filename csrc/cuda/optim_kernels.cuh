// Device side of the CUDA ops: the argument blocks and the kernels. Kernel
// selection is in optim_dispatch.cuh, validation and launches in optim_cuda.cu;
// tests/cuda_emulation.cpp compiles this header as host C++.
// The kernels use no shared memory, no barriers and no warp shuffles: every
// thread's work depends only on its own indices, which keeps them simple to
// reason about (and lets them run one thread at a time under host emulation).
//
// [note: chunk walk on CUDA]
// The unit of work is a warp, not a block. A *work item* is one part of one
// chunk: the host splits every chunk into `parts` equal pieces (a multiple of
// the vector width, so alignment survives) when there are too few chunks to
// keep every warp of a full-occupancy grid busy, and never below
// kMinPartIters vector iterations per lane (plan_launch). The grid is
// persistent: the number of blocks the device holds at once (occupancy x
// SMs), or fewer when there is less work, and warp w of block b takes items
// b + gridDim.x * w, then strides by all the grid's warps, so neighbouring
// items land on different SMs.
// Per item a warp reads the chunk row, the segment's table row [note: segment
// table] (its parameter and gradient addresses; a zero gradient address marks
// it inactive) and its step,
// and computes the per-item scalars (bias corrections, ...) with the
// optimizer's math policy [note: math policies].
// Every lane computes the same values in lock-step, which costs the warp what
// one thread would and needs neither shared memory nor __syncthreads(). The
// schedule (lr, momentum / beta1) does not depend on the item and is evaluated
// once per warp at kernel start. A warp and not a block per item keeps small
// parameters cheap: a 64-element bias costs one warp iteration instead of
// idling 7/8 of a 256-thread block.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>

#include <fusedclr/policy.h>
#include <fusedclr/precision.h>
#include <fusedclr/schedule.h>
#include <fusedclr/segments.h>

#include "flat_walk.cuh"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fusedclr {
namespace cuda {
namespace {

// Work-item sizing [note: chunk walk on CUDA]: aim for this many items per
// warp of a full grid (balances ragged chunk sizes), but never split a chunk
// below kMinPartIters vector iterations per lane.
constexpr int64_t kItemsPerWorker = 4;
constexpr int64_t kMinPartIters = 4;

// A one-element float32 or float64 device tensor (GradScaler's tensors are
// float32; a scale derived from an fp64 bucket's grad norm is float64).
struct DeviceScalar {
  const void* ptr;  // nullptr: absent
  bool is_double;

  C10_DEVICE double get() const {
    return is_double ? *static_cast<const double*>(ptr) : static_cast<double>(*static_cast<const float*>(ptr));
  }
};

// Segment and chunk tables, counters, schedule and AMP inputs: what both
// optimizers read.
struct StepArgs {
  const int64_t* segments;  // [n_segments, seg::WORDS] [note: segment table]
  int64_t n_segments;
  const int64_t* chunks;  // [n_chunks, 3]: segment, begin, end (state coordinates)
  int64_t n_chunks;
  int64_t parts;  // work items per chunk
  int64_t numel;  // elements the chunks cover, at most (sizes the split)
  int64_t state_numel;  // length of the state buffers; -1 without states
  const int64_t* seg_steps;  // already advanced for this step; null for grad_sumsq and grad_zero_
  const double* hyper;    // [lr, momentum-or-beta1]
  const double* schedule;
  const int64_t* schedule_step;
  DeviceScalar grad_scale;  // absent: 1
  DeviceScalar found_inf;   // absent: never skip
  bool maximize;
};

// The schedule's values and GradScaler's scale: the same for every item.
struct LaunchValues {
  GroupValues group;  // lr and momentum / beta1 [note: math policies]
  double grad_scale;
};

C10_DEVICE inline bool step_skipped(const DeviceScalar& found_inf) {
  return found_inf.ptr != nullptr && found_inf.get() != 0.0;
}

// Not inlined: the evaluator is long (pow, cos, loops) and identical for every
// kernel; one copy keeps ptxas time and code size down.
__device__ __noinline__ LaunchValues launch_values(const double* hyper, const double* schedule,
                                                   const int64_t* schedule_step, DeviceScalar grad_scale) {
  const sched::Value v = sched::evaluate(schedule, *schedule_step);
  LaunchValues g;
  g.group.lr = v.has_lr ? v.lr : hyper[0];
  g.group.momentum = v.has_momentum ? v.momentum : hyper[1];
  g.grad_scale = grad_scale.ptr != nullptr ? grad_scale.get() : 1.0;
  return g;
}

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Runs fn(seg, lo, hi, row) for each work item of this warp whose segment is
// active (`row`: the segment's table row). Reads no step count: the ops that
// only walk the gradients (grad_sumsq, grad_zero_) pass no seg_steps.
template <int VEC, typename Fn>
C10_DEVICE C10_ALWAYS_INLINE void for_each_range(const StepArgs& a, Fn&& fn) {
  const int64_t worker = blockIdx.x + static_cast<int64_t>(gridDim.x) * (threadIdx.x / kWarp);
  const int64_t n_workers = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const int64_t n_items = a.n_chunks * a.parts;
  for (int64_t item = worker; item < n_items; item += n_workers) {
    const int64_t c = item / a.parts;
    const int64_t part = item - c * a.parts;
    const int64_t seg = a.chunks[3 * c];
    const int64_t begin = a.chunks[3 * c + 1];
    const int64_t end = a.chunks[3 * c + 2];
    CUDA_KERNEL_ASSERT_MSG(seg >= 0 && seg < a.n_segments, "fusedclr: chunk table row names no segment");
    const int64_t* row = a.segments + seg * seg::WORDS;
    CUDA_KERNEL_ASSERT_MSG(row[seg::OFFSET] <= begin && begin <= end && end <= row[seg::OFFSET] + row[seg::NUMEL] &&
                               (a.state_numel < 0 || end <= a.state_numel),
                           "fusedclr: chunk table row out of range of its segment or the state buffers");
    const int64_t span = ceil_div(ceil_div(end - begin, a.parts), VEC) * VEC;
    const int64_t lo = begin + part * span;
    const int64_t hi = lo + span < end ? lo + span : end;
    if (lo >= hi || row[seg::GRAD] == 0) {
      continue;
    }
    fn(seg, lo, hi, row);
  }
}

// for_each_range with the segment's (already advanced) step count:
// fn(seg, step, lo, hi, row).
template <int VEC, typename Fn>
C10_DEVICE C10_ALWAYS_INLINE void for_each_item(const StepArgs& a, Fn&& fn) {
  for_each_range<VEC>(a, [&](int64_t seg, int64_t lo, int64_t hi, const int64_t* row) {
    fn(seg, a.seg_steps[seg], lo, hi, row);
  });
}

// N parameters from `param` (and, under kMaster, their masters) as math values
// [note: precision opt-ins]. `master` is scratch for store_param.
template <ParamWrite W, int N, bool V, typename P, typename T>
C10_DEVICE C10_ALWAYS_INLINE void load_param(const P* param, const float* master_src, T (&p)[N],
                                             float (&master)[N]) {
  if constexpr (W == ParamWrite::kMaster) {
    P raw[N];
    load<N, V>(param, raw);
    load<N, V>(master_src, master);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      p[e] = read_param<W, T>(raw[e], master[e]);
    }
  } else {
    load<N, V>(param, p);
  }
}

// Stores N updated math values as parameters of element index i.. (and their
// masters under kMaster).
template <ParamWrite W, int N, bool V, typename P, typename T>
C10_DEVICE C10_ALWAYS_INLINE void store_param(P* param, float* master_dst, const T (&p)[N], float (&master)[N],
                                              uint32_t key, int64_t i) {
  if constexpr (W == ParamWrite::kRound) {
    store<N, V>(param, p);
  } else {
    P out[N];
#pragma unroll
    for (int e = 0; e < N; ++e) {
      out[e] = write_param<W, P>(p[e], master[e], key, i + e);
    }
    store<N, V>(param, out);
    if constexpr (W == ParamWrite::kMaster) {
      store<N, V>(master_dst, master);
    }
  }
}

// The step counters' advance [note: step counters on CUDA] (optim_cuda.cu),
// and the policy's per-segment scalars with them (NAdam's mu_product, which
// needs the schedule's beta1). Grid-stride, so a capped grid covers any
// number of segments.
constexpr int kAdvanceMaxBlocks = 1024;

struct AdvanceArgs {
  int64_t* seg_steps;
  const int64_t* segments;
  DeviceScalar found_inf;
  int64_t n;
  double* seg_scalars;  // policies with kSegmentScalar only
  double options[kMaxOptions];
  const double* hyper;
  const double* schedule;
  const int64_t* schedule_step;
};

template <typename Policy>
__global__ void __launch_bounds__(kThreads) advance_steps_kernel(const AdvanceArgs a) {
  if (step_skipped(a.found_inf)) {
    return;
  }
  GroupValues group{0.0, 0.0};
  if constexpr (Policy::kSegmentScalar) {
    group = launch_values(a.hyper, a.schedule, a.schedule_step, DeviceScalar{nullptr, false}).group;
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < a.n; i += stride) {
    if (seg::active(a.segments, i)) {
      a.seg_steps[i] += 1;
      if constexpr (Policy::kSegmentScalar) {
        Policy::advance(a.seg_scalars[i], a.seg_steps[i], a.options, group);
      }
    }
  }
}

// Sum of squares of the active gradients [note: fused clipping]: each thread
// adds its elements in float64 and writes its own partial (zero when it had no
// work), which the host sums with one deterministic reduction. No atomics, so
// the result does not depend on timing.
template <typename P>
__global__ void __launch_bounds__(kThreads) grad_sumsq_kernel(const StepArgs a, double* partials) {
  using T = at::opmath_type<P>;
  double acc = 0.0;
  for_each_range<1>(a, [&](int64_t, int64_t lo, int64_t hi, const int64_t* row) {
    const P* grad = seg::segment_base<const P>(row[seg::GRAD], row[seg::OFFSET]);
    walk_range<1>(lo, hi, false, [&](int64_t i, auto, auto) {
      const double x = static_cast<double>(static_cast<T>(grad[i]));
      acc += x * x;
    });
  });
  partials[blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x] = acc;
}

// Zeroes the active gradients [note: zeroing through the table]: a 128-bit
// store of zeros per lane where the gradient is 16-byte aligned at the item's
// start, else one element per lane. All-zero bits are +0 in every float
// format, as torch's zero_() writes.
template <typename P>
__global__ void __launch_bounds__(kThreads) grad_zero_kernel(const StepArgs a) {
  constexpr int VEC = kPackBytes / sizeof(P);
  for_each_range<VEC>(a, [&](int64_t, int64_t lo, int64_t hi, const int64_t* row) {
    P* grad = seg::segment_base<P>(row[seg::GRAD], row[seg::OFFSET]);
    walk_range<VEC>(lo, hi, aligned16(grad + lo), [&](int64_t i, auto width, auto vectorized) {
      constexpr int N = decltype(width)::value;
      const float zeros[N] = {};
      store<N, decltype(vectorized)::value>(grad + i, zeros);
    });
  });
}

// Everything an update kernel reads besides StepArgs: the state buffers in
// the policy's order (null where absent), the precision opt-ins, the
// per-segment scalars and the options [note: math policies].
template <typename S>
struct UpdateArgs {
  StepArgs step;
  S* states[kMaxStates];
  float* master;               // ParamWrite::kMaster only [note: precision opt-ins]
  int64_t sr_seed;             // ParamWrite::kStochastic only
  const double* seg_scalars;   // policies with kSegmentScalar only (already advanced)
  double options[kMaxOptions];
};

// One optimizer's update over the chunk table: the generic walk of every
// policy [note: math policies]. The policy's variant V is compile-time;
// refine() may pick a leaner one per item from what only the schedule knows.
template <typename Policy, int V, typename P, typename S, ParamWrite W>
__global__ void __launch_bounds__(kThreads) update_kernel(const UpdateArgs<S> a) {
  using T = at::opmath_type<P>;
  constexpr int VEC = vec_width<P, S>();
  constexpr int NS = Policy::kStates;
  if (step_skipped(a.step.found_inf)) {
    return;
  }
  const LaunchValues lv = launch_values(a.step.hyper, a.step.schedule, a.step.schedule_step, a.step.grad_scale);
  const bool scaled = a.step.grad_scale.ptr != nullptr;
  const T scale = static_cast<T>(lv.grad_scale);
  const T sign = a.step.maximize ? T(-1) : T(1);
  for_each_item<VEC>(a.step, [&](int64_t seg, int64_t step, int64_t lo, int64_t hi, const int64_t* row) {
    const double seg_scalar = Policy::kSegmentScalar ? a.seg_scalars[seg] : 0.0;
    const auto k = Policy::template scalars<T>(a.options, lv.group, step, seg_scalar);
    if (Policy::skip(k)) {
      return;
    }
    P* param = seg::segment_base<P>(row[seg::PARAM], row[seg::OFFSET]);
    const P* grad = seg::segment_base<const P>(row[seg::GRAD], row[seg::OFFSET]);
    const uint32_t key = rounding_key(a.sr_seed, step);
    Policy::template refine<V>(k, [&](auto refined) {
      constexpr int R = decltype(refined)::value;
      bool aligned = aligned16(param + lo) && (!Policy::kUsesGrad || aligned16(grad + lo)) &&
                     (W != ParamWrite::kMaster || aligned16(a.master + lo));
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        aligned = aligned && (!Policy::template uses_state<R>(j) || aligned16(a.states[j] + lo));
      }
      walk_range<VEC>(lo, hi, aligned, [&](int64_t i, auto width, auto vectorized) {
        constexpr int N = decltype(width)::value;
        constexpr bool VZ = decltype(vectorized)::value;
        T p[N], g[N], st[NS][N];
        float master[N];
        load_param<W, N, VZ>(param + i, a.master + i, p, master);
        if constexpr (Policy::kUsesGrad) {
          load<N, VZ>(grad + i, g);
        }
#pragma unroll
        for (int j = 0; j < NS; ++j) {
          if (Policy::template uses_state<R>(j)) {
            load<N, VZ>(a.states[j] + i, st[j]);
          }
        }
#pragma unroll
        for (int e = 0; e < N; ++e) {
          T ge = T(0);
          if constexpr (Policy::kUsesGrad) {
            ge = scaled ? g[e] / scale * sign : g[e] * sign;
          }
          T se[NS];
#pragma unroll
          for (int j = 0; j < NS; ++j) {
            se[j] = Policy::template uses_state<R>(j) ? st[j][e] : T(0);
          }
          Policy::template update<R, true>(p[e], ge, se, k);
#pragma unroll
          for (int j = 0; j < NS; ++j) {
            st[j][e] = se[j];
          }
        }
        store_param<W, N, VZ>(param + i, a.master + i, p, master, key, i);
#pragma unroll
        for (int j = 0; j < NS; ++j) {
          if (Policy::template uses_state<R>(j)) {
            store<N, VZ>(a.states[j] + i, st[j]);
          }
        }
      });
    });
  });
}

__global__ void schedule_eval_kernel(const double* schedule, const int64_t* schedule_step, double* out) {
  const sched::Value v = sched::evaluate(schedule, *schedule_step);
  out[0] = v.lr;
  out[1] = v.momentum;
  out[2] = v.has_lr ? 1.0 : 0.0;
  out[3] = v.has_momentum ? 1.0 : 0.0;
}

// state_t for param_t: the math type, or bf16 for bf16 params with bf16
// states. Other combinations are rejected on the host, so they collapse to
// the math type here and are never instantiated.
template <typename P, bool BF16_STATE>
using state_type =
    std::conditional_t<BF16_STATE && std::is_same_v<P, c10::BFloat16>, c10::BFloat16, at::opmath_type<P>>;

struct LaunchPlan {
  int64_t blocks;
  int64_t parts;
};

// Grid and chunk split for one update launch [note: chunk walk on CUDA].
// `resident`: blocks of the kernel the device holds at once.
inline LaunchPlan plan_launch(int64_t n_chunks, int64_t numel, int vec, int64_t resident) {
  const int64_t workers = resident * kWarpsPerBlock;
  const int64_t want = ceil_div(kItemsPerWorker * workers, n_chunks);
  const int64_t cap = std::max<int64_t>(1, numel / (n_chunks * kMinPartIters * kWarp * vec));
  const int64_t parts = std::clamp<int64_t>(want, 1, cap);
  return LaunchPlan{std::min(resident, ceil_div(n_chunks * parts, kWarpsPerBlock)), parts};
}

}  // namespace
}  // namespace cuda
}  // namespace fusedclr
