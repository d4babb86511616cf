// Launchers of selfe's plain CUDA kernels (no torch headers): raw pointers, sizes and a stream.
//
// Every launcher returns cudaSuccess or the error of the launch; cudaErrorInvalidValue for arguments
// the kernels do not support (the torch binding in binding.cpp checks those first with clear messages).
// Element tensors are contiguous; per-sample conditioning rows (shift, scale, gate) may be strided views
// (FLUX chunks one modulation tensor into six), given by their row stride in elements.
// Arithmetic is fp32 whatever the storage dtype; results are cast back to the input dtype.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace selfe {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Widest feature dim D the modulation kernels hold in registers (one row per block).
int64_t modulation_max_dim(DType dtype);

// out = LayerNorm(x) * (1 + scale) + shift.
// x, out: (B, L, D) of `dtype`; shift, scale: (B, D) rows of `cond_dtype` (== dtype or kFloat32).
cudaError_t launch_layer_norm_modulate(const void* x, const void* shift, const void* scale, void* out, int64_t B,
                                       int64_t L, int64_t D, int64_t shift_stride, int64_t scale_stride, float eps,
                                       DType dtype, DType cond_dtype, cudaStream_t stream);

// x_new = x + gate * y (rounded to dtype); out = LayerNorm(x_new) * (1 + scale) + shift, in one pass.
// x, y, x_new, out: (B, L, D) of `dtype`; gate, shift, scale: (B, D) rows of `cond_dtype`.
cudaError_t launch_gated_residual_modulate(const void* x, const void* gate, const void* y, const void* shift,
                                           const void* scale, void* x_new, void* out, int64_t B, int64_t L,
                                           int64_t D, int64_t gate_stride, int64_t shift_stride,
                                           int64_t scale_stride, float eps, DType dtype, DType cond_dtype,
                                           cudaStream_t stream);

// Number of floats of workspace launch_energy_preserving_mix needs for B samples of N elements.
int64_t energy_preserving_mix_workspace_floats(int64_t B, int64_t N);

// out = (a p + b q) * ||p|| / max(||a p + b q||, eps), norms per sample over its N elements.
// p, q, out: (B, N) of `dtype`; a, b: (B,) float32; workspace: energy_preserving_mix_workspace_floats(B, N).
cudaError_t launch_energy_preserving_mix(const void* p, const void* q, const float* a, const float* b, void* out,
                                         float* workspace, int64_t B, int64_t N, float eps, DType dtype,
                                         cudaStream_t stream);

}  // namespace selfe
