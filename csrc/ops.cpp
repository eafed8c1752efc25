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
  // Zeroes the active segments' gradients [note: zeroing through the table].
  m.def("grad_zero_(Tensor segments, ScalarType param_dtype, Tensor chunks) -> ()");
}

// [note: zeroing through the table]
// grad_zero_ writes +0 (all-zero bits, what zero_() writes) over the elements
// that the chunk table covers of every active segment's gradient (GRAD != 0;
// an empty gradient, entered as 1, has none): zero_grad(set_to_none=False)'s
// zero_() of a whole bucket in one launch, with no Python loop over its
// parameters. As step_ writes the parameters, it writes the gradients through
// the table's addresses, which the schema cannot name: it marks nothing
// mutated, so it is called eagerly (the optimizers' zero_grad is disabled for
// Dynamo, as torch's is), and it bumps no version counter, so autograd cannot
// tell that a gradient some graph saved for its backward was zeroed (where
// torch's zero_() makes that backward raise). The optimizers call it after a
// refresh that found every gradient of the bucket walkable in place, not
// requiring grad and not copy-on-write; torch zeroes the others
// (fusedclr/optim/_base.py, [note: zero_grad through the table]).

// `import fusedclr._C` loads this library, whose static initialisers register
// the ops above. The module also carries the host half of the segment table:
// the per-step refresh (see below).
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <fusedclr/segments.h>

#include <ATen/Parallel.h>
#include <c10/core/impl/COW.h>

#include <atomic>
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
// `_local_tensor` of the parameter and of its gradient. The loop over plain
// tensors is prefetched and, for many parameters, multi-threaded [note:
// refresh prefetch]; it may then report several flags at once (one for each
// thread's first problem), which the Python side handles as it would one.
// One flag does not stop the loop: GRAD_READ_ONLY, a walkable gradient that
// the step may read but grad_zero_ must not write [note: zeroing through the
// table], because autograd tracks it (it requires grad: backward with
// create_graph=True) or its storage is copy-on-write (shared with another
// tensor until one of them writes through torch). It is complete only when
// neither SLOW_PATH nor PARAM_CHANGED stopped the walk. For a DTensor gradient
// it says whether the DTensor or its local shard requires grad, or the shard
// is copy-on-write.
constexpr long kTableChanged = 1;
constexpr long kSlowPath = 2;      // a gradient the kernels cannot read as it is
constexpr long kParamChanged = 4;  // a parameter changed dtype, device, size or layout
constexpr long kGradReadOnly = 8;  // a gradient grad_zero_ must leave to torch

inline bool is_cow(const at::Tensor& t) {
  return c10::impl::cow::is_cow_data_ptr(t.unsafeGetTensorImpl()->unsafe_storage().data_ptr());
}

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

// The local shard of a DTensor, the tensor whose memory the kernels walk (a
// new reference in `hold`, released by the caller), or null.
const at::Tensor* local_shard(PyObject* obj, PyObject** hold) {
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
  const int64_t addr = reinterpret_cast<int64_t>(grad.const_data_ptr());  // read only: never materializes
  return addr == 0 ? 1 : addr;
}

// [note: refresh prefetch]
// Between two refreshes the step's kernel (or a forward and backward) has
// streamed far more memory than the caches hold, so each parameter's metadata
// is cold, and it is a chain of dependent loads: the PyObject, its TensorImpl,
// that impl's StorageImpl and AutogradMeta, the gradient's TensorImpl and its
// StorageImpl. Walked one parameter at a time, every link costs a full memory
// latency. So the loop is software-pipelined: at parameter i it prefetches
// link k of parameter i + k * kDistance (link 5, the PyObject, furthest
// ahead), following the pointers that earlier iterations brought into the
// cache, and the checks at parameter i find their lines there. Prefetches
// never fault, and every pointer is read again by the checks. From
// kParallelParams parameters the walk is also split between threads, each
// with its own pipeline. Measured on the 2-vCPU development machine, 10000
// parameters with every gradient replaced and the caches flushed: 1.9-2.0 ms
// one parameter at a time, 1.1-1.2 ms pipelined, 0.66-0.74 ms on two threads.
// DTensor buckets (whose local shards come from Python attributes) are
// neither prefetched nor split.
class Prefetcher {
 public:
  // Prefetches for a walk over parameters [lo, hi).
  Prefetcher(const std::vector<PyObject*>& params, size_t lo, size_t hi) : params_(params), hi_(hi) {
    for (size_t back = kLinks * kDistance; back >= 1; --back) {
      advance(lo, back);  // the links that the iterations before the first would have fetched
    }
  }

