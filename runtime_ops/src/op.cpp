// sinq.ops::SinqMatMulNBits (version 1) — onnxruntime custom-op library entry point.
//
//   Y[..., N] = (A[..., K] * col_scale[K]) @ ((Q - z) * s)^T + bias[N]
//
// Inputs : 0 A          T       [..., K]
//          1 B          uint8   [N, nb, bs*bits/8]   codes, LSB-first bitstream per block
//          2 scales     T       [N, nb]  (or flat [N*nb])
//          3 zero_points uint8  [N, ceil(nb*bits/8)] (or flat), optional; default 2^(bits-1)
//          4 col_scale  T       [K], optional (fused: no separate Mul)
//          5 bias       T       [N], optional
// Output : 0 Y          T       [..., N]
// T = float or float16 (float16 is computed in float32 and rounded once at the end).
// Attributes (all required, int): K, N, bits (2..8), block_size (power of two >= 16).
//
// Built against onnxruntime's public C/C++ API headers (API version ORT_API_VERSION at build
// time); loads into any onnxruntime whose API version is >= that.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include "sinq_kernels.h"

#if defined(SINQ_WITH_CUDA)
#include "sinq_cuda.h"
#endif

namespace sinq {
namespace {

constexpr const char* kOpName = "SinqMatMulNBits";
constexpr const char* kDomain = "sinq.ops";
constexpr int64_t kMaxBlockSize = 2048;
// Up to this many rows of A the decode path (decode each packed block once in registers, FMA
// with every row) beats dequantise-a-tile + GEMM; measured on AVX-512 and AVX2.
constexpr int64_t kDecodeMaxM = 8;

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  os << kOpName << ": ";
  (os << ... << args);
  throw Error(os.str());
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

const char* type_str(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "other";
  }
}

const char* const kInputNames[6] = {"A", "B", "scales", "zero_points", "col_scale", "bias"};

// ---------------------------------------------------------------------------------------------
// Attributes and the shapes they imply.
// ---------------------------------------------------------------------------------------------
struct Attrs {
  int64_t K = 0, N = 0, bits = 0, bs = 0;
  int64_t nb = 0, block_bytes = 0, zp_bytes = 0;

  void derive_and_check() {
    if (bits < 2 || bits > 8) fail("attribute bits=", bits, " is not supported; it must be in 2..8");
    if (bs < 16 || bs > kMaxBlockSize || (bs & (bs - 1)) != 0)
      fail("attribute block_size=", bs, " must be a power of two in [16, ", kMaxBlockSize, "]");
    if (K <= 0) fail("attribute K=", K, " must be positive");
    if (N <= 0) fail("attribute N=", N, " must be positive");
    nb = (K + bs - 1) / bs;
    block_bytes = bs * bits / 8;
    zp_bytes = (nb * bits + 7) / 8;
  }

  // Expected shape of input i (A excluded); `alt` is the accepted flat form, if any.
  std::vector<int64_t> expected(size_t i, std::vector<int64_t>* alt) const {
    alt->clear();
    switch (i) {
      case 1: return {N, nb, block_bytes};
      case 2: *alt = {N * nb}; return {N, nb};
      case 3: *alt = {N * zp_bytes}; return {N, zp_bytes};
      case 4: return {K};
      case 5: return {N};
      default: return {};
    }
  }

