// Optional CUDA extension: the small-rows (decode) adapter epilogue in one launch.
//
//   out[m, :] += s * ((x[m, :] A^T) * u) B^T * v          x (M, K), A (r, K), B (N, r), u (r,), v (N,)
//
// One block per row m: the block first reduces h = x[m] A^T (r values, fp32) into shared memory,
// then every thread adds the rank-r update into its slice of out[m, :]. For M <= 64 this is the
// whole adapter cost on top of the cuBLAS GEMV that produced `out`. h is returned for backward.
// Built only with TIEDLORA_BUILD_CUDA=1 (see setup.py); the Triton kernels remain the default.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void decode_epilogue_kernel(T* __restrict__ out, const T* __restrict__ x, const float* __restrict__ A,
                                       const float* __restrict__ B, const float* __restrict__ u,
                                       const float* __restrict__ v, float* __restrict__ h_out, int64_t K,
                                       int64_t N, int64_t r, int64_t stride_xm, int64_t stride_om, float s) {
  extern __shared__ float h[];  // [r]
  const int64_t m = blockIdx.x;
  const T* xr = x + m * stride_xm;
  // h[j] = sum_k x[m, k] * A[j, k]: one warp per j, lanes stride over k.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  for (int64_t j = warp; j < r; j += n_warps) {
    float acc = 0.f;
    for (int64_t k = lane; k < K; k += 32) acc += static_cast<float>(xr[k]) * A[j * K + k];
    for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffff, acc, off);
    if (lane == 0) {
      h_out[m * r + j] = acc;
      h[j] = s * acc * (u ? u[j] : 1.f);
    }
  }
  __syncthreads();
  T* orow = out + m * stride_om;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    float acc = 0.f;
    for (int64_t j = 0; j < r; ++j) acc += h[j] * B[n * r + j];
    if (v) acc *= v[n];
    orow[n] = static_cast<T>(static_cast<float>(orow[n]) + acc);
  }
}

at::Tensor decode_epilogue_cuda(at::Tensor out, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                const c10::optional<at::Tensor>& u, const c10::optional<at::Tensor>& v,
                                double scaling) {
  TORCH_CHECK(x.is_cuda() && out.is_cuda(), "decode_epilogue_: x and out must be CUDA tensors");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2, "decode_epilogue_: x (M, K) and out (M, N) must be 2-D");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, "decode_epilogue_: x and out need unit stride in the last dim");
  TORCH_CHECK(x.scalar_type() == out.scalar_type(), "decode_epilogue_: x and out must share a dtype");
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), r = A.size(0);
  TORCH_CHECK(A.size(1) == K && B.size(0) == N && B.size(1) == r, "decode_epilogue_: A (r, K) / B (N, r) mismatch");
  auto A32 = A.to(at::kFloat).contiguous();
  auto B32 = B.to(at::kFloat).contiguous();
  auto u32 = u.has_value() ? u->to(at::kFloat).contiguous() : at::Tensor();
  auto v32 = v.has_value() ? v->to(at::kFloat).contiguous() : at::Tensor();
  auto h = at::empty({M, r}, x.options().dtype(at::kFloat));
  if (M == 0) return h;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "decode_epilogue_", [&] {
    decode_epilogue_kernel<scalar_t><<<M, kThreads, r * sizeof(float), stream>>>(
        out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), A32.data_ptr<float>(), B32.data_ptr<float>(),
        u.has_value() ? u32.data_ptr<float>() : nullptr, v.has_value() ? v32.data_ptr<float>() : nullptr,
        h.data_ptr<float>(), K, N, r, x.stride(0), out.stride(0), static_cast<float>(scaling));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return h;
}

}  // namespace

TORCH_LIBRARY(tiedlora_C, m) {
  m.def("decode_epilogue_(Tensor(a!) out, Tensor x, Tensor A, Tensor B, Tensor? u, Tensor? v, float scaling) -> Tensor");
}

TORCH_LIBRARY_IMPL(tiedlora_C, CUDA, m) { m.impl("decode_epilogue_", &decode_epilogue_cuda); }
