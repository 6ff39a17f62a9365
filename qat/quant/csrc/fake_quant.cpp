// qat's fused CPU fake quantizer (issue 19): Jacob et al. 2018 eq. 12 with the straight-through estimator,
// in one pass over the tensor instead of seven ATen passes (qat/quant/vectorized.py).
//
// Per element, exactly the float32 arithmetic of torch's fake-quantize kernels (checked against torch 2.14.1)
// and of qat.quant.vectorized:
//     q    = nearbyint(x * float32(1/S)) + Z      (ties to even)
//     c    = clamp(q, qmin, qmax)                 (NaN stays NaN, as torch.clamp)
//     out  = (c - Z) * S
//     mask = (q == c)                             (the STE: the gradient passes where nothing was clipped)
// Built with -ffp-contract=off so that no multiply-add is fused (that would round once instead of twice).
// Registered as torch.ops.qat_cpu.fake_quantize / fake_quantize_backward; loaded by qat/quant/cpu_kernel.py.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

constexpr int64_t kGrain = 32768;

// Codes for n consecutive elements sharing one (inverse scale, zero point, scale).
inline void quantize_run(const float* x, float* out, bool* mask, int64_t n, float inv, float z, float s, float lo,
                         float hi) {
  if (mask != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const float q = std::nearbyint(x[i] * inv) + z;
      const float c = std::min(std::max(q, lo), hi);
      mask[i] = (q == c);
      out[i] = (c - z) * s;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float q = std::nearbyint(x[i] * inv) + z;
      out[i] = (std::min(std::max(q, lo), hi) - z) * s;
    }
  }
}

inline void mask_run(const float* grad, const uint8_t* mask, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = grad[i] * static_cast<float>(mask[i]);
  }
}

bool dense(const at::Tensor& t) { return t.is_non_overlapping_and_dense(); }

// (out, mask) for x fake-quantized per tensor (axis < 0; scale/zero_point with one element) or per channel along
// `axis` (scale/zero_point with x.size(axis) elements). out and mask take x's memory layout (contiguous or
// channels-last alike); mask is an empty tensor when need_mask is false (the caller knows nothing is clipped).
std::tuple<at::Tensor, at::Tensor> fake_quantize(const at::Tensor& x_in, const at::Tensor& scale_in,
                                                 const at::Tensor& zero_point_in, int64_t qmin, int64_t qmax,
                                                 int64_t axis, bool need_mask) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat, "qat_cpu.fake_quantize: float32 CPU x");
  TORCH_CHECK(scale_in.scalar_type() == at::kFloat, "qat_cpu.fake_quantize: float32 scale");
  const at::Tensor x = dense(x_in) ? x_in : x_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor zero_point = zero_point_in.contiguous().to(at::kFloat);
  const int64_t channels = axis < 0 ? 1 : x.size(axis);
  TORCH_CHECK(scale.numel() == channels && zero_point.numel() == channels,
              "qat_cpu.fake_quantize: scale and zero_point need ", channels, " elements");
  at::Tensor out = at::empty_like(x);
  at::Tensor mask = need_mask ? at::empty_like(x, x.options().dtype(at::kBool)) : at::Tensor();
  const int64_t numel = x.numel();
  if (numel == 0) {
    return {out, mask};
  }
  const float* px = x.const_data_ptr<float>();
  float* po = out.mutable_data_ptr<float>();
  bool* pm = need_mask ? mask.mutable_data_ptr<bool>() : nullptr;
  const float* ps = scale.const_data_ptr<float>();
  const float* pz = zero_point.const_data_ptr<float>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  // A dense tensor's element at memory offset i has index (i / stride) % size along a dimension: runs of
  // `run` consecutive offsets share one channel. A single channel is per tensor (a size-1 dimension may carry any
  // stride).
  const int64_t run = channels == 1 ? numel : x.stride(axis);
  const int64_t runs = numel / run;
  if (runs == 1) {
    const float s = ps[0], inv = 1.0f / s, z = pz[0];
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      quantize_run(px + begin, po + begin, pm ? pm + begin : nullptr, end - begin, inv, z, s, lo, hi);
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrain / run);
    at::parallel_for(0, runs, grain, [&](int64_t begin, int64_t end) {
      for (const auto r : c10::irange(begin, end)) {
        const int64_t c = r % channels;
        const float s = ps[c], inv = 1.0f / s, z = pz[c];
        const int64_t off = r * run;
        quantize_run(px + off, po + off, pm ? pm + off : nullptr, run, inv, z, s, lo, hi);
      }
    });
  }
  return {out, mask};
}

// grad * mask (float multiply, as autograd's grad * mask: NaN/inf gradients where clipped give NaN, -g * 0 is -0).
at::Tensor fake_quantize_backward(const at::Tensor& grad, const at::Tensor& mask) {
  if (!(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && dense(grad) && dense(mask) &&
        grad.sizes() == mask.sizes() && grad.strides() == mask.strides())) {
    return at::mul(grad, mask);
  }
  at::Tensor out = at::empty_like(grad);
  const float* pg = grad.const_data_ptr<float>();
  // read as bytes: a bool load is not vectorized by the compiler, a byte widened to float is
  const uint8_t* pm = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  float* po = out.mutable_data_ptr<float>();
  at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
    mask_run(pg + begin, pm + begin, po + begin, end - begin);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(qat_cpu, m) {
  m.def("fake_quantize(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int axis, bool need_mask)"
        " -> (Tensor, Tensor)");
  m.def("fake_quantize_backward(Tensor grad, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(qat_cpu, CPU, m) {
  m.impl("fake_quantize", &fake_quantize);
  m.impl("fake_quantize_backward", &fake_quantize_backward);
}
