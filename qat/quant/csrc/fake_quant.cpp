// qat's CPU kernel for the QAT step (issue 19): each op does in one call, and its backward in one pass, what a
// chain of ATen ops does in qat/quant (fake quantizers, BN folds, batch moments, int32 bias, whitepaper correction,
// ReLU masks), element for element with the same float32 arithmetic (each op's comment says which ops).
//
// The fake quantizer, per element, exactly the float32 arithmetic of torch's fake-quantize kernels (checked
// against torch 2.14.1) and of qat.quant.vectorized:
//     q    = nearbyint(x * float32(1/S)) + Z      (ties to even)
//     c    = clamp(q, qmin, qmax)                 (NaN stays NaN, as torch.clamp)
//     out  = (c - Z) * S
//     mask = (q == c)                             (the STE: the gradient passes where nothing was clipped)
// Built with -ffp-contract=off so that no multiply-add is fused (that would round once instead of twice).
// Registered as torch.ops.qat_cpu.*; loaded by qat/quant/cpu_kernel.py.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/irange.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>
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

// min, max and whether any NaN, over the n products p[i] * f (each rounded as torch's multiply rounds it; f = 1
// gives p itself exactly), without storing them. Float min/max reductions are not vectorized by the compiler (they
// are not associative under NaN and signed zeros), so with AVX2 eight lanes are reduced by hand: min and max are
// exact in any order, NaN is tracked on its own, and a zero's sign does not reach S or Z.
inline void range_of(const float* p, float f, int64_t n, float& mn, float& mx, bool& nan) {
  int64_t i = 0;
#ifdef __AVX2__
  if (n >= 8) {
    const __m256 vf = _mm256_set1_ps(f);
    __m256 vmin = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256 vnan = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(p + i), vf);
      vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      vmin = _mm256_min_ps(vmin, v);
      vmax = _mm256_max_ps(vmax, v);
    }
    alignas(32) float lmin[8], lmax[8];
    _mm256_store_ps(lmin, vmin);
    _mm256_store_ps(lmax, vmax);
    for (int k = 0; k < 8; ++k) {
      mn = std::min(mn, lmin[k]);
      mx = std::max(mx, lmax[k]);
    }
    nan |= _mm256_movemask_ps(vnan) != 0;
  }
#endif
  for (; i < n; ++i) {
    const float v = p[i] * f;
    nan |= (v != v);
    mn = std::min(mn, v);
    mx = std::max(mx, v);
  }
}

// Turns the quantizer's mask bytes m (0/1) into the codes of coded_mask_backward: 0 where the ReLU/ReLU6 output x
// is 0 (or 6), else 2 - m (1: passed, 2: clipped by the quantizer).
// kKeepBytes[b]: byte k is 0x00 where bit k of b is set, else 0xFF (a movemask spread over eight bytes).
const std::array<uint64_t, 256> kKeepBytes = [] {
  std::array<uint64_t, 256> table{};
  for (int b = 0; b < 256; ++b) {
    for (int k = 0; k < 8; ++k) table[b] |= static_cast<uint64_t>(((b >> k) & 1) ? 0x00 : 0xFF) << (8 * k);
  }
  return table;
}();

inline void activation_codes(const float* x, uint8_t* codes, int64_t n, bool relu6) {
  int64_t i = 0;
#ifdef __AVX2__
  const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    __m256 stop = _mm256_cmp_ps(v, zero, _CMP_EQ_OQ);
    if (relu6) stop = _mm256_or_ps(stop, _mm256_cmp_ps(v, six, _CMP_EQ_OQ));
    const int bits = _mm256_movemask_ps(stop);
    uint64_t m8;
    std::memcpy(&m8, codes + i, 8);
    const uint64_t out = (0x0202020202020202ULL - m8) & kKeepBytes[bits];
    std::memcpy(codes + i, &out, 8);
  }
#endif
  for (; i < n; ++i) {
    const bool stop = x[i] == 0.0f || (relu6 && x[i] == 6.0f);
    codes[i] = stop ? 0 : static_cast<uint8_t>(2 - codes[i]);
  }
}

// grad through the codes: 0 -> +0, 1 -> grad, 2 -> grad * 0.
inline void coded_run(const float* g, const uint8_t* codes, float* out, int64_t n) {
  int64_t i = 0;
#ifdef __AVX2__
  const __m256i one = _mm256_set1_epi32(1), none = _mm256_setzero_si256();
  const __m256 onef = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    int64_t c8;
    std::memcpy(&c8, codes + i, 8);
    const __m256i c = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(c8));
    const __m256 pass = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(c, one)), onef);  // 1.0 or 0.0
    const __m256 stop = _mm256_castsi256_ps(_mm256_cmpeq_epi32(c, none));
    const __m256 r = _mm256_mul_ps(_mm256_loadu_ps(g + i), pass);
    _mm256_storeu_ps(out + i, _mm256_andnot_ps(stop, r));
  }
