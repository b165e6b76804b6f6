// CUDA kernels of the WKV operator, with plain launch functions on raw pointers: no torch
// headers, so `nvcc -c cuda/wkv_cuda.cu` compiles this file on its own.
//
// One thread per (batch row, channel) walks over time; neighbouring threads handle
// neighbouring channels, so every load and store of a warp is one contiguous segment of
// a (B, T, C) array. The arithmetic is that of wkv_math.h, shared with the CPU kernels.
// There is no compile-time limit on T: the backward pass keeps the per-step state in
// global memory (the gk and gv outputs double as workspace for a and b; p gets its own
// array, allocated by the caller), not in per-thread arrays.
#include <cuda_runtime.h>

#include <cstdint>

#include "wkv_math.h"

namespace {

constexpr int kThreads = 128;

template <typename F>
__global__ void wkv_forward_kernel(int64_t B, int64_t T, int64_t C, const F* __restrict__ w,
                                   const F* __restrict__ u, const F* __restrict__ k,
                                   const F* __restrict__ v, const F* __restrict__ a0,
                                   const F* __restrict__ b0, const F* __restrict__ p0,
                                   F* __restrict__ y, F* __restrict__ aT, F* __restrict__ bT,
                                   F* __restrict__ pT) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= B * C) return;  // any B and C: the last block may be partly idle
    const int64_t row = idx / C, c = idx % C;
    const F ww = w[c], uu = u[c];
    F a = a0 ? a0[idx] : F(0), b = b0 ? b0[idx] : F(0), p = p0 ? p0[idx] : F(WKV_P_EMPTY);
    const int64_t base = row * T * C + c;
    for (int64_t t = 0; t < T; ++t) {
        const int64_t i = base + t * C;
        y[i] = wkv_forward_step(ww, uu, k[i], v[i], a, b, p);
    }
    aT[idx] = a;
    bT[idx] = b;
    pT[idx] = p;
}

template <typename F>
__global__ void wkv_backward_kernel(int64_t B, int64_t T, int64_t C, const F* __restrict__ w,
                                    const F* __restrict__ u, const F* __restrict__ k,
                                    const F* __restrict__ v, const F* __restrict__ a0,
                                    const F* __restrict__ b0, const F* __restrict__ p0,
                                    const F* __restrict__ gy, const F* __restrict__ gaT,
                                    const F* __restrict__ gbT, const F* __restrict__ gpT,
                                    F* __restrict__ saved_p, F* __restrict__ gw,
                                    F* __restrict__ gu, F* __restrict__ gk,
                                    F* __restrict__ gv, F* __restrict__ ga0,
                                    F* __restrict__ gb0, F* __restrict__ gp0) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= B * C) return;
    const int64_t row = idx / C, c = idx % C;
    const F ww = w[c], uu = u[c];
    F a = a0 ? a0[idx] : F(0), b = b0 ? b0[idx] : F(0), p = p0 ? p0[idx] : F(WKV_P_EMPTY);
    const int64_t base = row * T * C + c;
    // Pass 1, forward in time: the state before each token. Each thread reads back only
    // what it wrote itself, so no synchronization is needed between the passes.
    for (int64_t t = 0; t < T; ++t) {
        const int64_t i = base + t * C;
        gk[i] = a;
        gv[i] = b;
        saved_p[i] = p;
        wkv_update_step(ww, k[i], v[i], a, b, p);
    }
    // Pass 2, backward in time: scaled adjoints of the state, gradients of k and v.
    // (a, b) is now the final state; gp starts as G of wkv_math.h.
    F ga = gaT ? gaT[idx] : F(0), gb = gbT ? gbT[idx] : F(0), gww = F(0), guu = F(0);
    F gp = (gpT ? gpT[idx] : F(0)) - ga * a - gb * b;
    for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t i = base + t * C;
        F gki, gvi;
        wkv_backward_step(ww, uu, k[i], v[i], gy[i], gk[i], gv[i], saved_p[i], ga, gb, gww,
                          guu, gki, gvi);
        wkv_backward_p_step(ww, k[i], saved_p[i], gp, gki, gww);
        gk[i] = gki;
        gv[i] = gvi;
    }
    gw[idx] = gww;  // per batch row; the caller sums over the batch (no atomics)
    gu[idx] = guu;
    if (ga0) ga0[idx] = ga;
    if (gb0) gb0[idx] = gb;
    if (gp0) gp0[idx] = (a0 && b0) ? ga * a0[idx] + gb * b0[idx] + gp : F(0);
}

int64_t blocks_for(int64_t B, int64_t C) { return (B * C + kThreads - 1) / kThreads; }

template <typename F>
int launch_forward(int64_t B, int64_t T, int64_t C, const F* w, const F* u, const F* k,
                   const F* v, const F* a0, const F* b0, const F* p0, F* y, F* aT, F* bT,
                   F* pT, void* stream) {
    if (B * C == 0) return 0;  // a grid of zero blocks is a launch error
    wkv_forward_kernel<F><<<blocks_for(B, C), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        B, T, C, w, u, k, v, a0, b0, p0, y, aT, bT, pT);
    return static_cast<int>(cudaGetLastError());
}

template <typename F>
int launch_backward(int64_t B, int64_t T, int64_t C, const F* w, const F* u, const F* k,
                    const F* v, const F* a0, const F* b0, const F* p0, const F* gy,
                    const F* gaT, const F* gbT, const F* gpT, F* saved_p, F* gw, F* gu, F* gk,
                    F* gv, F* ga0, F* gb0, F* gp0, void* stream) {
    if (B * C == 0) return 0;
    wkv_backward_kernel<F><<<blocks_for(B, C), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        B, T, C, w, u, k, v, a0, b0, p0, gy, gaT, gbT, gpT, saved_p, gw, gu, gk, gv, ga0, gb0,
        gp0);
    return static_cast<int>(cudaGetLastError());
}

}  // namespace

// Launchers called by wkv_ops.cpp (argument meaning as in wkv_cpu.cpp). They return the
// cudaError_t of the launch as an int, 0 on success.
#define WKV_DEFINE_LAUNCHERS(F)                                                               \
    int wkv_forward_cuda(int64_t B, int64_t T, int64_t C, const F* w, const F* u,            \
                         const F* k, const F* v, const F* a0, const F* b0, const F* p0,      \
                         F* y, F* aT, F* bT, F* pT, void* stream) {                          \
        return launch_forward(B, T, C, w, u, k, v, a0, b0, p0, y, aT, bT, pT, stream);       \
    }                                                                                        \
    int wkv_backward_cuda(int64_t B, int64_t T, int64_t C, const F* w, const F* u,           \
                          const F* k, const F* v, const F* a0, const F* b0, const F* p0,     \
                          const F* gy, const F* gaT, const F* gbT, const F* gpT,             \
                          F* saved_p, F* gw, F* gu, F* gk, F* gv, F* ga0, F* gb0, F* gp0,    \
                          void* stream) {                                                    \
        return launch_backward(B, T, C, w, u, k, v, a0, b0, p0, gy, gaT, gbT, gpT, saved_p,  \
                               gw, gu, gk, gv, ga0, gb0, gp0, stream);                       \
    }

WKV_DEFINE_LAUNCHERS(float)
WKV_DEFINE_LAUNCHERS(double)

const char* wkv_cuda_error_string(int code) {
    return cudaGetErrorString(static_cast<cudaError_t>(code));
}
