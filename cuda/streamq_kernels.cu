// Fused CUDA kernels for streamq's search hot loops and for INT4 dequantisation.
//
// Each kernel mirrors one PyTorch function of streamq (the reference) step by step: every
// intermediate that PyTorch stores in the compute dtype T is rounded to T here too (the scaled
// weights w * s, the pseudo-quantized result), the quantizer's own arithmetic and the whole
// clip search are float32 as in quant.py and search.py, divisions are IEEE divisions, and a division by a Python scalar is a multiply by
// its float reciprocal, as ATen's CUDA kernels do. Build with torch.utils.cpp_extension
// (streamq/kernels.py); never compile with --use_fast_math, which would change the rounding.
//
//   scaled_pseudo_quantize  Q(w * s) / s per group (search.search_scale's candidate weights)
//   clip_search             best clipping max per (output channel, group) from the Gram matrix
//                           of the sampled inputs (search.search_clip, without the 4-D product)
//   dequantize_gemm         AWQ GEMM qweight/qzeros/scales -> fp16 weight [out, in] (pack.dequantize_gemm)

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>

namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxLanesPerGroup = 8;  // group sizes up to 256 (8 values per lane)
// AWQ_ORDER: nibble i of a packed int32 holds output column 8c + kAwqOrder[i]
__constant__ int kAwqOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};

template <typename T>
__device__ __forceinline__ float f(T v) { return static_cast<float>(v); }