#endif
  for (; i < n; ++i) {
    out[i] = codes[i] == 0 ? 0.0f : g[i] * static_cast<float>(codes[i] == 1);
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

// Per output channel (axis 0, whose elements lie in one contiguous block of the dense tensor w): the weight
// folded with `factor` (w * factor[c], as torch multiplies a tensor by a broadcast one; none: w itself), its range
// (min and max, as torch.aminmax: NaN if any element is NaN), (S, Z) from the range widened to contain 0 (exactly
// qat.quant.scheme.choose_qparams in float32), and the folded weight fake-quantized on that grid, with the STE
// mask. Returns (out, mask, min, max, scale, zero_point, clipped): `clipped` counts elements outside the grid
// (rounding can push a channel's extreme one code out); when it is 0 the mask is not written (never read then).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t> fold_fake_quantize_weight(
    const at::Tensor& w, const std::optional<at::Tensor>& factor_in, int64_t qmin, int64_t qmax, bool symmetric,
    double eps) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() >= 1 && dense(w),
              "qat_cpu.fold_fake_quantize_weight_train: a dense float32 CPU weight");
  const int64_t channels = w.size(0);
  const int64_t numel = w.numel();
  TORCH_CHECK(channels > 0 && w.stride(0) * channels == numel,
              "qat_cpu.fold_fake_quantize_weight_train: each output channel must be one contiguous block");
  const int64_t block = numel / channels;
  at::Tensor factor;
  if (factor_in.has_value()) {
    factor = factor_in->contiguous();
    TORCH_CHECK(factor.scalar_type() == at::kFloat && factor.numel() == channels,
                "qat_cpu.fold_fake_quantize_weight_train: a float32 factor per output channel");
  }
  at::Tensor out = at::empty_like(w);
  at::Tensor mask = at::empty_like(w, w.options().dtype(at::kBool));
  const auto vec = w.options().dtype(at::kFloat);
  at::Tensor low = at::empty({channels}, vec), high = at::empty({channels}, vec), scale = at::empty({channels}, vec);
  at::Tensor zero_point = at::empty({channels}, w.options().dtype(at::kInt));
  const float* pw = w.const_data_ptr<float>();
  const float* pf = factor.defined() ? factor.const_data_ptr<float>() : nullptr;
  float* po = out.mutable_data_ptr<float>();
  bool* pm = mask.mutable_data_ptr<bool>();
  float *pl = low.mutable_data_ptr<float>(), *ph = high.mutable_data_ptr<float>(), *ps = scale.mutable_data_ptr<float>();
  int32_t* pz = zero_point.mutable_data_ptr<int32_t>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax), eps_f = static_cast<float>(eps);
  std::vector<int64_t> clipped_per_channel(channels, 0);
  at::parallel_for(0, channels, std::max<int64_t>(1, kGrain / std::max<int64_t>(block, 1)), [&](int64_t begin,
                                                                                                  int64_t end) {
    for (const auto c : c10::irange(begin, end)) {
      const float* src = pw + c * block;
      float* dst = po + c * block;
      float mn = std::numeric_limits<float>::infinity(), mx = -std::numeric_limits<float>::infinity();
      bool nan = false;
      const float f = pf != nullptr ? pf[c] : 1.0f;  // without a factor, w * 1 is w exactly
      range_of(src, f, block, mn, mx, nan);
      if (nan) {
        mn = mx = std::numeric_limits<float>::quiet_NaN();
      }
      pl[c] = mn;
      ph[c] = mx;
      // choose_qparams: widen to contain 0 (clamp propagates NaN), then S and Z
      const float wlo = std::isnan(mn) ? mn : std::min(mn, 0.0f);
      const float whi = std::isnan(mx) ? mx : std::max(mx, 0.0f);
      float s, z;
      if (symmetric) {
        const float absmax = (std::isnan(wlo) || std::isnan(whi)) ? std::numeric_limits<float>::quiet_NaN()
                                                                   : std::max(-wlo, whi);
        const float raw = absmax / static_cast<float>(static_cast<double>(qmax - qmin) / 2.0);
        s = std::isnan(raw) ? raw : std::max(raw, eps_f);
        z = 0.0f;
      } else {
        const float raw = (whi - wlo) / static_cast<float>(qmax - qmin);
        s = std::isnan(raw) ? raw : std::max(raw, eps_f);
        const float zr = std::nearbyint(lo - wlo / s);
        z = std::isnan(zr) ? zr : std::min(std::max(zr, lo), hi);
      }
      ps[c] = s;
      pz[c] = static_cast<int32_t>(z);
      z = static_cast<float>(pz[c]);
      const float inv = 1.0f / s;
      // the fake-quantized w * f (recomputed: the same product) and how many codes were clipped; the mask is
      // written below only if some channel clipped (it is read only then)
      int64_t clipped = 0;
      for (int64_t i = 0; i < block; ++i) {
        const float q = std::nearbyint((src[i] * f) * inv) + z;
        const float cq = std::min(std::max(q, lo), hi);
        clipped += (q != cq);
        dst[i] = (cq - z) * s;
      }
      clipped_per_channel[c] = clipped;
    }
  });
  int64_t clipped = 0;
  for (const auto n : clipped_per_channel) {
    clipped += n;
  }
  if (clipped > 0) {  // the STE mask: all ones in channels that clipped nothing, recomputed in the others
    at::parallel_for(0, channels, std::max<int64_t>(1, kGrain / std::max<int64_t>(block, 1)), [&](int64_t begin,
                                                                                                    int64_t end) {
      for (const auto c : c10::irange(begin, end)) {
        bool* m = pm + c * block;
        if (clipped_per_channel[c] == 0) {
          std::memset(m, 1, block);
          continue;
        }
        const float* src = pw + c * block;
        const float f = pf != nullptr ? pf[c] : 1.0f, s = ps[c], z = static_cast<float>(pz[c]), inv = 1.0f / s;
        for (int64_t i = 0; i < block; ++i) {
          const float q = std::nearbyint((src[i] * f) * inv) + z;
          m[i] = (q == std::min(std::max(q, lo), hi));
        }
      }
    });
  }
  return {out, mask, low, high, scale, zero_point, clipped};
}

// The factor's gradient from prod = g1 * w: autograd's sum_to_size onto the broadcast shape (C, 1, ..., 1), i.e.
// ATen's own sum over every dimension but the first (the same reduction, hence the same bits), as a vector.
at::Tensor factor_grad(const at::Tensor& prod, int64_t channels) {
  std::vector<int64_t> dims;
  for (int64_t d = 1; d < prod.dim(); ++d) dims.push_back(d);
  return prod.sum(dims, /*keepdim=*/true).reshape({channels});
}

// The backward of fold_fake_quantize_weight: g1 = grad * mask (grad itself when nothing was clipped), then, as
// autograd differentiates w * factor: grad_w = g1 * factor[c] and factor's gradient, the per-channel sum of
// g1 * w by ATen's reduction (factor_grad; only when need_prod). Without a factor: (g1, undefined).
std::tuple<at::Tensor, at::Tensor> fold_fake_quantize_weight_backward(const at::Tensor& grad, const at::Tensor& mask,
                                                                      bool clipped, const at::Tensor& w,
                                                                      const std::optional<at::Tensor>& factor_in,
                                                                      bool need_prod) {
  const bool same = grad.device().is_cpu() && grad.scalar_type() == at::kFloat && dense(grad) &&
                    grad.sizes() == w.sizes() && grad.strides() == w.strides() &&
                    (!clipped || mask.strides() == w.strides());  // unclipped: the mask is not read (empty)
  if (!factor_in.has_value()) {
    if (!clipped) {
      return {grad, at::Tensor()};
    }
    return {fake_quantize_backward(grad, mask), at::Tensor()};
  }
  const at::Tensor factor = factor_in->contiguous();
  if (!same) {  // ATen ops in autograd's order (same values)
    const at::Tensor g1 = clipped ? at::mul(grad, mask) : grad;
    std::vector<int64_t> shape(w.dim(), 1);
    shape[0] = -1;
    const at::Tensor f = factor.reshape(shape);
    return {at::mul(g1, f), need_prod ? factor_grad(at::mul(g1, w), w.size(0)) : at::Tensor()};
  }
  const int64_t channels = w.size(0), block = w.numel() / channels;
  at::Tensor grad_w = at::empty_like(w);
  at::Tensor prod = need_prod ? at::empty_like(w) : at::Tensor();
  const float* pg = grad.const_data_ptr<float>();
  const uint8_t* pm = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  const float* pw = w.const_data_ptr<float>();
  const float* pf = factor.const_data_ptr<float>();
  float* pgw = grad_w.mutable_data_ptr<float>();
  float* pp = need_prod ? prod.mutable_data_ptr<float>() : nullptr;
  at::parallel_for(0, channels, std::max<int64_t>(1, kGrain / std::max<int64_t>(block, 1)), [&](int64_t begin,
                                                                                                  int64_t end) {
    for (const auto c : c10::irange(begin, end)) {  // four plain loops, each vectorized
      const int64_t off = c * block;
      const float f = pf[c];
      const float* g = pg + off;
      const uint8_t* m = pm + off;
      const float* wc = pw + off;
      float* gw = pgw + off;
      if (clipped && pp != nullptr) {
        float* p = pp + off;
        for (int64_t i = 0; i < block; ++i) {
          const float g1 = g[i] * static_cast<float>(m[i]);
          gw[i] = g1 * f;
          p[i] = g1 * wc[i];
        }
      } else if (clipped) {
        for (int64_t i = 0; i < block; ++i) gw[i] = (g[i] * static_cast<float>(m[i])) * f;
      } else if (pp != nullptr) {
        float* p = pp + off;
        for (int64_t i = 0; i < block; ++i) {
          gw[i] = g[i] * f;
          p[i] = g[i] * wc[i];
        }
      } else {
        for (int64_t i = 0; i < block; ++i) gw[i] = g[i] * f;
      }
    }
  });
  return {grad_w, need_prod ? factor_grad(prod, channels) : at::Tensor()};
}

