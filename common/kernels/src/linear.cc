#include "duet/kernels/linear.h"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <dnnl.hpp>
#include <unordered_map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "duet/tensor/buffer.h"
#include "gemv_bf16.h"

namespace duet::kernels {
namespace {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

// One CPU engine and stream for the process; oneDNN objects are cheap handles.
struct DnnlContext {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
};
DnnlContext& Context() {
  static DnnlContext ctx;
  return ctx;
}

// Up to this many rows, bf16 matmuls use duet's small-M kernels (weights read once for all
// rows): GemmAmxBf16 where the CPU has AMX, GemvBf16 otherwise.
constexpr int64_t kGemvMaxM = 16;

}  // namespace

struct Linear::Impl {
  int64_t k = 0, n = 0;
  Precision precision = Precision::kBF16;
  dnnl::memory::desc weights_desc;  // packed layout, identical for every M
  Buffer weight_storage;            // huge-page backed (see duet/tensor/buffer.h)
  dnnl::memory weights;             // views weight_storage
  std::vector<float> bias;
  std::vector<float> bias_padded;  // the bias padded to whole 64-column blocks (GemmAmxBf16)
  std::vector<uint16_t> x_bf16;    // scratch: x rounded to bf16
  // Small M (decode) runs duet's own kernel on the same packed weights when the layout is
  // BA16a64b2a (AMX tiles where the CPU has them, AVX-512-BF16 dot products otherwise); kp is
  // K padded to the layout's block.
  bool use_gemv = false;
  bool use_amx = false;
  int64_t kp = 0;
  // How the threads share the weights, per size class: M = 1, 2-3, 4-7, 8-16 (how unequal the
  // threads are depends on M: timed at M = 4 and 16 in one run, the slower thread was not the
  // same one).
  GemvSplit split[4];
  struct Cached {
    dnnl::matmul prim;
  };
  std::unordered_map<int64_t, Cached> by_m;

  dt src_type() const { return precision == Precision::kBF16 ? dt::bf16 : dt::f32; }

  dnnl::matmul::primitive_desc MakePd(int64_t m, const dnnl::memory::desc& wdesc) const {
    dnnl::memory::desc src({m, k}, src_type(), tag::ab);
    dnnl::memory::desc dst({m, n}, dt::f32, tag::ab);
    return dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, wdesc, dst), Context().engine);
  }

  dnnl::matmul& Get(int64_t m) {
    auto it = by_m.find(m);
    if (it == by_m.end()) it = by_m.emplace(m, Cached{dnnl::matmul(MakePd(m, weights_desc))}).first;
    return it->second.prim;
  }
};

Linear::Linear(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Linear::~Linear() = default;
int64_t Linear::k() const { return impl_->k; }
int64_t Linear::n() const { return impl_->n; }
size_t Linear::weight_bytes() const { return impl_->weights_desc.get_size(); }
const char* Linear::small_m_kernel() const {
  return !impl_->use_gemv ? "onednn" : impl_->use_amx ? "amx" : "avx512-bf16";
}

absl::StatusOr<std::unique_ptr<Linear>> Linear::Create(int64_t k, int64_t n, const float* weights,
                                                       WeightLayout layout, const float* bias,
                                                       Precision precision) {
  if (k <= 0 || n <= 0 || weights == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("Linear: bad shape k=", k, " n=", n));
  }
  auto impl = std::make_unique<Impl>();
  impl->k = k;
  impl->n = n;
  impl->precision = precision;
  try {
    auto& ctx = Context();
    // Let oneDNN choose the packed layout once (for a prefill-sized M), then force that same
    // layout for every M so one copy of the weights serves prefill and decode.
    dnnl::memory::desc any({k, n}, impl->src_type(), tag::any);
    impl->weights_desc = impl->MakePd(128, any).weights_desc();
    impl->weight_storage = Buffer(impl->weights_desc.get_size());
    impl->weights = dnnl::memory(impl->weights_desc, ctx.engine, impl->weight_storage.data());
    dnnl::memory::desc user_desc({k, n}, dt::f32, layout == WeightLayout::kKN ? tag::ab : tag::ba);
    dnnl::memory user(user_desc, ctx.engine, const_cast<float*>(weights));
    dnnl::reorder(user, impl->weights).execute(ctx.stream, user, impl->weights);
    ctx.stream.wait();
    if (precision == Precision::kBF16 && HasAvx512Bf16() &&
        impl->weights_desc == dnnl::memory::desc({k, n}, dt::bf16, tag::BA16a64b2a)) {
      impl->use_gemv = true;
      // AMX where the CPU has it and oneDNN may use it too: ONEDNN_MAX_CPU_ISA (below
      // AVX512_CORE_AMX) turns both off, one knob for comparing or avoiding the tiles.
      impl->use_amx =
          HasAmxBf16() && dnnl::get_effective_cpu_isa() == dnnl::cpu_isa::avx512_core_amx;
      impl->kp = impl->weights_desc.data.padded_dims[0];
    } else {
      impl->Get(1);  // build the decode-sized primitive now, not on the first request
    }
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat("oneDNN matmul k=", k, " n=", n, ": ", e.what()));
  }
  if (bias != nullptr) {
    impl->bias.assign(bias, bias + n);
    if (impl->use_amx) {
      impl->bias_padded.assign((n + 63) / 64 * 64, 0.f);
      std::copy(bias, bias + n, impl->bias_padded.begin());
    }
  }
  return std::unique_ptr<Linear>(new Linear(std::move(impl)));
}

