// The pybind11 module, built twice from this file: pyalexnet._cuda (kernels compiled by nvcc; arrays are
// anything with __cuda_array_interface__, such as CuPy arrays and PyTorch CUDA tensors) and pyalexnet._emu
// (kernels compiled by the host compiler against the emulator; arrays are anything with
// __array_interface__, such as NumPy arrays).
//
// Every function checks each array's dtype, shape, C-contiguity and writability before it touches memory,
// whatever the Python layer above already checked: a direct call with wrong arguments raises ValueError or
// TypeError, it never reads or writes out of bounds. Then it releases the GIL and calls one launcher.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "errors.h"
#include "kernels.h"

#if defined(PA_BACKEND_CUDA)
#include <cuda_runtime.h>
#define PA_MODULE _cuda
#define PA_INTERFACE "__cuda_array_interface__"
#define PA_ARRAY_KIND "a CUDA array (CuPy, or anything with __cuda_array_interface__)"
#else
namespace pa_emu {
int worker_count();              // emu/runtime.cpp
int emulated_sm_count();         // emu/runtime.cpp
void set_emulated_sm_count(int n);  // emu/runtime.cpp
const char* fiber_switch_name();  // emu/runtime.cpp
std::map<std::string, int> launch_bounds_seen();  // emu/runtime.cpp
}
#if defined(PA_EMU_PROFILE)
#include "emu/counters.h"
#define PA_MODULE _emu_profile  // the counting build: the same kernels, every memory access counted
#else
#define PA_MODULE _emu
#endif
#define PA_INTERFACE "__array_interface__"
#define PA_ARRAY_KIND "a host array (NumPy, or anything with __array_interface__)"
#endif

namespace py = pybind11;

