// llmint8::cpu_linear: the LLM.int8() linear on x86-64 CPUs in one call (the kernels: cpu_linear_kernels.h), and
// llmint8::cpu_linear_group, several of them on one activation in one call, and
// llmint8::cpu_block_linear, the block-scaled linear of docs/design.md §1b (cpu_block_linear_kernels.h), and
// llmint8::cpu_block_linear_group, several of those on one activation in one call, and
// llmint8::cpu_decode_attention, attention of one query token on a bf16/fp16/fp32 KV cache (cpu_attention_kernels.h),
// and llmint8::cpu_fp_linear, the decode GEMV of the linears a graph keeps in bf16/fp16 (cpu_fp_linear_kernels.h).
// Registered with PyTorch's dispatcher here, in C++, so that a compiled graph calls it with no Python in between and
// an AOTInductor package runs it by loading this library alone. Built by torch.utils.cpp_extension (cpu_linear.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <utility>

#include "cpu_attention_kernels.h"
#include "cpu_block_linear_kernels.h"
#include "cpu_fp_linear_kernels.h"

namespace {

int dtype_code(const at::Tensor& t, const char* what, const char* op = "llmint8::cpu_linear") {
  switch (t.scalar_type()) {
    case at::kFloat: return int8pass::F32;
    case at::kBFloat16: return int8pass::BF16;
    case at::kHalf: return int8pass::F16;
    default: TORCH_CHECK(false, op, ": ", what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// The checks both ops make of x, the codes and the bias (the scales differ); returns x's dtype code
int check_operands(const char* op, const at::Tensor& x, const at::Tensor& weight_q, const at::Tensor& weight_scale,
                   const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight_q.device().is_cpu() && weight_scale.device().is_cpu(), op,
              ": all tensors must be on the CPU");
  TORCH_CHECK(weight_q.scalar_type() == at::kChar && weight_q.dim() == 2, op, ": weight_q must be int8 [N, K], got ",
              weight_q.scalar_type(), " ", weight_q.sizes());
  const int64_t N = weight_q.size(0), K = weight_q.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, op, ": x's last dim must be K = ", K, ", got ", x.sizes());
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == N, op,
                ": bias must be a CPU vector of N = ", N, ", got ", bias->sizes());
    dtype_code(*bias, "bias", op);
  }
  return dtype_code(x, "x", op);
}

// The number of rows M of x [..., K]
int64_t leading_rows(const at::Tensor& x) {
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  return M;
}

// y [..., N] for x [..., K] (contiguous, in x's dtype), and the number of rows M of x
std::pair<at::Tensor, int64_t> output_for(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  return {at::empty(sizes, x.options().memory_format(at::MemoryFormat::Contiguous)), leading_rows(x)};
}

// The checks of one weight of llmint8::cpu_linear (or of a group) beyond check_operands: its scales, outlier weight and
// code sums
void check_weight(const char* op, const at::Tensor& weight_q, const at::Tensor& weight_scale,
                  const std::optional<at::Tensor>& outlier_weight, const std::optional<at::Tensor>& code_sums) {
  const int64_t N = weight_q.size(0), K = weight_q.size(1);
  TORCH_CHECK(weight_scale.scalar_type() == at::kFloat && weight_scale.dim() == 1 && weight_scale.size(0) == N, op,
              ": weight_scale must be float32 [", N, "], got ", weight_scale.scalar_type(), " ", weight_scale.sizes());
  if (outlier_weight) {
    TORCH_CHECK(outlier_weight->device().is_cpu() && outlier_weight->dim() == 2 && outlier_weight->size(0) == N &&
                    outlier_weight->size(1) == K,
                op, ": outlier_weight must be a CPU [", N, ", ", K, "] tensor, got ", outlier_weight->sizes());
    dtype_code(*outlier_weight, "outlier_weight", op);
  }
  if (code_sums)
    TORCH_CHECK(code_sums->device().is_cpu() && code_sums->scalar_type() == at::kInt && code_sums->dim() == 1 &&
                    code_sums->size(0) == N,
                op, ": code_sums must be a CPU int32 [", N, "] tensor, got ", code_sums->scalar_type(), " ",
                code_sums->sizes());
}

