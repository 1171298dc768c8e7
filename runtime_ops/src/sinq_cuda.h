// CUDA side of SinqMatMulNBits: a launcher with no CUDA types in its interface, so op.cpp
// compiles with the host compiler alone (only linked against kernels_cuda.o and cudart).
#pragma once

#include <cstdint>

namespace sinq {
namespace cuda {

struct Params {
  int64_t M = 0, K = 0, N = 0;
  int bits = 0, bs = 0;
  int64_t nb = 0, block_bytes = 0, zp_row_bytes = 0;
  const void* a = nullptr;          // T [M, K]        (device)
  const uint8_t* b = nullptr;       // [N, nb, block_bytes]
  const void* scales = nullptr;     // T [N, nb]
  const uint8_t* zp = nullptr;      // [N, zp_row_bytes] or nullptr (default 2^(bits-1))
  const void* col_scale = nullptr;  // T [K] or nullptr
  const void* bias = nullptr;       // T [N] or nullptr
  void* y = nullptr;                // T [M, N]
};

// Enqueue y = (a * col_scale) @ ((Q - z) * s)^T + bias on `stream` (a cudaStream_t).
// fp16: T = half (inputs/outputs), accumulation in float. Returns 0 or a CUDA error code;
// error_string() turns it into text.
int launch_f32(const Params& p, void* stream);
int launch_f16(const Params& p, void* stream);
const char* error_string(int code);

}  // namespace cuda
}  // namespace sinq