  // Full check of a concrete shape (dims < 0 are unknown and skipped).
  void check_shape(size_t i, const std::vector<int64_t>& got) const {
    std::vector<int64_t> alt;
    const std::vector<int64_t> want = expected(i, &alt);
    auto matches = [&](const std::vector<int64_t>& w) {
      if (w.size() != got.size()) return false;
      for (size_t d = 0; d < w.size(); ++d)
        if (got[d] >= 0 && got[d] != w[d]) return false;
      return true;
    };
    if (matches(want) || (!alt.empty() && matches(alt))) return;
    fail("input ", i, " (", kInputNames[i], ") has shape ", shape_str(got), ", expected ", shape_str(want),
         " for K=", K, ", N=", N, ", bits=", bits, ", block_size=", bs,
         (i == 1 ? " (B is [N, ceil(K/block_size), block_size*bits/8])" : ""));
  }
};

template <typename T>
constexpr ONNXTensorElementDataType onnx_type();
template <>
constexpr ONNXTensorElementDataType onnx_type<float>() { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
template <>
constexpr ONNXTensorElementDataType onnx_type<Ort::Float16_t>() { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16; }

inline float to_float(float x) { return x; }
inline float to_float(Ort::Float16_t x) { return x.ToFloat(); }

// ---------------------------------------------------------------------------------------------
// CPU instruction-set dispatch (decided once per kernel; SINQ_OPS_ISA=base|avx2|avx512 forces
// one, for tests and benchmarks — never one the CPU lacks).
// ---------------------------------------------------------------------------------------------
const KernelSet& pick_kernels() {
#if defined(SINQ_HAVE_AVX2)  // x86-64 builds with the SIMD variants (not SINQ_OPS_PORTABLE=1)
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#if defined(SINQ_HAVE_AVX512)
  const bool can512 = has512;
#else
  const bool can512 = false;
#endif
  const char* force = std::getenv("SINQ_OPS_ISA");
  if (force && *force) {
    const std::string f(force);
    if (f == "base") return base::kernels();
    if (f == "avx2") {
      if (!has2) fail("SINQ_OPS_ISA=avx2 but this CPU lacks AVX2/FMA");
      return avx2::kernels();
    }
    if (f == "avx512") {
      if (!can512) fail("SINQ_OPS_ISA=avx512 but this CPU (or this build) lacks AVX-512F/BW");
#if defined(SINQ_HAVE_AVX512)
      return avx512::kernels();
#endif
    }
    if (f != "auto") fail("SINQ_OPS_ISA='", f, "' is not one of auto, base, avx2, avx512");
  }
#if defined(SINQ_HAVE_AVX512)
  if (can512) return avx512::kernels();
#endif
  if (has2) return avx2::kernels();
#endif
  return base::kernels();
}

// ---------------------------------------------------------------------------------------------
// The kernel.
// ---------------------------------------------------------------------------------------------
struct Job {
  const Problem* p;
  RowRangeFn fn;
  int64_t rows_per_unit;
  std::atomic<bool> failed{false};
};

void run_unit(void* data, size_t i) {
  Job* job = static_cast<Job*>(data);
  const int64_t n0 = int64_t(i) * job->rows_per_unit;
  const int64_t n1 = std::min(job->p->N, n0 + job->rows_per_unit);
  try {
    job->fn(*job->p, n0, n1);
  } catch (...) {
    job->failed = true;
  }
}

// At[k, m] = A[m, k] * c[k] for k in one slab of kSlab columns; zero for m >= M or k >= K.
template <typename T>
struct TransposeJob {
  static constexpr int64_t kSlab = 64;
  const T* a;
  const float* c;
  float* at;
  int64_t M, K, Kp, Mp;
  static void run(void* data, size_t i) {
    const TransposeJob* j = static_cast<const TransposeJob*>(data);
    const int64_t k0 = int64_t(i) * kSlab, k1 = std::min(j->Kp, k0 + kSlab);
    for (int64_t k = k0; k < k1; ++k) std::memset(j->at + k * j->Mp + j->M, 0, size_t(j->Mp - j->M) * sizeof(float));
    const int64_t kend = std::min(k1, j->K);
    for (int64_t k = std::max(k0, kend); k < k1; ++k) std::memset(j->at + k * j->Mp, 0, size_t(j->M) * sizeof(float));
    constexpr int64_t TB = 16;  // TB x TB tiles
    for (int64_t m0 = 0; m0 < j->M; m0 += TB)
      for (int64_t kk = k0; kk < kend; kk += TB)
        for (int64_t m = m0; m < std::min(j->M, m0 + TB); ++m)
          for (int64_t k = kk; k < std::min(kend, kk + TB); ++k)
            j->at[k * j->Mp + m] = to_float(j->a[m * j->K + k]) * j->c[k];
  }
};

Attrs read_attrs(const OrtKernelInfo* info_ptr) {
  Ort::ConstKernelInfo info(info_ptr);
  Attrs a;
  const char* names[4] = {"K", "N", "bits", "block_size"};
  int64_t* slots[4] = {&a.K, &a.N, &a.bits, &a.bs};
  for (int i = 0; i < 4; ++i) {
    try {
      *slots[i] = info.GetAttribute<int64_t>(names[i]);
    } catch (const Ort::Exception&) {
      fail("required int attribute '", names[i], "' is missing (attributes: K, N, bits, block_size)");
    }
  }
  a.derive_and_check();
  return a;
}

// Attributes, static shape checks and per-call input checks shared by the CPU and CUDA kernels.
struct KernelBase {
  Attrs attrs;

  explicit KernelBase(const OrtKernelInfo* info_ptr) {
    attrs = read_attrs(info_ptr);
    // Check statically known input shapes now, so a bad model fails at session creation.
    Ort::ConstKernelInfo info(info_ptr);
    const size_t n_in = info.GetInputCount();
    if (n_in < 3 || n_in > 6) fail("expects 3 to 6 inputs, got ", n_in);
    for (size_t i = 1; i < n_in; ++i) {
      std::vector<int64_t> shape;
      try {
        auto ti = info.GetInputTypeInfo(i);
        if (ti.GetONNXType() != ONNX_TYPE_TENSOR) continue;
        shape = ti.GetTensorTypeAndShapeInfo().GetShape();
      } catch (const Ort::Exception&) {
        continue;  // absent optional input or no static info
      }
      if (shape.empty()) continue;  // unknown rank (a scalar fails at Run)
      attrs.check_shape(i, shape);
    }
  }

  static Ort::ConstValue input(Ort::KernelContext& ctx, size_t i) {
    if (i >= ctx.GetInputCount()) return Ort::ConstValue{nullptr};
    return ctx.GetInput(i);
  }

  void check_input(Ort::ConstValue v, size_t i, ONNXTensorElementDataType want,
                   std::vector<int64_t>* shape_out) const {
    if (!v.IsTensor()) fail("input ", i, " (", kInputNames[i], ") must be a tensor");
    auto info = v.GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != want)
      fail("input ", i, " (", kInputNames[i], ") has type ", type_str(info.GetElementType()), ", expected ",
           type_str(want));
    *shape_out = info.GetShape();
    if (i > 0) attrs.check_shape(i, *shape_out);
  }

  struct Inputs {
    Ort::ConstValue A{nullptr}, B{nullptr}, S{nullptr}, Z{nullptr}, C{nullptr}, Bias{nullptr};
    std::vector<int64_t> a_shape;
    int64_t M = 1;
  };

  // Fetch and check every input for element type T; returns them with M = prod(A.shape[:-1]).
  Inputs fetch(Ort::KernelContext& ctx, ONNXTensorElementDataType tt) const {
    const ONNXTensorElementDataType u8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    Inputs in;
    std::vector<int64_t> tmp;
    in.A = input(ctx, 0);
    in.B = input(ctx, 1);
    in.S = input(ctx, 2);
    in.Z = input(ctx, 3);
    in.C = input(ctx, 4);
    in.Bias = input(ctx, 5);
    if (!in.A || !in.B || !in.S) fail("inputs A, B and scales are required");
    check_input(in.A, 0, tt, &in.a_shape);
    if (in.a_shape.empty() || in.a_shape.back() != attrs.K)
      fail("input 0 (A) has shape ", shape_str(in.a_shape), "; its last dimension must equal K=", attrs.K);
    check_input(in.B, 1, u8, &tmp);
    check_input(in.S, 2, tt, &tmp);
    if (in.Z) check_input(in.Z, 3, u8, &tmp);
    if (in.C) check_input(in.C, 4, tt, &tmp);
    if (in.Bias) check_input(in.Bias, 5, tt, &tmp);
    for (size_t d = 0; d + 1 < in.a_shape.size(); ++d) in.M *= in.a_shape[d];
    return in;
  }
};

template <typename Derived>
OrtStatusPtr compute_with_status(Derived* self, OrtKernelContext* context) {
  try {
    self->compute(context);
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  }
}

template <typename T>
struct CpuKernel : KernelBase {
  const KernelSet* kset = nullptr;