  // Called at parameter i, before its checks (`back` > 0: the iteration `back` before i).
  void advance(size_t i, size_t back = 0) {
    for (size_t k = kLinks; k >= 1; --k) {
      const size_t ahead = k * kDistance;
      if (ahead >= back && i + ahead - back < hi_) {
        fetch(i + ahead - back, k);
      }
    }
  }

 private:
  static constexpr size_t kDistance = 2;  // parameters between two links
  static constexpr size_t kLinks = 5;
  static constexpr size_t kRing = 16;  // > 2 * kDistance (link 4 to link 2), a power of two

  static void lines(const void* p, size_t bytes) {
    auto a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
    for (const auto end = reinterpret_cast<uintptr_t>(p) + bytes; a < end; a += 64) {
      __builtin_prefetch(reinterpret_cast<const void*>(a));
    }
  }
  static void storage_of(const c10::TensorImpl* t) {
    if (const c10::StorageImpl* s = t->unsafe_storage().unsafeGetStorageImpl()) {
      lines(s, sizeof(c10::StorageImpl));
    }
  }

  // Link `k` of parameter j: 5 its PyObject, 4 its TensorImpl, 3 that impl's
  // StorageImpl and AutogradMeta, 2 the gradient's TensorImpl, 1 its StorageImpl.
  void fetch(size_t j, size_t k) {
    const size_t r = j % kRing;
    switch (k) {
      case 5:
        lines(params_[j], sizeof(THPVariable));
        break;
      case 4:
        param_[r] = THPVariable_Unpack(params_[j]).unsafeGetTensorImpl();
        lines(param_[r], sizeof(c10::TensorImpl));
        break;
      case 3:
        storage_of(param_[r]);
        if (const auto* meta = param_[r]->autograd_meta()) {
          lines(meta, 128);  // its vtable pointer and grad_
        }
        break;
      case 2: {
        const at::Tensor& g = param_[r]->grad();
        grad_[r] = g.defined() ? g.unsafeGetTensorImpl() : nullptr;
        if (grad_[r] != nullptr) {
          lines(grad_[r], sizeof(c10::TensorImpl));
        }
        break;
      }
      default:
        if (grad_[r] != nullptr) {
          storage_of(grad_[r]);
        }
    }
  }

  const std::vector<PyObject*>& params_;
  size_t hi_;
  const c10::TensorImpl* param_[kRing] = {};
  const c10::TensorImpl* grad_[kRing] = {};
};

// Whether `p` still has the dtype, device, element count and density the
// bucket was built for (its table row's NUMEL).
inline bool param_fits(const at::Tensor& p, const Tracker& t, const int64_t* row) {
  return real_type(p) == t.dtype && p.device() == t.device &&
         p.numel() * (p.is_complex() ? 2 : 1) == row[fusedclr::seg::NUMEL] && p.is_non_overlapping_and_dense();
}

// Writes a row's addresses where they changed; TABLE_CHANGED if they did.
inline long write_row(int64_t* row, int64_t paddr, int64_t gaddr) {
  if (row[fusedclr::seg::PARAM] == paddr && row[fusedclr::seg::GRAD] == gaddr) {
    return 0;
  }
  row[fusedclr::seg::PARAM] = paddr;
  row[fusedclr::seg::GRAD] = gaddr;
  return kTableChanged;
}

// Parameters from which the refresh is split between at::parallel_for's
// threads (cold, a parameter costs ~100 ns, a parallel region a few µs).
constexpr size_t kParallelParams = 1024;

// Refreshes rows [lo, hi) of a bucket of plain tensors, stopping at the first
// parameter that needs the Python side. It calls nothing of Python's and
// writes only its own rows, so it runs on at::parallel_for's workers. A
// copy-on-write parameter (whose data_ptr() would materialize a storage that
// others share, and not from two threads at once) takes the Python path.
long refresh_rows(const Tracker& t, int64_t* rows, size_t lo, size_t hi) {
  long flags = 0;
  Prefetcher ahead(t.params, lo, hi);
  for (size_t i = lo; i < hi; ++i) {
    ahead.advance(i);
    const at::Tensor& p = THPVariable_Unpack(t.params[i]);
    int64_t* row = rows + i * fusedclr::seg::WORDS;
    if (!param_fits(p, t, row)) {
      return flags | kParamChanged;
    }
    if (is_cow(p)) {
      return flags | kSlowPath;
    }
    int64_t gaddr = 0;
    const at::Tensor& g = p.unsafeGetTensorImpl()->grad();
    if (g.defined()) {
      if (!walkable_grad(g, p)) {
        return flags | kSlowPath;
      }
      gaddr = grad_address(g);
      if (g.requires_grad() || is_cow(g)) {
        flags |= kGradReadOnly;
      }
    }
    flags |= write_row(row, reinterpret_cast<int64_t>(p.data_ptr()), gaddr);
  }
  return flags;
}

