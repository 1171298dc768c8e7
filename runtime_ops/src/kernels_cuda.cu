// SinqMatMulNBits CUDA kernel (compiled only where nvcc and a CUDA onnxruntime exist).
//
// One warp per (output column n, group of up to MT rows of A). Lanes stride along K; each code
// is read from its block's LSB-first bitstream through a 16-bit window (any bits 2..8), the
// zero point from the row's packed zero-point stream, and the result is reduced with warp
// shuffles. Memory-bound for decode (M = 1): each packed byte of W is read by one warp once
// per MT rows. Launched on the stream onnxruntime hands the kernel.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "sinq_cuda.h"

namespace sinq {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int MT = 4;  // rows of A per warp

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }

__device__ __forceinline__ int read_code(const uint8_t* stream, int64_t idx, int bits, int64_t nbytes) {
  const int64_t bit = idx * bits;
  const int64_t byte = bit >> 3;
  unsigned v = stream[byte];
  if (byte + 1 < nbytes) v |= unsigned(stream[byte + 1]) << 8;
  return int((v >> (bit & 7)) & ((1u << bits) - 1u));
}

template <typename T>
__global__ void sinq_matmul_kernel(Params p) {
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  const int64_t m0 = int64_t(blockIdx.y) * MT;
  if (n >= p.N) return;
  const T* a = static_cast<const T*>(p.a);
  const T* scales = static_cast<const T*>(p.scales);
  const T* cs = static_cast<const T*>(p.col_scale);
  const uint8_t* brow = p.b + n * p.nb * p.block_bytes;
  const uint8_t* zrow = p.zp ? p.zp + n * p.zp_row_bytes : nullptr;
  const int zdef = 1 << (p.bits - 1);
  float acc[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) acc[i] = 0.f;
  for (int64_t k = lane; k < p.K; k += kWarp) {
    const int64_t blk = k / p.bs;
    const int64_t j = k - blk * p.bs;
    const int q = read_code(brow + blk * p.block_bytes, j, p.bits, p.block_bytes);
    const int z = zrow ? read_code(zrow, blk, p.bits, p.zp_row_bytes) : zdef;
    const float w = float(q - z) * to_f(scales[n * p.nb + blk]);
    const float c = cs ? to_f(cs[k]) : 1.f;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int64_t m = m0 + i;
      if (m < p.M) acc[i] = fmaf(to_f(a[m * p.K + k]) * c, w, acc[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    float v = acc[i];
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    const int64_t m = m0 + i;
    if (lane == 0 && m < p.M) {
      if (p.bias) v += to_f(static_cast<const T*>(p.bias)[n]);
      store(static_cast<T*>(p.y) + m * p.N + n, v);
    }
  }
}

template <typename T>
int launch(const Params& p, void* stream) {
  if (p.M == 0 || p.N == 0) return 0;
  const int64_t gx = (p.N + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t gy = (p.M + MT - 1) / MT;
  if (gy > 65535) return int(cudaErrorInvalidConfiguration);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  sinq_matmul_kernel<T><<<grid, kWarp * kWarpsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return int(cudaGetLastError());
}

}  // namespace

int launch_f32(const Params& p, void* stream) { return launch<float>(p, stream); }
int launch_f16(const Params& p, void* stream) { return launch<__half>(p, stream); }
const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace sinq
