// CPU kernels of the fusedclr ops: one pass over a bucket's flat buffers,
// multi-threaded over the chunk table with at::parallel_for, inner loops that
// the compiler vectorizes (the per-element math is branch-free: the options are
// template parameters). See csrc/ops.cpp for the contract.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <fusedclr/checks.h>
#include <fusedclr/optimizers.h>
#include <fusedclr/policy.h>
#include <fusedclr/precision.h>
#include <fusedclr/schedule.h>
#include <fusedclr/segments.h>
#include <fusedclr/switch.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace fusedclr {
namespace {

// Elements one at::parallel_for task should cover; below this the threading
// overhead (~µs) outweighs the work.
constexpr int64_t kGrainElements = 32768;


// Bookkeeping of a step once its arguments are checked: found_inf, the
// schedule's values, the step counters (advanced before use, as torch's
// step_t += 1; a segment without a gradient is inactive [note: segment
// table]) and the policy's per-segment scalars. Returns whether the step runs.
struct StepSetup {
  GroupValues group;
  double grad_scale;
  bool skip;
};

template <typename Policy>
StepSetup begin_step(const at::Tensor& segments, const at::Tensor& seg_steps,
                     const std::optional<at::Tensor>& seg_scalars, const at::Tensor& hyper,
                     const at::Tensor& schedule, const at::Tensor& schedule_step, const double* options,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  StepSetup s{{0.0, 0.0}, 1.0, false};
  if (found_inf.has_value()) {
    s.skip = found_inf->item<double>() != 0.0;
  }
  if (grad_scale.has_value()) {
    s.grad_scale = grad_scale->item<double>();
  }
  const auto v = sched::evaluate(schedule.data_ptr<double>(), schedule_step.item<int64_t>());
  const double* h = hyper.data_ptr<double>();
  s.group.lr = v.has_lr ? v.lr : h[0];
  s.group.momentum = v.has_momentum ? v.momentum : h[1];
  if (s.skip || !Policy::kAdvancesSteps) {
    return s;
  }
  int64_t* steps = seg_steps.data_ptr<int64_t>();
  double* scalars = seg_scalars.has_value() ? seg_scalars->data_ptr<double>() : nullptr;
  const int64_t* table = segments.data_ptr<int64_t>();
  const int64_t n = seg_steps.numel();
  for (int64_t i = 0; i < n; ++i) {
    if (seg::active(table, i)) {
      steps[i] += 1;
      if constexpr (Policy::kSegmentScalar) {
        Policy::advance(scalars[i], steps[i], options, s.group);
      }
    }
  }
  return s;
}

// Checks every chunk row against the table and against `state_numel` (the
// states' length, -1 without states). Every op calls it before anything moves.
void check_chunk_rows(const at::Tensor& segments, const at::Tensor& chunks, int64_t state_numel) {
  const int64_t n = chunks.size(0);
  const int64_t* c = chunks.data_ptr<int64_t>();
  const int64_t* table = segments.data_ptr<int64_t>();
  const int64_t n_segments = segments.size(0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t seg = c[3 * i], begin = c[3 * i + 1], end = c[3 * i + 2];
    TORCH_CHECK(seg >= 0 && seg < n_segments, "fusedclr: chunk ", i, " names segment ", seg, " of ", n_segments);
    const int64_t* row = table + seg * seg::WORDS;
    TORCH_CHECK(row[seg::OFFSET] <= begin && begin <= end && end <= row[seg::OFFSET] + row[seg::NUMEL] &&
                    (state_numel < 0 || end <= state_numel),
                "fusedclr: chunk ", i, " [", begin, ", ", end, ") lies outside segment ", seg, " [",
                row[seg::OFFSET], ", ", row[seg::OFFSET] + row[seg::NUMEL], ") or the state buffers (", state_numel,
                " elements)");
  }
}

// [note: chunk prefetch]
// The parameters and gradients that the table points at are wherever the
// model and autograd allocated them: for many small tensors, a few cache
// lines here and a few there, between other objects, which the hardware
// prefetchers (trained by runs of sequential lines) do not fetch ahead. The
// flat states stream as usual. So before its chunk i, a task prefetches the
// first kPrefetchBytes of the parameter and the gradient of chunk
// i + kPrefetchAhead, whose misses then overlap the current chunk's work.
// For large chunks it is a hint of a few lines that the hardware prefetcher
// would soon have issued. Prefetches never fault, so a stale address costs
// nothing. Measured on the 2-vCPU development machine, AdamW over 10000
// separate 64-element fp32 tensors with every gradient replaced and the
// caches flushed, one thread, five alternating runs: the kernel took 1.22-1.31
// ms without it and 0.82-0.99 ms with it (2 to 6 chunks ahead measured
// alike); 2000 x 1024 and 20 x 1M were unchanged within the noise.
constexpr int64_t kPrefetchAhead = 3;
constexpr int64_t kPrefetchBytes = 1024;

// Bytes per element of the segments' parameters and gradients that a walk
// reads or writes (0: it does not touch that column).
struct Touches {
  int64_t param = 0;
  int64_t grad = 0;
};

// Always inlined: a function that only prefetches reads as side-effect free
// to GCC's interprocedural analysis, which then deletes its calls.
template <int Write>
C10_ALWAYS_INLINE void prefetch_lines(int64_t addr, int64_t bytes) {
  const auto end = static_cast<uintptr_t>(addr + bytes);
  for (auto a = static_cast<uintptr_t>(addr) & ~uintptr_t{63}; a < end; a += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(a), Write);
  }
}