  explicit CpuKernel(const OrtKernelInfo* info_ptr) : KernelBase(info_ptr) {
    kset = &pick_kernels();
    Ort::ConstKernelInfo info(info_ptr);
    const size_t n_in = info.GetInputCount();
    // Constant zero points (the usual case: an initializer) are unpacked once, here.
    if (n_in > 3) {
      try {
        int is_const = 0;
        Ort::ConstValue z = info.GetTensorConstantInput(3, &is_const);
        if (is_const && z) {
          auto ti = z.GetTensorTypeAndShapeInfo();
          if (ti.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
            attrs.check_shape(3, ti.GetShape());
            zu_const_ = unpack_all_zero_points(z.GetTensorData<uint8_t>());
          }
        }
      } catch (const Ort::Exception&) {
        // absent or not constant: handled per call
      }
    }
  }

  std::vector<float> unpack_all_zero_points(const uint8_t* packed) const {
    Problem q;
    q.bits = int(attrs.bits);
    q.nb = attrs.nb;
    q.zp_row_bytes = attrs.zp_bytes;
    q.zp = packed;
    std::vector<float> out(size_t(attrs.N * attrs.nb));
    for (int64_t n = 0; n < attrs.N; ++n) unpack_zero_points_row(q, n, out.data() + n * attrs.nb);
    return out;
  }

