// PyTorch bindings of the WKV operator: argument checks, dtype handling, and dispatch to
// the CPU kernels (wkv_cpu.cpp) or, in a build with -DWITH_CUDA, the CUDA kernels
// (wkv_cuda.cu, or the chunked ones of wkv_cuda_chunked.cu, chosen by RWKV_WKV_CUDA). The ops are registered twice, on purpose (notebook 05 shows both):
//   - TORCH_LIBRARY(rwkv, m): torch.ops.rwkv.wkv_forward / torch.ops.rwkv.wkv_backward,
//     operators known to PyTorch's dispatcher (and so to TorchScript and torch.ops);
//   - PYBIND11_MODULE: the same two functions as attributes of the Python module.
//
// Dtypes: the math runs in float32, or in float64 when k is float64 (for gradcheck).
// float16/bfloat16 inputs are converted to float32. y is returned in k's dtype, the state
// (a, b, p) in the compute dtype, and each gradient in the dtype of its input.
//
// The ops take the raw time_decay; w = -exp(time_decay) is formed here, and the gradient
// returned for time_decay includes the chain rule factor dw/dtime_decay = w.
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// ---- kernels, defined in wkv_cpu.cpp and wkv_cuda.cu (C++ linkage: a signature that
// does not match its definition fails to link instead of misbehaving) ----
#define WKV_DECLARE_CPU(F)                                                                  \
    void wkv_forward_cpu(int64_t B, int64_t T, int64_t C, const F* w, const F* u, const F* k, \
                         const F* v, const F* a0, const F* b0, const F* p0, F* y, F* aT,    \
                         F* bT, F* pT);                                                     \
    void wkv_backward_cpu(int64_t B, int64_t T, int64_t C, const F* w, const F* u,          \
                          const F* k, const F* v, const F* a0, const F* b0, const F* p0,    \
                          const F* gy, const F* gaT, const F* gbT, const F* gpT, F* gw,     \
                          F* gu, F* gk, F* gv, F* ga0, F* gb0, F* gp0);
WKV_DECLARE_CPU(float)
WKV_DECLARE_CPU(double)

#ifdef WITH_CUDA
// The CUDA launchers take the stream as a last argument and return a cudaError_t as int.
#define WKV_DECLARE_CUDA(F)                                                                 \
    int wkv_forward_cuda(int64_t B, int64_t T, int64_t C, const F* w, const F* u,          \
                         const F* k, const F* v, const F* a0, const F* b0, const F* p0,    \
                         F* y, F* aT, F* bT, F* pT, void* stream);                         \
    int wkv_backward_cuda(int64_t B, int64_t T, int64_t C, const F* w, const F* u,         \
                          const F* k, const F* v, const F* a0, const F* b0, const F* p0,   \
                          const F* gy, const F* gaT, const F* gbT, const F* gpT,           \
                          F* saved_p, F* gw, F* gu, F* gk, F* gv, F* ga0, F* gb0, F* gp0,  \
                          void* stream);
WKV_DECLARE_CUDA(float)
WKV_DECLARE_CUDA(double)
const char* wkv_cuda_error_string(int code);
// The chunked kernels (wkv_cuda_chunked.cu) and the choice between them and the
// sequential ones: wkv_cuda_chunks returns 0 (sequential), J >= 1 (chunked, J chunks per
// sequence) or a negative code for a bad RWKV_WKV_CUDA / RWKV_WKV_CUDA_CHUNKS setting.
#define WKV_DECLARE_CUDA_CHUNKED(F)                                                          \
    int wkv_forward_cuda_chunked(int64_t B, int64_t T, int64_t C, int chunks, const F* w,   \
                                 const F* u, const F* k, const F* v, const F* a0,           \
                                 const F* b0, const F* p0, F* y, F* aT, F* bT, F* pT,       \
                                 void* stream);                                             \
    int wkv_backward_cuda_chunked(int64_t B, int64_t T, int64_t C, int chunks, const F* w,  \
                                  const F* u, const F* k, const F* v, const F* a0,          \
                                  const F* b0, const F* p0, const F* gy, const F* gaT,      \
                                  const F* gbT, const F* gpT, int exact_p, F* saved_p,      \
                                  F* gw, F* gu, F* gk, F* gv, F* ga0, F* gb0, F* gp0,       \
                                  void* stream);