// Prefetches chunk row `c` ([segment, begin, end]) of the table [note: chunk prefetch].
C10_ALWAYS_INLINE void prefetch_chunk(const int64_t* c, const int64_t* table, Touches t) {
  const int64_t* row = table + c[0] * seg::WORDS;
  if (!seg::active(table, c[0])) {
    return;
  }
  const int64_t at = c[1] - row[seg::OFFSET];
  const int64_t n = c[2] - c[1];
  if (t.param != 0) {
    prefetch_lines<1>(row[seg::PARAM] + at * t.param, std::min(n * t.param, kPrefetchBytes));
  }
  if (t.grad != 0) {
    prefetch_lines<0>(row[seg::GRAD] + at * t.grad, std::min(n * t.grad, kPrefetchBytes));
  }
}

// Runs fn(chunk, segment, begin, end, row, cache) over every chunk of an
// active segment, in parallel (`row`: the segment's table row; the rows were
// checked by check_chunk_rows); small chunks are batched so each task has
// ~kGrainElements, and each task gets its own scalar cache. `touches` says
// what to prefetch [note: chunk prefetch].
template <typename Cache, typename Fn>
void for_each_chunk(const at::Tensor& segments, const at::Tensor& chunks, Touches touches, Fn fn) {
  const int64_t n = chunks.size(0);
  if (n == 0) {
    return;
  }
  const int64_t* c = chunks.data_ptr<int64_t>();
  const int64_t* table = segments.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    total += c[3 * i + 2] - c[3 * i + 1];
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElements * n / std::max<int64_t>(total, 1));
  at::parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
    Cache cache;
    for (int64_t i = lo; i < std::min(hi, lo + kPrefetchAhead); ++i) {
      prefetch_chunk(c + 3 * i, table, touches);
    }
    for (int64_t i = lo; i < hi; ++i) {
      if (i + kPrefetchAhead < hi) {
        prefetch_chunk(c + 3 * (i + kPrefetchAhead), table, touches);
      }
      const int64_t seg = c[3 * i];
      if (!seg::active(table, seg)) {
        continue;
      }
      fn(i, seg, c[3 * i + 1], c[3 * i + 2], table + seg * seg::WORDS, cache);
    }
  });
}

// [note: CPU instruction sets]
// The loops below are plain C++ that GCC/Clang vectorize. Built for baseline
// x86-64 they get 128-bit SSE vectors, which leaves the sqrt/div-heavy Adam
// update compute-bound at ~6 GB/s per core; torch's own fused CPU kernels use
// AVX-512 where present. So each loop is compiled three times (baseline,
// AVX2+FMA, AVX-512) through target attributes and the widest one the CPU
// supports is picked once at run time. Measured on this 2-core AVX-512 box,
// 25.6M-element fp32 AdamW, 1 thread: 125 ms (SSE) vs torch fused 52 ms.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FUSEDCLR_X86_MULTIVERSION 1
#define FUSEDCLR_ALWAYS_INLINE __attribute__((always_inline)) inline
#define FUSEDCLR_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FUSEDCLR_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,prefer-vector-width=512")))
#else
#define FUSEDCLR_ALWAYS_INLINE inline
#endif