// Batch moments of Jacob eq. 14 for a 4-d float32 tensor in NCHW or NHWC memory: per channel (dim 1) the mean and
// the biased variance over (N, H, W), as torch.var_mean(y, (0, 2, 3), unbiased=False). Two passes in float64
// (mean, then the squared deviations from it), each rounded once to float32: torch's Welford reduction also
// accumulates in float64, so both give the correctly rounded float32 except where the exact value lies within
// float64 error (~1e-12 relative) of a float32 rounding boundary (tests measure the agreement).
std::tuple<at::Tensor, at::Tensor> batch_moments(const at::Tensor& y) {
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kFloat && y.dim() == 4,
              "qat_cpu.batch_moments: a 4-d float32 CPU tensor");
  const bool nhwc = y.is_contiguous(at::MemoryFormat::ChannelsLast) && !y.is_contiguous();
  TORCH_CHECK(nhwc || y.is_contiguous(), "qat_cpu.batch_moments: NCHW or NHWC memory");
  const int64_t n = y.size(0), channels = y.size(1), hw = y.size(2) * y.size(3);
  const int64_t count = n * hw;
  const auto opts = y.options();
  at::Tensor var = at::empty({channels}, opts), mean = at::empty({channels}, opts);
  const float* py = y.const_data_ptr<float>();
  std::vector<double> mean_d(channels, 0.0), m2_d(channels, 0.0);
  if (count > 0) {
    const int threads = std::max(1, at::get_num_threads());
    // pass 1: sums; pass 2: squared deviations. Partial sums per thread-sized block, combined in block order.
    for (int pass = 0; pass < 2; ++pass) {
      if (nhwc) {
        const int64_t rows = count;  // rows of `channels` contiguous values
        const int64_t blocks = std::min<int64_t>(threads, rows);
        std::vector<double> partial(blocks * channels, 0.0);
        at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
          for (const auto b : c10::irange(begin, end)) {
            double* acc = partial.data() + b * channels;
            const int64_t r0 = rows * b / blocks, r1 = rows * (b + 1) / blocks;
            const double* mu = mean_d.data();
            if (pass == 0) {
              for (int64_t r = r0; r < r1; ++r) {
                const float* row = py + r * channels;
                for (int64_t c = 0; c < channels; ++c) acc[c] += static_cast<double>(row[c]);
              }
            } else {
              for (int64_t r = r0; r < r1; ++r) {
                const float* row = py + r * channels;
                for (int64_t c = 0; c < channels; ++c) {
                  const double d = static_cast<double>(row[c]) - mu[c];
                  acc[c] += d * d;
                }
              }
            }
          }
        });
        std::vector<double>& out = pass == 0 ? mean_d : m2_d;
        for (int64_t b = 0; b < blocks; ++b)
          for (int64_t c = 0; c < channels; ++c) out[c] += partial[b * channels + c];
      } else {
        at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
          for (const auto c : c10::irange(begin, end)) {
            double acc = 0.0;
            for (int64_t i = 0; i < n; ++i) {
              const float* plane = py + (i * channels + c) * hw;
              if (pass == 0) {
                for (int64_t j = 0; j < hw; ++j) acc += static_cast<double>(plane[j]);
              } else {
                for (int64_t j = 0; j < hw; ++j) {
                  const double d = static_cast<double>(plane[j]) - mean_d[c];
                  acc += d * d;
                }
              }
            }
            (pass == 0 ? mean_d : m2_d)[c] = acc;
          }
        });
      }
      if (pass == 0) {
        for (int64_t c = 0; c < channels; ++c) mean_d[c] /= static_cast<double>(count);
      }
    }
  }
  float* pv = var.mutable_data_ptr<float>();
  float* pm = mean.mutable_data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    pm[c] = count > 0 ? static_cast<float>(mean_d[c]) : std::numeric_limits<float>::quiet_NaN();
    pv[c] = count > 0 ? static_cast<float>(m2_d[c] / static_cast<double>(count))
                      : std::numeric_limits<float>::quiet_NaN();
  }
  return {var, mean};
}

// The backward of batch_moments, autograd's var_mean_backward element by element (torch/csrc/autograd/
// FunctionsManual.cpp, checked against torch 2.14.1): (float(2/n) * grad_var[c]) * (y - mean_y[c]) +
// grad_mean[c] / n, where mean_y is ATen's own mean of y (as autograd recomputes it), in one pass.
at::Tensor batch_moments_backward(const std::optional<at::Tensor>& grad_var, const std::optional<at::Tensor>& grad_mean,
                                  const at::Tensor& y) {
  const bool nhwc = y.is_contiguous(at::MemoryFormat::ChannelsLast) && !y.is_contiguous();
  const int64_t n = y.size(0), channels = y.size(1), hw = y.size(2) * y.size(3);
  const int64_t count = n * hw;
  const at::Tensor mean_y = y.mean({0, 2, 3}).contiguous();
  const float two_over_n = static_cast<float>(2.0 / static_cast<double>(count));
  const float n_f = static_cast<float>(count);
  // an absent gradient drops its term (autograd adds nothing, so a -0 product stays -0)
  const bool has_var = grad_var.has_value(), has_mean = grad_mean.has_value();
  TORCH_CHECK(has_var || has_mean, "qat_cpu.batch_moments_backward: no gradient");
  std::vector<float> coef(channels, 0.0f), shift(channels, 0.0f);
  const at::Tensor gv = has_var ? grad_var->contiguous() : at::Tensor();
  const at::Tensor gm = has_mean ? grad_mean->contiguous() : at::Tensor();
  for (int64_t c = 0; c < channels; ++c) {
    if (has_var) coef[c] = two_over_n * gv.const_data_ptr<float>()[c];
    if (has_mean) shift[c] = gm.const_data_ptr<float>()[c] / n_f;
  }
  const float* pmy = mean_y.const_data_ptr<float>();
  at::Tensor out = at::empty_like(y);
  const float* py = y.const_data_ptr<float>();
  float* po = out.mutable_data_ptr<float>();
  const float* k = coef.data();
  const float* sh = shift.data();
  // NHWC: a row holds every channel (parameters per value); NCHW: a plane holds one channel (parameters fixed).
  // The three cases (both gradients, the variance's, the mean's) in separate plain loops, which vectorize.
  if (nhwc) {
    at::parallel_for(0, count, std::max<int64_t>(1, kGrain / std::max<int64_t>(channels, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* src = py + r * channels;
        float* dst = po + r * channels;
        if (has_var && has_mean) {
          for (int64_t c = 0; c < channels; ++c) dst[c] = k[c] * (src[c] - pmy[c]) + sh[c];
        } else if (has_var) {
          for (int64_t c = 0; c < channels; ++c) dst[c] = k[c] * (src[c] - pmy[c]);
        } else {
          for (int64_t c = 0; c < channels; ++c) dst[c] = sh[c];
        }
      }
    });
  } else {
    at::parallel_for(0, n * channels, std::max<int64_t>(1, kGrain / std::max<int64_t>(hw, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % channels;
        const float* src = py + p * hw;
        float* dst = po + p * hw;
        const float kc = k[c], m = pmy[c], s = sh[c];
        if (has_var && has_mean) {
          for (int64_t j = 0; j < hw; ++j) dst[j] = kc * (src[j] - m) + s;
        } else if (has_var) {
          for (int64_t j = 0; j < hw; ++j) dst[j] = kc * (src[j] - m);
        } else {
          for (int64_t j = 0; j < hw; ++j) dst[j] = s;
        }
      }
    });
  }
  return out;
}

// Per-channel elementwise passes over a 4-d NCHW or NHWC tensor: calls f(offset, length, s, s_step) in runs, in
// NHWC a row of all channels (s advances with the element, s_step 1), in NCHW a plane of one channel (s fixed,
// s_step 0); simple loops the compiler vectorizes.
template <typename F>
void per_channel_runs(const at::Tensor& like, const float* s, const F& f) {
  const bool nhwc = like.is_contiguous(at::MemoryFormat::ChannelsLast) && !like.is_contiguous();
  const int64_t n = like.size(0), channels = like.size(1), hw = like.size(2) * like.size(3);
  const int64_t run = nhwc ? channels : hw, runs = nhwc ? n * hw : n * channels;
  at::parallel_for(0, runs, std::max<int64_t>(1, kGrain / std::max<int64_t>(run, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (nhwc) {
        f(r * run, run, s, 1);
      } else {
        f(r * run, run, s + r % channels, 0);
      }
    }
  });
}

bool nchw_or_nhwc(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4 &&
         (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast));
}

