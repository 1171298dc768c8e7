// SinqMatMulNBits CPU kernels, written once and compiled once per instruction set:
//   -DSINQ_ISA=base    portable C++ (x86-64 baseline / any CPU; the compiler may auto-vectorise)
//   -DSINQ_ISA=avx2    with -mavx2 -mfma          (8 float lanes)
//   -DSINQ_ISA=avx512  with -mavx512f -mavx512bw  (16 float lanes)
// The operator picks one at kernel creation from the running CPU (see op.cpp), so the library
// runs on any x86-64 machine whatever machine built it.
//
// Unpacking any bit width 2..8 with SIMD: W consecutive codes of one block occupy W*bits/8
// bytes (bs is a power of two >= 16 >= W, so a step never straddles blocks). Code i starts at
// bit i*bits; its value lies in the 16-bit window of bytes (i*bits/8, i*bits/8 + 1) at bit
// offset off_i = (i*bits)%8. One byte shuffle (per 128-bit lane, the loaded bytes broadcast to
// every lane) puts each window into a 32-bit lane; the code is masked in place and OR-ed into the
// mantissa of 2^23, and one float subtract of 2^23 + z*2^off_i yields (q - z)*2^off_i exactly
// (see Decoder). The 2^-off_i is folded into the activations (decode path) or the block scale
// (prefill path): powers of two, so nothing is rounded differently.
#include <cstdlib>
#include <cstring>
#include <new>

#include "sinq_kernels.h"

#if !defined(SINQ_ISA)
#error "define SINQ_ISA"
#endif

#define SINQ_STR2(x) #x
#define SINQ_STR(x) SINQ_STR2(x)

#if defined(SINQ_ISA_AVX512) || defined(SINQ_ISA_AVX2)
#include <immintrin.h>
#endif