enum class Isa { kBase, kAvx2, kAvx512 };

// FUSEDCLR_CPU_ISA=base|avx2|avx512 caps the instruction set (for comparisons
// and for ruling the vector loops out when debugging), as ATEN_CPU_CAPABILITY
// does for torch's kernels.
Isa detect_isa() {
#ifdef FUSEDCLR_X86_MULTIVERSION
  const char* cap = std::getenv("FUSEDCLR_CPU_ISA");
  const std::string want = cap == nullptr ? "" : cap;
  __builtin_cpu_init();
  if (want == "base") {
    return Isa::kBase;
  }
  if (want == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2 : Isa::kBase;
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kBase;
}

const Isa kIsa = detect_isa();

// [note: CPU loops]
// Each update is a Loop struct whose static run() walks [begin, end) of the
// flat buffers; run_loop<Loop> calls it through a function compiled for the
// widest instruction set the CPU has [note: CPU instruction sets]. P is the
// parameter type, S the state type (the math type, or bf16 [note: precision
// opt-ins]), W how the parameter is written; `master` is read only under
// ParamWrite::kMaster and `key` only under kStochastic.
// Whether the baseline build has FMA instructions: torch's lerp is fused
// where the vectors have one [note: rounding as torch].
#if defined(__FMA__) || defined(__aarch64__)
constexpr bool kBaseFma = true;
#else
constexpr bool kBaseFma = false;
#endif

template <typename Loop, typename... A>
void run_base(A... a) {
  Loop::template run<kBaseFma>(a...);
}
#ifdef FUSEDCLR_X86_MULTIVERSION
template <typename Loop, typename... A>
FUSEDCLR_TARGET_AVX2 void run_avx2(A... a) {
  Loop::template run<true>(a...);
}
template <typename Loop, typename... A>
FUSEDCLR_TARGET_AVX512 void run_avx512(A... a) {
  Loop::template run<true>(a...);
}
#endif
template <typename Loop, typename... A>
void run_loop(A... a) {
#ifdef FUSEDCLR_X86_MULTIVERSION
  if (kIsa == Isa::kAvx512) {
    return run_avx512<Loop>(a...);
  }
  if (kIsa == Isa::kAvx2) {
    return run_avx2<Loop>(a...);
  }
#endif
  run_base<Loop>(a...);
}

// One optimizer's update over [begin, end) of a segment [note: math
// policies]: the parameter (through the master under kMaster), the gradient
// divided by grad_scale and negated under maximize (the division only with a
// scale, a loop-invariant test the compiler unswitches), the states the
// variant uses, the policy's update, and the stores. s0..s3 are the state
// buffers (unused ones null), restrict-qualified one by one so the loop
// vectorizes.
template <typename Policy, int V, typename P, typename S, ParamWrite W>
struct PolicyLoop {
  using T = at::opmath_type<P>;
  using K = typename Policy::template Scalars<T>;

  template <int J>
  static constexpr bool uses() {
    return J < Policy::kStates && Policy::template uses_state<V>(J);
  }

  // The grad_scale test is taken out of the loop by hand: GCC kept it in, and
  // the loop scalar, for bf16 and fp16 parameters [note: vectorized conversions].
  template <bool FMA>
  static FUSEDCLR_ALWAYS_INLINE void run(P* __restrict__ p, const P* __restrict__ g, S* __restrict__ s0,
                                         S* __restrict__ s1, S* __restrict__ s2, S* __restrict__ s3,
                                         float* __restrict__ master, int64_t begin, int64_t end, const K* k,
                                         bool scaled, T grad_scale, T grad_sign, uint32_t key) {
    if (scaled) {
      walk<FMA, true>(p, g, s0, s1, s2, s3, master, begin, end, k, grad_scale, grad_sign, key);
    } else {
      walk<FMA, false>(p, g, s0, s1, s2, s3, master, begin, end, k, grad_scale, grad_sign, key);
    }
  }

  template <bool FMA, bool SCALED>
  static FUSEDCLR_ALWAYS_INLINE void walk(P* __restrict__ p, const P* __restrict__ g, S* __restrict__ s0,
                                          S* __restrict__ s1, S* __restrict__ s2, S* __restrict__ s3,
                                          float* __restrict__ master, int64_t begin, int64_t end, const K* k,
                                          T grad_scale, T grad_sign, uint32_t key) {
    float no_master = 0;
    for (int64_t i = begin; i < end; ++i) {
      float& mst = W == ParamWrite::kMaster ? master[i] : no_master;
      T pi = read_param<W, T>(p[i], mst);
      T gi = T(0);
      if constexpr (Policy::kUsesGrad) {
        gi = from_storage<T>(g[i]);
        gi = SCALED ? gi / grad_scale * grad_sign : gi * grad_sign;
      }
      T s[Policy::kStates];
      if constexpr (uses<0>()) s[0] = from_storage<T>(s0[i]);
      if constexpr (uses<1>()) s[1] = from_storage<T>(s1[i]);
      if constexpr (uses<2>()) s[2] = from_storage<T>(s2[i]);
      if constexpr (uses<3>()) s[3] = from_storage<T>(s3[i]);
      Policy::template update<V, FMA>(pi, gi, s, *k);
      p[i] = write_param<W, P>(pi, mst, key, i);
      if constexpr (uses<0>()) s0[i] = to_storage<S>(s[0]);
      if constexpr (uses<1>()) s1[i] = to_storage<S>(s[1]);
      if constexpr (uses<2>()) s2[i] = to_storage<S>(s[2]);
      if constexpr (uses<3>()) s3[i] = to_storage<S>(s[3]);
    }
  }
};

// fusedclr::step_ on the CPU for optimizer `Policy` (csrc/ops.cpp [note: step contract]).
template <typename Policy>
void step_policy(const char* name, const at::Tensor& segments, at::ScalarType param_dtype,
                 const StateArgs& states, const at::Tensor& seg_steps,
                 const std::optional<at::Tensor>& seg_scalars, const at::Tensor& chunks, const at::Tensor& hyper,
                 const at::Tensor& schedule, const at::Tensor& schedule_step, c10::ArrayRef<double> options,
                 bool maximize, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& master_param,
                 std::optional<int64_t> sr_seed) {
  const StepCall call = check_step_call<Policy>(name, segments, param_dtype, states, seg_steps, seg_scalars, chunks,
                                                hyper, schedule, schedule_step, options, grad_scale, found_inf,
                                                master_param, sr_seed);
  check_chunk_rows(segments, chunks, call.state_numel);
  const double* opt = options.data();
  const StepSetup s = begin_step<Policy>(segments, seg_steps, seg_scalars, hyper, schedule, schedule_step, opt,
                                         grad_scale, found_inf);
  if (s.skip) {
    return;
  }
  const int64_t* steps = seg_steps.data_ptr<int64_t>();
  const double* seg_scalar = seg_scalars.has_value() ? seg_scalars->data_ptr<double>() : nullptr;
  const int64_t seed = sr_seed.value_or(0);
  float* master = master_param.has_value() ? master_param->data_ptr<float>() : nullptr;
  void* state_ptr[kMaxStates] = {nullptr, nullptr, nullptr, nullptr};
  for (int j = 0; j < Policy::kStates; ++j) {
    if (call.has_state[j]) {
      state_ptr[j] = states[j]->data_ptr();
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param_dtype, "fusedclr::step_", [&] {
    using P = scalar_t;
    using T = at::opmath_type<P>;
    using K = typename Policy::template Scalars<T>;
    struct Cache {  // per-task memo of the last segment's scalars
      int64_t step = -1;
      double seg_scalar = 0.0;
      K k{};
      uint32_t key = 0;
    };
    const T scale = static_cast<T>(s.grad_scale);
    const T grad_sign = maximize ? T(-1) : T(1);
    const bool scaled = grad_scale.has_value();
    FUSEDCLR_BOOL_SWITCH(call.state_dtype == at::kBFloat16, BF16_STATE, [&] {
      using S = std::conditional_t<BF16_STATE && std::is_same_v<P, c10::BFloat16>, c10::BFloat16, T>;
      S* st[kMaxStates];
      for (int j = 0; j < kMaxStates; ++j) {
        st[j] = static_cast<S*>(state_ptr[j]);
      }
      switch_write<P>(master != nullptr, sr_seed.has_value(), [&](auto mode) {
        constexpr ParamWrite W = decltype(mode)::value;
        switch_variant<Policy::kVariants>(call.variant, [&](auto variant) {
          constexpr int V = decltype(variant)::value;
          constexpr int64_t kGradBytes = Policy::kUsesGrad ? sizeof(P) : 0;
          for_each_chunk<Cache>(segments, chunks, Touches{sizeof(P), kGradBytes},
                                [&](int64_t, int64_t seg, int64_t begin, int64_t end, const int64_t* row, Cache& c) {
            // Segments usually share one step count: recompute the scalars only when it changes.
            const double scalar = seg_scalar != nullptr ? seg_scalar[seg] : 0.0;
            if (c.step != steps[seg] || c.seg_scalar != scalar) {
              c.step = steps[seg];
              c.seg_scalar = scalar;
              c.k = Policy::template scalars<T>(opt, s.group, c.step, scalar);
              c.key = rounding_key(seed, c.step);
            }
            if (Policy::skip(c.k)) {
              return;
            }
            P* p = seg::segment_base<P>(row[seg::PARAM], row[seg::OFFSET]);
            const P* g = seg::segment_base<P>(row[seg::GRAD], row[seg::OFFSET]);
            Policy::template refine<V>(c.k, [&](auto refined) {
              constexpr int R = decltype(refined)::value;
              run_loop<PolicyLoop<Policy, R, P, S, W>>(p, g, st[0], st[1], st[2], st[3], master, begin, end, &c.k,
                                                       scaled, scale, grad_sign, c.key);
            });
          });
        });
      });
    });
  });
}

void step_cpu(c10::string_view optimizer, const at::Tensor& segments, at::ScalarType param_dtype,
              const std::optional<at::Tensor>& state0, const std::optional<at::Tensor>& state1,
              const std::optional<at::Tensor>& state2, const std::optional<at::Tensor>& state3,
              const at::Tensor& seg_steps, const std::optional<at::Tensor>& seg_scalars, const at::Tensor& chunks,
              const at::Tensor& hyper,
              const at::Tensor& schedule, const at::Tensor& schedule_step, c10::ArrayRef<double> options,
              bool maximize, const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
              const std::optional<at::Tensor>& master_param, std::optional<int64_t> sr_seed) {
  const StateArgs states{state0, state1, state2, state3};
  TORCH_CHECK(segments.device().is_cpu(), "fusedclr: segments must be a CPU tensor for the CPU kernel, got ",
              segments.device());
  const std::string name(optimizer.data(), optimizer.size());
  with_policy(name, [&](auto policy) {
    step_policy<decltype(policy)>(name.c_str(), segments, param_dtype, states, seg_steps, seg_scalars, chunks, hyper,
                                  schedule, schedule_step, options, maximize, grad_scale, found_inf, master_param,
                                  sr_seed);
  });
}

// Runs fn(chunk, grad, begin, end) over every chunk of an active segment, in
// parallel, with `grad` the segment's gradient as a scalar_t pointer shifted
// to state coordinates [note: segment table]: the walk of the ops that only
// touch the gradients (grad_sumsq, grad_zero_), after their checks (which
// leave no dtype for the dispatch to refuse).
template <typename Fn>
void for_each_grad_chunk(const at::Tensor& segments, at::ScalarType param_dtype, const at::Tensor& chunks, Fn fn) {
  TORCH_CHECK(segments.device().is_cpu(), "fusedclr: segments must be a CPU tensor for the CPU kernel, got ",
              segments.device());
  check_segments(segments, param_dtype, chunks);
  check_chunk_rows(segments, chunks, -1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param_dtype, "fusedclr::for_each_grad_chunk", [&] {
    struct NoCache {};
    for_each_chunk<NoCache>(segments, chunks, Touches{0, sizeof(scalar_t)},
                            [&](int64_t chunk, int64_t, int64_t begin, int64_t end, const int64_t* row, NoCache&) {
      fn(chunk, seg::segment_base<scalar_t>(row[seg::GRAD], row[seg::OFFSET]), begin, end);
    });
  });
}

// Sum of squares of g[begin, end) in float64 into *out, through the widest
// instruction set [note: CPU instruction sets]. kLanes independent sums, added
// in a fixed order at the end: one running sum is a chain of dependent adds
// that the compiler may not reorder (no -ffast-math). 4 x 4M elements, one
// thread, dev machine: 14.4 ms (fp32) and 16.4 ms (bf16) with one sum, 2.1-2.3
// and 3.4-4.0 ms with 64 lanes, where torch's foreach norm takes 2.2-2.7 and 1.9.
template <typename P>
struct SumSquaresLoop {
  template <bool FMA>
  static FUSEDCLR_ALWAYS_INLINE void run(const P* __restrict__ g, int64_t begin, int64_t end, double* out) {
    using T = at::opmath_type<P>;
    constexpr int64_t kLanes = 64;
    double lane[kLanes] = {};
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const double x = static_cast<double>(from_storage<T>(g[i + l]));
        lane[l] += x * x;
      }
    }
    for (; i < end; ++i) {
      const double x = static_cast<double>(from_storage<T>(g[i]));
      lane[0] += x * x;
    }
    double acc = 0;
    for (int64_t l = 0; l < kLanes; ++l) {
      acc += lane[l];
    }
    *out = acc;
  }
};