// A group's lists: at least one weight, a scale for each, and no bias or one for each; returns the weight count
size_t check_group_lists(const char* op, at::TensorList weight_q, at::TensorList weight_scale, at::TensorList bias) {
  const size_t count = weight_q.size();
  TORCH_CHECK(count > 0, op, ": no weights");
  TORCH_CHECK(weight_scale.size() == count, op, ": ", count, " weights but ", weight_scale.size(), " weight_scales");
  TORCH_CHECK(bias.empty() || bias.size() == count, op, ": bias must be empty or one per weight (", count, "), got ",
              bias.size());
  return count;
}

// One weight of a call: its contiguous tensors (kept alive for the call) and what the kernel reads of them
struct WeightOperands {
  at::Tensor codes, scale, bias, outlier_weight, code_sums, y;

  WeightOperands(const at::Tensor& x, const at::Tensor& weight_q, const at::Tensor& weight_scale,
                 const std::optional<at::Tensor>& bias_, const std::optional<at::Tensor>& outlier_weight_,
                 const std::optional<at::Tensor>& code_sums_)
      : codes(weight_q.contiguous()), scale(weight_scale.contiguous()),
        bias(bias_ ? bias_->contiguous() : at::Tensor()),
        outlier_weight(outlier_weight_ ? outlier_weight_->contiguous() : at::Tensor()),
        code_sums(code_sums_ ? code_sums_->contiguous() : at::Tensor()), y(output_for(x, weight_q.size(0)).first) {}

  int8pass::Weight view() const {
    return {codes.data_ptr<int8_t>(), codes.size(0),
            code_sums.defined() ? code_sums.data_ptr<int32_t>() : nullptr, scale.data_ptr<float>(),
            bias.defined() ? bias.data_ptr() : nullptr, bias.defined() ? dtype_code(bias, "bias") : 0,
            outlier_weight.defined() ? outlier_weight.data_ptr() : nullptr,
            outlier_weight.defined() ? dtype_code(outlier_weight, "outlier_weight") : 0, y.data_ptr()};
  }
};

// Runs the kernel for x (contiguous) and the weights, each of which has its output allocated
void run_linear(const at::Tensor& x_c, int x_dtype, double threshold, const std::vector<WeightOperands>& operands) {
  const int64_t K = x_c.size(-1), M = leading_rows(x_c);
  std::vector<int8pass::Weight> weights;
  for (const WeightOperands& operand : operands)
    if (operand.codes.size(0) > 0) weights.push_back(operand.view());
  if (M == 0 || weights.empty()) return;
  const int8pass::Activation activation{x_c.data_ptr(), x_dtype, M, K, float(threshold)};
  int8pass::linear(activation, weights.data(), int64_t(weights.size()), int8pass::kernel_for(M, K));
}

// y [..., N] = llmint8 linear of x [..., K] with codes weight_q [N, K] and row absmax weight_scale [N]: docs/design.md
// §1, with outlier_weight (floating point [N, K]) replacing the dequantized codes for the outlier columns when given.
// code_sums (int32 [N]) is each row's sum of codes, which the VNNI and AMX GEMMs take off (Int8Weight keeps it);
// without it they sum the rows on every call.
at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& weight_q, const at::Tensor& weight_scale,
                      const std::optional<at::Tensor>& bias, double threshold,
                      const std::optional<at::Tensor>& outlier_weight, const std::optional<at::Tensor>& code_sums) {
  const char* op = "llmint8::cpu_linear";
  const int x_dtype = check_operands(op, x, weight_q, weight_scale, bias);
  check_weight(op, weight_q, weight_scale, outlier_weight, code_sums);
  std::vector<WeightOperands> operands;
  operands.emplace_back(x, weight_q, weight_scale, bias, outlier_weight, code_sums);
  run_linear(x.contiguous(), x_dtype, threshold, operands);
  return operands[0].y;
}

