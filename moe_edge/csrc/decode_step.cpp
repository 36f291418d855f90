// A decoder layer's two blocks for one decode row (batch 1, one new token), each in one call
// from Python: the attention block (norm, q/k/v, rotary, KV cache write, attention, o_proj,
// residual) and the MLP block (norm, router and top-k, shared and routed experts, residual).
//
// Each runs the ATen ops and kernels that model/attention.py, model/moe.py and
// quant/qlinear.py run for that row, in the same dtypes on the same shapes, so the output is
// bit for bit the Python path's (tests/test_native.py compares them). What it saves is the
// Python between the ops: ~30 module calls, views and casts per block, which are most of a
// small model's time per token (the demo's 128-wide layers run each op in a microsecond or
// two). Built with int4_decode.cpp into one library (quant/native.py).
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "int4_decode.h"

namespace moe_edge {
namespace {

// A QuantLinear on the native kernel, as QuantLinear.forward runs it: x [M, K] -> [M, N] in `out`.
struct Int4Linear {
  at::Tensor packed, scale_zeros;
  std::optional<at::Tensor> perm, bias;
  int64_t group;

  at::Tensor operator()(const at::Tensor& x, at::ScalarType out) const {
    at::Tensor y = int4_mm(ordered(x.to(at::kBFloat16), perm), packed, scale_zeros, group);
    if (bias) y = y + *bias;
    return y.to(out);
  }
};

// A QuantMLP with fused gate+up, both on the native kernel (native.mlps_usable).
struct Int4Mlp {
  Int4Linear gate_up, down;
};

// mlps() on these MLPs in this order: QuantMLP.run (one) and run_experts (a layer's top-k).
at::Tensor run_mlps(const std::vector<const Int4Mlp*>& ms, const at::Tensor& x, at::ScalarType dtype) {
  std::vector<at::Tensor> gu, gu_sz, down, down_sz;
  c10::List<std::optional<at::Tensor>> gu_perm, down_perm;
  for (const Int4Mlp* m : ms) {
    gu.push_back(m->gate_up.packed);
    gu_sz.push_back(m->gate_up.scale_zeros);
    gu_perm.push_back(m->gate_up.perm);
    down.push_back(m->down.packed);
    down_sz.push_back(m->down.scale_zeros);
    down_perm.push_back(m->down.perm);
  }
  return mlps(x, gu, gu_sz, gu_perm, ms[0]->gate_up.group, down, down_sz, down_perm, ms[0]->down.group, dtype);
}

// x * cos + roll(x) * signed sin: layers.apply_rotary.
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return x * cos + at::roll(x, {x.size(-1) / 2}, {-1}) * sin;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  return at::rms_norm(x, {w.size(0)}, w, eps);
}

// x + Attention(RMSNorm(x)) for x fp32 [1, 1, D] at position `pos` (> 0) of a bf16 KV cache,
// whose k and v [1, K, capacity, Hd] get this token's keys and values: Attention.forward
// with a fused qkv and the native decode_attention.
class AttentionStep {
 public:
  AttentionStep(at::Tensor norm, double eps, Int4Linear qkv, Int4Linear o, std::optional<at::Tensor> q_norm,
                std::optional<at::Tensor> k_norm, bool norm_per_head, double qk_eps, int64_t heads,
                int64_t kv_heads, int64_t head_dim, double scale)
      : norm_(std::move(norm)), eps_(eps), qkv_(std::move(qkv)), o_(std::move(o)), q_norm_(std::move(q_norm)),
        k_norm_(std::move(k_norm)), per_head_(norm_per_head), qk_eps_(qk_eps), H_(heads), K_(kv_heads),
        Hd_(head_dim), scale_(scale) {
    TORCH_CHECK(q_norm_.has_value() == k_norm_.has_value(), "AttentionStep: q and k norms come together");
  }