  const float* default_zero_points() {
    std::call_once(zu_default_once_, [this] {
      zu_default_.assign(size_t(attrs.N * attrs.nb), float(1 << (attrs.bits - 1)));
    });
    return zu_default_.data();
  }

  std::vector<float> zu_const_, zu_default_;  // unpacked zero points, [N, nb]
  std::once_flag zu_default_once_;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) { return compute_with_status(this, context); }

  void compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Attrs& at = attrs;
    Inputs in = fetch(ctx, onnx_type<T>());
    Ort::ConstValue &A = in.A, &B = in.B, &S = in.S, &Z = in.Z, &C = in.C, &Bias = in.Bias;
    const std::vector<int64_t>& a_shape = in.a_shape;
    const int64_t M = in.M;
    std::vector<int64_t> y_shape(a_shape);
    y_shape.back() = at.N;
    auto Y = ctx.GetOutput(0, y_shape);
    if (M == 0) return;

    Problem p;
    p.M = M;
    p.K = at.K;
    p.N = at.N;
    p.bits = int(at.bits);
    p.bs = int(at.bs);
    p.nb = at.nb;
    p.Kp = at.nb * at.bs;
    p.block_bytes = at.block_bytes;
    p.zp_row_bytes = at.zp_bytes;
    p.b = B.GetTensorData<uint8_t>();
    p.b_total_bytes = at.N * at.nb * at.block_bytes;
    p.zp = Z ? Z.GetTensorData<uint8_t>() : nullptr;

    if (Z == nullptr) {
      p.zf = default_zero_points();
    } else if (!zu_const_.empty() && Z.GetTensorData<uint8_t>() != nullptr) {
      p.zf = zu_const_.data();  // unpacked at kernel creation (constant initializer)
    }