// [y_i] = [cpu_linear(x, weight_q[i], weight_scale[i], bias[i], threshold, None, code_sums[i])] for weights that
// multiply the same x, in one call: x is quantized once and the weights are streamed in one parallel loop. bias and
// code_sums are empty (none) or one per weight.
std::vector<at::Tensor> cpu_linear_group(const at::Tensor& x, at::TensorList weight_q, at::TensorList weight_scale,
                                         at::TensorList bias, double threshold, at::TensorList code_sums) {
  const char* op = "llmint8::cpu_linear_group";
  const size_t count = check_group_lists(op, weight_q, weight_scale, bias);
  TORCH_CHECK(code_sums.empty() || code_sums.size() == count, op, ": code_sums must be empty or one per weight (",
              count, "), got ", code_sums.size());
  int x_dtype = 0;
  std::vector<WeightOperands> operands;
  operands.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    const std::optional<at::Tensor> bias_i = bias.empty() ? std::nullopt : std::optional<at::Tensor>(bias[i]);
    const std::optional<at::Tensor> sums_i = code_sums.empty() ? std::nullopt : std::optional<at::Tensor>(code_sums[i]);
    x_dtype = check_operands(op, x, weight_q[i], weight_scale[i], bias_i);
    check_weight(op, weight_q[i], weight_scale[i], std::nullopt, sums_i);
    operands.emplace_back(x, weight_q[i], weight_scale[i], bias_i, std::nullopt, sums_i);
  }
  run_linear(x.contiguous(), x_dtype, threshold, operands);
  std::vector<at::Tensor> outputs;
  for (const WeightOperands& operand : operands) outputs.push_back(operand.y);
  return outputs;
}

// The checks of one weight of llmint8::cpu_block_linear (or of a group): its codes, bias and bf16 block scales
// [N, ceil(K / block_size)]; returns x's dtype code
int check_block_weight(const char* op, const at::Tensor& x, const at::Tensor& weight_q, const at::Tensor& weight_scale,
                       const std::optional<at::Tensor>& bias, int64_t block_size) {
  const int x_dtype = check_operands(op, x, weight_q, weight_scale, bias);
  TORCH_CHECK(block_size > 0 && block_size % 32 == 0, op, ": block_size must be a positive multiple of 32, got ",
              block_size);
  const int64_t N = weight_q.size(0), K = weight_q.size(1), blocks = int8pass::blocks::block_count(K, block_size);
  TORCH_CHECK(weight_scale.scalar_type() == at::kBFloat16 && weight_scale.dim() == 2 && weight_scale.size(0) == N &&
                  weight_scale.size(1) == blocks,
              op, ": weight_scale must be bfloat16 [", N, ", ", blocks, "], got ", weight_scale.scalar_type(), " ",
              weight_scale.sizes());
  return x_dtype;
}

// [y_i] = the block-scaled linears of x (already checked with each weight) in one kernel call
std::vector<at::Tensor> run_block_linear(const at::Tensor& x, int x_dtype, at::TensorList weight_q,
                                         at::TensorList weight_scale, at::TensorList bias, int64_t block_size,
                                         double threshold) {
  const at::Tensor x_c = x.contiguous();
  std::vector<at::Tensor> kept, outputs;  // the contiguous operands, alive for the call
  std::vector<int8pass::blocks::BlockWeight> weights;
  const int64_t M = leading_rows(x);
  for (size_t i = 0; i < weight_q.size(); ++i) {
    const at::Tensor w = weight_q[i].contiguous(), s = weight_scale[i].contiguous();
    const at::Tensor b = bias.empty() ? at::Tensor() : bias[i].contiguous();
    outputs.push_back(output_for(x, w.size(0)).first);
    kept.insert(kept.end(), {w, s, b});
    if (w.size(0) > 0)
      weights.push_back({w.data_ptr<int8_t>(), w.size(0), reinterpret_cast<const uint16_t*>(s.data_ptr<at::BFloat16>()),
                         b.defined() ? b.data_ptr() : nullptr, b.defined() ? dtype_code(b, "bias") : 0,
                         outputs.back().data_ptr()});
  }
  if (M == 0 || weights.empty()) return outputs;
  const int8pass::blocks::BlockActivation activation{x_c.data_ptr(), x_dtype, M, x.size(-1), block_size,
                                                     float(threshold)};
  int8pass::blocks::linear(activation, weights.data(), int64_t(weights.size()), int8pass::kernel_for(M, x.size(-1)));
  return outputs;
}

