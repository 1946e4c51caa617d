// pybind11 module dffkit._cuda: the CUDA engine. It takes device pointers as integers and never
// copies arrays: python/dffkit/_cuda_backend.py reads them from the caller's arrays
// (__cuda_array_interface__ / DLPack) and makes the one deliberate copy where one is needed.
// Errors: bad input -> ValueError, CUDA failures -> RuntimeError with the CUDA error name, out
// of device memory -> MemoryError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "nmf_cuda.hpp"
#include "bindings/params.hpp"

namespace py = pybind11;
using namespace dffkit;
using i64 = std::int64_t;

namespace {

struct Params : bindings::Params {
  std::string precision = "fp32";
  std::string engine = "auto";  // "auto" | "resident" | "sweep" | "gemm" (tests, sanitizer runs)
};

cuda::Engine parse_engine(const std::string& s) {
  if (s == "auto") return cuda::Engine::automatic;
  if (s == "resident") return cuda::Engine::resident;
  if (s == "sweep") return cuda::Engine::sweep;
  if (s == "gemm") return cuda::Engine::gemm;
  throw invalid_argument("dffkit._cuda: engine must be 'auto', 'resident', 'sweep' or 'gemm'");
}

cuda::DType parse_dtype(const std::string& s) {
  if (s == "float32" || s == "f32" || s == "<f4") return cuda::DType::f32;
  if (s == "float64" || s == "f64" || s == "<f8") return cuda::DType::f64;
  throw invalid_argument("dffkit._cuda: dtype must be 'float32' or 'float64' (got '" + s + "')");
}

cuda::Precision parse_precision(const std::string& s) {
  if (s == "fp32") return cuda::Precision::fp32;
  if (s == "tf32") return cuda::Precision::tf32;
  if (s == "bf16x") return cuda::Precision::bf16x;
  throw invalid_argument("dffkit._cuda: precision must be 'fp32', 'tf32' or 'bf16x' (got '" + s +
                         "')");
}

Problem make_problem(i64 m, i64 n, i64 k, const Params& q, const std::vector<i64>* groups) {
  return bindings::make_problem(m, n, k, q, groups, "dffkit._cuda");
}
using bindings::make_options;

py::dict result_dict(const cuda::FitResult& r, bool with_objective) {
  py::dict d;
  d["n_iter"] = r.n_iter;
  d["error_init"] = r.error_init;
  d["error"] = r.error;
  d["kernel"] = r.kernel;
  if (with_objective) d["objective"] = r.objective;
  return d;
}

/// Runs a batch with the GIL released; one result dict per problem.
py::list run_batched(const std::vector<cuda::BatchItem>& items, const std::string& dtype,
                     const Params& q, std::uintptr_t stream) {
  const cuda::DType dt = parse_dtype(dtype);
  const cuda::Precision prec = parse_precision(q.precision);
  const Problem p = make_problem(1, 1, 1, q, nullptr);  // loss and penalties; shapes per item
  const Options o = make_options(q);
  std::vector<cuda::FitResult> r;
  {
    py::gil_scoped_release nogil;
    r = cuda::fit_batched(items, p, o, dt, prec, stream);
  }
  py::list out;
  for (const auto& x : r) out.append(result_dict(x, q.record_objective));
  return out;
}

// ---- DLPack (v0.8 ABI, the one every framework takes) -----------------------------------------
struct DLDevice { int32_t device_type; int32_t device_id; };
struct DLDataType { uint8_t code; uint8_t bits; uint16_t lanes; };
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
constexpr int32_t kDLCUDA = 2;

struct DLHolder {
  DLManagedTensor managed;
  std::vector<int64_t> shape;
  PyObject* owner;
};

void dl_deleter(DLManagedTensor* t) {
  auto* h = static_cast<DLHolder*>(t->manager_ctx);
  {
    py::gil_scoped_acquire gil;
    Py_XDECREF(h->owner);
  }
  delete h;
}

void dl_capsule_destructor(PyObject* capsule) {
  // only an unconsumed capsule (still named "dltensor") owns its tensor
  if (PyCapsule_IsValid(capsule, "dltensor")) {
    auto* t = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    if (t && t->deleter) t->deleter(t);
  } else {
    PyErr_Clear();
  }
}

py::capsule make_dlpack(py::object owner, std::uintptr_t ptr, std::vector<i64> shape,
                        const std::string& dtype, int device) {
  auto* h = new DLHolder;
  h->shape = std::move(shape);
  h->owner = owner.ptr();
  Py_INCREF(h->owner);
  DLTensor& t = h->managed.dl_tensor;
  t.data = reinterpret_cast<void*>(ptr);
  t.device = DLDevice{kDLCUDA, device};
  t.ndim = int32_t(h->shape.size());
  t.dtype = DLDataType{2, uint8_t(parse_dtype(dtype) == cuda::DType::f32 ? 32 : 64), 1};
  t.shape = h->shape.data();
  t.strides = nullptr;  // compact row-major
  t.byte_offset = 0;
  h->managed.manager_ctx = h;
  h->managed.deleter = dl_deleter;
  PyObject* cap = PyCapsule_New(&h->managed, "dltensor", dl_capsule_destructor);
  if (!cap) {
    dl_deleter(&h->managed);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::capsule>(cap);
}

/// (ptr, shape, strides in elements or None, dtype string, device_type, device_id) of a DLPack
/// capsule, without consuming it (the caller keeps the capsule alive while it uses the data).
py::tuple dlpack_info(py::capsule cap) {
  if (!PyCapsule_IsValid(cap.ptr(), "dltensor"))
    throw invalid_argument("dffkit._cuda: not an unconsumed DLPack capsule");
  auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), "dltensor"));
  const DLTensor& t = m->dl_tensor;
  py::list shape, strides;
  for (int i = 0; i < t.ndim; ++i) shape.append(t.shape[i]);
  py::object st = py::none();
  if (t.strides) {
    for (int i = 0; i < t.ndim; ++i) strides.append(t.strides[i]);
    st = strides;
  }
  std::string dt = "other";
  if (t.dtype.code == 2 && t.dtype.lanes == 1 && t.dtype.bits == 32) dt = "float32";
  if (t.dtype.code == 2 && t.dtype.lanes == 1 && t.dtype.bits == 64) dt = "float64";
  const std::uintptr_t ptr = reinterpret_cast<std::uintptr_t>(t.data) + t.byte_offset;
  return py::make_tuple(ptr, shape, st, dt, t.device.device_type, t.device.device_id);
}