    // Activations in float, col_scale fused here (one multiply per element), zero padded past K:
    //   decode (M <= kDecodeMaxM): a [M, Kp], pre-scaled per lane (see lane_shift)
    //   prefill (larger M):         at [Kp, Mp] (transposed, Mp % lanes == 0)
    const bool decode = M <= kDecodeMaxM;
    const T* a_src = A.GetTensorData<T>();
    const T* cs = C ? C.GetTensorData<T>() : nullptr;
    std::vector<float> cs_f(size_t(at.K), 1.0f);
    if (cs)
      for (int64_t k = 0; k < at.K; ++k) cs_f[k] = to_float(cs[k]);
    std::vector<float> a_buf;
    if (decode) {
      a_buf.assign(size_t(M * p.Kp), 0.0f);
      float lane_scale[8];  // 2^-lane_shift(k): see sinq_kernels.h
      for (int i = 0; i < 8; ++i) lane_scale[i] = 1.0f / float(1 << lane_shift(i, p.bits));
      for (int64_t m = 0; m < M; ++m) {
        const T* src = a_src + m * at.K;
        float* dst = a_buf.data() + m * p.Kp;
        for (int64_t k = 0; k < at.K; ++k) dst[k] = to_float(src[k]) * cs_f[k] * lane_scale[k & 7];
      }
      p.a = a_buf.data();
    } else {
      const int64_t lanes = kset->lanes;
      p.Mp = (M + lanes - 1) / lanes * lanes;
      a_buf.resize(size_t(p.Kp * p.Mp));
      // Transpose (and scale) in parallel over K slabs: row k of At is [A[0,k]*c[k], ...].
      TransposeJob<T> tj{a_src, cs_f.data(), a_buf.data(), M, at.K, p.Kp, p.Mp};
      const size_t slabs = size_t((p.Kp + TransposeJob<T>::kSlab - 1) / TransposeJob<T>::kSlab);
      if (slabs <= 1 || M * at.K < (1 << 15)) {
        for (size_t i = 0; i < slabs; ++i) TransposeJob<T>::run(&tj, i);
      } else {
        Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(context, &TransposeJob<T>::run, slabs, 0, &tj));
      }
      p.at = a_buf.data();
    }

    std::vector<float> s_buf, bias_buf, y_buf;
    if constexpr (std::is_same_v<T, float>) {
      p.scales = S.GetTensorData<float>();
      p.bias = Bias ? Bias.GetTensorData<float>() : nullptr;
      p.y = Y.GetTensorMutableData<float>();
    } else {
      const T* s = S.GetTensorData<T>();
      s_buf.resize(size_t(at.N * at.nb));
      for (size_t i = 0; i < s_buf.size(); ++i) s_buf[i] = to_float(s[i]);
      p.scales = s_buf.data();
      if (Bias) {
        const T* b = Bias.GetTensorData<T>();
        bias_buf.resize(size_t(at.N));
        for (size_t i = 0; i < bias_buf.size(); ++i) bias_buf[i] = to_float(b[i]);
        p.bias = bias_buf.data();
      }
      y_buf.resize(size_t(M * at.N));
      p.y = y_buf.data();
    }

    Job job;
    job.p = &p;
    job.fn = decode ? kset->decode : kset->prefill;
    job.rows_per_unit = decode ? 16 : kset->prefill_unit;
    const size_t units = size_t((at.N + job.rows_per_unit - 1) / job.rows_per_unit);
    if (units == 1) {
      run_unit(&job, 0);
    } else {
      Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(context, &run_unit, units, 0, &job));
    }
    if (job.failed) fail("internal error in the CPU kernel (out of memory?)");

    if constexpr (!std::is_same_v<T, float>) {
      T* y = Y.GetTensorMutableData<T>();
      for (size_t i = 0; i < y_buf.size(); ++i) y[i] = T(y_buf[i]);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Op definitions (one per element type T; onnxruntime merges same-name ops by type).
// ---------------------------------------------------------------------------------------------
template <typename T, typename Kernel>
struct OpBase : Ort::CustomOpBase<OpBase<T, Kernel>, Kernel, true> {
  explicit OpBase(const char* ep) : ep_(ep) {}
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel(info);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }
  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return ep_; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return (i == 1 || i == 3) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : onnx_type<T>();
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  OrtMemType GetInputMemoryType(size_t) const { return OrtMemTypeDefault; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return onnx_type<T>(); }
  const char* ep_;
};