template <typename T>
__device__ __forceinline__ T rnd(float v) { return static_cast<T>(v); }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ __forceinline__ float warp_min(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

struct GroupQ {
  float scale;  // an fp16 value (scales are stored in fp16), held in float32
  float zero;
};

// quant.quant_params for one group whose max and min (values of T) are known, in float32.
__device__ __forceinline__ GroupQ group_params(float mx, float mn, int w_bit, bool zero_point) {
  GroupQ q;
  if (zero_point) {
    const float max_int = static_cast<float>((1 << w_bit) - 1);
    const float range = fmaxf(mx - mn, 1e-5f);  // clamp(min=1e-5) on a float32 tensor
    q.scale = __half2float(__float2half_rn(range * (1.0f / max_int)));
    q.zero = fminf(fmaxf(-nearbyintf(mn / q.scale), 0.0f), max_int);
  } else {
    const float half_range = static_cast<float>((1 << (w_bit - 1)) - 1);
    const float absmax = fmaxf(fmaxf(fabsf(mx), fabsf(mn)), 1e-5f);
    q.scale = __half2float(__float2half_rn(absmax * (1.0f / half_range)));
    q.zero = static_cast<float>(1 << (w_bit - 1));
  }
  return q;
}

// quant.pseudo_quantize for one value, float32: (clamp(round(v / s) + z, 0, max) - z) * s
__device__ __forceinline__ float fake_quant(float v, GroupQ q, float max_int) {
  const float c = fminf(fmaxf(nearbyintf(v / q.scale) + q.zero, 0.0f), max_int);
  return (c - q.zero) * q.scale;
}

// One warp per (row, group). With s: the group of w * s is quantized and divided by s again.
template <typename T>
__global__ void scaled_pq_kernel(const T* __restrict__ w, const T* __restrict__ s, T* __restrict__ out,
                                 int64_t rows, int64_t cols, int group_size, int w_bit, bool zero_point) {
  const int64_t n_group = cols / group_size;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (gid >= rows * n_group) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarp;
  const int64_t base = (gid / n_group) * cols + (gid % n_group) * group_size;
  const T* sg = s == nullptr ? nullptr : s + (gid % n_group) * group_size;
  float mx = -INFINITY, mn = INFINITY;
  for (int k = lane; k < group_size; k += kWarp) {
    const float v = sg == nullptr ? f(w[base + k]) : f(rnd<T>(f(w[base + k]) * f(sg[k])));
    mx = fmaxf(mx, v);
    mn = fminf(mn, v);
  }
  const GroupQ q = group_params(warp_max(mx), warp_min(mn), w_bit, zero_point);
  const float max_int = static_cast<float>((1 << w_bit) - 1);
  for (int k = lane; k < group_size; k += kWarp) {
    if (sg == nullptr) {
      out[base + k] = rnd<T>(fake_quant(f(w[base + k]), q, max_int));  // the result, in T
    } else {
      const float scaled = f(rnd<T>(f(w[base + k]) * f(sg[k])));  // w * s is a tensor of T
      out[base + k] = rnd<T>(f(rnd<T>(fake_quant(scaled, q, max_int))) / f(sg[k]));
    }
  }
}

// Block = one group x kClipRows output channels; the group's Gram matrix H = X^T X (fp32,
// symmetric) sits in shared memory. For each shrink candidate a warp forms the error
// e = Q(clamp(w)) - w of its channel's group and the output MSE e^T H e / n_tokens: the
// tokens x channels product of the PyTorch search is never formed.
constexpr int kClipRows = 64;

template <typename T>
__global__ void clip_search_kernel(const T* __restrict__ w, const float* __restrict__ gram,
                                   float* __restrict__ best_out, int64_t rows, int64_t cols, int group_size,
                                   int w_bit, bool zero_point, int n_grid, int n_cand, float inv_tokens) {
  extern __shared__ float H[];
  const int64_t n_group = cols / group_size;
  const int64_t g = blockIdx.x;
  const int gs2 = group_size * group_size;
  for (int k = threadIdx.x; k < gs2; k += blockDim.x) H[k] = gram[g * gs2 + k];
  __syncthreads();
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const int per_lane = group_size / kWarp;
  const float max_int = static_cast<float>((1 << w_bit) - 1);
  const int64_t row_end = min(rows, static_cast<int64_t>(blockIdx.y + 1) * kClipRows);
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * kClipRows + warp; row < row_end; row += warps) {
    const T* wg = w + row * cols + g * group_size;
    float wv[kMaxLanesPerGroup];
    float amax = 0.0f, mx = -INFINITY, mn = INFINITY;
#pragma unroll
    for (int j = 0; j < kMaxLanesPerGroup; ++j) {
      if (j < per_lane) {
        wv[j] = f(wg[j * kWarp + lane]);
        amax = fmaxf(amax, fabsf(wv[j]));
        mx = fmaxf(mx, wv[j]);
        mn = fminf(mn, wv[j]);
      }
    }
    // the whole search in float32, as search.search_clip (values of T are exact in float)
    const float org_max = warp_max(amax);
    mx = warp_max(mx);
    mn = warp_min(mn);
    float best_err = INFINITY;
    float best_max = org_max;
    for (int i = 0; i < n_cand; ++i) {
      // org_max * (1 - i / n_grid): a float32 tensor times a Python float scalar
      const float mv = org_max * static_cast<float>(1.0 - static_cast<double>(i) / n_grid);
      const GroupQ q = group_params(fminf(fmaxf(mx, -mv), mv), fminf(fmaxf(mn, -mv), mv), w_bit, zero_point);
      float e[kMaxLanesPerGroup];
#pragma unroll
      for (int j = 0; j < kMaxLanesPerGroup; ++j) {
        if (j < per_lane) e[j] = fake_quant(fminf(fmaxf(wv[j], -mv), mv), q, max_int) - wv[j];
      }
      float part = 0.0f;
#pragma unroll
      for (int j = 0; j < kMaxLanesPerGroup; ++j) {
        if (j >= per_lane) break;
        const int m = j * kWarp + lane;
        float hm = 0.0f;  // (H e)_m, H read by columns: lanes hit consecutive banks
#pragma unroll
        for (int kj = 0; kj < kMaxLanesPerGroup; ++kj) {
          if (kj >= per_lane) break;
          for (int src = 0; src < kWarp; ++src) {
            const float ek = __shfl_sync(kFull, e[kj], src);
            hm = fmaf(H[(kj * kWarp + src) * group_size + m], ek, hm);
          }
        }
        part = fmaf(e[j], hm, part);
      }
      // float32 errors, as the reference's (search.search_clip computes X e in float32)
      const float err = fmaxf(warp_sum(part), 0.0f) * inv_tokens;
      if (err < best_err) {
        best_err = err;
        best_max = mv;
      }
    }
    if (lane == 0) best_out[row * n_group + g] = best_max;
  }
}

// Thread per (packed column c, input row r), r fastest so the writes of W[out, in] coalesce.
__global__ void dequantize_gemm_kernel(const int32_t* __restrict__ qweight, const int32_t* __restrict__ qzeros,
                                       const c10::Half* __restrict__ scales, c10::Half* __restrict__ out,
                                       int64_t in_features, int64_t out_features, int64_t group_size) {
  const int64_t packed_cols = out_features / 8;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= in_features * packed_cols) return;
  const int64_t r = idx % in_features, c = idx / in_features, grp = r / group_size;
  const uint32_t qw = static_cast<uint32_t>(qweight[r * packed_cols + c]);
  const uint32_t qz = static_cast<uint32_t>(qzeros[grp * packed_cols + c]);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t o = c * 8 + kAwqOrder[i];
    const float q = static_cast<float>((qw >> (4 * i)) & 0xF), z = static_cast<float>((qz >> (4 * i)) & 0xF);
    // (q - z) has 5 significant bits and the scale 11: the float product is exact, rounded once
    out[o * in_features + r] = c10::Half((q - z) * static_cast<float>(scales[grp * out_features + o]));
  }
}