namespace {

struct Array {
    void* data;
    std::vector<int64_t> shape;
    int64_t size;
    int64_t itemsize;
    std::string dtype;  // "f4", "i4", ...
};

std::string shape_str(const std::vector<int64_t>& s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + (s.size() == 1 ? ",)" : ")");
}

#if defined(PA_BACKEND_CUDA)
// __cuda_array_interface__ v3's "stream": the stream on which the producer may still be writing the array (None or
// absent: nothing pending, or the producer synchronised). Our kernel must not start before that work ends, so
// when it launches on another stream, our stream waits on an event recorded on the producer's: ordering on the
// device, without blocking the host (a device or stream synchronisation would). The protocol's values: 1 the
// legacy default stream, 2 the per-thread default stream, 0 disallowed (ambiguous between the two), any other a
// cudaStream_t. Our own stream 0 is the default stream this translation unit's runtime calls mean by 0.
cudaStream_t interface_stream(uintptr_t v) {
    if (v == 1) return cudaStreamLegacy;
    if (v == 2) return cudaStreamPerThread;
    return reinterpret_cast<cudaStream_t>(v);
}

void check_stream_call(cudaError_t err, const char* name, const char* call, uintptr_t producer) {
    if (err != cudaSuccess)
        throw pa::KernelError(std::string(name) + ": " + call + " while ordering after its producer's stream " +
                              std::to_string(producer) + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

void wait_for_producer(const py::dict& iface, const char* name, uintptr_t our_stream) {
    if (!iface.contains("stream")) return;
    const py::object value = iface["stream"];
    if (value.is_none()) return;
    if (!py::isinstance<py::int_>(value))
        throw py::type_error(std::string(name) + ": __cuda_array_interface__'s stream must be an int or None, got " +
                             std::string(py::str(py::type::handle_of(value).attr("__name__"))));
    uintptr_t producer = 0;
    try {
        producer = value.cast<uintptr_t>();
    } catch (const py::cast_error&) {
        throw py::value_error(std::string(name) + ": __cuda_array_interface__'s stream " + std::string(py::str(value)) +
                              " is not a stream handle");
    }
    if (producer == 0)
        throw py::value_error(std::string(name) + ": __cuda_array_interface__'s stream is 0, which the protocol "
                              "disallows (1 means the legacy default stream, 2 the per-thread default stream)");
#if defined(CUDA_API_PER_THREAD_DEFAULT_STREAM)
    const cudaStream_t ours = our_stream == 0 ? cudaStreamPerThread : interface_stream(our_stream);
#else
    const cudaStream_t ours = our_stream == 0 ? cudaStreamLegacy : interface_stream(our_stream);
#endif
    const cudaStream_t theirs = interface_stream(producer);
    if (theirs == ours) return;  // stream order already holds
    cudaEvent_t done;
    check_stream_call(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), name, "cudaEventCreateWithFlags",
                      producer);
    cudaError_t err = cudaEventRecord(done, theirs);
    const char* failed = "cudaEventRecord";
    if (err == cudaSuccess) {
        err = cudaStreamWaitEvent(ours, done, 0);
        failed = "cudaStreamWaitEvent";
    }
    // Destroying at once is safe: the wait is already enqueued, and the event's resources outlive it.
    const cudaError_t destroyed = cudaEventDestroy(done);
    check_stream_call(err, name, failed, producer);
    check_stream_call(destroyed, name, "cudaEventDestroy", producer);
}
#endif

// Reads an array's interface and checks it. `dtypes` is a typestr without byte order ("f4"), or several
// separated by '|' ("i4|i8"); the one found is in Array::dtype. On the cuda backend, `stream` (the one the kernel
// will launch on) is first made to wait for the array's producer (wait_for_producer); the host arrays of the
// emulator have no stream.
Array array_arg(py::handle obj, const char* name, const std::string& dtypes, bool writable, uintptr_t stream) {
    if (!py::hasattr(obj, PA_INTERFACE))
        throw py::type_error(std::string(name) + ": expected " + PA_ARRAY_KIND + ", got " +
                             std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
    const py::object iface_obj = obj.attr(PA_INTERFACE);
    if (!py::isinstance<py::dict>(iface_obj)) throw py::type_error(std::string(name) + ": " PA_INTERFACE " is not a dict");
    const py::dict iface = iface_obj;
    const std::string typestr = py::str(iface["typestr"]);
    Array a;
    a.dtype = typestr.size() >= 2 ? typestr.substr(1) : typestr;
    const std::string wanted = "|" + dtypes + "|";
    if (typestr.size() < 3 || typestr[0] == '>' || wanted.find("|" + a.dtype + "|") == std::string::npos) {
        std::string expected = dtypes;
        for (size_t i; (i = expected.find('|')) != std::string::npos;) expected.replace(i, 1, " or ");
        throw py::type_error(std::string(name) + ": expected dtype " + expected + " (little-endian), got " + typestr);
    }
    a.itemsize = std::stoll(a.dtype.substr(1));
    a.size = 1;
    for (py::handle d : py::tuple(iface["shape"])) {
        a.shape.push_back(d.cast<int64_t>());
        if (a.shape.back() < 0) throw py::value_error(std::string(name) + ": negative dimension in " + shape_str(a.shape));
        if (__builtin_mul_overflow(a.size, a.shape.back(), &a.size))
            throw py::value_error(std::string(name) + ": the shape " + shape_str(a.shape) + " has more than 2^63 elements");
    }
    const py::object strides = iface.contains("strides") ? py::object(iface["strides"]) : py::object(py::none());
    if (!strides.is_none() && a.size > 0) {
        int64_t expect = a.itemsize;
        const py::tuple st(strides);
        if (st.size() != a.shape.size()) throw py::value_error(std::string(name) + ": strides do not match the shape");
        for (size_t i = a.shape.size(); i-- > 0;) {
            if (a.shape[i] != 1 && st[i].cast<int64_t>() != expect)
                throw py::value_error(std::string(name) + ": must be C-contiguous (got strides " +
                                      std::string(py::str(strides)) + " for shape " + shape_str(a.shape) + ")");
            expect *= a.shape[i];
        }
    }
    // The spec also allows a buffer object here; we take only the (pointer, read-only) pair.
    const py::object data = iface["data"];
    if (!py::isinstance<py::tuple>(data) || py::len(data) != 2 || !py::isinstance<py::int_>(py::tuple(data)[0]))
        throw py::type_error(std::string(name) + ": expected (pointer, read_only) as the interface's data");
    a.data = reinterpret_cast<void*>(py::tuple(data)[0].cast<uintptr_t>());
    if (writable && py::tuple(data)[1].cast<bool>())
        throw py::value_error(std::string(name) + ": is read-only, but it is written");
    if (a.size > 0 && !a.data) throw py::value_error(std::string(name) + ": has a null data pointer");
    if (reinterpret_cast<uintptr_t>(a.data) % uintptr_t(a.itemsize))
        throw py::value_error(std::string(name) + ": is not aligned to its " + std::to_string(a.itemsize) +
                              "-byte elements (a GPU faults on such loads)");
#if defined(PA_BACKEND_CUDA)
    wait_for_producer(iface, name, stream);
#else
    (void)stream;
#endif
    return a;
}

struct Named {
    const Array& array;
    const char* name;
};

// Outputs must not share memory with inputs or with each other: kernels read inputs while they write outputs
// (exact in-place, the same array as input and output, is allowed where the caller says the op supports it).
void expect_disjoint(const std::vector<Named>& outputs, const std::vector<Named>& inputs, bool in_place = false) {
    auto check = [](const Named& o, const Named& i, bool exact_ok) {
        const auto lo1 = reinterpret_cast<uintptr_t>(o.array.data), lo2 = reinterpret_cast<uintptr_t>(i.array.data);
        const auto hi1 = lo1 + uintptr_t(o.array.size * o.array.itemsize), hi2 = lo2 + uintptr_t(i.array.size * i.array.itemsize);
        if (lo1 == hi1 || lo2 == hi2) return;
        if (exact_ok && lo1 == lo2 && hi1 == hi2) return;
        if (lo1 < hi2 && lo2 < hi1)
            throw py::value_error(std::string(o.name) + ": shares memory with " + i.name + "; pass separate arrays");
    };
    for (auto o = outputs.begin(); o != outputs.end(); ++o) {
        for (const Named& i : inputs) check(*o, i, in_place);
        for (auto o2 = o + 1; o2 != outputs.end(); ++o2) check(*o, *o2, false);
    }
}

void expect_shape(const Array& a, const char* name, const std::vector<int64_t>& shape) {
    if (a.shape != shape)
        throw py::value_error(std::string(name) + ": expected shape " + shape_str(shape) + ", got " + shape_str(a.shape));
}

void expect_rank(const Array& a, const char* name, size_t rank) {
    if (a.shape.size() != rank)
        throw py::value_error(std::string(name) + ": expected " + std::to_string(rank) + " dimensions, got shape " +
                              shape_str(a.shape));
}

// Sizes the kernels index with 32-bit ints; the margin keeps loop counters (i += blockDim) from overflowing.
constexpr int64_t kMaxDim = 2147483647 - 4096;

int int_dim(int64_t v, const char* what) {
    if (v > kMaxDim)
        throw py::value_error(std::string(what) + " = " + std::to_string(v) + " exceeds " + std::to_string(kMaxDim) +
                              ", the largest size the kernels index with 32-bit integers");
    return int(v);
}

// For the ops that index with 32-bit ints: every tensor's element count, not only each dimension, must fit.
void index32(std::initializer_list<std::pair<const Array*, const char*>> arrays) {
    for (const auto& [a, name] : arrays) int_dim(a->size, (std::string(name) + "'s element count").c_str());
}

float* f32(const Array& a) { return static_cast<float*>(a.data); }

pa::Stream stream_arg(uintptr_t s) { return reinterpret_cast<pa::Stream>(s); }

void relu_forward(py::handle x, py::handle y, uintptr_t stream) {
    const Array ax = array_arg(x, "x", "f4", false, stream), ay = array_arg(y, "y", "f4", true, stream);
    expect_shape(ay, "y", ax.shape);
    expect_disjoint({{ay, "y"}}, {{ax, "x"}}, true);
    py::gil_scoped_release nogil;
    pa::relu_forward(f32(ax), f32(ay), ax.size, stream_arg(stream));
}

void relu_backward(py::handle dy, py::handle y, py::handle dx, uintptr_t stream) {
    const Array ady = array_arg(dy, "dy", "f4", false, stream), ay = array_arg(y, "y", "f4", false, stream),
                adx = array_arg(dx, "dx", "f4", true, stream);
    expect_shape(ay, "y", ady.shape);
    expect_shape(adx, "dx", ady.shape);
    expect_disjoint({{adx, "dx"}}, {{ady, "dy"}, {ay, "y"}}, true);
    py::gil_scoped_release nogil;
    pa::relu_backward(f32(ady), f32(ay), f32(adx), ady.size, stream_arg(stream));
}

void sgemm(py::handle a, py::handle b, py::handle c, bool trans_a, bool trans_b, float alpha, float beta,
           py::object bias, uintptr_t stream) {
    const Array aa = array_arg(a, "a", "f4", false, stream), ab = array_arg(b, "b", "f4", false, stream),
                ac = array_arg(c, "c", "f4", true, stream);
    expect_rank(aa, "a", 2);
    expect_rank(ab, "b", 2);
    const int64_t M = trans_a ? aa.shape[1] : aa.shape[0], K = trans_a ? aa.shape[0] : aa.shape[1];
    const int64_t Kb = trans_b ? ab.shape[1] : ab.shape[0], N = trans_b ? ab.shape[0] : ab.shape[1];
    if (Kb != K)
        throw py::value_error("b: inner dimensions disagree: op(a) is " + shape_str({M, K}) + ", op(b) is " +
                              shape_str({Kb, N}));
    expect_shape(ac, "c", {M, N});
    const float* pbias = nullptr;
    if (!bias.is_none()) {
        const Array abias = array_arg(bias, "bias", "f4", false, stream);
        expect_shape(abias, "bias", {N});
        expect_disjoint({{ac, "c"}}, {{abias, "bias"}});
        pbias = f32(abias);
    }
    index32({{&aa, "a"}, {&ab, "b"}, {&ac, "c"}});
    const int m = int_dim(M, "M"), n = int_dim(N, "N"), k = int_dim(K, "K");
    const int lda = int_dim(aa.shape[1], "lda"), ldb = int_dim(ab.shape[1], "ldb");
    expect_disjoint({{ac, "c"}}, {{aa, "a"}, {ab, "b"}});
    py::gil_scoped_release nogil;
    pa::sgemm(trans_a, trans_b, m, n, k, alpha, f32(aa), lda, f32(ab), ldb, beta, f32(ac), n, pbias, stream_arg(stream));
}

void linear_forward(py::handle x, py::handle w, py::object b, py::handle y, uintptr_t stream, bool relu) {
    const Array ax = array_arg(x, "x", "f4", false, stream), aw = array_arg(w, "w", "f4", false, stream),
                ay = array_arg(y, "y", "f4", true, stream);
    expect_rank(ax, "x", 2);
    expect_rank(aw, "w", 2);
    const int64_t batch = ax.shape[0], in = ax.shape[1], out = aw.shape[0];
    expect_shape(aw, "w", {out, in});
    expect_shape(ay, "y", {batch, out});
    const float* pb = nullptr;
    if (!b.is_none()) {
        const Array ab = array_arg(b, "b", "f4", false, stream);
        expect_shape(ab, "b", {out});
        expect_disjoint({{ay, "y"}}, {{ab, "b"}});
        pb = f32(ab);
    }
    index32({{&ax, "x"}, {&aw, "w"}, {&ay, "y"}});
    const int nb = int_dim(batch, "batch"), ni = int_dim(in, "in_features"), no = int_dim(out, "out_features");
    expect_disjoint({{ay, "y"}}, {{ax, "x"}, {aw, "w"}});
    py::gil_scoped_release nogil;
    pa::linear_forward(f32(ax), f32(aw), pb, f32(ay), nb, ni, no, stream_arg(stream), relu);
}

void linear_backward(py::handle dy, py::handle x, py::handle w, py::handle dx, py::handle dw, py::handle db,
                     uintptr_t stream) {
    const Array ady = array_arg(dy, "dy", "f4", false, stream), ax = array_arg(x, "x", "f4", false, stream),
                aw = array_arg(w, "w", "f4", false, stream), adx = array_arg(dx, "dx", "f4", true, stream),
                adw = array_arg(dw, "dw", "f4", true, stream), adb = array_arg(db, "db", "f4", true, stream);
    expect_rank(ax, "x", 2);
    expect_rank(aw, "w", 2);
    const int64_t batch = ax.shape[0], in = ax.shape[1], out = aw.shape[0];
    expect_shape(aw, "w", {out, in});
    expect_shape(ady, "dy", {batch, out});
    expect_shape(adx, "dx", {batch, in});
    expect_shape(adw, "dw", {out, in});
    expect_shape(adb, "db", {out});
    index32({{&ady, "dy"}, {&ax, "x"}, {&aw, "w"}});
    const int nb = int_dim(batch, "batch"), ni = int_dim(in, "in_features"), no = int_dim(out, "out_features");
    expect_disjoint({{adx, "dx"}, {adw, "dw"}, {adb, "db"}}, {{ady, "dy"}, {ax, "x"}, {aw, "w"}});
    py::gil_scoped_release nogil;
    pa::linear_backward(f32(ady), f32(ax), f32(aw), f32(adx), f32(adw), f32(adb), nb, ni, no, stream_arg(stream));
}

void softmax_xent(py::handle logits, py::handle labels, py::handle dlogits, py::handle row_loss, py::handle result,
                  uintptr_t stream) {
    const Array al = array_arg(logits, "logits", "f4", false, stream), ad = array_arg(dlogits, "dlogits", "f4", true, stream),
                ar = array_arg(row_loss, "row_loss", "f4", true, stream), ares = array_arg(result, "result", "f4", true, stream);
    expect_rank(al, "logits", 2);
    const int64_t batch = al.shape[0], classes = al.shape[1];
    if (batch < 1 || classes < 1)
        throw py::value_error("logits: expected shape (batch >= 1, classes >= 1), got " + shape_str(al.shape));
    const Array alab = array_arg(labels, "labels", "i4|i8", false, stream);
    const bool int64 = alab.dtype == "i8";
    expect_shape(alab, "labels", {batch});
    expect_shape(ad, "dlogits", al.shape);
    expect_shape(ar, "row_loss", {batch});
    expect_shape(ares, "result", {2});
    index32({{&al, "logits"}});
    const int nb = int_dim(batch, "batch"), nc = int_dim(classes, "classes");
    expect_disjoint({{ad, "dlogits"}, {ar, "row_loss"}, {ares, "result"}}, {{al, "logits"}, {alab, "labels"}});
    py::gil_scoped_release nogil;
    pa::softmax_xent(f32(al), alab.data, int64, f32(ad), f32(ar), f32(ares), nb, nc, stream_arg(stream));
}

void sgd_update(py::handle w, py::handle dw, py::handle v, float lr, float momentum, float weight_decay,
                uintptr_t stream) {
    const Array aw = array_arg(w, "w", "f4", true, stream), adw = array_arg(dw, "dw", "f4", false, stream),
                av = array_arg(v, "v", "f4", true, stream);
    expect_shape(adw, "dw", aw.shape);
    expect_shape(av, "v", aw.shape);
    expect_disjoint({{aw, "w"}, {av, "v"}}, {{adw, "dw"}});
    if (!(std::isfinite(lr) && lr > 0.0f)) throw py::value_error("lr: expected a finite value > 0, got " + std::to_string(lr));
    if (!(momentum >= 0.0f && momentum < 1.0f))
        throw py::value_error("momentum: expected a value in [0, 1), got " + std::to_string(momentum));
    if (!(std::isfinite(weight_decay) && weight_decay >= 0.0f))
        throw py::value_error("weight_decay: expected a finite value >= 0, got " + std::to_string(weight_decay));
    py::gil_scoped_release nogil;
    pa::sgd_update(f32(aw), f32(adw), f32(av), aw.size, lr, momentum, weight_decay, stream_arg(stream));
}

// sgd_update for lists of tensors (w[i], dw[i], v[i]), in as few launches as the kernel's table allows.
void sgd_update_many(const py::sequence& w, const py::sequence& dw, const py::sequence& v, float lr, float momentum,
                     float weight_decay, uintptr_t stream) {
    const size_t count = py::len(w);
    if (py::len(dw) != count || py::len(v) != count)
        throw py::value_error("sgd_update_many: w, dw and v must be lists of the same length, got " +
                              std::to_string(count) + ", " + std::to_string(py::len(dw)) + " and " +
                              std::to_string(py::len(v)));
    if (!(std::isfinite(lr) && lr > 0.0f)) throw py::value_error("lr: expected a finite value > 0, got " + std::to_string(lr));
    if (!(momentum >= 0.0f && momentum < 1.0f))
        throw py::value_error("momentum: expected a value in [0, 1), got " + std::to_string(momentum));
    if (!(std::isfinite(weight_decay) && weight_decay >= 0.0f))
        throw py::value_error("weight_decay: expected a finite value >= 0, got " + std::to_string(weight_decay));
    std::vector<Array> arrays;
    std::vector<std::string> names;
    arrays.reserve(3 * count);
    names.reserve(3 * count);
    for (size_t i = 0; i < count; ++i) {
        const std::string k = "[" + std::to_string(i) + "]";
        names.push_back("w" + k), names.push_back("dw" + k), names.push_back("v" + k);
        arrays.push_back(array_arg(w[i], names[3 * i].c_str(), "f4", true, stream));
        arrays.push_back(array_arg(dw[i], names[3 * i + 1].c_str(), "f4", false, stream));
        arrays.push_back(array_arg(v[i], names[3 * i + 2].c_str(), "f4", true, stream));
        expect_shape(arrays[3 * i + 1], names[3 * i + 1].c_str(), arrays[3 * i].shape);
        expect_shape(arrays[3 * i + 2], names[3 * i + 2].c_str(), arrays[3 * i].shape);
    }
    std::vector<Named> outputs, inputs;
    for (size_t i = 0; i < count; ++i) {
        outputs.push_back({arrays[3 * i], names[3 * i].c_str()});
        outputs.push_back({arrays[3 * i + 2], names[3 * i + 2].c_str()});
        inputs.push_back({arrays[3 * i + 1], names[3 * i + 1].c_str()});
    }
    expect_disjoint(outputs, inputs);  // every w and v apart from each other and from every dw
    std::vector<pa::SgdTensor> tensors;
    for (size_t i = 0; i < count; ++i)
        tensors.push_back({f32(arrays[3 * i]), f32(arrays[3 * i + 1]), f32(arrays[3 * i + 2]), arrays[3 * i].size});
    py::gil_scoped_release nogil;
    pa::sgd_update_many(tensors.data(), int(tensors.size()), lr, momentum, weight_decay, stream_arg(stream));
}

// The convolution's geometry, checked: returns the output shape (N, K, P, Q).
struct ConvArgs {
    int N, C, H, W, K, R, S;
    std::vector<int64_t> out_shape;
};

ConvArgs conv_args(const Array& x, const Array& w, int stride, int padding, int groups) {
    if (x.shape.size() != 4) throw py::value_error("x: expected NCHW (4 dimensions), got shape " + shape_str(x.shape));
    if (w.shape.size() != 4)
        throw py::value_error("w: expected (out_channels, in_channels / groups, kh, kw), got shape " + shape_str(w.shape));
    if (stride < 1) throw py::value_error("stride: expected >= 1, got " + std::to_string(stride));
    if (padding < 0) throw py::value_error("padding: expected >= 0, got " + std::to_string(padding));
    if (groups < 1) throw py::value_error("groups: expected >= 1, got " + std::to_string(groups));
    ConvArgs a{int_dim(x.shape[0], "batch"), int_dim(x.shape[1], "channels"), int_dim(x.shape[2], "height"),
               int_dim(x.shape[3], "width"), int_dim(w.shape[0], "out_channels"), int_dim(w.shape[2], "kernel height"),
               int_dim(w.shape[3], "kernel width"), {}};
    if (a.C % groups || a.K % groups)
        throw py::value_error("groups: " + std::to_string(a.C) + " input and " + std::to_string(a.K) +
                              " output channels must both divide into " + std::to_string(groups) + " groups");
    if (w.shape[1] != a.C / groups)
        throw py::value_error("w: expected " + std::to_string(a.C / groups) + " input channels per filter (" +
                              std::to_string(a.C) + " / groups " + std::to_string(groups) + "), got shape " +
                              shape_str(w.shape));
    if (a.R < 1 || a.S < 1) throw py::value_error("w: empty kernel " + shape_str(w.shape));
    const int64_t padded_h = int64_t(a.H) + 2 * int64_t(padding), padded_w = int64_t(a.W) + 2 * int64_t(padding);
    if (padded_h < a.R || padded_w < a.S)
        throw py::value_error("w: a " + std::to_string(a.R) + "x" + std::to_string(a.S) + " kernel is larger than the " +
                              std::to_string(padded_h) + "x" + std::to_string(padded_w) + " padded input");
    int_dim(padded_h, "the padded height");  // the kernels compute H + 2 pad in 32-bit ints
    int_dim(padded_w, "the padded width");
    a.out_shape = {a.N, a.K, (padded_h - a.R) / stride + 1, (padded_w - a.S) / stride + 1};
    // conv.cu indexes with 32-bit ints: every tensor must have fewer elements than that.
    int_dim(x.size, "x's element count");
    int_dim(w.size, "w's element count");
    int_dim(a.out_shape[0] * a.out_shape[1] * a.out_shape[2] * a.out_shape[3], "the output's element count");
    return a;
}

void conv_forward(py::handle x, py::handle w, py::object b, py::handle y, int stride, int padding, int groups,
                  uintptr_t stream, bool relu) {
    const Array ax = array_arg(x, "x", "f4", false, stream), aw = array_arg(w, "w", "f4", false, stream),
                ay = array_arg(y, "y", "f4", true, stream);
    const ConvArgs c = conv_args(ax, aw, stride, padding, groups);
    expect_shape(ay, "y", c.out_shape);
    expect_disjoint({{ay, "y"}}, {{ax, "x"}, {aw, "w"}});
    const float* pb = nullptr;
    if (!b.is_none()) {
        const Array ab = array_arg(b, "b", "f4", false, stream);
        expect_shape(ab, "b", {c.K});
        expect_disjoint({{ay, "y"}}, {{ab, "b"}});
        pb = f32(ab);
    }
    py::gil_scoped_release nogil;
    pa::conv_forward(f32(ax), f32(aw), pb, f32(ay), c.N, c.C, c.H, c.W, c.K, c.R, c.S, stride, padding, groups,
                     stream_arg(stream), relu);
}

void conv_backward(py::handle dy, py::handle x, py::handle w, py::handle dx, py::handle dw, py::handle db, int stride,
                   int padding, int groups, uintptr_t stream) {
    const Array ady = array_arg(dy, "dy", "f4", false, stream), ax = array_arg(x, "x", "f4", false, stream),
                aw = array_arg(w, "w", "f4", false, stream), adx = array_arg(dx, "dx", "f4", true, stream),
                adw = array_arg(dw, "dw", "f4", true, stream), adb = array_arg(db, "db", "f4", true, stream);
    const ConvArgs c = conv_args(ax, aw, stride, padding, groups);
    expect_shape(ady, "dy", c.out_shape);
    expect_shape(adx, "dx", ax.shape);
    expect_shape(adw, "dw", aw.shape);
    expect_shape(adb, "db", {c.K});
    expect_disjoint({{adx, "dx"}, {adw, "dw"}, {adb, "db"}}, {{ady, "dy"}, {ax, "x"}, {aw, "w"}});
    py::gil_scoped_release nogil;
    pa::conv_backward(f32(ady), f32(ax), f32(aw), f32(adx), f32(adw), f32(adb), c.N, c.C, c.H, c.W, c.K, c.R, c.S,
                      stride, padding, groups, stream_arg(stream));
}

void conv_backward_data(py::handle dy, py::handle w, py::handle dx, int stride, int padding, int groups,
                        uintptr_t stream, py::object relu_y) {
    const Array ady = array_arg(dy, "dy", "f4", false, stream), aw = array_arg(w, "w", "f4", false, stream),
                adx = array_arg(dx, "dx", "f4", true, stream);
    const ConvArgs c = conv_args(adx, aw, stride, padding, groups);
    expect_shape(ady, "dy", c.out_shape);
    expect_disjoint({{adx, "dx"}}, {{ady, "dy"}, {aw, "w"}});
    const float* py_relu = nullptr;
    if (!relu_y.is_none()) {
        const Array ar = array_arg(relu_y, "relu_y", "f4", false, stream);
        expect_shape(ar, "relu_y", adx.shape);
        expect_disjoint({{adx, "dx"}}, {{ar, "relu_y"}});
        py_relu = f32(ar);
    }
    py::gil_scoped_release nogil;
    pa::conv_backward_data(f32(ady), f32(aw), f32(adx), c.N, c.C, c.H, c.W, c.K, c.R, c.S, stride, padding, groups,
                           stream_arg(stream), py_relu);
}

void conv_backward_filter(py::handle dy, py::handle x, py::handle dw, py::handle db, int stride, int padding,
                          int groups, uintptr_t stream) {
    const Array ady = array_arg(dy, "dy", "f4", false, stream), ax = array_arg(x, "x", "f4", false, stream),
                adw = array_arg(dw, "dw", "f4", true, stream), adb = array_arg(db, "db", "f4", true, stream);
    const ConvArgs c = conv_args(ax, adw, stride, padding, groups);
    expect_shape(ady, "dy", c.out_shape);
    expect_shape(adb, "db", {c.K});
    expect_disjoint({{adw, "dw"}, {adb, "db"}}, {{ady, "dy"}, {ax, "x"}});
    py::gil_scoped_release nogil;
    pa::conv_backward_filter(f32(ady), f32(ax), f32(adw), f32(adb), c.N, c.C, c.H, c.W, c.K, c.R, c.S, stride, padding,
                             groups, stream_arg(stream));
}

// (N, C, H, W) -> (N, C, H * W) as the kernels index it.
void expect_nchw(const Array& a, const char* name) {
    if (a.shape.size() != 4)
        throw py::value_error(std::string(name) + ": expected NCHW (4 dimensions), got shape " + shape_str(a.shape));
}

void lrn_check(int size, float alpha, float beta, float k) {
    if (size < 1 || size % 2 == 0) throw py::value_error("size: expected an odd window >= 1, got " + std::to_string(size));
    if (!(std::isfinite(alpha) && alpha >= 0.0f)) throw py::value_error("alpha: expected a finite value >= 0");
    if (!(std::isfinite(beta) && beta >= 0.0f)) throw py::value_error("beta: expected a finite value >= 0");
    if (!(std::isfinite(k) && k > 0.0f)) throw py::value_error("k: expected a finite value > 0");
}

void lrn_forward(py::handle x, py::handle y, int size, float alpha, float beta, float k, uintptr_t stream) {
    const Array ax = array_arg(x, "x", "f4", false, stream), ay = array_arg(y, "y", "f4", true, stream);
    expect_nchw(ax, "x");
    expect_shape(ay, "y", ax.shape);
    expect_disjoint({{ay, "y"}}, {{ax, "x"}});
    lrn_check(size, alpha, beta, k);
    const int C = int_dim(ax.shape[1], "channels");
    py::gil_scoped_release nogil;
    pa::lrn_forward(f32(ax), f32(ay), ax.shape[0], C, ax.shape[2] * ax.shape[3], size, alpha, beta, k, stream_arg(stream));
}

void lrn_backward(py::handle dy, py::handle x, py::handle y, py::handle dx, int size, float alpha, float beta, float k,
                  uintptr_t stream) {
    const Array ady = array_arg(dy, "dy", "f4", false, stream), ax = array_arg(x, "x", "f4", false, stream),
                ay = array_arg(y, "y", "f4", false, stream), adx = array_arg(dx, "dx", "f4", true, stream);
    expect_nchw(ax, "x");
    expect_shape(ady, "dy", ax.shape);
    expect_shape(ay, "y", ax.shape);
    expect_shape(adx, "dx", ax.shape);
    expect_disjoint({{adx, "dx"}}, {{ady, "dy"}, {ax, "x"}, {ay, "y"}});
    lrn_check(size, alpha, beta, k);
    const int C = int_dim(ax.shape[1], "channels");
    py::gil_scoped_release nogil;
    pa::lrn_backward(f32(ady), f32(ax), f32(ay), f32(adx), ax.shape[0], C, ax.shape[2] * ax.shape[3], size, alpha, beta,
                     k, stream_arg(stream));
}

// Checks the window and returns the pooled shape.
std::vector<int64_t> pool_shape(const Array& x, int size, int stride) {
    expect_nchw(x, "x");
    if (size < 1) throw py::value_error("size: expected >= 1, got " + std::to_string(size));
    if (stride < 1) throw py::value_error("stride: expected >= 1, got " + std::to_string(stride));
    if (x.shape[2] < size || x.shape[3] < size)
        throw py::value_error("x: a " + std::to_string(size) + "x" + std::to_string(size) +
                              " window does not fit an input of " + std::to_string(x.shape[2]) + "x" +
                              std::to_string(x.shape[3]));
    int_dim(x.shape[2], "height");
    int_dim(x.shape[3], "width");
    return {x.shape[0], x.shape[1], (x.shape[2] - size) / stride + 1, (x.shape[3] - size) / stride + 1};
}

void maxpool_forward(py::handle x, py::handle y, int size, int stride, uintptr_t stream) {
    const Array ax = array_arg(x, "x", "f4", false, stream), ay = array_arg(y, "y", "f4", true, stream);
    expect_shape(ay, "y", pool_shape(ax, size, stride));
    expect_disjoint({{ay, "y"}}, {{ax, "x"}});
    py::gil_scoped_release nogil;
    pa::maxpool_forward(f32(ax), f32(ay), ax.shape[0] * ax.shape[1], int(ax.shape[2]), int(ax.shape[3]), size, stride,
                        stream_arg(stream));
}

void maxpool_backward(py::handle dy, py::handle x, py::handle y, py::handle dx, int size, int stride, uintptr_t stream,
                      bool relu) {
    const Array ady = array_arg(dy, "dy", "f4", false, stream), ax = array_arg(x, "x", "f4", false, stream),
                ay = array_arg(y, "y", "f4", false, stream), adx = array_arg(dx, "dx", "f4", true, stream);
    const std::vector<int64_t> pooled = pool_shape(ax, size, stride);
    expect_shape(ady, "dy", pooled);
    expect_shape(ay, "y", pooled);
    expect_shape(adx, "dx", ax.shape);
    expect_disjoint({{adx, "dx"}}, {{ady, "dy"}, {ax, "x"}, {ay, "y"}});
    py::gil_scoped_release nogil;
    pa::maxpool_backward(f32(ady), f32(ax), f32(ay), f32(adx), ax.shape[0] * ax.shape[1], int(ax.shape[2]),
                         int(ax.shape[3]), size, stride, stream_arg(stream), relu);
}

// Adaptive average pooling's geometry: x (N, C, H, W) pooled to y (N, C, OH, OW), every size >= 1. The output
// size is the pooled array's shape (y forward, dy backward), as dx's shape gives x's.
void adaptive_pool_check(const Array& x, const char* x_name, const Array& y, const char* y_name) {
    expect_nchw(x, x_name);
    expect_nchw(y, y_name);
    if (x.shape[2] < 1 || x.shape[3] < 1)
        throw py::value_error(std::string(x_name) + ": expected height and width >= 1, got shape " + shape_str(x.shape));
    if (y.shape[2] < 1 || y.shape[3] < 1)
        throw py::value_error(std::string(y_name) + ": expected an output size >= 1 x 1, got shape " + shape_str(y.shape));
    expect_shape(y, y_name, {x.shape[0], x.shape[1], y.shape[2], y.shape[3]});
    int_dim(x.shape[2], "height");
    int_dim(x.shape[3], "width");
    int_dim(y.shape[2], "output height");
    int_dim(y.shape[3], "output width");
}

void adaptive_avgpool_forward(py::handle x, py::handle y, uintptr_t stream) {
    const Array ax = array_arg(x, "x", "f4", false, stream), ay = array_arg(y, "y", "f4", true, stream);
    adaptive_pool_check(ax, "x", ay, "y");
    expect_disjoint({{ay, "y"}}, {{ax, "x"}});
    py::gil_scoped_release nogil;
    pa::adaptive_avgpool_forward(f32(ax), f32(ay), ax.shape[0] * ax.shape[1], int(ax.shape[2]), int(ax.shape[3]),
                                 int(ay.shape[2]), int(ay.shape[3]), stream_arg(stream));
}

void adaptive_avgpool_backward(py::handle dy, py::handle dx, uintptr_t stream) {
    const Array ady = array_arg(dy, "dy", "f4", false, stream), adx = array_arg(dx, "dx", "f4", true, stream);
    adaptive_pool_check(adx, "dx", ady, "dy");
    expect_disjoint({{adx, "dx"}}, {{ady, "dy"}});
    py::gil_scoped_release nogil;
    pa::adaptive_avgpool_backward(f32(ady), f32(adx), adx.shape[0] * adx.shape[1], int(adx.shape[2]),
                                  int(adx.shape[3]), int(ady.shape[2]), int(ady.shape[3]), stream_arg(stream));
}

// The drop decision in integers: keep iff the 24-bit draw >= ceil(p * 2^24).
unsigned keep_threshold(double p) {
    if (!(p >= 0.0 && p < 1.0)) throw py::value_error("p: expected a value in [0, 1), got " + std::to_string(p));
    return unsigned(std::ceil(p * 16777216.0));
}

void dropout_forward(py::handle x, py::handle y, py::handle mask, double p, unsigned long long seed, uintptr_t stream) {
    const Array ax = array_arg(x, "x", "f4", false, stream), ay = array_arg(y, "y", "f4", true, stream),
                am = array_arg(mask, "mask", "u4", true, stream);
    expect_shape(ay, "y", ax.shape);
    expect_shape(am, "mask", {(ax.size + 31) / 32});
    expect_disjoint({{ay, "y"}, {am, "mask"}}, {{ax, "x"}});
    const unsigned threshold = keep_threshold(p);
    py::gil_scoped_release nogil;
    pa::dropout_forward(f32(ax), f32(ay), static_cast<unsigned*>(am.data), ax.size, seed, threshold,
                        float(1.0 / (1.0 - p)), stream_arg(stream));
}

void dropout_backward(py::handle dy, py::handle mask, py::handle dx, double p, uintptr_t stream) {
    const Array ady = array_arg(dy, "dy", "f4", false, stream), am = array_arg(mask, "mask", "u4", false, stream),
                adx = array_arg(dx, "dx", "f4", true, stream);
    expect_shape(am, "mask", {(ady.size + 31) / 32});
    expect_shape(adx, "dx", ady.shape);
    expect_disjoint({{adx, "dx"}}, {{ady, "dy"}, {am, "mask"}});
    keep_threshold(p);
    py::gil_scoped_release nogil;
    pa::dropout_backward(f32(ady), static_cast<const unsigned*>(am.data), f32(adx), ady.size, float(1.0 / (1.0 - p)),
                         stream_arg(stream));
}

void selftest_tiled_gemm(py::handle a, py::handle b, py::handle c, uintptr_t stream) {
    const Array aa = array_arg(a, "a", "f4", false, stream), ab = array_arg(b, "b", "f4", false, stream),
                ac = array_arg(c, "c", "f4", true, stream);
    expect_rank(aa, "a", 2);
    expect_shape(ab, "b", {aa.shape[1], ab.shape.size() == 2 ? ab.shape[1] : -1});
    expect_shape(ac, "c", {aa.shape[0], ab.shape[1]});
    const int m = int_dim(aa.shape[0], "M"), n = int_dim(ab.shape[1], "N"), k = int_dim(aa.shape[1], "K");
    py::gil_scoped_release nogil;
    pa::selftest_tiled_gemm(f32(aa), f32(ab), f32(ac), m, n, k, stream_arg(stream));
}

void selftest_shuffle_sum(py::handle x, py::handle out, int variant, uintptr_t stream) {
    const Array ax = array_arg(x, "x", "f4", false, stream), aout = array_arg(out, "out", "f4", true, stream);
    expect_rank(ax, "x", 1);
    if (ax.size < 1) throw py::value_error("x: must not be empty");
    const int n = int_dim(ax.size, "n");
    expect_shape(aout, "out", {(n + 127) / 128});
    if (variant < 0 || variant > 5) throw py::value_error("variant: expected 0..5");
    py::gil_scoped_release nogil;
    pa::selftest_shuffle_sum(f32(ax), f32(aout), n, variant, stream_arg(stream));
}

void selftest_dynamic_shared(py::handle x, py::handle y, int shared_floats, uintptr_t stream) {
    const Array ax = array_arg(x, "x", "f4", false, stream), ay = array_arg(y, "y", "f4", true, stream);
    expect_rank(ax, "x", 1);
    expect_shape(ay, "y", ax.shape);
    if (ax.size < 1) throw py::value_error("x: must not be empty");
    if (shared_floats < 1) throw py::value_error("shared_floats: expected >= 1");
    const int n = int_dim(ax.size, "n");
    py::gil_scoped_release nogil;
    pa::selftest_dynamic_shared(f32(ax), f32(ay), n, shared_floats, stream_arg(stream));
}

void selftest_atomics(py::handle x, py::handle counters, uintptr_t stream) {
    const Array ax = array_arg(x, "x", "i4", false, stream), ac = array_arg(counters, "counters", "i4", true, stream);
    expect_rank(ax, "x", 1);
    expect_shape(ac, "counters", {4});
    if (ax.size < 1) throw py::value_error("x: must not be empty");
    const int n = int_dim(ax.size, "n");
    py::gil_scoped_release nogil;
    pa::selftest_atomics(static_cast<const int*>(ax.data), static_cast<int*>(ac.data), n, stream_arg(stream));
}

void selftest_intrinsics(py::handle out, uintptr_t stream) {
    const Array aout = array_arg(out, "out", "u4", true, stream);
    expect_shape(aout, "out", {48 * 29});
    py::gil_scoped_release nogil;
    pa::selftest_intrinsics(static_cast<unsigned*>(aout.data), stream_arg(stream));
}

void selftest_exited_lanes(py::handle x, py::handle out, uintptr_t stream) {
    const Array ax = array_arg(x, "x", "f4", false, stream), aout = array_arg(out, "out", "f4", true, stream);
    expect_shape(ax, "x", {48});
    expect_shape(aout, "out", {48});
    py::gil_scoped_release nogil;
    pa::selftest_exited_lanes(f32(ax), f32(aout), stream_arg(stream));
}

// augment_batch's scale: one number for every channel, or a sequence of three (RGB), each finite as a float32.
std::array<float, 3> channel_scale(py::handle scale) {
    std::array<float, 3> s;
    try {
        if (py::isinstance<py::str>(scale) || py::isinstance<py::bytes>(scale)) throw py::cast_error();
        if (py::isinstance<py::sequence>(scale)) {
            const py::sequence seq = py::reinterpret_borrow<py::sequence>(scale);
            if (seq.size() != 3)
                throw py::value_error("scale: expected a number or 3 numbers (one per RGB channel), got " +
                                      std::to_string(seq.size()));
            for (size_t c = 0; c < 3; ++c) s[c] = seq[c].cast<float>();
        } else {
            s.fill(scale.cast<float>());
        }
    } catch (const py::cast_error&) {
        throw py::type_error("scale: expected a number or 3 numbers (one per RGB channel), got " +
                             std::string(py::str(py::type::handle_of(scale).attr("__name__"))));
    }
    for (float v : s)
        if (!std::isfinite(v)) throw py::value_error("scale: expected finite values (as float32), got " + std::to_string(v));
    return s;
}

void augment_batch(py::handle images, py::handle mean, py::handle params, py::handle shift, py::handle out,
                   py::handle scale_obj, uintptr_t stream) {
    const Array ai = array_arg(images, "images", "u1", false, stream), am = array_arg(mean, "mean", "f4", false, stream),
                ap = array_arg(params, "params", "i4", false, stream), as = array_arg(shift, "shift", "f4", false, stream),
                ao = array_arg(out, "out", "f4", true, stream);
    if (ai.shape.size() != 4 || ai.shape[3] != 3 || ai.shape[1] != ai.shape[2])
        throw py::value_error("images: expected (batch, size, size, 3) uint8, got shape " + shape_str(ai.shape));
    const int64_t batch = ai.shape[0], size = ai.shape[1];
    if (ao.shape.size() != 4 || ao.shape[0] != batch || ao.shape[1] != 3 || ao.shape[2] != ao.shape[3])
        throw py::value_error("out: expected (" + std::to_string(batch) + ", 3, crop, crop), got " + shape_str(ao.shape));
    const int64_t crop = ao.shape[2];
    if (crop < 1 || crop > size)
        throw py::value_error("out: a crop of " + std::to_string(crop) + " does not fit images of " + std::to_string(size));
    expect_shape(am, "mean", {size, size, 3});
    expect_shape(ap, "params", {batch, 3});
    expect_shape(as, "shift", {batch, 3});
    const std::array<float, 3> scale = channel_scale(scale_obj);
    index32({{&ai, "images"}, {&ao, "out"}});
    expect_disjoint({{ao, "out"}}, {{ai, "images"}, {am, "mean"}, {ap, "params"}, {as, "shift"}});
    py::gil_scoped_release nogil;
    pa::augment_batch(static_cast<const unsigned char*>(ai.data), f32(am), static_cast<const int*>(ap.data), f32(as),
                      f32(ao), int(batch), int(size), int(crop), scale, stream_arg(stream));
}

void selftest_index64(py::handle x, py::handle y, uintptr_t stream) {
    const Array ax = array_arg(x, "x", "f4", false, stream), ay = array_arg(y, "y", "f4", true, stream);
    expect_rank(ax, "x", 1);
    expect_shape(ay, "y", ax.shape);
    if (ax.size < 1) throw py::value_error("x: expected at least one element");
    expect_disjoint({{ay, "y"}}, {{ax, "x"}}, false);
    py::gil_scoped_release nogil;
    pa::selftest_index64(f32(ax), f32(ay), int_dim(ax.size, "n"), stream_arg(stream));
}

void selftest_memory_pattern(const std::string& pattern, py::handle x, py::handle y, uintptr_t stream) {
    const Array ax = array_arg(x, "x", "f4", false, stream), ay = array_arg(y, "y", "f4", true, stream);
    expect_shape(ax, "x", {65536});
    expect_shape(ay, "y", {4096});
    expect_disjoint({{ay, "y"}}, {{ax, "x"}}, false);
    py::gil_scoped_release nogil;
    pa::selftest_memory_pattern(pattern.c_str(), f32(ax), f32(ay), stream_arg(stream));
}

void selftest_uninitialised_shared(py::handle out, uintptr_t stream) {
    const Array aout = array_arg(out, "out", "f4", true, stream);
    expect_shape(aout, "out", {128});
    py::gil_scoped_release nogil;
    pa::selftest_uninitialised_shared(f32(aout), stream_arg(stream));
}

void selftest_planted(const std::string& fault, py::handle scratch) {
#if defined(PA_BACKEND_CUDA)
    (void)fault;
    (void)scratch;
    throw py::value_error("selftest_planted: planted faults run on the emulator only (on a GPU several would hang)");
#else
    const Array as = array_arg(scratch, "scratch", "f4", true, 0);
    expect_shape(as, "scratch", {1024});
    py::gil_scoped_release nogil;
    pa::selftest_planted(fault.c_str(), f32(as), nullptr);
#endif
}

}  // namespace

PYBIND11_MODULE(PA_MODULE, m) {
    m.doc() = "pyalexnet kernels (see kernels/kernels.h for each launcher's contract)";
    // Module-local: each of _emu, _emu_profile and _cuda raises its own KernelError, whichever was imported last.
    py::register_local_exception<pa::KernelError>(m, "KernelError", PyExc_RuntimeError);
#if defined(PA_BACKEND_CUDA)
    m.attr("backend") = "cuda";
    m.def("device_status", []() -> py::tuple {
        int n = 0;
        const cudaError_t err = cudaGetDeviceCount(&n);
        if (err != cudaSuccess) return py::make_tuple(0, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err));
        return py::make_tuple(n, std::string());
    }, "(number of CUDA devices, '' or the CUDA error that hides them: no driver, a driver too old, ...).");
    m.def("synchronize", [] {
        py::gil_scoped_release nogil;
        const cudaError_t err = cudaDeviceSynchronize();
        if (err != cudaSuccess)
            throw pa::KernelError(std::string("cudaDeviceSynchronize: ") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
    }, "Waits for every kernel; raises KernelError for an asynchronous fault.");
#else
    m.attr("backend") = "emu";
    m.attr("fiber_switch") = pa_emu::fiber_switch_name();
    m.def("worker_count", &pa_emu::worker_count, "Worker threads of the emulator (PYALEXNET_EMU_WORKERS).");
    m.def("emulated_sm_count", &pa_emu::emulated_sm_count,
          "SMs of the card the emulator stands for (132 unless set): grid-shaping choices such as split-K follow it.");
    m.def("set_emulated_sm_count", &pa_emu::set_emulated_sm_count, py::arg("n"),
          "Stand for a card with n SMs (pyalexnet profile sets its card's).");
    m.def("launch_bounds_seen", &pa_emu::launch_bounds_seen,
          "Each kernel launched so far (as its launch names it) -> its __launch_bounds__ threads, 0 if none.");
#if defined(__SANITIZE_ADDRESS__)
    m.attr("sanitizer") = "address,undefined";
#elif defined(PA_EMU_RACECHECK)
    m.attr("sanitizer") = "race";
#else
    m.attr("sanitizer") = py::none();
#endif
    m.def("synchronize", [] {}, "Emulated launches are synchronous: nothing to wait for.");
#if defined(PA_EMU_PROFILE)
    m.attr("profile") = true;
    m.def("profile_set_interior_samples", &pa_emu::prof::set_interior_samples, py::arg("n"),
          "0: run every block of every launch; n > 0: per grid dimension, the first, the last and n interior blocks.");
    m.def("profile_interior_samples", &pa_emu::prof::interior_samples);
    m.def("profile_take", [] {
        std::vector<pa_emu::prof::LaunchCounts> launches;
        {
            py::gil_scoped_release nogil;
            launches = pa_emu::prof::take_launches();
        }
        py::list out;
        for (const auto& l : launches) {
            py::list instructions, buffers;
            for (const auto& c : l.instructions)
                instructions.append(py::dict(py::arg("pc") = c.pc, py::arg("space") = c.space == 0 ? "global" : "shared",
                                             py::arg("kind") = c.kind == 0 ? "load" : c.kind == 1 ? "store" : "atomic",
                                             py::arg("width") = c.width, py::arg("instructions") = c.instructions,
                                             py::arg("lanes") = c.lanes, py::arg("sectors") = c.sectors,
                                             py::arg("ideal_sectors") = c.ideal_sectors, py::arg("wavefronts") = c.wavefronts,
                                             py::arg("ideal_wavefronts") = c.ideal_wavefronts));
            for (const auto& b : l.buffers)
                buffers.append(py::dict(py::arg("argument") = b.argument, py::arg("read_bytes") = b.read_bytes,
                                        py::arg("write_bytes") = b.write_bytes, py::arg("extent") = b.extent));
            out.append(py::dict(
                py::arg("kernel") = l.kernel, py::arg("name") = l.name, py::arg("file") = l.file, py::arg("line") = l.line,
                py::arg("grid") = py::make_tuple(l.grid[0], l.grid[1], l.grid[2]),
                py::arg("block") = py::make_tuple(l.block[0], l.block[1], l.block[2]),
                py::arg("dynamic_shared") = l.dynamic_shared, py::arg("static_shared") = l.static_shared,
                py::arg("ctas") = l.ctas, py::arg("sampled_ctas") = l.sampled_ctas, py::arg("barriers") = l.barriers,
                py::arg("other_global_bytes") = l.other_global_bytes, py::arg("instructions") = instructions,
                py::arg("buffers") = buffers));
        }
        return out;
    }, "Every launch counted since the last call (see kernels/emu/counters.h), oldest first.");
#else
    m.attr("profile") = false;
#endif
#endif
    const auto s = py::arg("stream") = uintptr_t(0);
    m.def("relu_forward", &relu_forward, py::arg("x"), py::arg("y"), s, "y = max(x, 0), NaN kept.");
    m.def("relu_backward", &relu_backward, py::arg("dy"), py::arg("y"), py::arg("dx"), s, "dx = dy where y > 0, else 0.");
    m.def("sgemm", &sgemm, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("trans_a") = false,
          py::arg("trans_b") = false, py::arg("alpha") = 1.0f, py::arg("beta") = 0.0f, py::arg("bias") = py::none(), s,
          "c = alpha op(a) op(b) + beta c + bias (op transposes when trans_* is set).");
    m.def("linear_forward", &linear_forward, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("y"), s,
          py::arg("relu") = false, "y = x w^T + b (relu: then max(y, 0), NaN kept: the next layer's ReLU fused).");
    m.def("linear_backward", &linear_backward, py::arg("dy"), py::arg("x"), py::arg("w"), py::arg("dx"), py::arg("dw"),
          py::arg("db"), s, "dx = dy w, dw = dy^T x, db = sum_rows dy (all overwritten).");
    m.def("softmax_xent", &softmax_xent, py::arg("logits"), py::arg("labels"), py::arg("dlogits"), py::arg("row_loss"),
          py::arg("result"), s, "Per-row softmax cross-entropy and dlogits; result = [mean loss, bad labels].");
    m.def("sgd_update", &sgd_update, py::arg("w"), py::arg("dw"), py::arg("v"), py::arg("lr"), py::arg("momentum"),
          py::arg("weight_decay"), s, "v = momentum v - weight_decay lr w - lr dw; w += v (in place).");
    m.def("sgd_update_many", &sgd_update_many, py::arg("w"), py::arg("dw"), py::arg("v"), py::arg("lr"),
          py::arg("momentum"), py::arg("weight_decay"), s,
          "sgd_update for lists of tensors, in one launch per 32 of them.");
    m.def("conv_forward", &conv_forward, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("y"), py::arg("stride"),
          py::arg("padding"), py::arg("groups"), s, py::arg("relu") = false,
          "y = conv2d(x, w) + b (cross-correlation, zero padding, groups); relu: then max(y, 0), NaN kept.");
    m.def("conv_backward", &conv_backward, py::arg("dy"), py::arg("x"), py::arg("w"), py::arg("dx"), py::arg("dw"),
          py::arg("db"), py::arg("stride"), py::arg("padding"), py::arg("groups"), s,
          "dx, dw, db of conv_forward (all overwritten; deterministic).");
    m.def("conv_backward_data", &conv_backward_data, py::arg("dy"), py::arg("w"), py::arg("dx"), py::arg("stride"),
          py::arg("padding"), py::arg("groups"), s, py::arg("relu_y") = py::none(),
          "dx of conv_forward (dx's shape gives x's); relu_y (like dx): dx also 0 where relu_y is not > 0 (the "
          "derivative of the ReLU whose output x is).");
    m.def("conv_backward_filter", &conv_backward_filter, py::arg("dy"), py::arg("x"), py::arg("dw"), py::arg("db"),
          py::arg("stride"), py::arg("padding"), py::arg("groups"), s, "dw and db of conv_forward.");
    m.def("lrn_forward", &lrn_forward, py::arg("x"), py::arg("y"), py::arg("size"), py::arg("alpha"), py::arg("beta"),
          py::arg("k"), s, "y = x / (k + alpha sum_window x^2)^beta across channels (alpha not divided by size).");
    m.def("lrn_backward", &lrn_backward, py::arg("dy"), py::arg("x"), py::arg("y"), py::arg("dx"), py::arg("size"),
          py::arg("alpha"), py::arg("beta"), py::arg("k"), s, "dx of lrn_forward.");
    m.def("maxpool_forward", &maxpool_forward, py::arg("x"), py::arg("y"), py::arg("size"), py::arg("stride"), s,
          "Max over size x size windows at stride, floor mode, no padding.");
    m.def("maxpool_backward", &maxpool_backward, py::arg("dy"), py::arg("x"), py::arg("y"), py::arg("dx"),
          py::arg("size"), py::arg("stride"), s, py::arg("relu") = false,
          "dx of maxpool_forward: dy to each window's first maximum (relu: and 0 where x is not > 0, x being a ReLU's "
          "output).");
    m.def("adaptive_avgpool_forward", &adaptive_avgpool_forward, py::arg("x"), py::arg("y"), s,
          "PyTorch's AdaptiveAvgPool2d to y's (OH, OW): cell (i, j) averages rows [floor(i H / OH), "
          "ceil((i + 1) H / OH)), columns likewise.");
    m.def("adaptive_avgpool_backward", &adaptive_avgpool_backward, py::arg("dy"), py::arg("dx"), s,
          "dx of adaptive_avgpool_forward (dx's shape gives x's; deterministic).");
    m.def("dropout_forward", &dropout_forward, py::arg("x"), py::arg("y"), py::arg("mask"), py::arg("p"),
          py::arg("seed"), s, "Inverted dropout with a Philox4x32-10 bit mask keyed by (seed, element index).");
    m.def("dropout_backward", &dropout_backward, py::arg("dy"), py::arg("mask"), py::arg("dx"), py::arg("p"), s,
          "dx = dy * mask / (1 - p).");
    m.def("augment_batch", &augment_batch, py::arg("images"), py::arg("mean"), py::arg("params"), py::arg("shift"),
          py::arg("out"), py::arg("scale"), s,
          "Crop, flip, mean subtraction and PCA colour shift of a uint8 HWC batch into float32 NCHW, times scale "
          "(a number, or one per RGB channel).");
    m.def("split_k_plan", [](long long tiles, int layers, int K, int bk, int sms) {
        if (tiles < 1 || layers < 1 || K < 0 || bk < 1 || sms < 1)
            throw py::value_error("split_k_plan: expected tiles, layers, bk, sms >= 1 and K >= 0");
        const auto plan = pa::split_k_plan(tiles, layers, K, bk, sms);
        return py::make_tuple(plan[0], plan[1]);
    }, py::arg("tiles"), py::arg("layers"), py::arg("K"), py::arg("bk"), py::arg("sms"),
          "(ranges, depth of each) of the split-K the GEMM-shaped launchers use ((1, K): none).");
    m.def("selftest_tiled_gemm", &selftest_tiled_gemm, py::arg("a"), py::arg("b"), py::arg("c"), s);
    m.def("selftest_shuffle_sum", &selftest_shuffle_sum, py::arg("x"), py::arg("out"), py::arg("variant"), s);
    m.def("selftest_dynamic_shared", &selftest_dynamic_shared, py::arg("x"), py::arg("y"), py::arg("shared_floats"), s);
    m.def("selftest_atomics", &selftest_atomics, py::arg("x"), py::arg("counters"), s);
    m.def("selftest_planted", &selftest_planted, py::arg("fault"), py::arg("scratch"));
    m.def("selftest_exited_lanes", &selftest_exited_lanes, py::arg("x"), py::arg("out"), s);
    m.def("selftest_intrinsics", &selftest_intrinsics, py::arg("out"), s);
    m.def("selftest_uninitialised_shared", &selftest_uninitialised_shared, py::arg("out"), s);
    m.def("selftest_static_shared_bytes", &pa::selftest_static_shared_bytes);
    m.def("selftest_index64", &selftest_index64, py::arg("x"), py::arg("y"), s);
    m.def("selftest_memory_pattern", &selftest_memory_pattern, py::arg("pattern"), py::arg("x"), py::arg("y"), s);
}
