// The native decode kernels (int4_decode.cpp), for the decode steps built on them (decode_step.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace moe_edge {

// torch.cat([xs[e] @ W_e^T for e]) along rows, bf16; one x (shared by all) or one per weight.
at::Tensor int4_mm_cat(at::TensorList xs, at::TensorList ws, at::TensorList szs, int64_t g);
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, int64_t g);
// x [M, D] in one layer's input order (act-order perm), or contiguous as it is.
at::Tensor ordered(const at::Tensor& x, const std::optional<at::Tensor>& perm);
// E int4 SiLU-GLU MLPs with fused gate+up on one input x [M, D] bf16 -> bf16 [E*M, D].
at::Tensor mlps(const at::Tensor& x, at::TensorList gate_up, at::TensorList gate_up_sz,
                const c10::List<std::optional<at::Tensor>>& gate_up_perm, int64_t gate_up_group,
                at::TensorList down, at::TensorList down_sz,
                const c10::List<std::optional<at::Tensor>>& down_perm, int64_t down_group,
                at::ScalarType dtype);
// One query row per head over a bf16 KV cache: q fp32 [1, H, 1, D], k, v [1, K, S, D] -> fp32.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);

}  // namespace moe_edge
