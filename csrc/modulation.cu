// adaLN modulation kernels: layer_norm_modulate and gated_residual_modulate (forward).
//
// One block per (b, l) row. The row is held in registers as fp32 (kPacks packs of kPackN elements per
// thread), so x is read from memory once: mean, then the centred variance (two-pass, as torch), then
// the modulated output. Vector path: kPackN elements = 16 bytes per access when D and every pointer
// and row stride allow it; otherwise the scalar path (kPackN = 1) with the same structure.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.cuh"
#include "selfe_kernels.h"

namespace selfe {
namespace {

using detail::block_sum;
using detail::load_f32;
using detail::store_f32;

constexpr int kMaxThreads = 1024;
constexpr int kMaxPacksPerThread = 8;
constexpr int kMaxElemsPerThread = 32;  // 32 fp32 registers of row cache: no spills under 1024 threads

// kGated: x_new = x + gate * y is formed, rounded to T, stored, and normalised in place of x.
template <typename T, typename C, int kPackN, int kPacks, bool kGated>
__global__ void __launch_bounds__(kMaxThreads)
    modulate_kernel(const T* __restrict__ x, const C* __restrict__ gate, const T* __restrict__ y,
                    const C* __restrict__ shift, const C* __restrict__ scale, T* __restrict__ x_new,
                    T* __restrict__ out, int64_t L, int64_t D, int64_t gate_stride, int64_t shift_stride,
                    int64_t scale_stride, float eps) {
  __shared__ float smem[33];
  const int64_t row = blockIdx.x;
  const int64_t b = row / L;
  const int64_t n_packs = D / kPackN;
  const int64_t row_offset = row * D;

  float v[kPacks][kPackN];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int64_t col = (threadIdx.x + static_cast<int64_t>(k) * blockDim.x) * kPackN;
    if (col < n_packs * kPackN) {
      load_f32<T, kPackN>(x + row_offset + col, v[k]);
      if constexpr (kGated) {
        float yv[kPackN], gv[kPackN];
        load_f32<T, kPackN>(y + row_offset + col, yv);
        load_f32<C, kPackN>(gate + b * gate_stride + col, gv);
        T rounded[kPackN];
#pragma unroll
        for (int j = 0; j < kPackN; ++j) {
          rounded[j] = detail::from_f32<T>(v[k][j] + gv[j] * yv[j]);
          v[k][j] = detail::to_f32(rounded[j]);  // normalise the stored value, as the reference does
        }
        store_f32<T, kPackN>(x_new + row_offset + col, v[k]);
      }
#pragma unroll
      for (int j = 0; j < kPackN; ++j) sum += v[k][j];
    }
  }
  const float mean = block_sum(sum, smem) / static_cast<float>(D);

  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int64_t col = (threadIdx.x + static_cast<int64_t>(k) * blockDim.x) * kPackN;
    if (col < n_packs * kPackN) {
#pragma unroll
      for (int j = 0; j < kPackN; ++j) {
        const float c = v[k][j] - mean;
        sq += c * c;
      }
    }
  }
  const float rstd = rsqrtf(block_sum(sq, smem) / static_cast<float>(D) + eps);

#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int64_t col = (threadIdx.x + static_cast<int64_t>(k) * blockDim.x) * kPackN;
    if (col < n_packs * kPackN) {
      float sh[kPackN], sc[kPackN], o[kPackN];
      load_f32<C, kPackN>(shift + b * shift_stride + col, sh);
      load_f32<C, kPackN>(scale + b * scale_stride + col, sc);
#pragma unroll
      for (int j = 0; j < kPackN; ++j) o[j] = (v[k][j] - mean) * rstd * (1.f + sc[j]) + sh[j];
      store_f32<T, kPackN>(out + row_offset + col, o);
    }
  }
}

struct ModulateArgs {
  const void* x;
  const void* gate;
  const void* y;
  const void* shift;
  const void* scale;
  void* x_new;
  void* out;
  int64_t B, L, D, gate_stride, shift_stride, scale_stride;
  float eps;
};

template <typename T, typename C, int kPackN, int kPacks, bool kGated>
cudaError_t launch_with(const ModulateArgs& a, int threads, cudaStream_t stream) {
  modulate_kernel<T, C, kPackN, kPacks, kGated><<<static_cast<unsigned>(a.B * a.L), threads, 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<const C*>(a.gate), static_cast<const T*>(a.y),
      static_cast<const C*>(a.shift), static_cast<const C*>(a.scale), static_cast<T*>(a.x_new),
      static_cast<T*>(a.out), a.L, a.D, a.gate_stride, a.shift_stride, a.scale_stride, a.eps);
  return cudaGetLastError();
}