#if defined(SINQ_WITH_CUDA)
// ---------------------------------------------------------------------------------------------
// CUDA kernel: same checks, inputs/outputs in device memory, launched on onnxruntime's stream.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct CudaKernel : KernelBase {
  explicit CudaKernel(const OrtKernelInfo* info) : KernelBase(info) {}
  OrtStatusPtr ComputeV2(OrtKernelContext* context) { return compute_with_status(this, context); }

  void compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    Inputs in = fetch(ctx, onnx_type<T>());
    std::vector<int64_t> y_shape(in.a_shape);
    y_shape.back() = attrs.N;
    auto Y = ctx.GetOutput(0, y_shape);
    if (in.M == 0) return;
    cuda::Params p;
    p.M = in.M;
    p.K = attrs.K;
    p.N = attrs.N;
    p.bits = int(attrs.bits);
    p.bs = int(attrs.bs);
    p.nb = attrs.nb;
    p.block_bytes = attrs.block_bytes;
    p.zp_row_bytes = attrs.zp_bytes;
    p.a = in.A.GetTensorRawData();
    p.b = in.B.GetTensorData<uint8_t>();
    p.scales = in.S.GetTensorRawData();
    p.zp = in.Z ? in.Z.GetTensorData<uint8_t>() : nullptr;
    p.col_scale = in.C ? in.C.GetTensorRawData() : nullptr;
    p.bias = in.Bias ? in.Bias.GetTensorRawData() : nullptr;
    p.y = Y.GetTensorMutableRawData();
    void* stream = ctx.GetGPUComputeStream();
    const int rc = std::is_same_v<T, float> ? cuda::launch_f32(p, stream) : cuda::launch_f16(p, stream);
    if (rc != 0) fail("CUDA launch failed: ", cuda::error_string(rc));
  }
};

void add_cuda_ops(Ort::CustomOpDomain& domain) {
  static OpBase<float, CudaKernel<float>> op_f32("CUDAExecutionProvider");
  static OpBase<Ort::Float16_t, CudaKernel<Ort::Float16_t>> op_f16("CUDAExecutionProvider");
  domain.Add(&op_f32);
  domain.Add(&op_f16);
}
#endif

std::mutex g_mu;
std::vector<Ort::CustomOpDomain>& domains() {
  static auto* d = new std::vector<Ort::CustomOpDomain>();  // lives as long as the process
  return *d;
}

}  // namespace
}  // namespace sinq

extern "C" {

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                 const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // The runtime is older than the headers this library was built with. Report with the
    // oldest API every runtime has.
    const OrtApi* api1 = api_base->GetApi(1);
    std::string msg = std::string("sinq_ops was built against onnxruntime API version ") +
                      std::to_string(ORT_API_VERSION) + " but this onnxruntime (" +
                      api_base->GetVersionString() +
                      ") is older; rebuild it against this onnxruntime's headers: "
                      "python -m sinq_export.runtime_ops build --force (ORT_INCLUDE_DIR=...)";
    return api1 ? api1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  try {
    using namespace sinq;
    static OpBase<float, CpuKernel<float>> op_f32("CPUExecutionProvider");
    static OpBase<Ort::Float16_t, CpuKernel<Ort::Float16_t>> op_f16("CPUExecutionProvider");
    Ort::CustomOpDomain domain(kDomain);
    domain.Add(&op_f32);
    domain.Add(&op_f16);
#if defined(SINQ_WITH_CUDA)
    add_cuda_ops(domain);
#endif
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(g_mu);
    domains().push_back(std::move(domain));
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

// For diagnostics: which kernels this machine would use, and the API version built against.
__attribute__((visibility("default"))) const char* SinqOpsBuildInfo() {
  static std::string s = std::string("api=") + std::to_string(ORT_API_VERSION) +
#if defined(SINQ_WITH_CUDA)
                         " cuda=1"
#else
                         " cuda=0"
#endif
      ;
  return s.c_str();
}

}  // extern "C"