// Sum of squares of every active segment's gradient, in float64: the global
// gradient norm's share of one bucket [note: fused clipping] (a reduction over
// the table, no copy). Per-chunk partial sums added in chunk order, so the
// result does not depend on the number of threads.
at::Tensor grad_sumsq_cpu(const at::Tensor& segments, at::ScalarType param_dtype, const at::Tensor& chunks) {
  std::vector<double> partial(chunks.size(0), 0.0);
  for_each_grad_chunk(segments, param_dtype, chunks,
                      [&](int64_t chunk, const auto* g, int64_t begin, int64_t end) {
    using P = std::remove_cv_t<std::remove_pointer_t<decltype(g)>>;
    run_loop<SumSquaresLoop<P>>(g, begin, end, &partial[chunk]);
  });
  double total = 0.0;
  for (double x : partial) {
    total += x;
  }
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble));
}

// Zeroes every active segment's gradient [note: zeroing through the table]:
// all-zero bytes are +0 in every float format, as zero_() writes.
void grad_zero_cpu(const at::Tensor& segments, at::ScalarType param_dtype, const at::Tensor& chunks) {
  for_each_grad_chunk(segments, param_dtype, chunks,
                      [](int64_t, auto* g, int64_t begin, int64_t end) {
    std::memset(static_cast<void*>(g + begin), 0, static_cast<size_t>(end - begin) * sizeof(*g));
  });
}

at::Tensor schedule_eval_cpu(const at::Tensor& schedule, const at::Tensor& schedule_step) {
  TORCH_CHECK(schedule.scalar_type() == at::kDouble && schedule.is_contiguous() && schedule.numel() >= 4,
              "fusedclr: schedule must be a contiguous float64 descriptor");
  TORCH_CHECK(schedule_step.scalar_type() == at::kLong && schedule_step.numel() == 1,
              "fusedclr: schedule_step must be an int64 scalar tensor");
  const auto v = sched::evaluate(schedule.data_ptr<double>(), schedule_step.item<int64_t>());
  auto out = at::empty({4}, schedule.options());
  double* o = out.data_ptr<double>();
  o[0] = v.lr;
  o[1] = v.momentum;
  o[2] = v.has_lr ? 1.0 : 0.0;
  o[3] = v.has_momentum ? 1.0 : 0.0;
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclr, CPU, m) {
  m.impl("step_", &step_cpu);
  m.impl("schedule_eval", &schedule_eval_cpu);
  m.impl("grad_sumsq", &grad_sumsq_cpu);
  m.impl("grad_zero_", &grad_zero_cpu);
}

}  // namespace fusedclr