/// Device memory owned by Python: results for callers whose library is unknown.
class DeviceMemory {
 public:
  DeviceMemory(i64 nbytes, int device) : nbytes_(nbytes), device_(device) {
    ptr_ = cuda::device_malloc(nbytes, device);
  }
  ~DeviceMemory() { cuda::device_free(ptr_, device_); }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  std::uintptr_t ptr() const { return ptr_; }
  i64 nbytes() const { return nbytes_; }
  int device() const { return device_; }

 private:
  std::uintptr_t ptr_ = 0;
  i64 nbytes_ = 0;
  int device_ = 0;
};

}  // namespace

PYBIND11_MODULE(_cuda, mod) {
  mod.doc() = "dffkit CUDA engine: hand-written kernels for multiplicative-update NMF";

  mod.def("probe", []() { return cuda::probe(); },
          "(usable, reason): whether a CUDA driver and a device of compute capability >= 8.0 are "
          "usable here; never raises.");
  mod.def("device_count", &cuda::device_count);
  mod.def(
      "device_info",
      [](int i) {
        const cuda::DeviceInfo d = cuda::device_info(i);
        py::dict r;
        r["name"] = d.name;
        r["cc"] = py::make_tuple(d.cc_major, d.cc_minor);
        r["sm_count"] = d.sm_count;
        r["mem_bytes"] = d.mem_bytes;
        r["l2_bytes"] = d.l2_bytes;
        r["smem_per_block_optin"] = d.smem_per_block_optin;
        return r;
      },
      py::arg("device") = 0);

  mod.def(
      "max_components",
      [](i64 n, const std::string& dtype, bool kl, int device, const std::string& precision,
         bool batched, i64 smem) {
        const cuda::DType dt = parse_dtype(dtype);
        const cuda::Precision prec = parse_precision(precision);
        if (smem < 0)
          throw invalid_argument("dffkit._cuda.max_components: smem must be >= 0 (0: the device's)");
        std::size_t limit = std::size_t(smem);
        if (smem == 0) {
          const int dev = device < 0 ? cuda::current_device() : device;
          limit = std::size_t(cuda::device_info(dev).smem_per_block_optin);
        }
        return cuda::max_components(n, dt, prec, kl, limit, batched);
      },
      py::arg("n"), py::arg("dtype"), py::arg("kl") = false, py::arg("device") = -1,
      py::arg("precision") = "fp32", py::arg("batched") = false, py::arg("smem") = 0,
      "The largest n_components that fit(..., engine='auto') (batched=True: fit_batched) serves "
      "for X with n columns of `dtype` (kl: the Kullback-Leibler loss) on `device` (-1: the "
      "current one): the limit of the on-chip statistics, from the engine's shared-memory "
      "layouts; fit raises ValueError beyond it. smem > 0: for that many bytes of shared memory "
      "per block instead of the device's (no device needed).");

  bindings::bind_params<Params>(mod)
      .def_readwrite("precision", &Params::precision)
      .def_readwrite("engine", &Params::engine);

  mod.def(
      "fit",
      [](std::uintptr_t X, std::uintptr_t W, std::uintptr_t H, i64 m, i64 n, i64 k,
         const std::string& dtype, const Params& q, const std::vector<i64>& groups,
         std::uintptr_t stream) {
        const cuda::DType dt = parse_dtype(dtype);
        const cuda::Precision prec = parse_precision(q.precision);
        const cuda::Engine engine = parse_engine(q.engine);
        const Problem p = make_problem(m, n, k, q, &groups);
        check_problem(p);
        const Options o = make_options(q);
        cuda::FitResult r;
        {
          py::gil_scoped_release nogil;
          r = cuda::fit(X, W, H, p, o, dt, prec, stream, engine);
        }
        return result_dict(r, q.record_objective);
      },
      py::arg("X"), py::arg("W"), py::arg("H"), py::arg("m"), py::arg("n"), py::arg("k"),
      py::arg("dtype"), py::arg("params"), py::arg("group_offsets") = std::vector<i64>{},
      py::arg("stream") = 0,
      "Fit W (m x k) and H (k x n) in place for X (m x n): device pointers (ints) to C-contiguous "
      "arrays of one dtype on one device; group_offsets on the host. Runs on `stream` "
      "(cudaStream_t as int, 0 = legacy default) and returns when done, with the GIL released.");

  mod.def(
      "fit_batched",
      [](const std::vector<std::uintptr_t>& Xs, const std::vector<std::uintptr_t>& Ws,
         const std::vector<std::uintptr_t>& Hs, const std::vector<std::vector<i64>>& shapes,
         const std::string& dtype, const Params& q, std::uintptr_t stream) {
        const std::size_t B = Xs.size();
        if (Ws.size() != B || Hs.size() != B || shapes.size() != B)
          throw invalid_argument("dffkit._cuda.fit_batched: Xs, Ws, Hs and shapes must have the "
                                 "same length");
        std::vector<cuda::BatchItem> items(B);
        for (std::size_t b = 0; b < B; ++b) {
          if (shapes[b].size() != 3)
            throw invalid_argument("dffkit._cuda.fit_batched: each shape is (m, n, k)");
          items[b] = cuda::BatchItem{Xs[b], Ws[b], Hs[b], shapes[b][0], shapes[b][1], shapes[b][2]};
        }
        return run_batched(items, dtype, q, stream);
      },
      py::arg("Xs"), py::arg("Ws"), py::arg("Hs"), py::arg("shapes"), py::arg("dtype"),
      py::arg("params"), py::arg("stream") = 0,
      "Independent problems (lists of device pointers and (m, n, k) shapes), one launch, each "
      "with its own convergence; W and H updated in place. Returns one dict per problem.");

  mod.def(
      "fit_batched_strided",
      [](std::uintptr_t X, std::uintptr_t W, std::uintptr_t H, i64 B, i64 m, i64 n, i64 k,
         const std::string& dtype, const Params& q, std::uintptr_t stream) {
        if (B < 1) throw invalid_argument("dffkit._cuda.fit_batched_strided: B must be >= 1");
        const cuda::DType dt = parse_dtype(dtype);
        const i64 esz = dt == cuda::DType::f32 ? 4 : 8;
        std::vector<cuda::BatchItem> items(B);
        for (i64 b = 0; b < B; ++b)
          items[b] = cuda::BatchItem{X + std::uintptr_t(b * m * n * esz),
                                     W + std::uintptr_t(b * m * k * esz),
                                     H + std::uintptr_t(b * k * n * esz), m, n, k};
        return run_batched(items, dtype, q, stream);
      },
      py::arg("X"), py::arg("W"), py::arg("H"), py::arg("B"), py::arg("m"), py::arg("n"),
      py::arg("k"), py::arg("dtype"), py::arg("params"), py::arg("stream") = 0,
      "B problems of one shape: X (B, m, n), W (B, m, k), H (B, k, n), contiguous device arrays.");

  mod.def(
      "random_init",
      [](std::uintptr_t X, std::uintptr_t W, std::uintptr_t H, i64 m, i64 n, i64 k,
         const std::string& dtype, std::uint64_t seed, std::uintptr_t stream) {
        const cuda::DType dt = parse_dtype(dtype);
        py::gil_scoped_release nogil;
        cuda::random_init(X, W, H, m, n, k, dt, seed, stream);
      },
      py::arg("X"), py::arg("W"), py::arg("H"), py::arg("m"), py::arg("n"), py::arg("k"),
      py::arg("dtype"), py::arg("seed"), py::arg("stream") = 0,
      "init='random' on the device, bit-identical to _cpu.random_init.");

  mod.def(
      "random_init_strided",
      [](std::uintptr_t X, std::uintptr_t W, std::uintptr_t H, i64 B, i64 m, i64 n, i64 k,
         const std::string& dtype, std::uint64_t seed, std::uintptr_t stream) {
        const cuda::DType dt = parse_dtype(dtype);
        py::gil_scoped_release nogil;
        cuda::random_init_strided(X, W, H, B, m, n, k, dt, seed, stream);
      },
      py::arg("X"), py::arg("W"), py::arg("H"), py::arg("B"), py::arg("m"), py::arg("n"),
      py::arg("k"), py::arg("dtype"), py::arg("seed"), py::arg("stream") = 0,
      "init='random' for X (B, m, n): problem b as random_init with seed + b (mod 2^64).");
  mod.def(
      "fixed_order_sum",
      [](std::uintptr_t X, i64 count, const std::string& dtype, bool square, std::uintptr_t stream) {
        const cuda::DType dt = parse_dtype(dtype);
        py::gil_scoped_release nogil;
        return cuda::fixed_order_sum(X, count, dt, square, stream);
      },
      py::arg("X"), py::arg("count"), py::arg("dtype"), py::arg("square") = false,
      py::arg("stream") = 0,
      "Sum (or sum of squares) of count device elements in the CPU engine's fixed chunk order.");
  mod.def(
      "check_values",
      [](std::uintptr_t X, i64 count, const std::string& dtype, std::uintptr_t stream) {
        const cuda::DType dt = parse_dtype(dtype);
        cuda::ValueStats v;
        {
          py::gil_scoped_release nogil;
          v = cuda::check_values(X, count, dt, stream);
        }
        return py::make_tuple(v.min, v.nonfinite, v.sum_sq);
      },
      py::arg("X"), py::arg("count"), py::arg("dtype"), py::arg("stream") = 0,
      "(min of the finite values, has NaN or inf, sum of the finite values' squares) of count "
      "elements of device memory, in one pass.");

  mod.def(
      "dff_map_peaks",
      [](const std::vector<std::uintptr_t>& maps, i64 k, i64 h, i64 w, i64 H, i64 W,
         std::uintptr_t taps_y, std::uintptr_t taps_x, i64 blocks_per_map, std::uintptr_t parts,
         bool fused, std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        cuda::dff_map_peaks(maps, k, h, w, H, W, taps_y, taps_x, blocks_per_map, parts, fused,
                            stream);
      },
      py::arg("maps"), py::arg("k"), py::arg("h"), py::arg("w"), py::arg("H"), py::arg("W"),
      py::arg("taps_y"), py::arg("taps_x"), py::arg("blocks_per_map"), py::arg("parts"),
      py::arg("fused") = false, py::arg("stream") = 0,
      "DFF heat maps, step 1 (device pointers as ints; asynchronous on `stream`): for image t "
      "(maps[t]: its h*w x k float32 block of W) and concept j, the maximum of column j "
      "upsampled bilinearly to H x W, as blocks_per_map partial maxima at parts[t][j][b] "
      "(float32, len(maps) x k x blocks_per_map). taps_y, taps_x: int32 [i0, i1, bits of w0, "
      "bits of w1] of bilinear_taps(H, h), (W, w). fused: fma(w0, a0, w1*a1) taps.");
  mod.def(
      "dff_map_params",
      [](std::uintptr_t parts, i64 n, i64 k, i64 nb, bool joint, float threshold,
         std::uintptr_t params, std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        cuda::dff_map_params(parts, n, k, nb, joint, threshold, params, stream);
      },
      py::arg("parts"), py::arg("n"), py::arg("k"), py::arg("nb"), py::arg("joint"),
      py::arg("threshold"), py::arg("params"), py::arg("stream") = 0,
      "DFF heat maps, between the steps (as dff_map_peaks): params (float32, n x 2k: each "
      "image's k divisors, then its k strengths) from parts (float32, n x k x nb) on the device, "
      "as the host computes them; joint: strengths relative to each concept's largest maximum "
      "over the n images, else to the image's own.");
  mod.def(
      "dff_heat_labels",
      [](const std::vector<std::uintptr_t>& maps, i64 k, i64 h, i64 w, i64 H, i64 W,
         std::uintptr_t taps_y, std::uintptr_t taps_x, std::uintptr_t params, float threshold,
         std::uintptr_t heat, std::uintptr_t labels, bool fused, std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        cuda::dff_heat_labels(maps, k, h, w, H, W, taps_y, taps_x, params, threshold, heat,
                              labels, fused, stream);
      },
      py::arg("maps"), py::arg("k"), py::arg("h"), py::arg("w"), py::arg("H"), py::arg("W"),
      py::arg("taps_y"), py::arg("taps_x"), py::arg("params"), py::arg("threshold"),
      py::arg("heat"), py::arg("labels"), py::arg("fused") = false, py::arg("stream") = 0,
      "DFF heat maps, step 2 (as dff_map_peaks): heat (float32, len(maps) x k x H x W) = "
      "clip(upsampled / divisor, 0, 1) and labels (int16, len(maps) x H x W) = the first j of "
      "the largest heat * strength, -1 below threshold; params: float32 len(maps) x 2k, each "
      "image's k divisors then its k strengths.");

  mod.def("pointer_device", &cuda::pointer_device, py::arg("ptr"),
          "The device owning ptr, or -1 if ptr is not device memory.");
  mod.def("current_device", &cuda::current_device);
  mod.def(
      "memcpy",
      [](std::uintptr_t dst, std::uintptr_t src, i64 nbytes, std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        cuda::memcpy_async(dst, src, nbytes, stream);
      },
      py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("stream") = 0,
      "cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDefault, stream).");
  mod.def(
      "memcpy_htod",
      [](std::uintptr_t dst, const py::array& src, std::uintptr_t stream) {
        if (!(src.flags() & py::array::c_style))
          throw invalid_argument("dffkit._cuda.memcpy_htod: source must be C-contiguous");
        const void* p = src.data();
        const i64 nbytes = i64(src.nbytes());
        py::gil_scoped_release nogil;
        cuda::memcpy_from_host(dst, p, nbytes, stream);
      },
      py::arg("dst"), py::arg("src"), py::arg("stream") = 0);
  mod.def(
      "memcpy_dtoh",
      [](py::array& dst, std::uintptr_t src, std::uintptr_t stream) {
        if (!(dst.flags() & py::array::c_style) || !dst.writeable())
          throw invalid_argument("dffkit._cuda.memcpy_dtoh: destination must be C-contiguous "
                                 "and writeable");
        void* p = dst.mutable_data();
        const i64 nbytes = i64(dst.nbytes());
        py::gil_scoped_release nogil;
        cuda::memcpy_to_host(p, src, nbytes, stream);
      },
      py::arg("dst"), py::arg("src"), py::arg("stream") = 0);
  mod.def(
      "synchronize",
      [](std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        cuda::stream_synchronize(stream);
      },
      py::arg("stream") = 0);
  mod.def("workspace_bytes", &cuda::workspace_bytes,
          "Device bytes held by the workspace cache.");
  mod.def("release_workspaces", &cuda::release_workspaces,
          "Free the cached workspaces that no call is using.");

  py::class_<DeviceMemory>(mod, "DeviceMemory")
      .def(py::init<i64, int>(), py::arg("nbytes"), py::arg("device") = 0,
           "cudaMalloc(nbytes) on `device`; freed when the object goes away.")
      .def_property_readonly("ptr", &DeviceMemory::ptr)
      .def_property_readonly("nbytes", &DeviceMemory::nbytes)
      .def_property_readonly("device", &DeviceMemory::device);

  mod.def("make_dlpack", &make_dlpack, py::arg("owner"), py::arg("ptr"), py::arg("shape"),
          py::arg("dtype"), py::arg("device"),
          "A DLPack capsule for compact row-major device memory at ptr; it keeps `owner` alive.");
  mod.def("dlpack_info", &dlpack_info, py::arg("capsule"),
          "(ptr, shape, strides or None, dtype, device_type, device_id) of a DLPack capsule.");
}
