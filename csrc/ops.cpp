// Operator schemas of the fusedclr library. Always compiled; each device's
// kernels register with TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda, and
// fusedclr/ops.py registers a fake (meta) kernel for every op.
//
// [note: step contract]
// step_ applies one step of optimizer `optimizer` (a name of
// csrc/include/fusedclr/optimizers.h: "sgd", "adam", ...) to one bucket: the
// parameters of one (param group, device, dtype). `segments` is the bucket's
// segment table [note: segment table]
// (csrc/include/fusedclr/segments.h): per segment the addresses of its
// parameter and gradient (0: no gradient, the segment is inactive), its offset
// into the flat state buffers and its element count; `param_dtype` is the
// parameters' (real) dtype. `state0`..`state3` are the optimizer's flat state
// buffers in its policy's order (its class's _KERNEL_STATES names them), None
// where the options leave one out (amsgrad's maximum, RMSprop's grad_avg) or
// the optimizer has fewer (four optional tensors, not a list: torch's
// functionalization cannot handle a None in a mutable tensor list); `options`
// are its float options in the same table's order. `seg_scalars` (float64
// [n_segments]) is a per-segment scalar state of optimizers that keep one
// (NAdam's mu_product), else None. States and master_param are 1-D flat
// buffers of the bucket, and `chunks` is an int64 [n, 3] table of
// (segment, begin, end) ranges in state coordinates covering every segment's
// elements. `seg_steps` (int64 [n_segments]) is each segment's step count; a
// step first increments it for every active segment and then uses the new
// value. `hyper` is float64 [lr, momentum-or-beta1] for whatever the schedule
// does not provide; `schedule` is the float64 descriptor
// (csrc/include/fusedclr/schedule.h) evaluated at the int64 0-dim
// `schedule_step`. With `found_inf` non-zero the op changes nothing at all;
// `grad_scale` divides the grads in-kernel. `master_param` (fp32, bf16/fp16
// params) and `sr_seed` (bf16 params) are the precision opt-ins of
// csrc/include/fusedclr/precision.h [note: precision opt-ins]; bf16 parameters
// may also pass bf16 state buffers. The parameters are written through the
// table's addresses: the schema cannot name them, so the ops are kept in
// program order by the states and counters they do name.
#include <torch/library.h>

TORCH_LIBRARY(fusedclr, m) {
  m.def(
      "step_(str optimizer, Tensor segments, ScalarType param_dtype, Tensor(a!)? state0, Tensor(b!)? state1, "
      "Tensor(c!)? state2, Tensor(d!)? state3, Tensor(e!) seg_steps, Tensor(f!)? seg_scalars, Tensor chunks, "
      "Tensor hyper, Tensor schedule, Tensor schedule_step, float[] options, bool maximize=False, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor(g!)? master_param=None, int? sr_seed=None) -> ()");
  m.def("schedule_eval(Tensor schedule, Tensor schedule_step) -> Tensor");
  // Sum of squares of the active segments' gradients (float64, 0-dim): the
  // bucket's share of the global gradient norm [note: fused clipping].
  m.def("grad_sumsq(Tensor segments, ScalarType param_dtype, Tensor chunks) -> Tensor");
}

// `import fusedclr._C` loads this library, whose static initialisers register
// the ops above. The module also carries the host half of the segment table:
// the per-step refresh (see below).
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <fusedclr/segments.h>

#include <memory>
#include <vector>