WKV_DECLARE_CUDA_CHUNKED(float)
WKV_DECLARE_CUDA_CHUNKED(double)
int wkv_cuda_chunks(int64_t B, int64_t T, int64_t C);
const char* wkv_cuda_chunks_error(int code);
#endif

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

template <typename F>
const F* ptr_or_null(const Tensor& t) {
    return t.defined() ? t.data_ptr<F>() : nullptr;
}

template <typename F>
F* mut_ptr_or_null(Tensor& t) {
    return t.defined() ? t.data_ptr<F>() : nullptr;
}

void check_device_supported(const char* op, const Tensor& k) {
    TORCH_CHECK(k.is_cpu() || k.is_cuda(), op, ": tensors on ", k.device(),
                " are not supported; use CPU or CUDA tensors");
#ifndef WITH_CUDA
    TORCH_CHECK(!k.is_cuda(), op, ": this build of the extension has no CUDA kernels (it ",
                "was compiled without nvcc); install a CUDA toolkit matching torch.version.cuda"
                " and rebuild, or move the tensors to the CPU");
#endif
}

void check_tensor(const char* op, const char* name, const Tensor& t, const Tensor& k) {
    TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be a floating-point tensor ",
                "(float16, bfloat16, float32 or float64), got ", t.scalar_type());
    TORCH_CHECK(t.device() == k.device(), op, ": ", name, " is on ", t.device(),
                " but k is on ", k.device(), "; all inputs must be on the same device");
}

// Validates the common inputs and returns (B, T, C).
std::tuple<int64_t, int64_t, int64_t> check_inputs(const char* op, const Tensor& time_decay,
                                                   const Tensor& time_first, const Tensor& k,
                                                   const Tensor& v, const OptTensor& state_a,
                                                   const OptTensor& state_b,
                                                   const OptTensor& state_p) {
    TORCH_CHECK(k.dim() == 3, op, ": k must have shape (B, T, C), got ", k.sizes());
    TORCH_CHECK(v.sizes() == k.sizes(), op, ": v has shape ", v.sizes(), " but k has ",
                k.sizes(), "; they must be equal");
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
    TORCH_CHECK(time_decay.dim() == 1 && time_decay.size(0) == C, op,
                ": time_decay must have shape (C,) = (", C, ",) to match k, got ",
                time_decay.sizes());
    TORCH_CHECK(time_first.dim() == 1 && time_first.size(0) == C, op,
                ": time_first must have shape (C,) = (", C, ",) to match k, got ",
                time_first.sizes());
    check_device_supported(op, k);
    check_tensor(op, "k", k, k);
    check_tensor(op, "v", v, k);
    check_tensor(op, "time_decay", time_decay, k);
    check_tensor(op, "time_first", time_first, k);
    const int n_state = given(state_a) + given(state_b) + given(state_p);
    TORCH_CHECK(n_state == 0 || n_state == 3, op,
                ": pass all three state tensors (a, b, p) or none of them");
    if (n_state == 3) {
        const char* names[3] = {"state a", "state b", "state p"};
        const Tensor* states[3] = {&*state_a, &*state_b, &*state_p};
        for (int i = 0; i < 3; ++i) {
            TORCH_CHECK(states[i]->dim() == 2 && states[i]->size(0) == B &&
                            states[i]->size(1) == C,
                        op, ": ", names[i], " must have shape (B, C) = (", B, ", ", C,
                        "), got ", states[i]->sizes());
            check_tensor(op, names[i], *states[i], k);
        }
    }
    return {B, T, C};
}