// Per-channel sums of a and a * b in float64 over (N, H, W), a and b in one layout (NCHW or NHWC): y and y * y for
// one-pass moments, g and g * y for the backward of whitepaper_batch_norm.
void channel_sums(const at::Tensor& g, const at::Tensor& y, std::vector<double>& sum_g, std::vector<double>& sum_gy) {
  const bool nhwc = y.is_contiguous(at::MemoryFormat::ChannelsLast) && !y.is_contiguous();
  const int64_t n = y.size(0), channels = y.size(1), hw = y.size(2) * y.size(3);
  const float *pg = g.const_data_ptr<float>(), *py = y.const_data_ptr<float>();
  if (nhwc) {
    const int64_t rows = n * hw;
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
    std::vector<double> partial(2 * blocks * channels, 0.0);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (const auto b : c10::irange(begin, end)) {
        double* sg = partial.data() + 2 * b * channels;
        double* sgy = sg + channels;
        for (int64_t r = rows * b / blocks; r < rows * (b + 1) / blocks; ++r) {
          const float* gr = pg + r * channels;
          const float* yr = py + r * channels;
          for (int64_t c = 0; c < channels; ++c) {
            const double gv = gr[c];
            sg[c] += gv;
            sgy[c] += gv * static_cast<double>(yr[c]);
          }
        }
      }
    });
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t c = 0; c < channels; ++c) {
        sum_g[c] += partial[2 * b * channels + c];
        sum_gy[c] += partial[(2 * b + 1) * channels + c];
      }
  } else {
    at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
      for (const auto c : c10::irange(begin, end)) {
        double sg[4] = {0, 0, 0, 0}, sgy[4] = {0, 0, 0, 0};  // four chains: the adds need not wait on each other
        for (int64_t i = 0; i < n; ++i) {
          const float* gp = pg + (i * channels + c) * hw;
          const float* yp = py + (i * channels + c) * hw;
          int64_t j = 0;
          for (; j + 4 <= hw; j += 4)
            for (int k = 0; k < 4; ++k) {
              const double gv = gp[j + k];
              sg[k] += gv;
              sgy[k] += gv * static_cast<double>(yp[j + k]);
            }
          for (; j < hw; ++j) {
            const double gv = gp[j];
            sg[0] += gv;
            sgy[0] += gv * static_cast<double>(yp[j]);
          }
        }
        sum_g[c] = (sg[0] + sg[1]) + (sg[2] + sg[3]);
        sum_gy[c] = (sgy[0] + sgy[1]) + (sgy[2] + sgy[3]);
      }
    });
  }
}

// The batch mean and biased variance per channel in one pass: float64 sums of y and y^2 (channel_sums), var =
// E[y^2] - mu^2 (in float64 the cancellation costs ~mu^2/var * 1e-16 relative, negligible for float32 results unless
// |mu| / sigma exceeds ~1e4). For the whitepaper closed form, which is the kernel's alone (Jacob's moments keep two
// passes to stay within one ulp of torch.var_mean).
std::tuple<at::Tensor, at::Tensor> one_pass_moments(const at::Tensor& y) {
  const int64_t channels = y.size(1);
  const int64_t count = y.numel() / std::max<int64_t>(channels, 1);
  std::vector<double> sum(channels, 0.0), sum_sq(channels, 0.0);
  if (count > 0) channel_sums(y, y, sum, sum_sq);
  const auto opts = y.options();
  at::Tensor var = at::empty({channels}, opts), mean = at::empty({channels}, opts);
  float *pv = var.mutable_data_ptr<float>(), *pm = mean.mutable_data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    const double mu = count > 0 ? sum[c] / static_cast<double>(count) : std::numeric_limits<double>::quiet_NaN();
    pm[c] = static_cast<float>(mu);
    pv[c] = static_cast<float>(std::max(sum_sq[c] / static_cast<double>(count) - mu * mu, 0.0));
  }
  return {var, mean};
}

// Whitepaper §3.2.2 / Fig. 13 while batch statistics train: batch norm with batch statistics of y / s + b (s the
// running-sigma fold factor, b the conv bias) in closed form, per channel in float64 from y's float32 moments:
//     var' = v / s^2,  d = sqrt(var' + eps) * s,  a = gamma / d,  out = float(a) * (y - mu) + beta
// and the statistics of y / s + b for the running averages (mean' = mu / s + b, var'); qat/quant/whitepaper_bn.py
// derives them. One pass over y for the moments (one_pass_moments), one for the output.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> whitepaper_batch_norm(
    const at::Tensor& y, const at::Tensor& s_in, const at::Tensor& gamma_in, const at::Tensor& beta_in,
    const std::optional<at::Tensor>& bias_in, double eps) {
  TORCH_CHECK(nchw_or_nhwc(y), "qat_cpu.whitepaper_batch_norm_train: a 4-d NCHW or NHWC float32 CPU tensor");
  const int64_t channels = y.size(1);
  const at::Tensor s = s_in.contiguous(), gamma = gamma_in.contiguous(), beta = beta_in.contiguous();
  for (const at::Tensor* t : {&s, &gamma, &beta})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == channels,
                "qat_cpu.whitepaper_batch_norm_train: float32 s, gamma, beta per channel");
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  auto [var_y, mean_y] = one_pass_moments(y);
  const auto opts = y.options();
  at::Tensor mean = at::empty({channels}, opts), var = at::empty({channels}, opts);
  std::vector<float> a(channels);
  const float *ps = s.const_data_ptr<float>(), *pg = gamma.const_data_ptr<float>();
  const float *pmu = mean_y.const_data_ptr<float>(), *pv = var_y.const_data_ptr<float>();
  const float* pb = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float *pm = mean.mutable_data_ptr<float>(), *pvar = var.mutable_data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    const double sc = ps[c], v = static_cast<double>(pv[c]) / (sc * sc);
    a[c] = static_cast<float>(static_cast<double>(pg[c]) / (std::sqrt(v + eps) * sc));
    pm[c] = static_cast<float>(static_cast<double>(pmu[c]) / sc + (pb != nullptr ? static_cast<double>(pb[c]) : 0.0));
    pvar[c] = static_cast<float>(v);
  }
  at::Tensor out = at::empty_like(y);
  const float* py = y.const_data_ptr<float>();
  const float* pbeta = beta.const_data_ptr<float>();
  float* po = out.mutable_data_ptr<float>();
  const float* pa = a.data();
  per_channel_runs(y, pa, [&](int64_t off, int64_t len, const float* ac, int64_t step) {
    const float* src = py + off;
    float* dst = po + off;
    if (step == 1) {  // NHWC: a row of every channel
      for (int64_t i = 0; i < len; ++i) dst[i] = ac[i] * (src[i] - pmu[i]) + pbeta[i];
    } else {  // NCHW: a plane of channel c = ac - pa
      const int64_t c = ac - pa;
      const float k = ac[0], m = pmu[c], b = pbeta[c];
      for (int64_t i = 0; i < len; ++i) dst[i] = k * (src[i] - m) + b;
    }
  });
  return {out, mean_y, var_y, mean, var};
}