void check_cuda(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

torch::Tensor scaled_pseudo_quantize(torch::Tensor w, c10::optional<torch::Tensor> s, int64_t w_bit,
                                     int64_t group_size, bool zero_point) {
  check_cuda(w, "w");
  TORCH_CHECK(w.dim() == 2 && w.size(1) % group_size == 0, "w must be [out, in] with in divisible by group_size");
  TORCH_CHECK(w_bit >= 2 && w_bit <= 8, "w_bit must be in 2..8");
  if (s.has_value()) {
    check_cuda(*s, "s");
    TORCH_CHECK(s->scalar_type() == w.scalar_type() && s->numel() == w.size(1), "s must be [in] in w's dtype");
  }
  const c10::cuda::CUDAGuard guard(w.device());
  auto out = torch::empty_like(w);
  const int64_t groups = w.size(0) * (w.size(1) / group_size);
  const int threads = 256, warps = threads / kWarp;
  const int64_t blocks = (groups + warps - 1) / warps;
  if (blocks == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "scaled_pseudo_quantize", [&] {
    scaled_pq_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<scalar_t>(), s.has_value() ? s->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
        w.size(0), w.size(1), static_cast<int>(group_size), static_cast<int>(w_bit), zero_point);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

torch::Tensor clip_search(torch::Tensor w, torch::Tensor gram, int64_t w_bit, int64_t group_size, bool zero_point,
                          int64_t n_grid, int64_t n_cand, int64_t n_tokens) {
  check_cuda(w, "w");
  check_cuda(gram, "gram");
  TORCH_CHECK(w.dim() == 2 && w.size(1) % group_size == 0, "w must be [out, in] with in divisible by group_size");
  TORCH_CHECK(group_size % kWarp == 0 && group_size <= kWarp * kMaxLanesPerGroup,
              "clip_search needs a group size that is a multiple of 32, at most 256");
  const int64_t n_group = w.size(1) / group_size;
  TORCH_CHECK(gram.scalar_type() == at::kFloat && gram.dim() == 3 && gram.size(0) == n_group &&
                  gram.size(1) == group_size && gram.size(2) == group_size,
              "gram must be float32 [n_group, group_size, group_size]");
  const c10::cuda::CUDAGuard guard(w.device());
  auto best = torch::empty({w.size(0), n_group}, w.options().dtype(at::kFloat));
  if (best.numel() == 0) return best;
  const size_t smem = static_cast<size_t>(group_size) * group_size * sizeof(float);
  const dim3 grid(static_cast<unsigned>(n_group), static_cast<unsigned>((w.size(0) + kClipRows - 1) / kClipRows));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "clip_search", [&] {
    auto kernel = clip_search_kernel<scalar_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    kernel<<<grid, 256, smem, c10::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<scalar_t>(), gram.data_ptr<float>(), best.data_ptr<float>(), w.size(0), w.size(1),
        static_cast<int>(group_size), static_cast<int>(w_bit), zero_point, static_cast<int>(n_grid),
        static_cast<int>(n_cand), 1.0f / static_cast<float>(n_tokens));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return best;
}

torch::Tensor dequantize_gemm(torch::Tensor qweight, torch::Tensor qzeros, torch::Tensor scales) {
  check_cuda(qweight, "qweight");
  check_cuda(qzeros, "qzeros");
  check_cuda(scales, "scales");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qzeros.scalar_type() == at::kInt, "qweight/qzeros must be int32");
  TORCH_CHECK(scales.scalar_type() == at::kHalf, "scales must be float16");
  const int64_t in_features = qweight.size(0), out_features = qweight.size(1) * 8;
  TORCH_CHECK(scales.size(1) == out_features && qzeros.size(1) * 8 == out_features &&
                  qzeros.size(0) == scales.size(0) && in_features % scales.size(0) == 0,
              "qweight [in, out/8], qzeros [in/g, out/8] and scales [in/g, out] do not agree");
  const c10::cuda::CUDAGuard guard(qweight.device());
  auto out = torch::empty({out_features, in_features}, scales.options());
  const int64_t n = in_features * (out_features / 8);
  if (n == 0) return out;
  const int threads = 256;
  dequantize_gemm_kernel<<<(n + threads - 1) / threads, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      qweight.data_ptr<int32_t>(), qzeros.data_ptr<int32_t>(), scales.data_ptr<c10::Half>(),
      out.data_ptr<c10::Half>(), in_features, out_features, in_features / scales.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scaled_pseudo_quantize", &scaled_pseudo_quantize, "Q(w * s) / s per group (s optional)");
  m.def("clip_search", &clip_search, "best clipping max per (output channel, group) from the Gram matrix");
  m.def("dequantize_gemm", &dequantize_gemm, "AWQ GEMM tensors -> fp16 weight [out, in]");
}
