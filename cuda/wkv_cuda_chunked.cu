// The chunked CUDA kernels of the WKV operator (parallel over time), their launchers, and
// the choice between them and the sequential kernels of wkv_cuda.cu.
//
// The algorithm, the arithmetic and the barriers are in wkv_chunked.h, as __host__
// __device__ code that the CPU tests run too; this file only maps a block of n_ch
// channels x J chunks onto CUDA threads and launches it. No torch headers: this
// file compiles with `nvcc -c` on its own.
//
// Which kernel runs (read at every call, so tests and benchmarks can switch):
//   RWKV_WKV_CUDA=sequential  one thread per (row, channel), wkv_cuda.cu (the default)
//   RWKV_WKV_CUDA=chunked     this file's kernels, always
//   RWKV_WKV_CUDA=auto        the by-shape rule: chunked when B*C threads would leave the
//                             GPU mostly idle (wkv_auto_chunks picks J >= 2), else sequential
//   RWKV_WKV_CUDA_CHUNKS=J    with `chunked`: J chunks per sequence (1..kWkvMaxChunks)
//                             instead of the by-shape number
// The default stays `sequential` until the chunked kernels have been run and timed on a
// GPU (benchmarks/gpu_check.sh); the measured results decide whether `auto` becomes the
// default.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "wkv_chunked.h"

namespace {

// The block-wide barrier, as wkv_chunked.h's passes call it.
struct BlockSync {
    __device__ void operator()() const { __syncthreads(); }
};

// Shared memory, typeless so that the float and double kernels can share the declaration.
extern __shared__ __align__(16) unsigned char wkv_smem[];

template <typename F>
__global__ void __launch_bounds__(kWkvMaxThreads)
    wkv_chunked_forward_kernel(const WkvChunkedProblem<F> P) {
    const WkvChunkThread th = wkv_chunk_thread(P, blockIdx.x, static_cast<int>(threadIdx.x));
    BlockSync sync;
    wkv_chunked_forward_thread(P, th, reinterpret_cast<F*>(wkv_smem), sync);
}

template <typename F>
__global__ void __launch_bounds__(kWkvMaxThreads)
    wkv_chunked_backward_kernel(const WkvChunkedProblem<F> P) {
    const WkvChunkThread th = wkv_chunk_thread(P, blockIdx.x, static_cast<int>(threadIdx.x));
    BlockSync sync;
    wkv_chunked_backward_thread(P, th, reinterpret_cast<F*>(wkv_smem), sync);
}

template <typename F>
WkvChunkedProblem<F> problem(int64_t B, int64_t T, int64_t C, int chunks) {
    WkvChunkedProblem<F> P;
    std::memset(&P, 0, sizeof(P));
    P.B = B;
    P.T = T;
    P.C = C;
    P.lay = wkv_chunk_layout(B, T, C, chunks);
    return P;
}

template <typename F, class Kernel>
int launch(Kernel kernel, const WkvChunkedProblem<F>& P, bool backward, void* stream) {
    if (P.B * P.C == 0) return 0;  // a grid of zero blocks is a launch error
    if (P.lay.J < 1 || P.lay.J > kWkvMaxChunks || P.lay.threads > kWkvMaxThreads)
        return static_cast<int>(cudaErrorInvalidValue);
    if (P.lay.blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
    const size_t smem = static_cast<size_t>(wkv_chunked_smem_values(P.lay, backward)) * sizeof(F);
    kernel<<<static_cast<unsigned>(P.lay.blocks), P.lay.threads, smem,
             static_cast<cudaStream_t>(stream)>>>(P);
    return static_cast<int>(cudaGetLastError());
}

template <typename F>
int forward(int64_t B, int64_t T, int64_t C, int chunks, const F* w, const F* u, const F* k,
            const F* v, const F* a0, const F* b0, const F* p0, F* y, F* aT, F* bT, F* pT,
            void* stream) {
    WkvChunkedProblem<F> P = problem<F>(B, T, C, chunks);
    P.w = w;
    P.u = u;
    P.k = k;
    P.v = v;
    P.a0 = a0;
    P.b0 = b0;
    P.p0 = p0;
    P.y = y;
    P.aT = aT;
    P.bT = bT;
    P.pT = pT;
    return launch(wkv_chunked_forward_kernel<F>, P, false, stream);
}

template <typename F>
int backward(int64_t B, int64_t T, int64_t C, int chunks, const F* w, const F* u, const F* k,
             const F* v, const F* a0, const F* b0, const F* p0, const F* gy, const F* gaT,
             const F* gbT, const F* gpT, int exact_p, F* saved_p, F* gw, F* gu, F* gk, F* gv,
             F* ga0, F* gb0, F* gp0, void* stream) {
    WkvChunkedProblem<F> P = problem<F>(B, T, C, chunks);
    P.w = w;
    P.u = u;
    P.k = k;
    P.v = v;
    P.a0 = a0;
    P.b0 = b0;
    P.p0 = p0;
    P.gy = gy;
    P.gaT = gaT;
    P.gbT = gbT;
    P.gpT = gpT;
    P.exact_p = exact_p;
    P.saved_p = saved_p;
    P.gw = gw;
    P.gu = gu;
    P.gk = gk;
    P.gv = gv;
    P.ga0 = ga0;
    P.gb0 = gb0;
    P.gp0 = gp0;
    return launch(wkv_chunked_backward_kernel<F>, P, true, stream);
}

// Error codes of wkv_cuda_chunks (negative: a setting the user must fix).
constexpr int kBadKernel = -1, kBadChunks = -2, kChunksWithoutChunked = -3, kNoDevice = -4;

}  // namespace

// ---- entry points, called by wkv_ops.cpp ----

// Which kernel to run for this shape, on the current device: 0 for the sequential kernels,
// J >= 1 for the chunked ones with J chunks per sequence, < 0 for a bad setting (see
// wkv_cuda_chunks_error).
int wkv_cuda_chunks(int64_t B, int64_t T, int64_t C) {
    const char* kernel = std::getenv("RWKV_WKV_CUDA");
    const char* chunks_env = std::getenv("RWKV_WKV_CUDA_CHUNKS");
    const bool has_chunks = chunks_env != nullptr && chunks_env[0] != '\0';
    const bool chunked = kernel != nullptr && std::strcmp(kernel, "chunked") == 0;
    const bool automatic = kernel != nullptr && std::strcmp(kernel, "auto") == 0;
    const bool sequential = kernel == nullptr || kernel[0] == '\0' ||
                            std::strcmp(kernel, "sequential") == 0;
    if (!chunked && !automatic && !sequential) return kBadKernel;
    if (has_chunks && !chunked) return kChunksWithoutChunked;
    if (sequential) return 0;
    if (has_chunks) {
        char* end = nullptr;
        const long J = std::strtol(chunks_env, &end, 10);
        if (end == chunks_env || *end != '\0' || J < 1 || J > kWkvMaxChunks) return kBadChunks;
        return static_cast<int>(J);
    }
    int device = 0, multiprocessors = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device) !=
            cudaSuccess) {
        cudaGetLastError();  // clear it: the caller reports its own message
        return kNoDevice;
    }
    const int J = wkv_auto_chunks(B, T, C, multiprocessors);
    return (automatic && J < 2) ? 0 : J;
}

