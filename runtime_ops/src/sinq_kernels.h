// SinqMatMulNBits CPU kernels: shared declarations.
//
// The packed layout is the one defined by sinq_export/quant/packing.py:
//   B            uint8 [N, nb, bs*bits/8], one LSB-first bitstream of bs codes per block
//   zero points  uint8 [N, ceil(nb*bits/8)], one LSB-first bitstream of nb codes per row
//   scales       float [N, nb]
// with nb = ceil(K / bs).  y = (A * col_scale) @ ((Q - z) * s)^T + bias.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sinq {

// One call's problem, after the operator has normalised its inputs:
// `a` is float [M, Kp] with Kp = nb * bs, already multiplied by col_scale and zero padded
// past K; `scales` is float [N, nb]; `y` is float [M, N].
struct Problem {
  int64_t M = 0, K = 0, N = 0;
  int bits = 0, bs = 0;
  int64_t nb = 0, Kp = 0;
  int64_t block_bytes = 0;      // bs * bits / 8
  int64_t zp_row_bytes = 0;     // ceil(nb * bits / 8)
  const float* a = nullptr;     // [M, Kp] (decode path), pre-scaled: a[k] * 2^-lane_shift(k)
  const float* at = nullptr;    // [Kp, Mp] transposed, zero padded (prefill path)
  int64_t Mp = 0;               // M rounded up to the kernel's lane count
  const uint8_t* b = nullptr;
  int64_t b_total_bytes = 0;    // N * nb * block_bytes (to guard vector over-reads)
  const float* scales = nullptr;
  const uint8_t* zp = nullptr;  // nullptr -> default zero point 2^(bits-1)
  const float* zf = nullptr;    // optional: zero points already unpacked (as float), [N, nb]
  const float* bias = nullptr;  // nullptr -> no bias
  float* y = nullptr;
};

// Work split: the kernels process rows [n0, n1) of the output (all M rows of A).
using RowRangeFn = void (*)(const Problem&, int64_t n0, int64_t n1);

struct KernelSet {
  const char* name;
  int lanes;           // float lanes per vector: the prefill path wants Mp % lanes == 0
  int prefill_unit;    // rows of W per prefill work unit (its tile height)
  RowRangeFn decode;   // M small: decode each packed byte once, dot in registers
  RowRangeFn prefill;  // M large: dequantise a [rows x kc] tile once, reuse for all M rows
};

// Implemented once in kernels.cpp, compiled per instruction set.
namespace base { const KernelSet& kernels(); }
namespace avx2 { const KernelSet& kernels(); }
namespace avx512 { const KernelSet& kernels(); }

constexpr float kMagic = 8388608.0f;  // 2^23: float(2^23 + q) has q in its low mantissa bits

// The decoders leave code k at its bit offset inside its 16-bit window instead of shifting it
// down, i.e. they produce (q - z) * 2^lane_shift(k); the decode path pre-scales the activations
// by 2^-lane_shift(k) to compensate (exact: a power of two). Steps start byte-aligned, so the
// offset depends only on k mod 8.
inline int lane_shift(int64_t k, int bits) { return int(((k & 7) * bits) & 7); }

// Unpack the zero-point row n into zf[0..nb) as floats (shared scalar helper).
inline void unpack_zero_points_row(const Problem& p, int64_t n, float* zf) {
  if (p.zp == nullptr) {
    const float d = float(1 << (p.bits - 1));
    for (int64_t i = 0; i < p.nb; ++i) zf[i] = d;
    return;
  }
  const uint8_t* row = p.zp + n * p.zp_row_bytes;
  const uint32_t mask = (1u << p.bits) - 1u;
  for (int64_t i = 0; i < p.nb; ++i) {
    const int64_t bit = i * p.bits;
    const int64_t byte = bit >> 3;
    uint32_t v = row[byte];
    if (byte + 1 < p.zp_row_bytes) v |= uint32_t(row[byte + 1]) << 8;
    zf[i] = float((v >> (bit & 7)) & mask);
  }
}

}  // namespace sinq