// The backward of whitepaper_batch_norm (qat/quant/whitepaper_bn.py), from Sg = sum g and Sgy = sum g * y per
// channel in float64 (channel_sums), then in float64 with k = 1 / d:
//     G = k * (Sgy - mu * Sg)  (gamma's gradient; beta's is Sg),  grad_s = -(gamma / s) * G * eps / (var' + eps)
//     grad_y = (float(a) * g + float(c1) * (y - mu)) + float(c0),  c1 = -a * k * G / N,  c0 = -a * Sg / N
// One pass for the sums, one for grad_y; g is read in y's memory layout.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> whitepaper_batch_norm_backward(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& mean_y, const at::Tensor& var_y,
    const at::Tensor& s_in, const at::Tensor& gamma_in, double eps, bool need_y) {
  const bool nhwc = y.is_contiguous(at::MemoryFormat::ChannelsLast) && !y.is_contiguous();
  const at::Tensor g = grad.contiguous(nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  TORCH_CHECK(nchw_or_nhwc(g) && g.sizes() == y.sizes(), "qat_cpu.whitepaper_batch_norm_train (backward): grad like y");
  const int64_t channels = y.size(1);
  const double count = static_cast<double>(y.numel() / std::max<int64_t>(channels, 1));
  std::vector<double> sum_g(channels, 0.0), sum_gy(channels, 0.0);
  if (y.numel() > 0) channel_sums(g, y, sum_g, sum_gy);
  const at::Tensor s = s_in.contiguous(), gamma = gamma_in.contiguous();
  const auto opts = s.options();
  at::Tensor grad_s = at::empty({channels}, opts), grad_gamma = at::empty({channels}, opts);
  at::Tensor grad_beta = at::empty({channels}, opts);
  const float *ps = s.const_data_ptr<float>(), *pg = gamma.const_data_ptr<float>();
  const float *pmu = mean_y.const_data_ptr<float>(), *pv = var_y.const_data_ptr<float>();
  float *gs = grad_s.mutable_data_ptr<float>(), *gg = grad_gamma.mutable_data_ptr<float>();
  float* gb = grad_beta.mutable_data_ptr<float>();
  std::vector<float> a(channels), c1(channels), c0(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const double sc = ps[c], gm = pg[c], v = static_cast<double>(pv[c]) / (sc * sc);
    const double d = std::sqrt(v + eps) * sc, k = 1.0 / d, ac = gm / d;
    const double sg = sum_g[c], big_g = k * (sum_gy[c] - static_cast<double>(pmu[c]) * sg);
    a[c] = static_cast<float>(ac);
    c1[c] = static_cast<float>(-ac * k * big_g / count);
    c0[c] = static_cast<float>(-ac * sg / count);
    gg[c] = static_cast<float>(big_g);
    gb[c] = static_cast<float>(sg);
    gs[c] = static_cast<float>(-(gm / sc) * big_g * eps / (v + eps));
  }
  at::Tensor grad_y;
  if (need_y) {
    grad_y = at::empty_like(y);
    const float *pgr = g.const_data_ptr<float>(), *py = y.const_data_ptr<float>();
    float* po = grad_y.mutable_data_ptr<float>();
    const float *pa = a.data(), *p1 = c1.data(), *p0 = c0.data();
    per_channel_runs(y, pa, [&](int64_t off, int64_t len, const float* ac, int64_t step) {
      const float* gr = pgr + off;
      const float* src = py + off;
      float* dst = po + off;
      if (step == 1) {
        for (int64_t i = 0; i < len; ++i) dst[i] = (ac[i] * gr[i] + p1[i] * (src[i] - pmu[i])) + p0[i];
      } else {
        const int64_t c = ac - pa;
        const float ka = ac[0], k1 = p1[c], k0 = p0[c], m = pmu[c];
        for (int64_t i = 0; i < len; ++i) dst[i] = (ka * gr[i] + k1 * (src[i] - m)) + k0;
      }
    });
  }
  return {grad_y, grad_s, grad_gamma, grad_beta};
}

// The int32 bias of the integer model (Jacob §2.4), simulated: per channel, in float64 as the conversion does,
// S_b = S_in * S_w[c], r = clamp(nearbyint(b / S_b), -2^31, 2^31 - 1) * S_b, then b + (float32(r) - b) (the
// straight-through form whose gradient is the identity), as the ATen ops of IntegerBias.quantized_bias.
at::Tensor integer_bias(const at::Tensor& bias_in, const at::Tensor& input_scale, const at::Tensor& weight_scale) {
  TORCH_CHECK(bias_in.device().is_cpu() && bias_in.scalar_type() == at::kFloat && bias_in.dim() == 1,
              "qat_cpu.integer_bias: a float32 CPU bias vector");
  TORCH_CHECK(input_scale.numel() == 1 && input_scale.scalar_type() == at::kFloat &&
                  weight_scale.scalar_type() == at::kFloat &&
                  (weight_scale.numel() == 1 || weight_scale.numel() == bias_in.numel()),
              "qat_cpu.integer_bias: float32 scales (input: one; weights: one or one per channel)");
  const at::Tensor bias = bias_in.contiguous(), ws = weight_scale.contiguous();
  at::Tensor out = at::empty_like(bias);
  const double s_in = static_cast<double>(input_scale.contiguous().const_data_ptr<float>()[0]);
  const float* pb = bias.const_data_ptr<float>();
  const float* pw = ws.const_data_ptr<float>();
  float* po = out.mutable_data_ptr<float>();
  const int64_t step = ws.numel() == 1 ? 0 : 1;
  for (int64_t c = 0; c < bias.numel(); ++c) {
    const double scale = s_in * static_cast<double>(pw[c * step]);
    double q = std::nearbyint(static_cast<double>(pb[c]) / scale);
    if (!std::isnan(q)) {
      q = std::min(std::max(q, -2147483648.0), 2147483647.0);
    }
    const float rounded = static_cast<float>(q * scale);
    po[c] = pb[c] + (rounded - pb[c]);
  }
  return out;
}

// A per-tensor EMA activation quantizer's training step in one call (Jacob §3.1, eq. 12): the batch range
// (min, max of x, NaN if any element is NaN), the running range m <- m·decay + batch·(1 - decay) in float32 as
// torch's foreach ops compute it (the first batch sets it), (S, Z) from the running range widened to contain 0
// (qat.quant.fused.qparams: symmetric S = max(-m, M, 0) / ((qmax - qmin) / 2), asymmetric S = (M - m) /
// (qmax - qmin) and Z = clamp(round(qmin - m / S))), S at least eps, then x fake-quantized with the STE mask.
// Returns (out, mask, min, max, scale, zero_point), the last four 0-d like the buffers they replace.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ema_fake_quantize(
    const at::Tensor& x_in, const at::Tensor& running_min, const at::Tensor& running_max, bool first, double decay,
    double one_minus_decay, int64_t qmin, int64_t qmax, bool symmetric, double eps, int64_t activation) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat, "qat_cpu.ema_fake_quantize: float32 CPU x");
  const at::Tensor x = dense(x_in) ? x_in : x_in.contiguous();
  const int64_t numel = x.numel();
  TORCH_CHECK(numel > 0, "qat_cpu.ema_fake_quantize: an empty tensor has no range");
  const float* px = x.const_data_ptr<float>();
  // batch range: per-chunk partial results combined in chunk order (min and max are exact in any order)
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), numel / kGrain + 1));
  std::vector<float> mins(chunks, std::numeric_limits<float>::infinity());
  std::vector<float> maxs(chunks, -std::numeric_limits<float>::infinity());
  std::vector<uint8_t> nans(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t i0 = numel * k / chunks, i1 = numel * (k + 1) / chunks;
      float mn = std::numeric_limits<float>::infinity(), mx = -std::numeric_limits<float>::infinity();
      bool nan = false;
      range_of(px + i0, 1.0f, i1 - i0, mn, mx, nan);
      mins[k] = mn;
      maxs[k] = mx;
      nans[k] = nan;
    }
  });
  float low = std::numeric_limits<float>::infinity(), high = -std::numeric_limits<float>::infinity();
  bool nan = false;
  for (int64_t k = 0; k < chunks; ++k) {
    low = std::min(low, mins[k]);
    high = std::max(high, maxs[k]);
    nan |= nans[k] != 0;
  }
  if (nan) {
    low = high = std::numeric_limits<float>::quiet_NaN();
  }
  if (!first) {
    TORCH_CHECK(running_min.numel() == 1 && running_max.numel() == 1, "qat_cpu.ema_fake_quantize: 0-d ranges");
    const float d = static_cast<float>(decay), c = static_cast<float>(one_minus_decay);
    const float old_low = running_min.contiguous().const_data_ptr<float>()[0];
    const float old_high = running_max.contiguous().const_data_ptr<float>()[0];
    low = old_low * d + low * c;
    high = old_high * d + high * c;
  }
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax), eps_f = static_cast<float>(eps);
  const auto clamp_nan = [](float v, float a, float b) { return std::isnan(v) ? v : std::min(std::max(v, a), b); };
  float s, z;
  if (symmetric) {
    const float absmax = std::isnan(low) || std::isnan(high) ? std::numeric_limits<float>::quiet_NaN()
                                                             : std::max(std::max(-low, high), 0.0f);
    const float raw = absmax / static_cast<float>(static_cast<double>(qmax - qmin) / 2.0);
    s = std::isnan(raw) ? raw : std::max(raw, eps_f);
    z = 0.0f;
  } else {
    const float wlo = std::isnan(low) ? low : std::min(low, 0.0f);
    const float whi = std::isnan(high) ? high : std::max(high, 0.0f);
    const float raw = (whi - wlo) / static_cast<float>(qmax - qmin);
    s = std::isnan(raw) ? raw : std::max(raw, eps_f);
    z = clamp_nan(std::nearbyint(lo + (-wlo) / s), lo, hi);
  }
  const auto opts = x.options();
  at::Tensor new_min = at::empty({}, opts), new_max = at::empty({}, opts), scale = at::empty({}, opts);
  at::Tensor zero_point = at::empty({}, opts.dtype(at::kInt));
  new_min.mutable_data_ptr<float>()[0] = low;
  new_max.mutable_data_ptr<float>()[0] = high;
  scale.mutable_data_ptr<float>()[0] = s;
  zero_point.mutable_data_ptr<int32_t>()[0] = static_cast<int32_t>(z);
  const float zf = static_cast<float>(static_cast<int32_t>(z)), inv = 1.0f / s;
  at::Tensor out = at::empty_like(x);
  float* po = out.mutable_data_ptr<float>();
  if (activation == 0) {
    at::Tensor mask = at::empty_like(x, opts.dtype(at::kBool));
    bool* pm = mask.mutable_data_ptr<bool>();
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      quantize_run(px + begin, po + begin, pm + begin, end - begin, inv, zf, s, lo, hi);
    });
    return {out, mask, new_min, new_max, scale, zero_point};
  }
  // x = relu(y) (activation 1) or relu6(y) (2), handed over by the layer: the codes of coded_mask_backward, which
  // applies the activation's gradient mask (y <= 0, or y >= 6: exactly x == 0, or x == 6) and then this one
  at::Tensor codes = at::empty_like(x, opts.dtype(at::kByte));
  uint8_t* pc = codes.mutable_data_ptr<uint8_t>();
  const bool relu6 = activation == 2;
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    // the quantizer's mask first (its loop vectorizes), then the codes, branch-free
    quantize_run(px + begin, po + begin, reinterpret_cast<bool*>(pc + begin), end - begin, inv, zf, s, lo, hi);
    activation_codes(px + begin, pc + begin, end - begin, relu6);
  });
  return {out, codes, new_min, new_max, scale, zero_point};
}

