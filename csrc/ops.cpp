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
// the ops above. The module also carries the host helpers of the optimizers'
// step path: the grads check (see below).
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <memory>
#include <vector>

namespace {

// [note: grads check]
// Every optimizer step first asks whether each params[i].grad is still the
// flat-buffer view expected[i] (None: no grad), the fast path of
// fusedclr/optim/_flat.py's Bucket.gather. It is O(parameters), so it follows
// pointers only: in Python the .grad getters cost ~70-90 ns per parameter (0.9
// ms for 10000 parameters, more than the update kernel itself).
// TensorImpl::grad() rather than Tensor::grad() (which first asks autograd
// whether the tensor is a leaf), PyObject_TypeCheck rather than
// THPVariable_Check (an isinstance through the metaclass). A bucket prepares
// its check once (grads_checker: the tensors behind the Python objects, held
// in C++), so a step's check (grads_match) reads two pointers per parameter;
// ops.grads_are is a check prepared and run once.
// For 2000 parameters on the 2-vCPU dev machine: 16 us through
// THPVariable_Check and Tensor::grad(), 7-8 us from the lists, 4.4 us prepared.
inline bool same_grad(const at::Tensor& param, const c10::TensorImpl* expected) {
  const at::Tensor& grad = param.unsafeGetTensorImpl()->grad();
  return expected == nullptr ? !grad.defined() : grad.unsafeGetTensorImpl() == expected;
}

// The tensors of params[i] and expected[i], checked to be tensors (or None for
// expected); false with a Python error set otherwise.
bool unpack_pair(PyObject* p, PyObject* e, const at::Tensor** param, const at::Tensor** expected) {
  auto* tensor_type = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  if (tensor_type == nullptr || !PyObject_TypeCheck(p, tensor_type) ||
      (e != Py_None && !PyObject_TypeCheck(e, tensor_type))) {
    PyErr_SetString(PyExc_TypeError, "grads check: expected lists of tensors (or None)");
    return false;
  }
  *param = &THPVariable_Unpack(p);
  *expected = e == Py_None ? nullptr : &THPVariable_Unpack(e);
  return true;
}

bool parse_lists(PyObject* args, PyObject** params, PyObject** expected) {
  if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, params, &PyList_Type, expected)) {
    return false;
  }
  if (PyList_GET_SIZE(*expected) != PyList_GET_SIZE(*params)) {
    PyErr_SetString(PyExc_ValueError, "grads check: params and expected differ in length");
    return false;
  }
  return true;
}

// A prepared check: borrowed pointers to the parameters' Python objects and to
// the expected grads' TensorImpls (nullptr: no grad). The caller keeps the
// Python objects alive and visible to Python's GC (ops.grads_checker holds them
// in the partial that calls grads_match): holding the parameters as at::Tensor
// here would raise their use_count, and torch then stops traversing a tensor's
// Python state for the GC, so an optimizer referenced from a parameter (a hook,
// an attribute) would never be collected.
struct GradsCheck {
  std::vector<PyObject*> params;
  std::vector<const c10::TensorImpl*> expected_impls;
};
constexpr const char* kGradsCheck = "fusedclr._C.GradsCheck";

void free_grads_check(PyObject* capsule) {
  delete static_cast<GradsCheck*>(PyCapsule_GetPointer(capsule, kGradsCheck));
}

// grads_checker(params, expected) -> capsule for grads_match.
PyObject* grads_checker(PyObject* /*self*/, PyObject* args) {
  PyObject* params = nullptr;
  PyObject* expected = nullptr;
  if (!parse_lists(args, &params, &expected)) {
    return nullptr;
  }
  auto check = std::make_unique<GradsCheck>();
  const Py_ssize_t n = PyList_GET_SIZE(params);
  check->params.reserve(n);
  check->expected_impls.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* p = nullptr;
    const at::Tensor* e = nullptr;
    if (!unpack_pair(PyList_GET_ITEM(params, i), PyList_GET_ITEM(expected, i), &p, &e)) {
      return nullptr;
    }
    check->params.push_back(PyList_GET_ITEM(params, i));
    check->expected_impls.push_back(e == nullptr ? nullptr : e->unsafeGetTensorImpl());
  }
  PyObject* capsule = PyCapsule_New(check.get(), kGradsCheck, free_grads_check);
  if (capsule != nullptr) {
    check.release();
  }
  return capsule;
}

// grads_match(capsule, params, expected) -> bool: the prepared check. params and
// expected are the tuples of the objects the capsule points to, passed to keep
// them alive; the loop reads the capsule's pointers.
PyObject* grads_match(PyObject* /*self*/, PyObject* args) {
  PyObject* capsule = nullptr;
  PyObject* params = nullptr;
  PyObject* expected = nullptr;
  if (!PyArg_ParseTuple(args, "OO!O!", &capsule, &PyTuple_Type, &params, &PyTuple_Type, &expected)) {
    return nullptr;
  }
  auto* check = static_cast<GradsCheck*>(PyCapsule_GetPointer(capsule, kGradsCheck));
  if (check == nullptr) {
    return nullptr;  // PyCapsule_GetPointer set a TypeError/ValueError
  }
  const size_t n = check->params.size();
  if (static_cast<size_t>(PyTuple_GET_SIZE(params)) != n || static_cast<size_t>(PyTuple_GET_SIZE(expected)) != n) {
    PyErr_SetString(PyExc_ValueError, "grads_match: pass the params and expected that made the check");
    return nullptr;
  }
  for (size_t i = 0; i < n; ++i) {
    if (!same_grad(THPVariable_Unpack(check->params[i]), check->expected_impls[i])) {
      Py_RETURN_FALSE;
    }
  }
  Py_RETURN_TRUE;
}

PyMethodDef kMethods[] = {
    {"grads_checker", grads_checker, METH_VARARGS,
     "A prepared check that every params[i].grad is expected[i] (None: no grad): a capsule for grads_match."},
    {"grads_match", grads_match, METH_VARARGS, "The prepared check of grads_checker: (capsule, params, expected)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kMethods};
  return PyModule_Create(&module_def);
}
}