  at::Tensor operator()(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t pos) const {
    TORCH_CHECK(x.dim() == 3 && x.size(0) == 1 && x.size(1) == 1 && x.scalar_type() == at::kFloat,
                "AttentionStep: x must be fp32 [1, 1, D]");
    TORCH_CHECK(pos > 0 && pos < k_cache.size(2) && k_cache.scalar_type() == at::kBFloat16,
                "AttentionStep: a position inside a bf16 cache after the first");
    const at::Tensor h = rms_norm(x, norm_, eps_);
    const at::Tensor qkv = qkv_(h.reshape({-1, h.size(-1)}), at::kFloat).view({1, 1, -1});  // [1, 1, (H+2K) Hd]
    at::Tensor q, k, v;  // [1, H|K, 1, Hd]
    if (!q_norm_) {  // q's and k's heads adjacent: one rotary
      const auto parts = qkv.view({1, 1, H_ + 2 * K_, Hd_}).transpose(1, 2).split_with_sizes({H_ + K_, K_}, 1);
      const auto qk = rotary(parts[0], cos, sin).split_with_sizes({H_, K_}, 1);
      q = qk[0], k = qk[1], v = parts[1];
    } else {
      const auto parts = qkv.split_with_sizes({H_ * Hd_, K_ * Hd_, K_ * Hd_}, -1);
      q = parts[0], k = parts[1], v = parts[2];
      if (!per_head_) q = rms_norm(q, *q_norm_, qk_eps_), k = rms_norm(k, *k_norm_, qk_eps_);
      q = q.view({1, 1, -1, Hd_}).transpose(1, 2);
      k = k.view({1, 1, -1, Hd_}).transpose(1, 2);
      v = v.view({1, 1, -1, Hd_}).transpose(1, 2);
      if (per_head_) q = rms_norm(q, *q_norm_, qk_eps_), k = rms_norm(k, *k_norm_, qk_eps_);
      q = rotary(q, cos, sin), k = rotary(k, cos, sin);
    }
    k_cache.narrow(2, pos, 1).copy_(k);
    v_cache.narrow(2, pos, 1).copy_(v);
    const at::Tensor out = decode_attention(q, k_cache.narrow(2, 0, pos + 1), v_cache.narrow(2, 0, pos + 1), scale_);
    const at::Tensor a = out.transpose(1, 2).reshape({1, 1, -1});
    return x + o_(a.reshape({-1, a.size(-1)}), at::kFloat).view({1, 1, -1});
  }

 private:
  at::Tensor norm_;
  double eps_;
  Int4Linear qkv_, o_;
  std::optional<at::Tensor> q_norm_, k_norm_;
  bool per_head_;
  double qk_eps_;
  int64_t H_, K_, Hd_;
  double scale_;
};

// x + MLP(RMSNorm(x)) for x fp32 [1, 1, D]: a dense QuantMLP (no router), or a MoE block with
// resident int4 experts: softmax router, top-k (renormalised or not), the k experts in one
// mlps call in top-k order, their weighted sum, plus the shared experts (gated or not).
// Built without experts, it serves a MoE block whose experts an offloading provider holds:
// route, shared and combine are the parts before and after the provider's own call.
class MlpStep {
 public:
  MlpStep(at::Tensor norm, double eps, std::optional<at::Tensor> router, int64_t top_k, bool renormalize,
          std::optional<Int4Mlp> shared, std::optional<at::Tensor> shared_gate, std::vector<Int4Mlp> experts)
      : norm_(std::move(norm)), eps_(eps), router_(std::move(router)), top_k_(top_k), renorm_(renormalize),
        shared_(std::move(shared)), shared_gate_(std::move(shared_gate)), experts_(std::move(experts)) {
    TORCH_CHECK(router_ ? top_k_ > 0 && (experts_.empty() || int64_t(experts_.size()) == router_->size(0))
                        : shared_.has_value(),
                "MlpStep: a router (with one MLP per expert, or none), or a dense MLP");
  }

  at::Tensor operator()(const at::Tensor& x) const {
    if (!router_) {
      const auto [flat, xb] = normed(x);
      return x + shared(flat, xb)->view(x.sizes());
    }
    TORCH_CHECK(!experts_.empty(), "MlpStep: built without experts (an offloading provider holds them)");
    const auto [flat, xb, weights, ids] = route(x);
    const std::optional<at::Tensor> s = shared(flat, xb);
    const at::Tensor picked = ids.contiguous();
    const int64_t* id = picked.data_ptr<int64_t>();
    std::vector<const Int4Mlp*> ms;
    for (int64_t a = 0; a < top_k_; ++a) ms.push_back(&experts_.at(id[a]));
    return combine(x, weights, run_mlps(ms, xb, at::kFloat), s);
  }

  // (RMSNorm(x) as [1, D], it in bf16, top-k weights [1, A], expert ids [1, A]): MoEBlock's router.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route(const at::Tensor& x) const {
    TORCH_CHECK(router_.has_value(), "MlpStep: a dense MLP has no router");
    const auto [flat, xb] = normed(x);
    const at::Tensor probs = at::softmax(at::linear(flat, *router_), -1);  // [1, E]
    auto [weights, ids] = at::topk(probs, top_k_, -1);  // [1, A]
    if (renorm_) weights = weights / weights.sum({-1}, true);
    return {flat, xb, weights, ids};
  }