// The gradient through an activation quantizer and the ReLU/ReLU6 before it, from ema_fake_quantize's codes:
// 0: the activation's gradient is 0 there (+0, as threshold/hardtanh backward give); 1: grad; 2: clipped by the
// quantizer, grad * 0 (a signed zero, or NaN for a non-finite grad, as grad * mask gives).
// Where grad's layout differs from the codes' (x's), the result takes the layout autograd's ops would give it
// (it decides the summation order of the convolution backward that follows, hence its bits): grad's after
// hardtanh_backward(grad, y) (ReLU6: `grad_layout`), x's after threshold_backward(grad, x) (ReLU: TensorIterator
// follows its first input, which is x there).
at::Tensor coded_mask_backward(const at::Tensor& grad_in, const at::Tensor& codes_in, bool grad_layout) {
  at::Tensor grad = dense(grad_in) ? grad_in : grad_in.contiguous();
  at::Tensor codes = codes_in;
  if (codes.strides() != grad.strides()) {
    if (grad_layout) {
      codes = at::empty_like(grad, grad.options().dtype(at::kByte));
      codes.copy_(codes_in);
    } else {
      grad = at::empty_like(codes_in, grad.options());
      grad.copy_(grad_in);
    }
  }
  at::Tensor out = at::empty_like(grad);
  const float* pg = grad.const_data_ptr<float>();
  const uint8_t* pc = codes.const_data_ptr<uint8_t>();
  float* po = out.mutable_data_ptr<float>();
  at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
    coded_run(pg + begin, pc + begin, po + begin, end - begin);
  });
  return out;
}

// The running-statistics fold of a conv + BN (Jacob eq. 14 with the running moments): per channel
// inv = 1 / sqrt(var + eps) (torch.rsqrt's arithmetic), factor = gamma * inv, folded bias
// beta + ((b - mean) * gamma) * inv, with gamma 1, beta 0 and b 0 where absent, as QConvBnAct.fold_factor_and_bias
// computes them with ATen ops.
std::tuple<at::Tensor, at::Tensor> running_fold(const std::optional<at::Tensor>& gamma_in,
                                                const std::optional<at::Tensor>& beta_in,
                                                const std::optional<at::Tensor>& bias_in, const at::Tensor& mean_in,
                                                const at::Tensor& var_in, double eps) {
  const at::Tensor mean = mean_in.contiguous(), var = var_in.contiguous();
  const int64_t channels = var.numel();
  const auto vec = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->contiguous() : at::Tensor();
  };
  const at::Tensor gamma = vec(gamma_in), beta = vec(beta_in), bias = vec(bias_in);
  at::Tensor factor = at::empty({channels}, var.options()), folded = at::empty({channels}, var.options());
  const float e = static_cast<float>(eps);
  const float *pm = mean.const_data_ptr<float>(), *pv = var.const_data_ptr<float>();
  const float* pg = gamma.defined() ? gamma.const_data_ptr<float>() : nullptr;
  const float* pbeta = beta.defined() ? beta.const_data_ptr<float>() : nullptr;
  const float* pb = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float *pf = factor.mutable_data_ptr<float>(), *pfold = folded.mutable_data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    const float inv = 1.0f / std::sqrt(pv[c] + e);
    const float g = pg != nullptr ? pg[c] : 1.0f;
    pf[c] = g * inv;
    pfold[c] = (pbeta != nullptr ? pbeta[c] : 0.0f) + (((pb != nullptr ? pb[c] : 0.0f) - pm[c]) * g) * inv;
  }
  return {factor, folded};
}

// Its backward, autograd's for those ops: d gamma = g_factor * inv + (g_bias * inv) * (b - mean) (a sum of two:
// the order of accumulation does not change it), d beta = g_bias, d b = (g_bias * inv) * gamma.
std::tuple<at::Tensor, at::Tensor, at::Tensor> running_fold_backward(
    const std::optional<at::Tensor>& grad_factor_in, const std::optional<at::Tensor>& grad_bias_in,
    const std::optional<at::Tensor>& gamma_in, const std::optional<at::Tensor>& bias_in, const at::Tensor& mean_in,
    const at::Tensor& var_in, double eps) {
  const at::Tensor mean = mean_in.contiguous(), var = var_in.contiguous();
  const int64_t channels = var.numel();
  const auto vec = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->contiguous() : at::Tensor();
  };
  const at::Tensor gf = vec(grad_factor_in), gb = vec(grad_bias_in), gamma = vec(gamma_in), bias = vec(bias_in);
  at::Tensor d_gamma = at::empty({channels}, var.options()), d_beta = at::empty({channels}, var.options());
  at::Tensor d_bias = at::empty({channels}, var.options());
  const float e = static_cast<float>(eps);
  const float *pm = mean.const_data_ptr<float>(), *pv = var.const_data_ptr<float>();
  const float* pgf = gf.defined() ? gf.const_data_ptr<float>() : nullptr;
  const float* pgb = gb.defined() ? gb.const_data_ptr<float>() : nullptr;
  const float* pg = gamma.defined() ? gamma.const_data_ptr<float>() : nullptr;
  const float* pb = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float *dg = d_gamma.mutable_data_ptr<float>(), *dbeta = d_beta.mutable_data_ptr<float>();
  float* db = d_bias.mutable_data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    const float inv = 1.0f / std::sqrt(pv[c] + e);
    const float g = pg != nullptr ? pg[c] : 1.0f;
    float grad_gamma = 0.0f;
    bool any = false;
    if (pgf != nullptr) {
      grad_gamma = pgf[c] * inv;
      any = true;
    }
    if (pgb != nullptr) {
      const float t = pgb[c] * inv;
      const float from_bias = t * ((pb != nullptr ? pb[c] : 0.0f) - pm[c]);
      grad_gamma = any ? grad_gamma + from_bias : from_bias;
      dbeta[c] = pgb[c];
      db[c] = t * g;
    }
    dg[c] = grad_gamma;
  }
  return {d_gamma, d_beta, d_bias};
}