namespace sinq {
namespace SINQ_ISA {
namespace {

constexpr int64_t kGuard = 16;  // SIMD paths read up to 16 bytes from a step's start

// ---------------------------------------------------------------------------------------------
// ISA layer: a float vector of W lanes and a decoder of W codes.
// ---------------------------------------------------------------------------------------------
#if defined(SINQ_ISA_AVX512)
constexpr int W = 16;
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline float vhsum(vf v) { return _mm512_reduce_add_ps(v); }

struct Decoder {
  __m512i shuf, lmask, magic;
  __m512 pow2, inv_pow2, magicf;
  explicit Decoder(int bits) {
    alignas(64) uint8_t s[64];
    alignas(64) uint32_t m[16];
    alignas(64) float p2[16], ip2[16];
    for (int i = 0; i < 16; ++i) {
      const int bit = i * bits, start = bit >> 3, off = bit & 7;
      s[4 * i + 0] = uint8_t(start);
      s[4 * i + 1] = (off + bits > 8) ? uint8_t(start + 1) : uint8_t(0x80);
      s[4 * i + 2] = 0x80;
      s[4 * i + 3] = 0x80;
      m[i] = ((1u << bits) - 1u) << off;
      p2[i] = float(1 << off);
      ip2[i] = 1.0f / float(1 << off);
    }
    shuf = _mm512_load_si512(s);
    lmask = _mm512_load_si512(m);
    magic = _mm512_set1_epi32(0x4B000000);  // 2^23 as float
    magicf = _mm512_set1_ps(kMagic);
    pow2 = _mm512_load_ps(p2);
    inv_pow2 = _mm512_load_ps(ip2);
  }
  // W codes starting at byte p (bit offset 0): returns (q - z) * 2^off per lane, exactly.
  // Each code is left at its bit offset `off` inside its 16-bit window (no shift), masked and
  // OR-ed into the mantissa of 2^23 in one ternary-logic op; subtracting 2^23 + z * 2^off
  // (per block, zvec) leaves (q - z) * 2^off. Callers fold 2^-off into the other factor:
  // the activations (decode) or the block scale (prefill) -- powers of two, so still exact.
  inline vf decode(const uint8_t* p, __m512 zv) const {
    __m512i x = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    x = _mm512_shuffle_epi8(x, shuf);
    x = _mm512_ternarylogic_epi32(x, lmask, magic, 0xEA);  // (x & lmask) | magic
    return _mm512_sub_ps(_mm512_castsi512_ps(x), zv);
  }
  inline __m512 zvec(const float* z) const { return _mm512_fmadd_ps(_mm512_set1_ps(*z), pow2, magicf); }
  inline __m512 scale(float s) const { return _mm512_mul_ps(_mm512_set1_ps(s), inv_pow2); }
  using zv = __m512;
};

#elif defined(SINQ_ISA_AVX2)
constexpr int W = 8;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline float vhsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Decoder {  // see the AVX-512 decoder for the scheme
  __m256i shuf, lmask, magic;
  __m256 pow2, inv_pow2, magicf;
  explicit Decoder(int bits) {
    alignas(32) uint8_t s[32];
    alignas(32) uint32_t m[8];
    alignas(32) float p2[8], ip2[8];
    for (int i = 0; i < 8; ++i) {
      const int bit = i * bits, start = bit >> 3, off = bit & 7;
      s[4 * i + 0] = uint8_t(start);
      s[4 * i + 1] = (off + bits > 8) ? uint8_t(start + 1) : uint8_t(0x80);
      s[4 * i + 2] = 0x80;
      s[4 * i + 3] = 0x80;
      m[i] = ((1u << bits) - 1u) << off;
      p2[i] = float(1 << off);
      ip2[i] = 1.0f / float(1 << off);
    }
    shuf = _mm256_load_si256(reinterpret_cast<const __m256i*>(s));
    lmask = _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
    magic = _mm256_set1_epi32(0x4B000000);
    magicf = _mm256_set1_ps(kMagic);
    pow2 = _mm256_load_ps(p2);
    inv_pow2 = _mm256_load_ps(ip2);
  }
  inline vf decode(const uint8_t* p, __m256 zv) const {
    __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    x = _mm256_shuffle_epi8(x, shuf);
    x = _mm256_or_si256(_mm256_and_si256(x, lmask), magic);
    return _mm256_sub_ps(_mm256_castsi256_ps(x), zv);
  }
  inline __m256 zvec(const float* z) const { return _mm256_fmadd_ps(_mm256_set1_ps(*z), pow2, magicf); }
  inline __m256 scale(float s) const { return _mm256_mul_ps(_mm256_set1_ps(s), inv_pow2); }
  using zv = __m256;
};

#else  // portable: a "vector" of 8 floats in plain arrays; the compiler vectorises the loops.
constexpr int W = 8;
struct vf {
  float v[W];
};
inline vf vzero() { return vf{}; }
inline vf vload(const float* p) {
  vf r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
inline void vstore(float* p, vf v) { std::memcpy(p, v.v, sizeof(v.v)); }
inline vf vset1(float x) {
  vf r;
  for (int i = 0; i < W; ++i) r.v[i] = x;
  return r;
}
inline vf vfma(vf a, vf b, vf c) {
  for (int i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline vf vmul(vf a, vf b) {
  for (int i = 0; i < W; ++i) a.v[i] *= b.v[i];
  return a;
}
inline float vhsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v.v[i];
  return s;
}
struct Decoder {  // same contract as the SIMD decoders: (q - z) * 2^off per lane
  int bits;
  uint32_t mask;
  explicit Decoder(int b) : bits(b), mask((1u << b) - 1u) {}
  using zv = int32_t;
  inline int32_t zvec(const float* z) const { return int32_t(*z); }
  inline vf scale(float s) const {
    vf r;
    for (int i = 0; i < W; ++i) r.v[i] = s / float(1 << ((i * bits) & 7));
    return r;
  }
  inline vf decode(const uint8_t* p, int32_t z) const {
    vf r;
    for (int i = 0; i < W; ++i) {
      const int bit = i * bits, off = bit & 7;
      const uint32_t win = uint32_t(p[bit >> 3]) | (uint32_t(p[(bit >> 3) + 1]) << 8);
      r.v[i] = float(int32_t(win & (mask << off)) - (z << off));
    }
    return r;
  }
};
#endif

// Bytes of one decode step (W codes).
inline int64_t step_bytes(int bits) { return int64_t(W) * bits / 8; }

// Return a pointer to block (n, b) that is safe to over-read by kGuard bytes: the block itself
// unless it sits at the very end of B, else a zero-padded copy in `scratch`.
inline const uint8_t* safe_block(const Problem& p, int64_t n, int64_t b, uint8_t* scratch) {
  const int64_t off = (n * p.nb + b) * p.block_bytes;
  const uint8_t* ptr = p.b + off;
  if (off + p.block_bytes + kGuard <= p.b_total_bytes) return ptr;
  std::memset(scratch, 0, size_t(p.block_bytes + kGuard));
  std::memcpy(scratch, ptr, size_t(p.block_bytes));
  return scratch;
}

// Per-thread scratch buffers. Deliberately no std:: containers or algorithms in this file: it is
// compiled with different -m flags, and an out-of-line template instance (a weak symbol) from an
// AVX-512 object could be picked by the linker for every caller, base code included.
template <typename T>
struct Buf {
  T* ptr = nullptr;
  size_t cap = 0;
  ~Buf() { std::free(ptr); }
  void resize(size_t n) {
    if (n <= cap) return;
    void* p = std::realloc(ptr, (n + 16) * sizeof(T));
    if (p == nullptr) throw std::bad_alloc();
    ptr = static_cast<T*>(p);
    cap = n + 16;
  }
  T* data() { return ptr; }
  T& operator[](int64_t i) { return ptr[i]; }
};
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

struct Scratch {
  Buf<float> z0, z1, z2, z3;
  Buf<uint8_t> blk, blk2, blk3, blk4;
  Buf<float> tile, ct;
};
Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

inline const float* zero_row(const Problem& p, int64_t n, float* buf) {
  if (p.zf != nullptr) return p.zf + n * p.nb;
  unpack_zero_points_row(p, n, buf);
  return buf;
}

// True when every block of row n can be over-read by kGuard bytes without leaving B.
inline bool row_safe(const Problem& p, int64_t n) {
  return (n + 1) * p.nb * p.block_bytes + kGuard <= p.b_total_bytes;
}

// ---------------------------------------------------------------------------------------------
// Decode path (M = 1): every packed byte is read once and dequantised in registers; R output
// rows at a time share each activation load and give the FMA chains independent work.
// Per block: blk += (q - z) * a over the block; acc += blk * s; one horizontal sum per row.
// ---------------------------------------------------------------------------------------------
template <int R, int MR, bool kSafe>
inline void decode_group(const Problem& p, const Decoder& dec, int64_t n, const float* a, float* y,
                         Scratch& s) {
  const int64_t sb = step_bytes(p.bits);
  const int64_t steps = p.bs / W;
  const float* z[R];
  const float* sc[R];
  const uint8_t* base[R];
  float* zbuf[4] = {s.z0.data(), s.z1.data(), s.z2.data(), s.z3.data()};
  uint8_t* bbuf[4] = {s.blk.data(), s.blk2.data(), s.blk3.data(), s.blk4.data()};
  vf acc[R][MR];
  for (int r = 0; r < R; ++r) {
    z[r] = zero_row(p, n + r, zbuf[r]);
    sc[r] = p.scales + (n + r) * p.nb;
    base[r] = p.b + (n + r) * p.nb * p.block_bytes;
    for (int i = 0; i < MR; ++i) acc[r][i] = vzero();
  }
  for (int64_t b = 0; b < p.nb; ++b) {
    const uint8_t* q[R];
    typename Decoder::zv zv[R];
    vf blk[R][MR];
    for (int r = 0; r < R; ++r) {
      q[r] = kSafe ? safe_block(p, n + r, b, bbuf[r]) : base[r] + b * p.block_bytes;
      zv[r] = dec.zvec(z[r] + b);
      for (int i = 0; i < MR; ++i) blk[r][i] = vzero();
    }
    const float* ab = a + b * p.bs;
    for (int64_t j = 0; j < steps; ++j) {
      vf av[MR];
      for (int i = 0; i < MR; ++i) av[i] = vload(ab + i * p.Kp + j * W);
      for (int r = 0; r < R; ++r) {
        const vf w = dec.decode(q[r] + j * sb, zv[r]);
        for (int i = 0; i < MR; ++i) blk[r][i] = vfma(w, av[i], blk[r][i]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const vf sv = vset1(sc[r][b]);
      for (int i = 0; i < MR; ++i) acc[r][i] = vfma(blk[r][i], sv, acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MR; ++i) y[i * p.N + n + r] = vhsum(acc[r][i]) + (p.bias ? p.bias[n + r] : 0.f);
}

// Rows [n0, n1) for MR rows of A starting at a (pre-scaled, stride Kp) into y (stride N).
template <int MR>
void decode_rows_mr(const Problem& p, const Decoder& dec, int64_t n0, int64_t n1, const float* a,
                    float* y, Scratch& s) {
  constexpr int RBIG = MR == 1 ? 4 : 2;  // 4 rows of W share each activation load
  int64_t n = n0;
  if constexpr (RBIG == 4) {
    for (; n + 3 < n1; n += 4) {
      if (row_safe(p, n + 3)) decode_group<4, MR, false>(p, dec, n, a, y, s);
      else decode_group<4, MR, true>(p, dec, n, a, y, s);
    }
  }
  for (; n + 1 < n1; n += 2) {
    if (row_safe(p, n + 1)) decode_group<2, MR, false>(p, dec, n, a, y, s);
    else decode_group<2, MR, true>(p, dec, n, a, y, s);
  }
  for (; n < n1; ++n) {
    if (row_safe(p, n)) decode_group<1, MR, false>(p, dec, n, a, y, s);
    else decode_group<1, MR, true>(p, dec, n, a, y, s);
  }
}

// Decode path for small M: each packed block is decoded once per group of up to 4 rows of A
// (in registers) and used for all of them.
void decode_rows(const Problem& p, int64_t n0, int64_t n1) {
  Scratch& s = scratch();
  s.z0.resize(size_t(p.nb));
  s.z1.resize(size_t(p.nb));
  s.z2.resize(size_t(p.nb));
  s.z3.resize(size_t(p.nb));
  s.blk.resize(size_t(p.block_bytes + kGuard));
  s.blk2.resize(size_t(p.block_bytes + kGuard));
  s.blk3.resize(size_t(p.block_bytes + kGuard));
  s.blk4.resize(size_t(p.block_bytes + kGuard));
  const Decoder dec(p.bits);
  for (int64_t m = 0; m < p.M;) {
    const float* a = p.a + m * p.Kp;
    float* y = p.y + m * p.N;
    const int64_t left = p.M - m;
    // 4 rows of A at a time, but never a lone leftover row when 5 or 6 remain (3 + 2/3).
    const int mr = left >= 7 || left == 4 ? 4 : left >= 5 ? 3 : int(left);
    switch (mr) {
      case 4: decode_rows_mr<4>(p, dec, n0, n1, a, y, s); break;
      case 3: decode_rows_mr<3>(p, dec, n0, n1, a, y, s); break;
      case 2: decode_rows_mr<2>(p, dec, n0, n1, a, y, s); break;
      default: decode_rows_mr<1>(p, dec, n0, n1, a, y, s); break;
    }
    m += mr;
  }
}

// ---------------------------------------------------------------------------------------------
// Prefill path (M > 1): per work unit of rows, per K chunk, dequantise a [rows x kc] tile of
// W once ((q - z) * s as float), then an outer-product micro-kernel multiplies it with the
// transposed activations At [Kp x Mp] (prepared once per call): MV vectors of m by NRW rows
// of W in registers, W entries broadcast. Partial sums live in a per-unit Ct [rows x Mp]
// buffer across K chunks and are written to y (+ bias) at the end.
// ---------------------------------------------------------------------------------------------
#ifndef SINQ_MV_MAX  // vectors of m per micro-tile (1..4)
#if defined(SINQ_ISA_AVX512)
#define SINQ_MV_MAX 4
#else
#define SINQ_MV_MAX 2
#endif
#endif
#ifndef SINQ_NRW  // rows of W per micro-tile (1..8)
#define SINQ_NRW 6
#endif
#ifndef SINQ_KC
#define SINQ_KC 256
#endif
constexpr int MV_MAX = SINQ_MV_MAX;
static_assert(MV_MAX >= 1 && MV_MAX <= 4, "SINQ_MV_MAX in 1..4");
static_assert(SINQ_NRW >= 1 && SINQ_NRW <= 8, "SINQ_NRW in 1..8");
constexpr int NRW = SINQ_NRW;
constexpr int64_t NT = 4 * NRW;  // rows per tile

inline int64_t chunk_k(const Problem& p) {
  const int64_t kc = imax(p.bs, SINQ_KC);  // bs is a power of two: kc % bs == 0
  return imin(kc, p.Kp);
}

void dequant_tile(const Problem& p, int64_t n0, int64_t rows, int64_t k0, int64_t kc, float* tile,
                  Scratch& s) {
  const Decoder dec(p.bits);
  const int64_t sb = step_bytes(p.bits);
  const int64_t steps = p.bs / W;
  const int64_t b0 = k0 / p.bs, b1 = (k0 + kc) / p.bs;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    const float* z = zero_row(p, n, s.z0.data());
    const float* sc = p.scales + n * p.nb;
    float* out = tile + r * kc;
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* q = safe_block(p, n, b, s.blk.data());
      const typename Decoder::zv zv = dec.zvec(z + b);
      const vf sv = dec.scale(sc[b]);
      float* o = out + (b - b0) * p.bs;
      for (int64_t j = 0; j < steps; ++j) vstore(o + j * W, vmul(dec.decode(q + j * sb, zv), sv));
    }
  }
}

// acc[nr][mv] += At[k][m0 + mv*W ...] * Wt[nr][k], k in [0, kc)
template <int MV, int NR>
inline void micro(const float* at, int64_t ldat, const float* w, int64_t ldw, int64_t kc, float* ct,
                  int64_t ldct) {
  vf acc[NR][MV];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MV; ++j) acc[i][j] = vload(ct + i * ldct + j * W);
  for (int64_t k = 0; k < kc; ++k) {
    vf av[MV];
    for (int j = 0; j < MV; ++j) av[j] = vload(at + k * ldat + j * W);
    for (int i = 0; i < NR; ++i) {
      const vf wv = vset1(w[i * ldw + k]);
      for (int j = 0; j < MV; ++j) acc[i][j] = vfma(av[j], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MV; ++j) vstore(ct + i * ldct + j * W, acc[i][j]);
}

template <int MV>
inline void micro_nr(int nr, const float* at, int64_t ldat, const float* w, int64_t ldw, int64_t kc,
                     float* ct, int64_t ldct) {
  switch (nr) {
    case 8: micro<MV, 8>(at, ldat, w, ldw, kc, ct, ldct); break;
    case 7: micro<MV, 7>(at, ldat, w, ldw, kc, ct, ldct); break;
    case 6: micro<MV, 6>(at, ldat, w, ldw, kc, ct, ldct); break;
    case 5: micro<MV, 5>(at, ldat, w, ldw, kc, ct, ldct); break;
    case 4: micro<MV, 4>(at, ldat, w, ldw, kc, ct, ldct); break;
    case 3: micro<MV, 3>(at, ldat, w, ldw, kc, ct, ldct); break;
    case 2: micro<MV, 2>(at, ldat, w, ldw, kc, ct, ldct); break;
    default: micro<MV, 1>(at, ldat, w, ldw, kc, ct, ldct); break;
  }
}

inline void micro_any(int mv, int nr, const float* at, int64_t ldat, const float* w, int64_t ldw,
                      int64_t kc, float* ct, int64_t ldct) {
  switch (mv) {
    case 4: if constexpr (MV_MAX >= 4) micro_nr<4>(nr, at, ldat, w, ldw, kc, ct, ldct); break;
    case 3: if constexpr (MV_MAX >= 3) micro_nr<3>(nr, at, ldat, w, ldw, kc, ct, ldct); break;
    case 2: if constexpr (MV_MAX >= 2) micro_nr<2>(nr, at, ldat, w, ldw, kc, ct, ldct); break;
    default: micro_nr<1>(nr, at, ldat, w, ldw, kc, ct, ldct); break;
  }
}

void prefill_rows(const Problem& p, int64_t n0, int64_t n1) {
  Scratch& s = scratch();
  s.z0.resize(size_t(p.nb));
  s.blk.resize(size_t(p.block_bytes + kGuard));
  const int64_t kc_max = chunk_k(p);
  const int64_t Mp = p.Mp;
  s.tile.resize(size_t(NT * kc_max));
  s.ct.resize(size_t(NT * Mp));
  float* tile = s.tile.data();
  float* ct = s.ct.data();
  const int64_t mvec = Mp / W;

  for (int64_t t0 = n0; t0 < n1; t0 += NT) {
    const int64_t rows = imin(NT, n1 - t0);
    std::memset(ct, 0, size_t(rows * Mp) * sizeof(float));
    for (int64_t k0 = 0; k0 < p.Kp; k0 += kc_max) {
      const int64_t kc = imin(kc_max, p.Kp - k0);
      dequant_tile(p, t0, rows, k0, kc, tile, s);
      const float* at = p.at + k0 * Mp;
      for (int64_t r = 0; r < rows; r += NRW) {
        const int nr = int(imin(NRW, rows - r));
        for (int64_t v = 0; v < mvec; v += MV_MAX) {
          const int mv = int(imin(MV_MAX, mvec - v));
          micro_any(mv, nr, at + v * W, Mp, tile + r * kc, kc, kc, ct + r * Mp + v * W, Mp);
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float b = p.bias ? p.bias[t0 + r] : 0.f;
      const float* c = ct + r * Mp;
      for (int64_t m = 0; m < p.M; ++m) p.y[m * p.N + t0 + r] = c[m] + b;
    }
  }
}

}  // namespace

const KernelSet& kernels() {
  static const KernelSet k{SINQ_STR(SINQ_ISA), W, int(NT), &decode_rows, &prefill_rows};
  return k;
}

}  // namespace SINQ_ISA
}  // namespace sinq