// Pick packs per thread (registers) and threads per block from the number of packs in a row:
// the fewest packs per thread that keep the block at <= 256 threads, more threads only for wide rows.
template <typename T, typename C, int kPackN, bool kGated>
cudaError_t dispatch_packs(const ModulateArgs& a, cudaStream_t stream) {
  const int64_t n_packs = a.D / kPackN;
  constexpr int kMaxPacks = kMaxElemsPerThread / kPackN < kMaxPacksPerThread ? kMaxElemsPerThread / kPackN
                                                                               : kMaxPacksPerThread;
  int packs = 1;
  while (packs < kMaxPacks && detail::ceil_div(n_packs, packs) > 256) packs *= 2;
  const int64_t threads64 = detail::ceil_div(detail::ceil_div(n_packs, packs), 32) * 32;
  if (threads64 > kMaxThreads) return cudaErrorInvalidValue;
  const int threads = static_cast<int>(threads64);
  switch (packs) {
    case 1: return launch_with<T, C, kPackN, 1, kGated>(a, threads, stream);
    case 2: return launch_with<T, C, kPackN, 2, kGated>(a, threads, stream);
    case 4: return launch_with<T, C, kPackN, (kMaxPacks < 4 ? kMaxPacks : 4), kGated>(a, threads, stream);
    default: return launch_with<T, C, kPackN, kMaxPacks, kGated>(a, threads, stream);
  }
}

template <typename T, typename C, bool kGated>
cudaError_t dispatch_vector(const ModulateArgs& a, cudaStream_t stream) {
  constexpr int kPackN = detail::kVecBytes / sizeof(T);
  // 16-byte accesses need every row start aligned: D a multiple of the pack, aligned bases and strides.
  bool vec = a.D % kPackN == 0 && detail::aligned16(a.x) && detail::aligned16(a.out) &&
             detail::aligned16(a.shift) && detail::aligned16(a.scale) &&
             (a.shift_stride * sizeof(C)) % detail::kVecBytes == 0 &&
             (a.scale_stride * sizeof(C)) % detail::kVecBytes == 0;
  if (kGated) {
    vec = vec && detail::aligned16(a.y) && detail::aligned16(a.x_new) && detail::aligned16(a.gate) &&
          (a.gate_stride * sizeof(C)) % detail::kVecBytes == 0;
  }
  if (vec) return dispatch_packs<T, C, kPackN, kGated>(a, stream);
  return dispatch_packs<T, C, 1, kGated>(a, stream);
}

template <bool kGated>
cudaError_t dispatch_dtype(const ModulateArgs& a, DType dtype, DType cond_dtype, cudaStream_t stream) {
  if (a.B <= 0 || a.L <= 0 || a.D <= 0) return a.B * a.L * a.D == 0 ? cudaSuccess : cudaErrorInvalidValue;
  if (a.D > modulation_max_dim(dtype) || a.B * a.L > 0x7fffffffLL) return cudaErrorInvalidValue;
  const bool cond_f32 = cond_dtype == DType::kFloat32;
  if (!cond_f32 && cond_dtype != dtype) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return dispatch_vector<float, float, kGated>(a, stream);
    case DType::kFloat16:
      return cond_f32 ? dispatch_vector<__half, float, kGated>(a, stream)
                      : dispatch_vector<__half, __half, kGated>(a, stream);
    case DType::kBFloat16:
      return cond_f32 ? dispatch_vector<__nv_bfloat16, float, kGated>(a, stream)
                      : dispatch_vector<__nv_bfloat16, __nv_bfloat16, kGated>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t modulation_max_dim(DType dtype) {
  // The scalar path bounds what is always supported: kMaxThreads threads x kMaxPacksPerThread elements
  // (the 16-byte path reaches kMaxThreads x kMaxElemsPerThread when D and the pointers allow it).
  (void)dtype;
  return static_cast<int64_t>(kMaxThreads) * kMaxPacksPerThread;
}

cudaError_t launch_layer_norm_modulate(const void* x, const void* shift, const void* scale, void* out, int64_t B,
                                       int64_t L, int64_t D, int64_t shift_stride, int64_t scale_stride, float eps,
                                       DType dtype, DType cond_dtype, cudaStream_t stream) {
  const ModulateArgs a{x, nullptr, nullptr, shift, scale, nullptr, out, B, L, D, 0, shift_stride, scale_stride, eps};
  return dispatch_dtype<false>(a, dtype, cond_dtype, stream);
}

cudaError_t launch_gated_residual_modulate(const void* x, const void* gate, const void* y, const void* shift,
                                           const void* scale, void* x_new, void* out, int64_t B, int64_t L,
                                           int64_t D, int64_t gate_stride, int64_t shift_stride,
                                           int64_t scale_stride, float eps, DType dtype, DType cond_dtype,
                                           cudaStream_t stream) {
  const ModulateArgs a{x, gate, y, shift, scale, x_new, out, B, L, D, gate_stride, shift_stride, scale_stride, eps};
  return dispatch_dtype<true>(a, dtype, cond_dtype, stream);
}

}  // namespace selfe
