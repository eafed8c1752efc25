// Operator schemas of the fusedclr library. Always compiled; each device's
// kernels register with TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda, and
// fusedclr/ops.py registers a fake (meta) kernel for every op.
//
// [note: flat-buffer step contract]
// param, grad and the state tensors are 1-D flat buffers of one (param group,
// device, dtype) bucket. `chunks` is an int64 [n, 3] table of (segment, begin,
// end) element ranges covering the buffer; a segment is one parameter (padded).
// `seg_steps` (int64 [n_segments]) is each segment's step count; a step first
// increments it for every active segment (`active`: uint8/bool [n_segments],
// absent = all active) and then uses the new value. `hyper` is float64
// [lr, momentum-or-beta1] for whatever the schedule does not provide;
// `schedule` is the float64 descriptor (csrc/include/fusedclr/schedule.h)
// evaluated at the int64 0-dim `schedule_step`. With `found_inf` non-zero the
// op changes nothing at all; `grad_scale` divides the grads in-kernel.
#include <torch/library.h>

TORCH_LIBRARY(fusedclr, m) {
  m.def(
      "sgd_step_(Tensor(a!) param, Tensor grad, Tensor(b!)? momentum_buffer, Tensor(c!) seg_steps, "
      "Tensor chunks, Tensor? active, Tensor hyper, Tensor schedule, Tensor schedule_step, "
      "float dampening, float weight_decay, bool nesterov, bool maximize, "
      "Tensor? grad_scale, Tensor? found_inf) -> ()");
  m.def(
      "adam_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!)? max_exp_avg_sq, Tensor(e!) seg_steps, Tensor chunks, Tensor? active, "
      "Tensor hyper, Tensor schedule, Tensor schedule_step, float beta2, float eps, "
      "float weight_decay, bool decoupled, bool maximize, Tensor? grad_scale, Tensor? found_inf) -> ()");
  // [lr, momentum, has_lr, has_momentum] as float64 [4]: the kernels' own
  // evaluator, exposed so tests compare it with reference.schedule_value.
  m.def("schedule_eval(Tensor schedule, Tensor schedule_step) -> Tensor");
}

// `import fusedclr._C` loads this library, whose static initialisers register
// the ops above; the module itself is empty.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