namespace {

// [note: segment refresh]
// Every step, before the launch, a bucket refreshes its host segment table
// from the parameters as they are now: the address of each parameter and of
// its .grad (0 when the grad is None). That is O(parameters), so it is one C
// loop that follows pointers: TensorImpl::grad() (not Tensor::grad(), which
// first asks autograd whether the tensor is a leaf) and the impl's cached
// metadata. It also checks what the kernels rely on, cheaply: the gradient has
// the parameter's dtype, device, sizes and strides and is dense; the parameter
// still has the dtype, device and element count the bucket was built for and
// is dense. Anything else returns a flag and the bucket's Python side takes
// over: it raises an error that names the parameter, or re-buckets a parameter
// that changed dtype or device (model.to(...)), or copies a gradient whose
// strides differ. The table is only written where an address changed, and the
// result says whether anything did, so an unchanged table is never uploaded
// again (and a CUDA-graph-captured step stays valid).
// DTensor parameters (FSDP2) are refreshed from their local shards: the
// `_local_tensor` of the parameter and of its gradient.
constexpr long kTableChanged = 1;
constexpr long kSlowPath = 2;      // a gradient the kernels cannot read as it is
constexpr long kParamChanged = 4;  // a parameter changed dtype, device, size or layout

struct Tracker {
  std::vector<PyObject*> params;  // borrowed: the Python side keeps the parameters alive
  bool local;                     // DTensors: read ._local_tensor
  at::ScalarType dtype;           // the bucket's (real) dtype and device: what its states were built for
  at::Device device;
};
constexpr const char* kTracker = "fusedclr._C.SegmentTracker";

void free_tracker(PyObject* capsule) {
  delete static_cast<Tracker*>(PyCapsule_GetPointer(capsule, kTracker));
}

bool is_tensor(PyObject* obj) {
  auto* tensor_type = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  return tensor_type != nullptr && PyObject_TypeCheck(obj, tensor_type);
}

// The tensor whose memory the kernels walk: the object itself, or its local
// shard (a new reference in `hold`, released by the caller).
const at::Tensor* walked(PyObject* obj, bool local, PyObject** hold) {
  if (!local) {
    return &THPVariable_Unpack(obj);
  }
  *hold = PyObject_GetAttrString(obj, "_local_tensor");
  if (*hold == nullptr) {
    PyErr_Clear();
    return nullptr;
  }
  if (!is_tensor(*hold)) {
    return nullptr;
  }
  return &THPVariable_Unpack(*hold);
}

inline at::ScalarType real_type(const at::Tensor& t) {
  return t.is_complex() ? c10::toRealValueType(t.scalar_type()) : t.scalar_type();
}

// segment_tracker(params: list[Tensor], local: bool, like: Tensor) -> capsule for
// segment_refresh. `like` has the dtype and device the bucket was built for; a
// parameter that no longer has them is reported as changed.
PyObject* segment_tracker(PyObject* /*self*/, PyObject* args) {
  PyObject* params = nullptr;
  int local = 0;
  PyObject* like = nullptr;
  if (!PyArg_ParseTuple(args, "O!pO", &PyList_Type, &params, &local, &like)) {
    return nullptr;
  }
  if (!is_tensor(like)) {
    PyErr_SetString(PyExc_TypeError, "segment tracker: `like` must be a tensor");
    return nullptr;
  }
  const at::Tensor& t = THPVariable_Unpack(like);
  auto tracker = std::make_unique<Tracker>(Tracker{{}, local != 0, t.scalar_type(), t.device()});
  const Py_ssize_t n = PyList_GET_SIZE(params);
  tracker->params.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p = PyList_GET_ITEM(params, i);
    if (!is_tensor(p)) {
      PyErr_Format(PyExc_TypeError, "segment tracker: parameter %zd is not a tensor", i);
      return nullptr;
    }
    tracker->params.push_back(p);
  }
  PyObject* capsule = PyCapsule_New(tracker.get(), kTracker, free_tracker);
  if (capsule != nullptr) {
    tracker.release();
  }
  return capsule;
}

// Whether the kernels can walk `grad` as the memory image of `param`.
inline bool walkable_grad(const at::Tensor& grad, const at::Tensor& param) {
  return grad.layout() == c10::kStrided && grad.scalar_type() == param.scalar_type() &&
         grad.device() == param.device() && grad.sizes() == param.sizes() &&
         ((grad.is_contiguous() && param.is_contiguous()) ||
          (grad.strides() == param.strides() && grad.is_non_overlapping_and_dense()));
}

// A gradient's table entry: its address, or 1 for an empty one (whose null
// address would read as "no gradient"; a segment without elements is never
// dereferenced).
inline int64_t grad_address(const at::Tensor& grad) {
  const int64_t addr = reinterpret_cast<int64_t>(grad.data_ptr());
  return addr == 0 ? 1 : addr;
}