at::ScalarType compute_dtype(const Tensor& k) {
    return k.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Tensor prepared(const Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

Tensor prepared(const OptTensor& t, at::ScalarType dtype) {
    return given(t) ? prepared(*t, dtype) : Tensor();
}

// w = -exp(time_decay), kept finite: a huge time_decay then means "forget everything"
// instead of producing inf (and 0 * inf = NaN in the gradient).
Tensor decay_from(const Tensor& time_decay, at::ScalarType dtype) {
    if (!time_decay.is_cpu()) return -at::exp(time_decay.to(dtype)).clamp_max(1e38).contiguous();
    // On the CPU a plain loop over the C channels: at::exp, clamp_max and neg are three
    // dispatched ops, and at::exp starts a threaded vector-math call, together ~30 us at
    // C = 512, a tenth of a whole forward call at (4, 256, 512).
    const Tensor td = prepared(time_decay, dtype);
    Tensor w = at::empty_like(td);
    AT_DISPATCH_FLOATING_TYPES(dtype, "decay_from", [&] {
        const scalar_t* src = td.data_ptr<scalar_t>();
        scalar_t* dst = w.data_ptr<scalar_t>();
        for (int64_t c = 0; c < td.numel(); ++c)  // std::min keeps a NaN, as clamp_max does
            dst[c] = -std::min<scalar_t>(std::exp(src[c]), scalar_t(1e38));
    });
    return w;
}

#ifdef WITH_CUDA
void check_cuda(int code) {
    TORCH_CHECK(code == 0, "wkv: CUDA kernel launch failed: ", wkv_cuda_error_string(code));
}

// The kernel for this shape on the current device (see wkv_cuda_chunked.cu).
int cuda_chunks(const char* op, int64_t B, int64_t T, int64_t C) {
    const int chunks = wkv_cuda_chunks(B, T, C);
    TORCH_CHECK(chunks >= 0, op, ": ", wkv_cuda_chunks_error(chunks));
    return chunks;
}
#endif

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> wkv_forward(const Tensor& time_decay,
                                                       const Tensor& time_first,
                                                       const Tensor& k, const Tensor& v,
                                                       const OptTensor& state_a,
                                                       const OptTensor& state_b,
                                                       const OptTensor& state_p) {
    int64_t B, T, C;  // (plain variables: lambdas cannot capture structured bindings in C++17)
    std::tie(B, T, C) =
        check_inputs("wkv_forward", time_decay, time_first, k, v, state_a, state_b, state_p);
    const auto dtype = compute_dtype(k);
    const auto opts = k.options().dtype(dtype);
    const Tensor w = decay_from(time_decay, dtype), u = prepared(time_first, dtype);
    const Tensor kc = prepared(k, dtype), vc = prepared(v, dtype);
    const Tensor a0 = prepared(state_a, dtype), b0 = prepared(state_b, dtype),
                 p0 = prepared(state_p, dtype);
    Tensor y = at::empty({B, T, C}, opts);
    Tensor aT = at::empty({B, C}, opts), bT = at::empty({B, C}, opts),
           pT = at::empty({B, C}, opts);
    AT_DISPATCH_FLOATING_TYPES(dtype, "wkv_forward", [&] {
        using F = scalar_t;
        if (k.is_cuda()) {
#ifdef WITH_CUDA
            const c10::cuda::CUDAGuard guard(k.device());
            const int chunks = cuda_chunks("wkv_forward", B, T, C);  // 0: sequential kernel
            if (chunks > 0) {  // the kernels parallel over time (wkv_cuda_chunked.cu)
                check_cuda(wkv_forward_cuda_chunked(
                    B, T, C, chunks, w.data_ptr<F>(), u.data_ptr<F>(), kc.data_ptr<F>(),
                    vc.data_ptr<F>(), ptr_or_null<F>(a0), ptr_or_null<F>(b0),
                    ptr_or_null<F>(p0), y.data_ptr<F>(), aT.data_ptr<F>(), bT.data_ptr<F>(),
                    pT.data_ptr<F>(), c10::cuda::getCurrentCUDAStream().stream()));
                return;
            }
            check_cuda(wkv_forward_cuda(
                B, T, C, w.data_ptr<F>(), u.data_ptr<F>(), kc.data_ptr<F>(), vc.data_ptr<F>(),
                ptr_or_null<F>(a0), ptr_or_null<F>(b0), ptr_or_null<F>(p0), y.data_ptr<F>(),
                aT.data_ptr<F>(), bT.data_ptr<F>(), pT.data_ptr<F>(),
                c10::cuda::getCurrentCUDAStream().stream()));
#endif
        } else {
            wkv_forward_cpu(B, T, C, w.data_ptr<F>(), u.data_ptr<F>(), kc.data_ptr<F>(),
                            vc.data_ptr<F>(), ptr_or_null<F>(a0), ptr_or_null<F>(b0),
                            ptr_or_null<F>(p0), y.data_ptr<F>(), aT.data_ptr<F>(),
                            bT.data_ptr<F>(), pT.data_ptr<F>());
        }
    });
    return {y.to(k.scalar_type()), aT, bT, pT};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> wkv_backward(
    const Tensor& time_decay, const Tensor& time_first, const Tensor& k, const Tensor& v,
    const OptTensor& state_a, const OptTensor& state_b, const OptTensor& state_p,
    const Tensor& grad_y, const OptTensor& grad_state_a, const OptTensor& grad_state_b,
    const OptTensor& grad_state_p) {
    const char* op = "wkv_backward";
    int64_t B, T, C;
    std::tie(B, T, C) =
        check_inputs(op, time_decay, time_first, k, v, state_a, state_b, state_p);
    TORCH_CHECK(grad_y.sizes() == k.sizes(), op, ": grad_y has shape ", grad_y.sizes(),
                " but k has ", k.sizes());
    check_tensor(op, "grad_y", grad_y, k);
    const OptTensor* grad_states[3] = {&grad_state_a, &grad_state_b, &grad_state_p};
    for (const OptTensor* g : grad_states) {
        if (given(*g)) {
            TORCH_CHECK((*g)->dim() == 2 && (*g)->size(0) == B && (*g)->size(1) == C, op,
                        ": gradients of the final state must have shape (B, C) = (", B, ", ",
                        C, "), got ", (*g)->sizes());
            check_tensor(op, "a gradient of the final state", **g, k);
        }
    }
    const auto dtype = compute_dtype(k);
    const auto opts = k.options().dtype(dtype);
    const Tensor w = decay_from(time_decay, dtype), u = prepared(time_first, dtype);
    const Tensor kc = prepared(k, dtype), vc = prepared(v, dtype), gy = prepared(grad_y, dtype);
    const Tensor a0 = prepared(state_a, dtype), b0 = prepared(state_b, dtype),
                 p0 = prepared(state_p, dtype);
    const Tensor gaT = prepared(grad_state_a, dtype), gbT = prepared(grad_state_b, dtype),
                 gpT = prepared(grad_state_p, dtype);
    const bool has_state = a0.defined();
    Tensor gk = at::empty({B, T, C}, opts), gv = at::empty({B, T, C}, opts);
    Tensor gw = at::empty({B, C}, opts), gu = at::empty({B, C}, opts);
    Tensor ga0 = at::zeros({B, C}, opts), gb0 = at::zeros({B, C}, opts),
           gp0 = at::zeros({B, C}, opts);
    Tensor none;
    Tensor& ga0_out = has_state ? ga0 : none;
    Tensor& gb0_out = has_state ? gb0 : none;
    Tensor& gp0_out = has_state ? gp0 : none;
    AT_DISPATCH_FLOATING_TYPES(dtype, "wkv_backward", [&] {
        using F = scalar_t;
        if (k.is_cuda()) {
#ifdef WITH_CUDA
            const c10::cuda::CUDAGuard guard(k.device());
            // p before each token, for the reverse pass (a and b go into gk and gv)
            Tensor saved_p = at::empty({B, T, C}, opts);
            const int chunks = cuda_chunks("wkv_backward", B, T, C);  // 0: sequential kernel
            if (chunks > 0) {
                // exact_p = 1: dL/dp_T flows back along the max chain, as in the sequential
                // kernel (a missing grad_state_p means dL/dp_T = 0).
                check_cuda(wkv_backward_cuda_chunked(
                    B, T, C, chunks, w.data_ptr<F>(), u.data_ptr<F>(), kc.data_ptr<F>(),
                    vc.data_ptr<F>(), ptr_or_null<F>(a0), ptr_or_null<F>(b0),
                    ptr_or_null<F>(p0), gy.data_ptr<F>(), ptr_or_null<F>(gaT),
                    ptr_or_null<F>(gbT), ptr_or_null<F>(gpT), 1, saved_p.data_ptr<F>(), gw.data_ptr<F>(),
                    gu.data_ptr<F>(), gk.data_ptr<F>(), gv.data_ptr<F>(),
                    mut_ptr_or_null<F>(ga0_out), mut_ptr_or_null<F>(gb0_out),
                    mut_ptr_or_null<F>(gp0_out), c10::cuda::getCurrentCUDAStream().stream()));
                return;
            }
            check_cuda(wkv_backward_cuda(
                B, T, C, w.data_ptr<F>(), u.data_ptr<F>(), kc.data_ptr<F>(), vc.data_ptr<F>(),
                ptr_or_null<F>(a0), ptr_or_null<F>(b0), ptr_or_null<F>(p0), gy.data_ptr<F>(),
                ptr_or_null<F>(gaT), ptr_or_null<F>(gbT), ptr_or_null<F>(gpT),
                saved_p.data_ptr<F>(), gw.data_ptr<F>(), gu.data_ptr<F>(), gk.data_ptr<F>(),
                gv.data_ptr<F>(),
                mut_ptr_or_null<F>(ga0_out), mut_ptr_or_null<F>(gb0_out),
                mut_ptr_or_null<F>(gp0_out), c10::cuda::getCurrentCUDAStream().stream()));
#endif
        } else {
            wkv_backward_cpu(B, T, C, w.data_ptr<F>(), u.data_ptr<F>(), kc.data_ptr<F>(),
                             vc.data_ptr<F>(), ptr_or_null<F>(a0), ptr_or_null<F>(b0),
                             ptr_or_null<F>(p0), gy.data_ptr<F>(), ptr_or_null<F>(gaT),
                             ptr_or_null<F>(gbT), ptr_or_null<F>(gpT), gw.data_ptr<F>(),
                             gu.data_ptr<F>(), gk.data_ptr<F>(), gv.data_ptr<F>(),
                             mut_ptr_or_null<F>(ga0_out), mut_ptr_or_null<F>(gb0_out),
                             mut_ptr_or_null<F>(gp0_out));
        }
    });
    // Per-row partial sums -> sums over the batch; chain rule through w = -exp(time_decay).
    const Tensor grad_time_decay = (gw.sum(0) * w).to(time_decay.scalar_type());
    const Tensor grad_time_first = gu.sum(0).to(time_first.scalar_type());
    auto state_dtype = [&](const OptTensor& s) { return given(s) ? s->scalar_type() : dtype; };
    return {grad_time_decay,
            grad_time_first,
            gk.to(k.scalar_type()),
            gv.to(v.scalar_type()),
            ga0.to(state_dtype(state_a)),
            gb0.to(state_dtype(state_b)),
            gp0.to(state_dtype(state_p))};
}

TORCH_LIBRARY(rwkv, m) {
    m.def(
        "wkv_forward(Tensor time_decay, Tensor time_first, Tensor k, Tensor v, "
        "Tensor? state_a=None, Tensor? state_b=None, Tensor? state_p=None) "
        "-> (Tensor y, Tensor a, Tensor b, Tensor p)");
    m.def(
        "wkv_backward(Tensor time_decay, Tensor time_first, Tensor k, Tensor v, "
        "Tensor? state_a, Tensor? state_b, Tensor? state_p, Tensor grad_y, "
        "Tensor? grad_state_a=None, Tensor? grad_state_b=None, Tensor? grad_state_p=None) "
        "-> (Tensor grad_time_decay, Tensor grad_time_first, Tensor grad_k, Tensor grad_v, "
        "Tensor grad_state_a, Tensor grad_state_b, Tensor grad_state_p)");
}

// One implementation for every device: it dispatches to the CPU or CUDA kernels itself,
// and tensors on any other device (or mixed devices) reach its clear error messages
// instead of a generic "no kernel for this backend".
TORCH_LIBRARY_IMPL(rwkv, CompositeExplicitAutograd, m) {
    m.impl("wkv_forward", &wkv_forward);
    m.impl("wkv_backward", &wkv_backward);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    namespace py = pybind11;
    m.doc() = "WKV operator of RWKV-4 (CPU kernels, and CUDA kernels when built with nvcc)";
    m.def("wkv_forward", &wkv_forward, "y and the final state (a, b, p)",
          py::arg("time_decay"), py::arg("time_first"), py::arg("k"), py::arg("v"),
          py::arg("state_a") = py::none(), py::arg("state_b") = py::none(),
          py::arg("state_p") = py::none());
    m.def("wkv_backward", &wkv_backward,
          "gradients of time_decay, time_first, k, v and of the initial state (a, b, p)",
          py::arg("time_decay"), py::arg("time_first"), py::arg("k"), py::arg("v"),
          py::arg("state_a"), py::arg("state_b"), py::arg("state_p"), py::arg("grad_y"),
          py::arg("grad_state_a") = py::none(), py::arg("grad_state_b") = py::none(),
          py::arg("grad_state_p") = py::none());
#ifdef WITH_CUDA
    m.attr("has_cuda") = true;
    m.def("cuda_chunks", [](int64_t B, int64_t T, int64_t C) {
        return cuda_chunks("cuda_chunks", B, T, C);
    }, "the CUDA kernel for (B, T, C) on the current GPU: 0 sequential, J chunked with J chunks");
#else
    m.attr("has_cuda") = false;
#endif
    // at::parallel_for only uses several threads when compiled with OpenMP (-fopenmp)
#ifdef _OPENMP
    m.attr("parallel") = "openmp";
#else
    m.attr("parallel") = "single-threaded";
#endif
}