// y [..., N] from x [..., K], codes weight_q [N, K] and bf16 block scales weight_scale [N, ceil(K / block_size)]
at::Tensor cpu_block_linear(const at::Tensor& x, const at::Tensor& weight_q, const at::Tensor& weight_scale,
                            const std::optional<at::Tensor>& bias, int64_t block_size, double threshold) {
  const int x_dtype = check_block_weight("llmint8::cpu_block_linear", x, weight_q, weight_scale, bias, block_size);
  std::vector<at::Tensor> biases;
  if (bias) biases.push_back(*bias);
  return run_block_linear(x, x_dtype, weight_q, weight_scale, biases, block_size, threshold)[0];
}

// [y_i] = [cpu_block_linear(x, weight_q[i], weight_scale[i], bias[i], block_size, threshold)] for weights that
// multiply the same x, in one call: x is quantized once and the weights are streamed in one parallel loop. bias is
// empty (none) or one per weight.
std::vector<at::Tensor> cpu_block_linear_group(const at::Tensor& x, at::TensorList weight_q, at::TensorList weight_scale,
                                               at::TensorList bias, int64_t block_size, double threshold) {
  const char* op = "llmint8::cpu_block_linear_group";
  const size_t count = check_group_lists(op, weight_q, weight_scale, bias);
  int x_dtype = 0;
  for (size_t i = 0; i < count; ++i)
    x_dtype = check_block_weight(op, x, weight_q[i], weight_scale[i],
                                 bias.empty() ? std::nullopt : std::optional<at::Tensor>(bias[i]), block_size);
  return run_block_linear(x, x_dtype, weight_q, weight_scale, bias, block_size, threshold);
}

// out [B, H, 1, Dv] = softmax(query . key^T * scale) . value for one query token per head: query [B, H, 1, D], key
// [B, KVH, S, D], value [B, KVH, S, Dv], query heads h attending to key/value head h / (H / KVH) (grouped-query
// attention, as scaled_dot_product_attention's enable_gqa; KVH = H is plain multi-head attention). attn_mask, as
// scaled_dot_product_attention's: boolean (false: left out) or in the query's dtype (added to the scores),
// broadcastable to [B, H, 1, S].
at::Tensor cpu_decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                const std::optional<at::Tensor>& attn_mask, double scale) {
  const char* op = "llmint8::cpu_decode_attention";
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu() && value.device().is_cpu(), op,
              ": all tensors must be on the CPU");
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4, op,
              ": query, key and value must be 4-D [batch, heads, length, head dim], got ", query.sizes(), ", ",
              key.sizes(), ", ", value.sizes());
  const int64_t B = query.size(0), H = query.size(1), KVH = key.size(1), S = key.size(2), D = query.size(3);
  TORCH_CHECK(query.size(2) == 1, op, ": query must hold one token per head, got ", query.sizes());
  TORCH_CHECK(key.size(0) == B && value.size(0) == B && value.size(1) == KVH && value.size(2) == S && key.size(3) == D,
              op, ": key [", B, ", KVH, S, ", D, "] and value [", B, ", KVH, S, Dv] must match query ", query.sizes(),
              ", got ", key.sizes(), " and ", value.sizes());
  TORCH_CHECK(KVH > 0 && H % KVH == 0, op, ": the query heads (", H, ") must be a multiple of the key/value heads (",
              KVH, ")");
  TORCH_CHECK(S > 0, op, ": the key/value cache is empty");
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(), op,
              ": query, key and value must have one dtype, got ", query.scalar_type(), ", ", key.scalar_type(), ", ",
              value.scalar_type());
  const int dtype = dtype_code(query, "query", op);
  at::Tensor mask;
  if (attn_mask) {
    TORCH_CHECK(attn_mask->device().is_cpu() && attn_mask->dim() == 4 && attn_mask->size(2) == 1 &&
                    attn_mask->size(3) == S && (attn_mask->size(0) == 1 || attn_mask->size(0) == B) &&
                    (attn_mask->size(1) == 1 || attn_mask->size(1) == H),
                op, ": attn_mask must be a CPU tensor broadcastable to [", B, ", ", H, ", 1, ", S, "], got ",
                attn_mask->sizes());
    TORCH_CHECK(attn_mask->scalar_type() == at::kBool || attn_mask->scalar_type() == query.scalar_type(), op,
                ": attn_mask must be boolean or in the query's dtype ", query.scalar_type(), ", got ",
                attn_mask->scalar_type());
    mask = attn_mask->expand({B, H, 1, S});  // broadcast dims read with stride 0
  }
  // only the head dim needs unit stride; a cache slice or an expanded tensor is read in place
  const at::Tensor q = query.stride(3) == 1 ? query : query.contiguous();
  const at::Tensor k = key.stride(3) == 1 ? key : key.contiguous();
  const at::Tensor v = value.stride(3) == 1 ? value : value.contiguous();
  at::Tensor out = at::empty({B, H, 1, value.size(3)}, query.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || H == 0 || value.size(3) == 0) return out;
  const int8pass::attention::DecodeAttention args{
      q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
      v.data_ptr(), v.stride(0), v.stride(1), v.stride(2), dtype,
      attn_mask ? mask.data_ptr() : nullptr, attn_mask && mask.scalar_type() == at::kBool,
      attn_mask ? mask.stride(0) : 0, attn_mask ? mask.stride(1) : 0, attn_mask ? mask.stride(3) : 0,
      B, H, KVH, S, D, value.size(3), float(scale), out.data_ptr()};
  int8pass::attention::decode_attention(args);
  return out;
}