absl::Status Linear::Forward(const float* x, int64_t m, float* y) {
  Impl& im = *impl_;
  if (m <= 0) return absl::InvalidArgumentError(absl::StrCat("Linear: m=", m));
  if (im.use_gemv && m <= kGemvMaxM) {
    const int64_t kp = im.kp;
    if (im.x_bf16.size() < static_cast<size_t>(m * kp)) im.x_bf16.resize(m * kp);
    const auto* w = static_cast<const uint16_t*>(im.weights.get_data_handle());
    GemvSplit* split = &im.split[std::min<int>(3, std::bit_width(static_cast<uint64_t>(m)) - 1)];
    if (im.use_amx) {
      PackAmxRows(x, m, im.k, kp, im.x_bf16.data());
      GemmAmxBf16(im.x_bf16.data(), m, kp, w, im.n, y, split,
                  im.bias_padded.empty() ? nullptr : im.bias_padded.data());
      return absl::OkStatus();  // the tiles started from the bias, if there is one
    }
    for (int64_t r = 0; r < m; ++r) {
      uint16_t* xr = im.x_bf16.data() + r * kp;
      ConvertF32ToBf16(x + r * im.k, xr, static_cast<size_t>(im.k));
      std::fill(xr + im.k, xr + kp, uint16_t{0});
    }
    GemvBf16(im.x_bf16.data(), m, kp, w, im.n, y, split);
  } else {
    try {
      auto& ctx = Context();
      dnnl::matmul& prim = im.Get(m);
      dnnl::memory::desc src_desc({m, im.k}, im.src_type(), tag::ab);
      dnnl::memory::desc dst_desc({m, im.n}, dt::f32, tag::ab);
      void* src_ptr = const_cast<float*>(x);
      if (im.precision == Precision::kBF16) {
        const size_t count = static_cast<size_t>(m * im.k);
        if (im.x_bf16.size() < count) im.x_bf16.resize(count);
        uint16_t* xb = im.x_bf16.data();
        constexpr size_t kPiece = 16384;  // values per conversion task
        const int64_t pieces = static_cast<int64_t>((count + kPiece - 1) / kPiece);
#pragma omp parallel for schedule(static) if (pieces > 4)
        for (int64_t p = 0; p < pieces; ++p) {
          const size_t at = static_cast<size_t>(p) * kPiece;
          ConvertF32ToBf16(x + at, xb + at, std::min(kPiece, count - at));
        }
        src_ptr = xb;
      }
      dnnl::memory src(src_desc, ctx.engine, src_ptr);
      dnnl::memory dst(dst_desc, ctx.engine, y);
      prim.execute(ctx.stream,
                   {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, im.weights}, {DNNL_ARG_DST, dst}});
      ctx.stream.wait();
    } catch (const dnnl::error& e) {
      return absl::InternalError(absl::StrCat("oneDNN matmul m=", m, ": ", e.what()));
    }
  }
  if (!im.bias.empty()) {
    const int64_t n = im.n;
    const float* b = im.bias.data();
#pragma omp parallel for schedule(static) if (m * n > 65536)
    for (int64_t i = 0; i < m; ++i) {
      float* row = y + i * n;
      for (int64_t j = 0; j < n; ++j) row[j] += b[j];
    }
  }
  return absl::OkStatus();
}

}  // namespace duet::kernels