// Jacob eq. 14's fold with the batch moments: per channel inv = 1 / sqrt(var + eps), factor = gamma * inv and the
// folded bias beta + ((b - mean) * gamma) * inv (b 0 without a conv bias), as QConvBnAct._forward_jacob computes
// them with ATen ops.
std::tuple<at::Tensor, at::Tensor> batch_fold(const at::Tensor& var_in, const at::Tensor& mean_in,
                                              const at::Tensor& gamma_in, const at::Tensor& beta_in,
                                              const std::optional<at::Tensor>& bias_in, double eps) {
  const at::Tensor var = var_in.contiguous(), mean = mean_in.contiguous(), gamma = gamma_in.contiguous();
  const at::Tensor beta = beta_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const int64_t channels = var.numel();
  at::Tensor factor = at::empty({channels}, var.options()), folded = at::empty({channels}, var.options());
  const float e = static_cast<float>(eps);
  const float *pv = var.const_data_ptr<float>(), *pm = mean.const_data_ptr<float>();
  const float *pg = gamma.const_data_ptr<float>(), *pbeta = beta.const_data_ptr<float>();
  const float* pb = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float *pf = factor.mutable_data_ptr<float>(), *pfold = folded.mutable_data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    const float inv = 1.0f / std::sqrt(pv[c] + e);
    pf[c] = pg[c] * inv;
    pfold[c] = pbeta[c] + (((pb != nullptr ? pb[c] : 0.0f) - pm[c]) * pg[c]) * inv;
  }
  return {factor, folded};
}

// Its backward, autograd's for those ops (derivatives.yaml as of torch 2.14.1): with t1 = b - mean, t2 = t1 * gamma,
// d_t2 = g_bias * inv, d_t1 = d_t2 * gamma; d inv = g_factor * gamma + g_bias * t2; d var = (-0.5 * d inv) * inv^3
// (rsqrt's backward, inv^3 as (inv * inv) * inv); d mean = -d_t1; d gamma = g_factor * inv + d_t2 * t1;
// d beta = g_bias; d b = d_t1. Sums of two terms: the order autograd adds them in does not matter.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_fold_backward(
    const std::optional<at::Tensor>& grad_factor_in, const std::optional<at::Tensor>& grad_bias_in,
    const at::Tensor& var_in, const at::Tensor& mean_in, const at::Tensor& gamma_in,
    const std::optional<at::Tensor>& bias_in, double eps) {
  const at::Tensor var = var_in.contiguous(), mean = mean_in.contiguous(), gamma = gamma_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const at::Tensor gf = grad_factor_in.has_value() ? grad_factor_in->contiguous() : at::Tensor();
  const at::Tensor gb = grad_bias_in.has_value() ? grad_bias_in->contiguous() : at::Tensor();
  const int64_t channels = var.numel();
  const auto opts = var.options();
  at::Tensor d_var = at::empty({channels}, opts), d_mean = at::empty({channels}, opts);
  at::Tensor d_gamma = at::empty({channels}, opts), d_beta = at::empty({channels}, opts);
  at::Tensor d_bias = at::empty({channels}, opts);
  const float e = static_cast<float>(eps);
  const float *pv = var.const_data_ptr<float>(), *pm = mean.const_data_ptr<float>();
  const float* pg = gamma.const_data_ptr<float>();
  const float* pb = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  const float* pgf = gf.defined() ? gf.const_data_ptr<float>() : nullptr;
  const float* pgb = gb.defined() ? gb.const_data_ptr<float>() : nullptr;
  float *dv = d_var.mutable_data_ptr<float>(), *dm = d_mean.mutable_data_ptr<float>();
  float *dg = d_gamma.mutable_data_ptr<float>(), *dbeta = d_beta.mutable_data_ptr<float>();
  float* db = d_bias.mutable_data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    const float inv = 1.0f / std::sqrt(pv[c] + e);
    const float g = pg[c];
    float d_inv = 0.0f, grad_gamma = 0.0f;
    bool inv_used = false, gamma_used = false;
    if (pgf != nullptr) {
      d_inv = pgf[c] * g;
      grad_gamma = pgf[c] * inv;
      inv_used = gamma_used = true;
    }
    float d_t1 = 0.0f;
    if (pgb != nullptr) {
      const float t1 = (pb != nullptr ? pb[c] : 0.0f) - pm[c];
      const float t2 = t1 * g;
      const float d_t2 = pgb[c] * inv;
      const float d_inv_b = pgb[c] * t2;
      d_t1 = d_t2 * g;
      const float d_gamma_b = d_t2 * t1;
      d_inv = inv_used ? d_inv + d_inv_b : d_inv_b;
      grad_gamma = gamma_used ? grad_gamma + d_gamma_b : d_gamma_b;
      inv_used = gamma_used = true;
      dbeta[c] = pgb[c];
    }
    dm[c] = -d_t1;
    db[c] = d_t1;
    dg[c] = grad_gamma;
    dv[c] = (-0.5f * d_inv) * ((inv * inv) * inv);
  }
  return {d_var, d_mean, d_gamma, d_beta, d_bias};
}

// nn.BatchNorm2d's running-statistics update as QConvBnAct._batch_moments writes it, in place:
// m <- m * (1 - momentum) + momentum * mean and v <- v * (1 - momentum) + ((momentum * var) * n) / (n - 1), each
// Python scalar rounded to float32 as ATen does.
void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean_in,
                          const at::Tensor& var_in, double momentum, double n) {
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(),
              "qat_cpu.update_running_stats: contiguous running statistics");
  const at::Tensor mean = mean_in.contiguous(), var = var_in.contiguous();
  const float keep = static_cast<float>(1.0 - momentum), mom = static_cast<float>(momentum);
  const float nf = static_cast<float>(n), nm1 = static_cast<float>(std::max(n - 1.0, 1.0));
  float *rm = running_mean.mutable_data_ptr<float>(), *rv = running_var.mutable_data_ptr<float>();
  const float *pm = mean.const_data_ptr<float>(), *pv = var.const_data_ptr<float>();
  for (int64_t c = 0; c < mean.numel(); ++c) {
    rm[c] = rm[c] * keep + mom * pm[c];
    rv[c] = rv[c] * keep + ((mom * pv[c]) * nf) / nm1;
  }
}

// The whitepaper closed form for a training step: the output, and nn.BatchNorm2d's update of the running statistics
// (momentum, the variance made unbiased) from those of y / s + b. Returns (out, mean_y, var_y) for the backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> whitepaper_batch_norm_step(
    const at::Tensor& y, const at::Tensor& s, const at::Tensor& gamma, const at::Tensor& beta,
    const std::optional<at::Tensor>& bias, at::Tensor& running_mean, at::Tensor& running_var, double momentum,
    double eps) {
  auto [out, mean_y, var_y, mean, var] = whitepaper_batch_norm(y, s, gamma, beta, bias, eps);
  update_running_stats(running_mean, running_var, mean, var, momentum,
                       static_cast<double>(y.numel() / std::max<int64_t>(y.size(1), 1)));
  return {out, mean_y, var_y};
}

