// Energy-preserving mix (forward): out = (a p + b q) * ||p|| / max(||a p + b q||, eps) per sample.
//
// Two phases over a (n_chunks, B) grid, deterministic (partials, no atomics):
//   1. mix_reduce_kernel: each block reduces one chunk of one sample to fp32 partials (||p||^2, ||y||^2);
//   2. mix_apply_kernel: each block sums its sample's partials, then rescales its chunk.
// Each chunk is walked as a scalar head up to the first 16-byte boundary, a body of 16-byte packs and a
// scalar tail, so any N and any (common) base misalignment is handled; when p, q and out are misaligned
// differently the whole chunk takes the scalar path.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "common.cuh"
#include "selfe_kernels.h"

namespace selfe {
namespace {

using detail::block_sum;
using detail::load_f32;
using detail::store_f32;

constexpr int kThreads = 256;
constexpr int64_t kChunkAlign = 2048;      // chunk sizes are multiples of this (and so of every pack)
constexpr int64_t kTargetBlocks = 1024;    // enough blocks to cover an H100/H200 several times
constexpr int64_t kMaxChunksPerSample = 256;

// Split [lo, hi) of a sample into a scalar head (until `base + i` is 16-byte aligned), a packed body and
// a scalar tail. `vec` false: everything is tail.
template <typename T>
struct Span {
  int64_t body_lo, body_hi;
  __device__ Span(const T* base, int64_t lo, int64_t hi, bool vec) {
    constexpr int64_t kPackN = detail::kVecBytes / sizeof(T);
    body_lo = body_hi = lo;
    if (vec) {
      const uintptr_t addr = reinterpret_cast<uintptr_t>(base + lo);
      const int64_t head = static_cast<int64_t>((detail::kVecBytes - addr % detail::kVecBytes) % detail::kVecBytes) /
                           static_cast<int64_t>(sizeof(T));
      body_lo = lo + head < hi ? lo + head : hi;
      body_hi = body_lo + (hi - body_lo) / kPackN * kPackN;
    }
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    mix_reduce_kernel(const T* __restrict__ p, const T* __restrict__ q, const float* __restrict__ a,
                      const float* __restrict__ b, float* __restrict__ partial, int64_t N, int64_t chunk,
                      bool vec) {
  constexpr int kPackN = detail::kVecBytes / sizeof(T);
  __shared__ float smem[33];
  const int64_t s = blockIdx.y;
  const int64_t c = blockIdx.x;
  const int64_t n_chunks = gridDim.x;
  const T* ps = p + s * N;
  const T* qs = q + s * N;
  const float as = a[s], bs = b[s];
  const int64_t lo = c * chunk;
  const int64_t hi = lo + chunk < N ? lo + chunk : N;
  const Span<T> span(ps, lo, hi, vec);

  float pp = 0.f, yy = 0.f;
  for (int64_t i = span.body_lo + static_cast<int64_t>(threadIdx.x) * kPackN; i < span.body_hi;
       i += static_cast<int64_t>(blockDim.x) * kPackN) {
    float pv[kPackN], qv[kPackN];
    load_f32<T, kPackN>(ps + i, pv);
    load_f32<T, kPackN>(qs + i, qv);
#pragma unroll
    for (int j = 0; j < kPackN; ++j) {
      const float y = as * pv[j] + bs * qv[j];
      pp += pv[j] * pv[j];
      yy += y * y;
    }
  }
  // Scalar head [lo, body_lo) and tail [body_hi, hi).
  const int64_t head_n = span.body_lo - lo;
  const int64_t rest = head_n + (hi - span.body_hi);
  for (int64_t t = threadIdx.x; t < rest; t += blockDim.x) {
    const int64_t i = t < head_n ? lo + t : span.body_hi + (t - head_n);
    const float pv = detail::to_f32(ps[i]);
    const float y = as * pv + bs * detail::to_f32(qs[i]);
    pp += pv * pv;
    yy += y * y;
  }
  pp = block_sum(pp, smem);
  yy = block_sum(yy, smem);
  if (threadIdx.x == 0) {
    partial[(s * n_chunks + c) * 2] = pp;
    partial[(s * n_chunks + c) * 2 + 1] = yy;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    mix_apply_kernel(const T* __restrict__ p, const T* __restrict__ q, const float* __restrict__ a,
                     const float* __restrict__ b, const float* __restrict__ partial, T* __restrict__ out,
                     int64_t N, int64_t chunk, float eps, bool vec) {
  constexpr int kPackN = detail::kVecBytes / sizeof(T);
  __shared__ float smem[33];
  const int64_t s = blockIdx.y;
  const int64_t c = blockIdx.x;
  const int64_t n_chunks = gridDim.x;
  float pp = 0.f, yy = 0.f;
  for (int64_t i = threadIdx.x; i < n_chunks; i += blockDim.x) {
    pp += partial[(s * n_chunks + i) * 2];
    yy += partial[(s * n_chunks + i) * 2 + 1];
  }
  pp = block_sum(pp, smem);
  yy = block_sum(yy, smem);
  const float ratio = sqrtf(pp) / fmaxf(sqrtf(yy), eps);
  const float as = a[s] * ratio, bs = b[s] * ratio;  // fold the ratio into the coefficients

  const T* ps = p + s * N;
  const T* qs = q + s * N;
  T* os = out + s * N;
  const int64_t lo = c * chunk;
  const int64_t hi = lo + chunk < N ? lo + chunk : N;
  const Span<T> span(ps, lo, hi, vec);
  for (int64_t i = span.body_lo + static_cast<int64_t>(threadIdx.x) * kPackN; i < span.body_hi;
       i += static_cast<int64_t>(blockDim.x) * kPackN) {
    float pv[kPackN], qv[kPackN], ov[kPackN];
    load_f32<T, kPackN>(ps + i, pv);
    load_f32<T, kPackN>(qs + i, qv);
#pragma unroll
    for (int j = 0; j < kPackN; ++j) ov[j] = as * pv[j] + bs * qv[j];
    store_f32<T, kPackN>(os + i, ov);
  }
  const int64_t head_n = span.body_lo - lo;
  const int64_t rest = head_n + (hi - span.body_hi);
  for (int64_t t = threadIdx.x; t < rest; t += blockDim.x) {
    const int64_t i = t < head_n ? lo + t : span.body_hi + (t - head_n);
    os[i] = detail::from_f32<T>(as * detail::to_f32(ps[i]) + bs * detail::to_f32(qs[i]));
  }
}

// (n_chunks, chunk): chunks a multiple of kChunkAlign elements, enough of them to fill the device.
void chunking(int64_t B, int64_t N, int64_t* n_chunks, int64_t* chunk) {
  const int64_t want = std::min(kMaxChunksPerSample, std::max<int64_t>(1, detail::ceil_div(kTargetBlocks, B)));
  const int64_t max_chunks = detail::ceil_div(N, kChunkAlign);
  const int64_t chunks = std::max<int64_t>(1, std::min(want, max_chunks));
  *chunk = detail::ceil_div(detail::ceil_div(N, chunks), kChunkAlign) * kChunkAlign;
  *n_chunks = detail::ceil_div(N, *chunk);
}

template <typename T>
cudaError_t launch_typed(const void* p, const void* q, const float* a, const float* b, void* out, float* workspace,
                         int64_t B, int64_t N, float eps, cudaStream_t stream) {
  int64_t n_chunks = 0, chunk = 0;
  chunking(B, N, &n_chunks, &chunk);
  // p, q and out must share their offset from a 16-byte boundary for the packed body (then every
  // sample's head is the same length for all three).
  const uintptr_t mis = reinterpret_cast<uintptr_t>(p) % detail::kVecBytes;
  const bool vec = reinterpret_cast<uintptr_t>(q) % detail::kVecBytes == mis &&
                   reinterpret_cast<uintptr_t>(out) % detail::kVecBytes == mis && mis % sizeof(T) == 0;
  const dim3 grid(static_cast<unsigned>(n_chunks), static_cast<unsigned>(B));
  mix_reduce_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(p), static_cast<const T*>(q), a, b,
                                                      workspace, N, chunk, vec);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  mix_apply_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(p), static_cast<const T*>(q), a, b,
                                                     workspace, static_cast<T*>(out), N, chunk, eps, vec);
  return cudaGetLastError();
}

}  // namespace

int64_t energy_preserving_mix_workspace_floats(int64_t B, int64_t N) {
  if (B <= 0 || N <= 0) return 0;
  int64_t n_chunks = 0, chunk = 0;
  chunking(B, N, &n_chunks, &chunk);
  return B * n_chunks * 2;
}

cudaError_t launch_energy_preserving_mix(const void* p, const void* q, const float* a, const float* b, void* out,
                                         float* workspace, int64_t B, int64_t N, float eps, DType dtype,
                                         cudaStream_t stream) {
  if (B < 0 || N < 0 || B > 65535) return cudaErrorInvalidValue;  // B is grid.y
  if (B == 0 || N == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_typed<float>(p, q, a, b, out, workspace, B, N, eps, stream);
    case DType::kFloat16: return launch_typed<__half>(p, q, a, b, out, workspace, B, N, eps, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(p, q, a, b, out, workspace, B, N, eps, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace selfe