// y [..., N] = x [..., K] . weight [N, K]^T + bias [N] for bfloat16 or float16 tensors (all one dtype), products and
// sums in float32, rounded once: a linear kept in floating point, for a few rows (cpu_fp_linear_kernels.h)
at::Tensor cpu_fp_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "llmint8::cpu_fp_linear";
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && (!bias || bias->device().is_cpu()), op,
              ": all tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": x must be bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.dim() == 2, op, ": weight must be ", x.scalar_type(),
              " [N, K], got ", weight.scalar_type(), " ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, op, ": x's last dim must be K = ", K, ", got ", x.sizes());
  if (bias)
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->dim() == 1 && bias->size(0) == N, op,
                ": bias must be a ", x.scalar_type(), " vector of N = ", N, ", got ", bias->scalar_type(), " ",
                bias->sizes());
  auto [y, M] = output_for(x, N);
  if (M == 0 || N == 0) return y;
  const at::Tensor x_c = x.contiguous(), w = weight.contiguous(), b = bias ? bias->contiguous() : at::Tensor();
  const auto run = x.scalar_type() == at::kBFloat16 ? int8pass::fp_linear::linear<int8pass::BF16>
                                                    : int8pass::fp_linear::linear<int8pass::F16>;
  run(x_c.data_ptr(), w.data_ptr(), b.defined() ? b.data_ptr() : nullptr, y.data_ptr(), M, N, K);
  return y;
}

// Which GEMM kernel a call with `rows` activation rows of `in_features` runs on this machine
std::string cpu_linear_kernel(int64_t rows, int64_t in_features) {
  return int8pass::kernel_name(int8pass::kernel_for(rows, in_features));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmint8, m) {
  m.def("cpu_linear(Tensor x, Tensor weight_q, Tensor weight_scale, Tensor? bias, float threshold, "
        "Tensor? outlier_weight=None, Tensor? code_sums=None) -> Tensor");
  m.def("cpu_linear_group(Tensor x, Tensor[] weight_q, Tensor[] weight_scale, Tensor[] bias, float threshold, "
        "Tensor[] code_sums) -> Tensor[]");
  m.def("cpu_block_linear(Tensor x, Tensor weight_q, Tensor weight_scale, Tensor? bias, int block_size, "
        "float threshold) -> Tensor");
  m.def("cpu_block_linear_group(Tensor x, Tensor[] weight_q, Tensor[] weight_scale, Tensor[] bias, int block_size, "
        "float threshold) -> Tensor[]");
  m.def("cpu_decode_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float scale) -> Tensor");
  m.def("cpu_fp_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("cpu_linear_kernel(int rows, int in_features) -> str", &cpu_linear_kernel);
}

TORCH_LIBRARY_IMPL(llmint8, CPU, m) {
  m.impl("cpu_linear", &cpu_linear);
  m.impl("cpu_linear_group", &cpu_linear_group);
  m.impl("cpu_block_linear", &cpu_block_linear);
  m.impl("cpu_block_linear_group", &cpu_block_linear_group);
  m.impl("cpu_decode_attention", &cpu_decode_attention);
  m.impl("cpu_fp_linear", &cpu_fp_linear);
}