// Autograd in C++ for the two ops every folded layer calls each step (no Python autograd.Function round trip, about
// 25 us a call): the weight quantizer with the BN fold (fold_fake_quantize_weight and its backward) and the
// whitepaper closed form (whitepaper_batch_norm_step and whitepaper_batch_norm_backward).
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class FoldFakeQuantizeWeightTrain : public torch::autograd::Function<FoldFakeQuantizeWeightTrain> {
 public:
  // An absent optional tensor is no autograd input: needs_input_grad counts the present ones only.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& w, const std::optional<at::Tensor>& factor,
                               int64_t qmin, int64_t qmax, bool symmetric, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mask, low, high, scale, zero_point, clipped] = fold_fake_quantize_weight(w, factor, qmin, qmax,
                                                                                        symmetric, eps);
    ctx->saved_data["clipped"] = clipped > 0;
    ctx->save_for_backward({clipped > 0 ? mask : at::Tensor(), w, factor.value_or(at::Tensor())});
    ctx->mark_non_differentiable({low, high, scale, zero_point});
    ctx->set_materialize_grads(false);
    return {out, low, high, scale, zero_point};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &mask = saved[0], &w = saved[1], &factor = saved[2];
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const bool clipped = ctx->saved_data["clipped"].toBool();
    const bool need_factor = factor.defined() && ctx->needs_input_grad(1);
    const std::optional<at::Tensor> f = factor.defined() ? std::optional<at::Tensor>(factor) : std::nullopt;
    auto [grad_w, grad_factor] = fold_fake_quantize_weight_backward(
        grad, mask.defined() ? mask : at::empty({0}, grad.options().dtype(at::kBool)), clipped, w, f, need_factor);
    return {grad_w, need_factor ? grad_factor.reshape(factor.sizes()) : at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fold_fake_quantize_weight_train(
    const at::Tensor& w, const std::optional<at::Tensor>& factor, int64_t qmin, int64_t qmax, bool symmetric,
    double eps) {
  auto r = FoldFakeQuantizeWeightTrain::apply(w, factor, qmin, qmax, symmetric, eps);
  return {r[0], r[1], r[2], r[3], r[4]};
}

class WhitepaperBatchNormTrain : public torch::autograd::Function<WhitepaperBatchNormTrain> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& s, const at::Tensor& gamma,
                               const at::Tensor& beta, const std::optional<at::Tensor>& bias, at::Tensor running_mean,
                               at::Tensor running_var, double momentum, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean_y, var_y] = whitepaper_batch_norm_step(y, s, gamma, beta, bias, running_mean, running_var,
                                                           momentum, eps);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    ctx->save_for_backward({y, mean_y, var_y, s, gamma});
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &s = saved[3];
    auto [grad_y, grad_s, grad_gamma, grad_beta] = whitepaper_batch_norm_backward(
        grads[0], saved[0], saved[1], saved[2], s, saved[4], ctx->saved_data["eps"].toDouble(),
        ctx->needs_input_grad(0));
    // batch norm removes a per-channel shift exactly: the conv bias's gradient is 0
    const bool bias = ctx->saved_data["bias"].toBool();
    const auto need = [&](size_t i) { return ctx->needs_input_grad(i); };
    return {need(0) ? grad_y : at::Tensor(), need(1) ? grad_s.reshape(s.sizes()) : at::Tensor(),
            need(2) ? grad_gamma : at::Tensor(), need(3) ? grad_beta : at::Tensor(),
            bias && need(4) ? at::zeros_like(s) : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Batch norm's output, the running statistics updated in place (whitepaper_batch_norm_step).
at::Tensor whitepaper_batch_norm_train(const at::Tensor& y, const at::Tensor& s, const at::Tensor& gamma,
                                       const at::Tensor& beta, const std::optional<at::Tensor>& bias,
                                       at::Tensor& running_mean, at::Tensor& running_var, double momentum, double eps) {
  return WhitepaperBatchNormTrain::apply(y, s, gamma, beta, bias, running_mean, running_var, momentum, eps)[0];
}

// The same ops where autograd is not dispatched (inference mode): the forward alone.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fold_fake_quantize_weight_infer(
    const at::Tensor& w, const std::optional<at::Tensor>& factor, int64_t qmin, int64_t qmax, bool symmetric,
    double eps) {
  auto [out, mask, low, high, scale, zero_point, clipped] = fold_fake_quantize_weight(w, factor, qmin, qmax,
                                                                                      symmetric, eps);
  return {out, low, high, scale, zero_point};
}

at::Tensor whitepaper_batch_norm_infer(const at::Tensor& y, const at::Tensor& s, const at::Tensor& gamma,
                                       const at::Tensor& beta, const std::optional<at::Tensor>& bias,
                                       at::Tensor& running_mean, at::Tensor& running_var, double momentum, double eps) {
  return std::get<0>(whitepaper_batch_norm_step(y, s, gamma, beta, bias, running_mean, running_var, momentum, eps));
}

}  // namespace

TORCH_LIBRARY(qat_cpu, m) {
  m.def("fake_quantize(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int axis, bool need_mask)"
        " -> (Tensor, Tensor)");
  m.def("fake_quantize_backward(Tensor grad, Tensor mask) -> Tensor");
  m.def("batch_moments(Tensor y) -> (Tensor, Tensor)");
  m.def("batch_fold(Tensor var, Tensor mean, Tensor gamma, Tensor beta, Tensor? bias, float eps) -> (Tensor, Tensor)");
  m.def("batch_fold_backward(Tensor? grad_factor, Tensor? grad_bias, Tensor var, Tensor mean, Tensor gamma,"
        " Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var,"
        " float momentum, float n) -> ()");
  m.def("running_fold(Tensor? gamma, Tensor? beta, Tensor? bias, Tensor mean, Tensor var, float eps)"
        " -> (Tensor, Tensor)");
  m.def("running_fold_backward(Tensor? grad_factor, Tensor? grad_bias, Tensor? gamma, Tensor? bias, Tensor mean,"
        " Tensor var, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("coded_mask_backward(Tensor grad, Tensor codes, bool grad_layout) -> Tensor");
  m.def("ema_fake_quantize(Tensor x, Tensor running_min, Tensor running_max, bool first, float decay,"
        " float one_minus_decay, int qmin, int qmax, bool symmetric, float eps, int activation)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("integer_bias(Tensor bias, Tensor input_scale, Tensor weight_scale) -> Tensor");
  m.def("fold_fake_quantize_weight_train(Tensor w, Tensor? factor, int qmin, int qmax, bool symmetric, float eps)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("whitepaper_batch_norm_train(Tensor y, Tensor s, Tensor gamma, Tensor beta, Tensor? bias,"
        " Tensor(a!) running_mean, Tensor(b!) running_var, float momentum, float eps) -> Tensor");
  m.def("batch_moments_backward(Tensor? grad_var, Tensor? grad_mean, Tensor y) -> Tensor");
}

TORCH_LIBRARY_IMPL(qat_cpu, CPU, m) {
  m.impl("fake_quantize", &fake_quantize);
  m.impl("fake_quantize_backward", &fake_quantize_backward);
  m.impl("batch_moments", &batch_moments);
  m.impl("batch_fold", &batch_fold);
  m.impl("batch_fold_backward", &batch_fold_backward);
  m.impl("update_running_stats", &update_running_stats);
  m.impl("running_fold", &running_fold);
  m.impl("running_fold_backward", &running_fold_backward);
  m.impl("coded_mask_backward", &coded_mask_backward);
  m.impl("ema_fake_quantize", &ema_fake_quantize);
  m.impl("integer_bias", &integer_bias);
  m.impl("fold_fake_quantize_weight_train", &fold_fake_quantize_weight_infer);
  m.impl("whitepaper_batch_norm_train", &whitepaper_batch_norm_infer);
  m.impl("batch_moments_backward", &batch_moments_backward);
}

TORCH_LIBRARY_IMPL(qat_cpu, Autograd, m) {
  m.impl("fold_fake_quantize_weight_train", &fold_fake_quantize_weight_train);
  m.impl("whitepaper_batch_norm_train", &whitepaper_batch_norm_train);
}