// segment_refresh(capsule, params: tuple, table: Tensor) -> int flags: refreshes
// the PARAM and GRAD columns of the host table (int64 [n, 4], CPU) [note:
// segment refresh]. `params` is the tuple the capsule points into, passed to
// keep it alive.
PyObject* segment_refresh(PyObject* /*self*/, PyObject* args) {
  PyObject* capsule = nullptr;
  PyObject* params = nullptr;
  PyObject* table_obj = nullptr;
  if (!PyArg_ParseTuple(args, "OO!O", &capsule, &PyTuple_Type, &params, &table_obj)) {
    return nullptr;
  }
  auto* tracker = static_cast<Tracker*>(PyCapsule_GetPointer(capsule, kTracker));
  if (tracker == nullptr) {
    return nullptr;
  }
  const size_t n = tracker->params.size();
  if (!is_tensor(table_obj) || static_cast<size_t>(PyTuple_GET_SIZE(params)) != n) {
    PyErr_SetString(PyExc_ValueError, "segment_refresh: pass the tracker's params and its host table");
    return nullptr;
  }
  const at::Tensor& table = THPVariable_Unpack(table_obj);
  if (table.scalar_type() != at::kLong || !table.device().is_cpu() || !table.is_contiguous() ||
      table.numel() != static_cast<int64_t>(n) * fusedclr::seg::WORDS) {
    PyErr_SetString(PyExc_ValueError, "segment_refresh: the host table must be a contiguous CPU int64 [n, 4] tensor");
    return nullptr;
  }
  int64_t* rows = table.data_ptr<int64_t>();
  long flags = 0;
  HANDLE_TH_ERRORS
  for (size_t i = 0; i < n; ++i) {
    PyObject* param = tracker->params[i];
    int64_t* row = rows + i * fusedclr::seg::WORDS;
    PyObject* hold_p = nullptr;
    const at::Tensor* p = walked(param, tracker->local, &hold_p);
    if (p == nullptr || real_type(*p) != tracker->dtype || p->device() != tracker->device ||
        p->numel() * (p->is_complex() ? 2 : 1) != row[fusedclr::seg::NUMEL] || !p->is_non_overlapping_and_dense()) {
      Py_XDECREF(hold_p);
      flags |= kParamChanged;
      break;
    }
    const int64_t paddr = reinterpret_cast<int64_t>(p->data_ptr());
    int64_t gaddr = 0;
    if (!tracker->local) {
      const at::Tensor& g = p->unsafeGetTensorImpl()->grad();
      if (g.defined()) {
        if (!walkable_grad(g, *p)) {
          flags |= kSlowPath;
          break;
        }
        gaddr = grad_address(g);
      }
    } else {
      PyObject* gobj = PyObject_GetAttrString(param, "grad");
      if (gobj == nullptr) {
        Py_XDECREF(hold_p);
        return nullptr;
      }
      if (gobj != Py_None) {
        PyObject* hold_g = nullptr;
        const at::Tensor* g = is_tensor(gobj) ? walked(gobj, true, &hold_g) : nullptr;
        const bool ok = g != nullptr && walkable_grad(*g, *p);
        if (ok) {
          gaddr = grad_address(*g);
        }
        Py_XDECREF(hold_g);
        if (!ok) {
          Py_DECREF(gobj);
          Py_XDECREF(hold_p);
          flags |= kSlowPath;
          break;
        }
      }
      Py_DECREF(gobj);
    }
    Py_XDECREF(hold_p);
    if (row[fusedclr::seg::PARAM] != paddr || row[fusedclr::seg::GRAD] != gaddr) {
      row[fusedclr::seg::PARAM] = paddr;
      row[fusedclr::seg::GRAD] = gaddr;
      flags |= kTableChanged;
    }
  }
  return PyLong_FromLong(flags);
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"segment_tracker", segment_tracker, METH_VARARGS,
     "segment_tracker(params, local, like) -> capsule: the parameters a bucket's segment table follows."},
    {"segment_refresh", segment_refresh, METH_VARARGS,
     "segment_refresh(capsule, params, table) -> flags: refreshes the host segment table's addresses."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kMethods};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) {
    PyModule_AddIntConstant(module, "TABLE_CHANGED", kTableChanged);
    PyModule_AddIntConstant(module, "SLOW_PATH", kSlowPath);
    PyModule_AddIntConstant(module, "PARAM_CHANGED", kParamChanged);
  }
  return module;
}
}