  // The shared experts' output, fp32 [1, D] (times the sigmoid gate where there is one).
  std::optional<at::Tensor> shared(const at::Tensor& flat, const at::Tensor& xb) const {
    if (!shared_) return std::nullopt;
    at::Tensor out = run_mlps({&*shared_}, xb, at::kFloat).to(at::kFloat);
    if (shared_gate_) out = at::sigmoid(at::linear(flat, *shared_gate_)) * out;
    return out;
  }

  // combine() of routed experts an offloading provider holds (landed in its slots), given in
  // top-k order and run in one mlps call, as operator() runs resident ones.
  at::Tensor finish(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& xb,
                    const std::vector<Int4Mlp>& experts, const std::optional<at::Tensor>& shared) const {
    return combine(x, weights, rows(xb, experts), shared);
  }

  // Some routed experts' outputs [n, D], in the order given: each row equal bit for bit
  // to its row in finish()'s one call (an expert's row meets the same loops alone), so a
  // provider's experts can run in groups as their loads land and combine() takes the rows.
  at::Tensor rows(const at::Tensor& xb, const std::vector<Int4Mlp>& experts) const {
    TORCH_CHECK(!experts.empty(), "MlpStep.rows: no experts");
    std::vector<const Int4Mlp*> ms;
    for (const Int4Mlp& m : experts) ms.push_back(&m);
    return run_mlps(ms, xb, at::kFloat);
  }

  // x + sum_a weights[a] ys[a] (+ shared): ys [A, D], the experts' outputs in top-k order.
  at::Tensor combine(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& ys,
                     const std::optional<at::Tensor>& shared) const {
    at::Tensor out = (weights.view({-1, 1}) * ys.to(at::kFloat)).sum({0}, true);
    if (shared) out = out + *shared;
    return x + out.view(x.sizes());
  }

 private:
  // RMSNorm(x) [1, D] and its bf16 copy (ExpertInput: cast once for every expert).
  std::pair<at::Tensor, at::Tensor> normed(const at::Tensor& x) const {
    TORCH_CHECK(x.dim() == 3 && x.size(0) == 1 && x.size(1) == 1 && x.scalar_type() == at::kFloat,
                "MlpStep: x must be fp32 [1, 1, D]");
    const at::Tensor flat = rms_norm(x, norm_, eps_).reshape({-1, x.size(-1)});
    return {flat, flat.to(at::kBFloat16)};
  }

  at::Tensor norm_;
  double eps_;
  std::optional<at::Tensor> router_;
  int64_t top_k_;
  bool renorm_;
  std::optional<Int4Mlp> shared_;
  std::optional<at::Tensor> shared_gate_;
  std::vector<Int4Mlp> experts_;
};

}  // namespace
}  // namespace moe_edge

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace moe_edge;
  namespace py = pybind11;
  // the steps touch no Python object: other threads run while they compute (an offloaded
  // model's loader threads start and finish their reads during the shared experts, the
  // attention of the next layers), as they do during any ATen op called from Python
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  py::class_<Int4Linear>(m, "Int4Linear")
      .def(py::init([](at::Tensor packed, at::Tensor scale_zeros, std::optional<at::Tensor> perm,
                       std::optional<at::Tensor> bias, int64_t group) {
        return Int4Linear{std::move(packed), std::move(scale_zeros), std::move(perm), std::move(bias), group};
      }));
  py::class_<Int4Mlp>(m, "Int4Mlp").def(py::init([](Int4Linear gate_up, Int4Linear down) {
    return Int4Mlp{std::move(gate_up), std::move(down)};
  }));
  py::class_<AttentionStep>(m, "AttentionStep")
      .def(py::init<at::Tensor, double, Int4Linear, Int4Linear, std::optional<at::Tensor>, std::optional<at::Tensor>,
                    bool, double, int64_t, int64_t, int64_t, double>())
      .def("__call__", &AttentionStep::operator(), nogil);
  py::class_<MlpStep>(m, "MlpStep")
      .def(py::init<at::Tensor, double, std::optional<at::Tensor>, int64_t, bool, std::optional<Int4Mlp>,
                    std::optional<at::Tensor>, std::vector<Int4Mlp>>())
      .def("__call__", &MlpStep::operator(), nogil)
      .def("route", &MlpStep::route, nogil)
      .def("shared", &MlpStep::shared, nogil)
      .def("combine", &MlpStep::combine, nogil)
      .def("finish", &MlpStep::finish, nogil)
      .def("rows", &MlpStep::rows, nogil);
}