const char* wkv_cuda_chunks_error(int code) {
    static thread_local char message[320];
    const char* kernel = std::getenv("RWKV_WKV_CUDA");
    const char* chunks = std::getenv("RWKV_WKV_CUDA_CHUNKS");
    switch (code) {
        case kBadKernel:
            std::snprintf(message, sizeof(message),
                          "RWKV_WKV_CUDA=%s is not a kernel choice; set it to sequential, "
                          "chunked or auto (or unset it for sequential)",
                          kernel);
            break;
        case kBadChunks:
            std::snprintf(message, sizeof(message),
                          "RWKV_WKV_CUDA_CHUNKS=%s is not a chunk count; set it to a whole "
                          "number from 1 to %d, or unset it for the by-shape choice",
                          chunks, kWkvMaxChunks);
            break;
        case kChunksWithoutChunked:
            std::snprintf(message, sizeof(message),
                          "RWKV_WKV_CUDA_CHUNKS=%s applies to the chunked kernels only; set "
                          "RWKV_WKV_CUDA=chunked as well, or unset RWKV_WKV_CUDA_CHUNKS",
                          chunks);
            break;
        case kNoDevice:
            std::snprintf(message, sizeof(message),
                          "could not read the GPU's multiprocessor count for the by-shape "
                          "kernel choice");
            break;
        default:
            std::snprintf(message, sizeof(message), "unknown kernel choice error %d", code);
    }
    return message;
}

// Launchers (argument meaning as in wkv_cuda.cu, plus `chunks` and, backward, gpT =
// dL/dp_T (may be null) with exact_p: 0 drops the gradient along the p chain, as the
// sequential kernel does, 1 makes it exact). They return the cudaError_t as an int.
#define WKV_DEFINE_CHUNKED_LAUNCHERS(F)                                                       \
    int wkv_forward_cuda_chunked(int64_t B, int64_t T, int64_t C, int chunks, const F* w,    \
                                 const F* u, const F* k, const F* v, const F* a0,            \
                                 const F* b0, const F* p0, F* y, F* aT, F* bT, F* pT,        \
                                 void* stream) {                                             \
        return forward(B, T, C, chunks, w, u, k, v, a0, b0, p0, y, aT, bT, pT, stream);      \
    }                                                                                        \
    int wkv_backward_cuda_chunked(int64_t B, int64_t T, int64_t C, int chunks, const F* w,   \
                                  const F* u, const F* k, const F* v, const F* a0,           \
                                  const F* b0, const F* p0, const F* gy, const F* gaT,       \
                                  const F* gbT, const F* gpT, int exact_p, F* saved_p,       \
                                  F* gw, F* gu, F* gk, F* gv, F* ga0, F* gb0, F* gp0,        \
                                  void* stream) {                                            \
        return backward(B, T, C, chunks, w, u, k, v, a0, b0, p0, gy, gaT, gbT, gpT, exact_p, \
                        saved_p, gw, gu, gk, gv, ga0, gb0, gp0, stream);                     \
    }

WKV_DEFINE_CHUNKED_LAUNCHERS(float)
WKV_DEFINE_CHUNKED_LAUNCHERS(double)
