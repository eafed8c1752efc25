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
// `master_param` (fp32, bf16/fp16 params) and `sr_seed` (bf16 params) are the
// precision opt-ins of csrc/include/fusedclr/precision.h [note: precision
// opt-ins]; bf16 parameters may also pass bf16 state buffers.
#include <torch/library.h>

TORCH_LIBRARY(fusedclr, m) {
  m.def(
      "sgd_step_(Tensor(a!) param, Tensor grad, Tensor(b!)? momentum_buffer, Tensor(c!) seg_steps, "
      "Tensor chunks, Tensor? active, Tensor hyper, Tensor schedule, Tensor schedule_step, "
      "float dampening, float weight_decay, bool nesterov, bool maximize, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor(d!)? master_param=None, int? sr_seed=None) -> ()");
  m.def(
      "adam_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!)? max_exp_avg_sq, Tensor(e!) seg_steps, Tensor chunks, Tensor? active, "
      "Tensor hyper, Tensor schedule, Tensor schedule_step, float beta2, float eps, "
      "float weight_decay, bool decoupled, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor(f!)? master_param=None, int? sr_seed=None) -> ()");
  // [lr, momentum, has_lr, has_momentum] as float64 [4]: the kernels' own
  // evaluator, exposed so tests compare it with reference.schedule_value.
  m.def("schedule_eval(Tensor schedule, Tensor schedule_step) -> Tensor");
}

// `import fusedclr._C` loads this library, whose static initialisers register
// the ops above. The module also carries one host helper for the optimizers'
// step path, grads_are (see below).
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

// grads_are(params, expected) -> bool: whether every params[i].grad is the
// tensor expected[i] (None: no grad). This is the fast-path check of
// fusedclr/optim/_flat.py's Bucket.gather, on the step path of every
// optimizer step, so it is O(parameters) at a few ns each: in Python the .grad
// getters cost ~70-90 ns per parameter (0.9 ms for 10000 parameters, more than
// the update kernel itself). Per parameter it follows pointers only:
// PyObject_TypeCheck rather than THPVariable_Check (an isinstance through the
// metaclass), and TensorImpl::grad() rather than Tensor::grad() (which first
// asks autograd whether the tensor is a leaf). On the 2-vCPU dev machine this
// halved the check: 16 -> 6.7 us for 2000 parameters, 100 -> 50 us for 10000.
PyObject* grads_are(PyObject* /*self*/, PyObject* args) {
  PyObject* params = nullptr;
  PyObject* expected = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &params, &PyList_Type, &expected)) {
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (PyList_GET_SIZE(expected) != n) {
    PyErr_SetString(PyExc_ValueError, "grads_are: params and expected differ in length");
    return nullptr;
  }
  auto* tensor_type = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  if (tensor_type == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "grads_are: torch is not initialised");
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p = PyList_GET_ITEM(params, i);
    PyObject* e = PyList_GET_ITEM(expected, i);
    if (!PyObject_TypeCheck(p, tensor_type) || (e != Py_None && !PyObject_TypeCheck(e, tensor_type))) {
      PyErr_SetString(PyExc_TypeError, "grads_are: expected lists of tensors (or None)");
      return nullptr;
    }
    const at::Tensor& grad = THPVariable_Unpack(p).unsafeGetTensorImpl()->grad();
    const bool same = e == Py_None ? !grad.defined()
                                   : grad.unsafeGetTensorImpl() == THPVariable_Unpack(e).unsafeGetTensorImpl();
    if (!same) {
      Py_RETURN_FALSE;
    }
  }
  Py_RETURN_TRUE;
}

PyMethodDef kMethods[] = {
    {"grads_are", grads_are, METH_VARARGS, "Whether every params[i].grad is expected[i] (None: no grad)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kMethods};
  return PyModule_Create(&module_def);
}
}