// The refresh of a DTensor bucket (FSDP2), through the local shards of the
// parameters and their gradients: Python attributes, so one thread. Returns -1
// with a Python error set when reading an attribute failed.
long refresh_local(const Tracker& t, int64_t* rows) {
  long flags = 0;
  for (size_t i = 0; i < t.params.size(); ++i) {
    PyObject* param = t.params[i];
    int64_t* row = rows + i * fusedclr::seg::WORDS;
    PyObject* hold_p = nullptr;
    const at::Tensor* p = local_shard(param, &hold_p);
    if (p == nullptr || !param_fits(*p, t, row)) {
      Py_XDECREF(hold_p);
      return flags | kParamChanged;
    }
    const int64_t paddr = reinterpret_cast<int64_t>(p->data_ptr());
    int64_t gaddr = 0;
    PyObject* gobj = PyObject_GetAttrString(param, "grad");
    if (gobj == nullptr) {
      Py_XDECREF(hold_p);
      return -1;
    }
    if (gobj != Py_None) {
      PyObject* hold_g = nullptr;
      const at::Tensor* g = is_tensor(gobj) ? local_shard(gobj, &hold_g) : nullptr;
      const bool ok = g != nullptr && walkable_grad(*g, *p);
      if (ok) {
        gaddr = grad_address(*g);
        if (THPVariable_Unpack(gobj).requires_grad() || g->requires_grad() || is_cow(*g)) {
          flags |= kGradReadOnly;
        }
      }
      Py_XDECREF(hold_g);
      if (!ok) {
        Py_DECREF(gobj);
        Py_XDECREF(hold_p);
        return flags | kSlowPath;
      }
    }
    Py_DECREF(gobj);
    Py_XDECREF(hold_p);
    flags |= write_row(row, paddr, gaddr);
  }
  return flags;
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
  HANDLE_TH_ERRORS
  long flags = 0;
  if (tracker->local) {
    flags = refresh_local(*tracker, rows);
    if (flags < 0) {
      return nullptr;
    }
  } else if (n < kParallelParams || at::get_num_threads() == 1) {
    flags = refresh_rows(*tracker, rows, 0, n);
  } else {
    std::atomic<long> all{0};
    at::parallel_for(0, static_cast<int64_t>(n), kParallelParams / 2, [&](int64_t lo, int64_t hi) {
      all.fetch_or(refresh_rows(*tracker, rows, static_cast<size_t>(lo), static_cast<size_t>(hi)));
    });
    flags = all.load();
  }
  return PyLong_FromLong(flags);
  END_HANDLE_TH_ERRORS
}

// same_items(items: list, snapshot: tuple) -> bool: whether items[i] is snapshot[i]
// for every i, lengths equal. A step asks it of every param group [note: followed
// groups]: `group["params"][i] = q` replaces a parameter in place, which neither the
// list's identity nor its length shows. Pointer compares only, no Python call per
// item (list == tuple would call Tensor.__eq__ on a replaced item).
PyObject* same_items(PyObject* /*self*/, PyObject* args) {
  PyObject* items = nullptr;
  PyObject* snapshot = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &items, &PyTuple_Type, &snapshot)) {
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(items);
  if (n != PyTuple_GET_SIZE(snapshot)) {
    Py_RETURN_FALSE;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (PyList_GET_ITEM(items, i) != PyTuple_GET_ITEM(snapshot, i)) {
      Py_RETURN_FALSE;
    }
  }
  Py_RETURN_TRUE;
}

PyMethodDef kMethods[] = {
    {"segment_tracker", segment_tracker, METH_VARARGS,
     "segment_tracker(params, local, like) -> capsule: the parameters a bucket's segment table follows."},
    {"segment_refresh", segment_refresh, METH_VARARGS,
     "segment_refresh(capsule, params, table) -> flags: refreshes the host segment table's addresses."},
    {"same_items", same_items, METH_VARARGS,
     "same_items(items: list, snapshot: tuple) -> bool: items[i] is snapshot[i] for every i."},
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
    PyModule_AddIntConstant(module, "GRAD_READ_ONLY", kGradReadOnly);
  }
  return module;
}
}
