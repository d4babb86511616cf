// Shared device helpers of the selfe kernels: dtype conversion, 16-byte packed loads/stores, reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace selfe {
namespace detail {

constexpr int kVecBytes = 16;  // one 128-bit memory transaction per thread

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Load N consecutive elements of S as fp32: 16-byte (uint4) loads when N * sizeof(S) is a multiple of 16
// (the caller guarantees the alignment), else element by element.
template <typename S, int N>
__device__ __forceinline__ void load_f32(const S* __restrict__ p, float (&out)[N]) {
  if constexpr ((N * sizeof(S)) % kVecBytes == 0) {
    constexpr int kPer = kVecBytes / sizeof(S);
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[c];
      const S* e = reinterpret_cast<const S*>(&raw);
#pragma unroll
      for (int j = 0; j < kPer; ++j) out[c * kPer + j] = to_f32(e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_f32(p[j]);
  }
}

// Store N fp32 values as S, with 16-byte stores where the size allows (as load_f32).
template <typename S, int N>
__device__ __forceinline__ void store_f32(S* __restrict__ p, const float (&in)[N]) {
  if constexpr ((N * sizeof(S)) % kVecBytes == 0) {
    constexpr int kPer = kVecBytes / sizeof(S);
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      uint4 raw;
      S* e = reinterpret_cast<S*>(&raw);
#pragma unroll
      for (int j = 0; j < kPer; ++j) e[j] = from_f32<S>(in[c * kPer + j]);
      reinterpret_cast<uint4*>(p)[c] = raw;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = from_f32<S>(in[j]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024): shuffles within each warp, the warp
// totals through shared memory, a last shuffle in warp 0. Every thread gets the total. `smem` holds 33
// floats; consecutive calls may reuse it (the total lives in its own slot, read after the last barrier).
__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < n_warps ? smem[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) smem[32] = t;
  }
  __syncthreads();
  return smem[32];
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) % kVecBytes) == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace detail
}  // namespace selfe
