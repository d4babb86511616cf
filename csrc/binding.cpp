// Thin torch binding of the selfe CUDA launchers (module selfe._C): checks tensors, allocates outputs,
// calls the launchers on the current stream. The kernels themselves (*.cu) never see a torch header.
// Autograd, fake tensors and dispatch live in Python (selfe.kernels.cuda_ops).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <string>

#include "selfe_kernels.h"

namespace {

selfe::DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return selfe::DType::kFloat32;
    case at::kHalf: return selfe::DType::kFloat16;
    case at::kBFloat16: return selfe::DType::kBFloat16;
    default: TORCH_CHECK(false, name, ": dtype ", t.scalar_type(), " not supported (float32, float16, bfloat16)");
  }
  return selfe::DType::kFloat32;  // unreachable
}

void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but x is on ", ref.device());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

// A (B, D) conditioning tensor: strided rows are fine (FLUX chunks one modulation tensor), the last dim must
// be contiguous. Its dtype must be x's or float32; anything else is cast to float32 (a tiny tensor).
at::Tensor conditioning(const at::Tensor& t, const at::Tensor& x, at::ScalarType cond_type, const char* name) {
  check_cuda(t, x, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(2), name, " must be (B, D) = (",
              x.size(0), ", ", x.size(2), "), got ", t.sizes());
  at::Tensor c = t.scalar_type() == cond_type ? t : t.to(cond_type);
  if (c.stride(1) != 1 || c.stride(0) < c.size(1)) c = c.contiguous();
  return c;
}

// The conditioning dtype shared by all (B, D) inputs: x's if they all have it, else float32.
at::ScalarType cond_type_for(const at::Tensor& x, std::initializer_list<at::Tensor> conds) {
  for (const auto& c : conds) {
    if (c.scalar_type() != x.scalar_type()) return at::kFloat;
  }
  return x.scalar_type();
}

void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, L, D), got ", x.sizes());
  TORCH_CHECK(x.size(2) <= selfe::modulation_max_dim(to_dtype(x, "x")), op, ": D=", x.size(2),
              " exceeds the kernel limit ", selfe::modulation_max_dim(to_dtype(x, "x")));
}

at::Tensor layer_norm_modulate(const at::Tensor& x_in, const at::Tensor& shift_in, const at::Tensor& scale_in,
                               double eps) {
  check_x(x_in, "layer_norm_modulate");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::ScalarType ct = cond_type_for(x, {shift_in, scale_in});
  const at::Tensor shift = conditioning(shift_in, x, ct, "shift");
  const at::Tensor scale = conditioning(scale_in, x, ct, "scale");
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  check_launch(selfe::launch_layer_norm_modulate(
                   x.data_ptr(), shift.data_ptr(), scale.data_ptr(), out.data_ptr(), x.size(0), x.size(1), x.size(2),
                   shift.stride(0), scale.stride(0), static_cast<float>(eps), to_dtype(x, "x"),
                   to_dtype(shift, "shift"), c10::cuda::getCurrentCUDAStream().stream()),
               "layer_norm_modulate");
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_modulate(const at::Tensor& x_in, const at::Tensor& gate_in,
                                                           const at::Tensor& y_in, const at::Tensor& shift_in,
                                                           const at::Tensor& scale_in, double eps) {
  check_x(x_in, "gated_residual_modulate");
  check_cuda(y_in, x_in, "y");
  TORCH_CHECK(y_in.sizes() == x_in.sizes() && y_in.scalar_type() == x_in.scalar_type(),
              "gated_residual_modulate: y must match x ", x_in.sizes(), " ", x_in.scalar_type(), ", got ",
              y_in.sizes(), " ", y_in.scalar_type());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const at::ScalarType ct = cond_type_for(x, {gate_in, shift_in, scale_in});
  const at::Tensor gate = conditioning(gate_in, x, ct, "gate");
  const at::Tensor shift = conditioning(shift_in, x, ct, "shift");
  const at::Tensor scale = conditioning(scale_in, x, ct, "scale");
  at::Tensor x_new = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  check_launch(selfe::launch_gated_residual_modulate(
                   x.data_ptr(), gate.data_ptr(), y.data_ptr(), shift.data_ptr(), scale.data_ptr(), x_new.data_ptr(),
                   out.data_ptr(), x.size(0), x.size(1), x.size(2), gate.stride(0), shift.stride(0), scale.stride(0),
                   static_cast<float>(eps), to_dtype(x, "x"), to_dtype(shift, "shift"),
                   c10::cuda::getCurrentCUDAStream().stream()),
               "gated_residual_modulate");
  return {x_new, out};
}

at::Tensor energy_preserving_mix(const at::Tensor& p_in, const at::Tensor& q_in, const at::Tensor& a_in,
                                 const at::Tensor& b_in, double eps) {
  TORCH_CHECK(p_in.is_cuda(), "energy_preserving_mix: p must be a CUDA tensor");
  TORCH_CHECK(p_in.dim() >= 1, "energy_preserving_mix: p must be (B, ...)");
  check_cuda(q_in, p_in, "q");
  TORCH_CHECK(q_in.sizes() == p_in.sizes() && q_in.scalar_type() == p_in.scalar_type(),
              "energy_preserving_mix: q must match p ", p_in.sizes(), " ", p_in.scalar_type(), ", got ", q_in.sizes(),
              " ", q_in.scalar_type());
  const int64_t B = p_in.size(0);
  for (const auto* t : {&a_in, &b_in}) {
    check_cuda(*t, p_in, t == &a_in ? "a" : "b");
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, "energy_preserving_mix: ", t == &a_in ? "a" : "b",
                " must be (B,) = (", B, ",), got ", t->sizes());
  }
  TORCH_CHECK(B <= 65535, "energy_preserving_mix: batch ", B, " exceeds the kernel limit 65535");
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = p_in.contiguous();
  const at::Tensor q = q_in.contiguous();
  const at::Tensor a = a_in.to(at::kFloat).contiguous();
  const at::Tensor b = b_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(p, at::MemoryFormat::Contiguous);
  const int64_t N = B == 0 ? 0 : p.numel() / B;
  at::Tensor workspace = at::empty({std::max<int64_t>(1, selfe::energy_preserving_mix_workspace_floats(B, N))},
                                   p.options().dtype(at::kFloat));
  check_launch(selfe::launch_energy_preserving_mix(p.data_ptr(), q.data_ptr(), a.data_ptr<float>(),
                                                   b.data_ptr<float>(), out.data_ptr(), workspace.data_ptr<float>(), B,
                                                   N, static_cast<float>(eps), to_dtype(p, "p"),
                                                   c10::cuda::getCurrentCUDAStream().stream()),
               "energy_preserving_mix");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "selfe CUDA kernels (forward passes); see selfe.kernels.cuda_ops for the torch ops";
  m.def("layer_norm_modulate", &layer_norm_modulate, "LayerNorm(x) * (1 + scale) + shift");
  m.def("gated_residual_modulate", &gated_residual_modulate, "x' = x + gate * y, then the modulation of x'");
  m.def("energy_preserving_mix", &energy_preserving_mix, "(a p + b q) * ||p|| / ||a p + b q|| per sample");
}
