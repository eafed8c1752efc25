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
#include <fusedclr/precision.h>
#include <fusedclr/schedule.h>
#include <fusedclr/segments.h>
#include <fusedclr/switch.h>
#include <fusedclr/update.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

namespace fusedclr {
namespace {

// Elements one at::parallel_for task should cover; below this the threading
// overhead (~µs) outweighs the work.
constexpr int64_t kGrainElements = 32768;


// Shared checks and bookkeeping of both optimizers; returns the schedule's
// value and whether the step is skipped (found_inf).
struct StepSetup {
  double lr;
  double momentum;
  double grad_scale;
  bool skip;
};

StepSetup begin_step(const at::Tensor& segments, const at::Tensor& seg_steps, const at::Tensor& hyper,
                     const at::Tensor& schedule, const at::Tensor& schedule_step,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  check_step(segments, seg_steps, hyper, schedule, schedule_step, grad_scale, found_inf);
  StepSetup s{0.0, 0.0, 1.0, false};
  if (found_inf.has_value()) {
    s.skip = found_inf->item<double>() != 0.0;
  }
  if (grad_scale.has_value()) {
    s.grad_scale = grad_scale->item<double>();
  }
  const auto v = sched::evaluate(schedule.data_ptr<double>(), schedule_step.item<int64_t>());
  const double* h = hyper.data_ptr<double>();
  s.lr = v.has_lr ? v.lr : h[0];
  s.momentum = v.has_momentum ? v.momentum : h[1];
  if (s.skip) {
    return s;
  }
  // Steps advance before use, as torch's step_t += 1; a segment without a
  // gradient is inactive [note: segment table].
  int64_t* steps = seg_steps.data_ptr<int64_t>();
  const int64_t* table = segments.data_ptr<int64_t>();
  const int64_t n = seg_steps.numel();
  for (int64_t i = 0; i < n; ++i) {
    steps[i] += seg::active(table, i) ? 1 : 0;
  }
  return s;
}

// Runs fn(chunk, segment, begin, end, row, cache) over every chunk of an active
// segment, in parallel (`row`: the segment's table row); small chunks are
// batched so each task has ~kGrainElements, and each task gets its own scalar
// cache. Rows are checked against the table and against `state_numel` (the
// states' length, -1 without states) before anything is touched.
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

// Runs fn(chunk, segment, begin, end, row, cache) over every chunk of an
// active segment, in parallel (`row`: the segment's table row; the rows were
// checked by check_chunk_rows); small chunks are batched so each task has
// ~kGrainElements, and each task gets its own scalar cache.
template <typename Cache, typename Fn>
void for_each_chunk(const at::Tensor& segments, const at::Tensor& chunks, Fn fn) {
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
    for (int64_t i = lo; i < hi; ++i) {
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

template <typename P, typename S, ParamWrite W, bool HAS_WD, bool DECOUPLED, bool AMSGRAD>
struct AdamLoop {
  using T = at::opmath_type<P>;
  template <bool FMA>
  static FUSEDCLR_ALWAYS_INLINE void run(P* __restrict__ p, const P* __restrict__ g, S* __restrict__ m,
                                         S* __restrict__ v, S* __restrict__ vmax, float* __restrict__ master,
                                         int64_t begin, int64_t end, const AdamScalars<T>* k, uint32_t key) {
    float no_master = 0;
    for (int64_t i = begin; i < end; ++i) {
      float& mst = W == ParamWrite::kMaster ? master[i] : no_master;
      T pi = read_param<W, T>(p[i], mst);
      T mi = static_cast<T>(m[i]);
      T vi = static_cast<T>(v[i]);
      T vmi = AMSGRAD ? static_cast<T>(vmax[i]) : T(0);
      adam_update<HAS_WD, DECOUPLED, AMSGRAD, FMA>(pi, static_cast<T>(g[i]), mi, vi, vmi, *k);
      p[i] = write_param<W, P>(pi, mst, key, i);
      m[i] = static_cast<S>(mi);
      v[i] = static_cast<S>(vi);
      if (AMSGRAD) {
        vmax[i] = static_cast<S>(vmi);
      }
    }
  }
};

void adam_step_cpu(const at::Tensor& segments, at::ScalarType param_dtype, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
                   const at::Tensor& seg_steps, const at::Tensor& chunks, const at::Tensor& hyper,
                   const at::Tensor& schedule, const at::Tensor& schedule_step, double beta2, double eps,
                   double weight_decay, bool decoupled, bool maximize, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& master_param,
                   std::optional<int64_t> sr_seed) {
  TORCH_CHECK(segments.device().is_cpu(), "fusedclr: segments must be a CPU tensor for the CPU kernel, got ",
              segments.device());
  check_segments(segments, param_dtype, chunks);
  const bool amsgrad = max_exp_avg_sq.has_value();
  const at::Device dev = segments.device();
  const at::ScalarType state_dtype =
      amsgrad ? check_states(param_dtype, dev, {{&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"},
                                                {&*max_exp_avg_sq, "max_exp_avg_sq"}})
              : check_states(param_dtype, dev, {{&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}});
  check_precision(param_dtype, dev, exp_avg.numel(), master_param, sr_seed);
  check_chunk_rows(segments, chunks, exp_avg.numel());
  const StepSetup s = begin_step(segments, seg_steps, hyper, schedule, schedule_step, grad_scale, found_inf);
  if (s.skip) {
    return;
  }
  const int64_t* steps = seg_steps.data_ptr<int64_t>();
  const int64_t seed = sr_seed.value_or(0);
  float* master = master_param.has_value() ? master_param->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param_dtype, "fusedclr::adam_step_", [&] {
    using P = scalar_t;
    using T = at::opmath_type<P>;
    struct Cache {  // per-task memo of the last segment's scalars
      int64_t step = -1;
      AdamScalars<T> adam{};
      uint32_t key = 0;
    };
    FUSEDCLR_BOOL_SWITCH(state_dtype == at::kBFloat16, BF16_STATE, [&] {
      using S = std::conditional_t<BF16_STATE && std::is_same_v<P, c10::BFloat16>, c10::BFloat16, T>;
      S* m = static_cast<S*>(exp_avg.data_ptr());
      S* v = static_cast<S*>(exp_avg_sq.data_ptr());
      S* vmax = amsgrad ? static_cast<S*>(max_exp_avg_sq->data_ptr()) : nullptr;
      switch_write<P>(master != nullptr, sr_seed.has_value(), [&](auto mode) {
        constexpr ParamWrite W = decltype(mode)::value;
        FUSEDCLR_BOOL_SWITCH(weight_decay != 0.0, HAS_WD, [&] {
          FUSEDCLR_BOOL_SWITCH(decoupled, DECOUPLED, [&] {
            FUSEDCLR_BOOL_SWITCH(amsgrad, AMSGRAD, [&] {
              for_each_chunk<Cache>(segments, chunks,
                                    [&](int64_t, int64_t seg, int64_t begin, int64_t end, const int64_t* row, Cache& cache) {
                // Segments usually share one step count: recompute the bias corrections only when it changes.
                if (cache.step != steps[seg]) {
                  cache.step = steps[seg];
                  cache.adam = adam_scalars<T>(s.lr, s.momentum, beta2, eps, weight_decay, cache.step,
                                               s.grad_scale, maximize);
                  cache.key = rounding_key(seed, cache.step);
                }
                P* p = seg::segment_base<P>(row[seg::PARAM], row[seg::OFFSET]);
                const P* g = seg::segment_base<P>(row[seg::GRAD], row[seg::OFFSET]);
                run_loop<AdamLoop<P, S, W, HAS_WD, DECOUPLED, AMSGRAD>>(p, g, m, v, vmax, master, begin, end,
                                                                         &cache.adam, cache.key);
              });
            });
          });
        });
      });
    });
  });
}

template <typename P, typename S, ParamWrite W, bool HAS_WD, bool USE_MOMENTUM, bool NESTEROV>
struct SgdLoop {
  using T = at::opmath_type<P>;
  template <bool FMA>
  static FUSEDCLR_ALWAYS_INLINE void run(P* __restrict__ p, const P* __restrict__ g, S* __restrict__ buf,
                                         float* __restrict__ master, int64_t begin, int64_t end,
                                         const SgdScalars<T>* k, uint32_t key) {
    float no_master = 0;
    for (int64_t i = begin; i < end; ++i) {
      float& mst = W == ParamWrite::kMaster ? master[i] : no_master;
      T pi = read_param<W, T>(p[i], mst);
      T b = USE_MOMENTUM ? static_cast<T>(buf[i]) : T(0);
      sgd_update<HAS_WD, USE_MOMENTUM, NESTEROV, FMA>(pi, static_cast<T>(g[i]), b, *k);
      p[i] = write_param<W, P>(pi, mst, key, i);
      if (USE_MOMENTUM) {
        buf[i] = static_cast<S>(b);
      }
    }
  }
};

void sgd_step_cpu(const at::Tensor& segments, at::ScalarType param_dtype,
                  const std::optional<at::Tensor>& momentum_buffer, const at::Tensor& seg_steps,
                  const at::Tensor& chunks, const at::Tensor& hyper, const at::Tensor& schedule,
                  const at::Tensor& schedule_step, double dampening, double weight_decay, bool nesterov,
                  bool maximize, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& master_param,
                  std::optional<int64_t> sr_seed) {
  TORCH_CHECK(segments.device().is_cpu(), "fusedclr: segments must be a CPU tensor for the CPU kernel, got ",
              segments.device());
  check_segments(segments, param_dtype, chunks);
  const at::Device dev = segments.device();
  const at::ScalarType state_dtype = momentum_buffer.has_value()
                                         ? check_states(param_dtype, dev, {{&*momentum_buffer, "momentum_buffer"}})
                                         : param_dtype;
  const int64_t state_numel = state_length(momentum_buffer, master_param);
  check_precision(param_dtype, dev, state_numel, master_param, sr_seed);
  check_chunk_rows(segments, chunks, state_numel);
  const StepSetup s = begin_step(segments, seg_steps, hyper, schedule, schedule_step, grad_scale, found_inf);
  if (s.skip) {
    return;
  }
  const int64_t* steps = seg_steps.data_ptr<int64_t>();
  const int64_t seed = sr_seed.value_or(0);
  float* master = master_param.has_value() ? master_param->data_ptr<float>() : nullptr;
  // torch's SGD takes the momentum path only when momentum != 0 this step.
  const bool use_momentum = momentum_buffer.has_value() && s.momentum != 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param_dtype, "fusedclr::sgd_step_", [&] {
    using P = scalar_t;
    using T = at::opmath_type<P>;
    struct Cache {
      int64_t step = -1;
      SgdScalars<T> sgd{};
      uint32_t key = 0;
    };
    FUSEDCLR_BOOL_SWITCH(use_momentum && state_dtype == at::kBFloat16, BF16_STATE, [&] {
      using S = std::conditional_t<BF16_STATE && std::is_same_v<P, c10::BFloat16>, c10::BFloat16, T>;
      S* buf = use_momentum ? static_cast<S*>(momentum_buffer->data_ptr()) : nullptr;
      switch_write<P>(master != nullptr, sr_seed.has_value(), [&](auto mode) {
        constexpr ParamWrite W = decltype(mode)::value;
        FUSEDCLR_BOOL_SWITCH(weight_decay != 0.0, HAS_WD, [&] {
          FUSEDCLR_BOOL_SWITCH(use_momentum, USE_MOMENTUM, [&] {
            FUSEDCLR_BOOL_SWITCH(nesterov, NESTEROV, [&] {
              for_each_chunk<Cache>(segments, chunks,
                                    [&](int64_t, int64_t seg, int64_t begin, int64_t end, const int64_t* row, Cache& cache) {
                if (cache.step != steps[seg]) {
                  cache.step = steps[seg];
                  cache.sgd = sgd_scalars<T>(s.lr, s.momentum, dampening, weight_decay, cache.step, s.grad_scale,
                                             maximize);
                  cache.key = rounding_key(seed, cache.step);
                }
                P* p = seg::segment_base<P>(row[seg::PARAM], row[seg::OFFSET]);
                const P* g = seg::segment_base<P>(row[seg::GRAD], row[seg::OFFSET]);
                run_loop<SgdLoop<P, S, W, HAS_WD, USE_MOMENTUM, NESTEROV>>(p, g, buf, master, begin, end,
                                                                           &cache.sgd, cache.key);
              });
            });
          });
        });
      });
    });
  });
}

// Sum of squares of every active segment's gradient, in float64: the global
// gradient norm's share of one bucket [note: fused clipping] (a reduction over
// the table, no copy). Per-chunk partial sums added in chunk order, so the
// result does not depend on the number of threads.
at::Tensor grad_sumsq_cpu(const at::Tensor& segments, at::ScalarType param_dtype, const at::Tensor& chunks) {
  TORCH_CHECK(segments.device().is_cpu(), "fusedclr: segments must be a CPU tensor for the CPU kernel, got ",
              segments.device());
  check_segments(segments, param_dtype, chunks);
  check_chunk_rows(segments, chunks, -1);
  std::vector<double> partial(chunks.size(0), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param_dtype, "fusedclr::grad_sumsq", [&] {
    using P = scalar_t;
    using T = at::opmath_type<P>;
    struct NoCache {};
    for_each_chunk<NoCache>(segments, chunks,
                            [&](int64_t chunk, int64_t, int64_t begin, int64_t end, const int64_t* row, NoCache&) {
      const P* g = seg::segment_base<P>(row[seg::GRAD], row[seg::OFFSET]);
      double acc = 0;
      for (int64_t i = begin; i < end; ++i) {
        const double x = static_cast<double>(static_cast<T>(g[i]));
        acc += x * x;
      }
      partial[chunk] = acc;
    });
  });
  double total = 0.0;
  for (double x : partial) {
    total += x;
  }
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble));
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
  m.impl("sgd_step_", &sgd_step_cpu);
  m.impl("adam_step_", &adam_step_cpu);
  m.impl("schedule_eval", &schedule_eval_cpu);
  m.impl("grad_sumsq", &grad_sumsq_cpu);
}

}  // namespace fusedclr
