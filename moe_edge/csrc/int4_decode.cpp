// Decode-time int4 matmuls on the CPU, on PyTorch's own packed layout: y = x W^T for a few
// rows x, many weights per call (a layer's experts in one parallel region).
//
// The weight is what `_convert_weight_to_int4pack_for_cpu` packs on AVX512 builds: uint8
// [N/64, K, 32]; byte i of input row k in a block holds column i in its low nibble and column
// i + 32 in its high nibble. scale_zeros is bf16 [K/g, N, 2]: W = (q - 8) s + zero.
//
// Two input rows k, k+1 of a block are 64 contiguous bytes. A merge-masked VPERMB spreads
// them into bf16 pairs (W[n, k], W[n, k+1]) for 16 columns at a time, each high byte kept
// from a register of 0x43: bf16 0x43XX is 128 + q exactly. VDPBF16PS multiplies those pairs
// by the broadcast pair (x_k, x_{k+1}), exactly, accumulating in fp32. Per group and column:
//   D = sum_k x_k (128 + q_k),   y += s D + (zero - 136 s) sum_k x_k
// which is sum_k x_k ((q_k - 8) s + zero), the kernel's dequantised weight. The offset costs
// bits where x has a mean (sum_k x_k large): the output is then within one bf16 step of the
// exact result, and rounded as it is for 97.8-99.2% of outputs (99.7-99.9% for zero-mean x,
// against 99.99-100% for PyTorch's kernel, which pays in speed on streamed weights). Exact
// alternatives (a lookup of bf16 q - 8, or 1 + q/16) decode the 16B shape 15-20% slower.

// The int8 variant (configure(INT8, ...)), for CPUs where the bf16 variant's shuffles and dot
// products cost more than the weights take to stream (the AMD EPYC). Each group of g inputs
// of a row is quantised to int8, x ~ dx xq (dx = max|x| / 127, round to nearest even), as
// llama.cpp quantises activations to Q8. One two-source byte permute (VPERMI2B) turns four
// input rows of a block into the four nibbles of 16 columns per 32-bit lane; VPDPBUSD sums
// q_k xq_k over them, exactly, in int32. Per group and column:
//   y += s dx D + (zero - 8 s) dx sum_k xq_k
// which is sum_k (dx xq_k) ((q_k - 8) s + zero): the kernel's weight times the quantised x.
// Half the shuffles and dot products of the bf16 variant per weight byte (1.5x its rate on
// weights in the caches, AMD EPYC); the error is the activations' 8-bit rounding (~0.3-0.7%
// relative on random rows against ~0.2% for the bf16 variant).

// Every row is computed the same way whatever else is in the call (other rows, other
// weights, thread count): same chains, same order. So one expert's output is bit for bit the
// same alone or batched, which the tests rely on.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "int4_decode.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t BLOCK = 64;  // output columns per block of the packed layout
constexpr int64_t SERIAL_BYTES = 131072;  // weight bytes x row pairs below which a call runs on one thread

// Set once per process by quant/native.py (configure), from the CPU. `prefetch`: bytes ahead
// in a thread's weight stream, into the L2 (at most a block; 0: none). On weights in 4 KiB
// pages, where the hardware's prefetchers stop at every page, 64 KiB ahead streamed 13.8-16.6
// GB/s against 9.4-11 with none (Intel Xeon, 2 threads); on the AMD EPYC, weights on huge
// pages (as a loaded model's are), software prefetches cost more than they save.
enum Dots : int64_t { BF16 = 0, INT8 = 1 };
int64_t dots = BF16, prefetch = 65536;

struct Job {  // one weight of a call
  const uint8_t* w;       // [N/64, K, 32]
  const uint32_t* sz;     // [K/g, N] pairs of bf16 (s, zero) as 32-bit words
  const uint16_t* x;      // [M, K] bf16
  const int8_t* xq;       // [M, K] int8 (INT8: x ~ dx xq)
  const float* dx;        // [M, K/g] (INT8)
  const float* xsum;      // [M, K/g]: sum of x (BF16), of dx xq (INT8)
  uint16_t* y;            // [M, N] bf16
  int64_t M, N, K;
};

// Prefetch the byte `ahead` bytes past p in a thread's stream: p's block ends at `end`, the
// thread's next block (if any) starts at `next`.
inline void prefetch_ahead(const uint8_t* p, int64_t ahead, const uint8_t* end, const uint8_t* next,
                           int64_t next_bytes) {
  const int64_t over = p + ahead - end;  // past this block: into the next, if that far
  const uint8_t* a = over < 0 ? p + ahead : over < next_bytes ? next + over : nullptr;
  if (a) _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T2);
}

inline __m512 bf16_lo(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline __m512 bf16_hi(__m512i v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int32_t(0xFFFF0000u)))); }

// The bf16 variant's dot products: bf16 128 + q, two chains per column subtile (even and
// odd pairs of inputs).
struct Bf16Dots {
  static constexpr float OFFSET = 136.f;  // 128 + 8: y += s D + (zero - OFFSET s) sum(x)
  struct Acc {
    __m512 chain[2];
  };
  static void zero(Acc& a) { a.chain[0] = a.chain[1] = _mm512_setzero_ps(); }
  // Inputs k..k+3 (the 128 bytes at p) into acc[r][s] for rows r of x from x_at (row 0, input k).
  template <int R>
  static void step(const uint8_t* p, const Job& j, int64_t x_at, Acc (&acc)[R][4]) {
    alignas(64) static const uint8_t idx_bytes[2][64] = {
#define Q(i) uint8_t(i), 0, uint8_t(32 + (i)), 0  // (odd bytes: zeroed by the mask)
        {Q(0), Q(1), Q(2), Q(3), Q(4), Q(5), Q(6), Q(7), Q(8), Q(9), Q(10), Q(11), Q(12), Q(13), Q(14), Q(15)},
        {Q(16), Q(17), Q(18), Q(19), Q(20), Q(21), Q(22), Q(23), Q(24), Q(25), Q(26), Q(27), Q(28), Q(29), Q(30), Q(31)},
#undef Q
    };
    const __m512i idx0 = _mm512_load_si512(idx_bytes[0]), idx1 = _mm512_load_si512(idx_bytes[1]);
    const __m512i high = _mm512_set1_epi8(0x43), nib = _mm512_set1_epi8(0x0F);
    const __mmask64 even = 0x5555555555555555ull;  // low bytes of the bf16 lanes: from the weight
#pragma GCC unroll 2
    for (int c = 0; c < 2; ++c) {
      const __m512i v = _mm512_loadu_si512(p + 64 * c);  // inputs k+2c, k+2c+1
      const __m512i lo = _mm512_and_si512(v, nib);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
      const __m512i w4[4] = {  // bf16 128 + q of 16 columns x 2 inputs each
          _mm512_mask_permutexvar_epi8(high, even, idx0, lo), _mm512_mask_permutexvar_epi8(high, even, idx1, lo),
          _mm512_mask_permutexvar_epi8(high, even, idx0, hi), _mm512_mask_permutexvar_epi8(high, even, idx1, hi)};
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) {
        int32_t pair;  // (x_k, x_k+1) as one 32-bit word
        std::memcpy(&pair, j.x + x_at + r * j.K + 2 * c, sizeof pair);
        const __m512i xp = _mm512_set1_epi32(pair);
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s)
          acc[r][s].chain[c] = _mm512_dpbf16_ps(acc[r][s].chain[c], (__m512bh)w4[s], (__m512bh)xp);
      }
    }
  }
  // D = sum_k x_k (128 + q_k) of a group, fp32; i: row x group
  static __m512 dot(const Acc& a, const Job&, int64_t) { return _mm512_add_ps(a.chain[0], a.chain[1]); }
};

// The int8 variant's (see the top of the file): q against int8 x, exact in int32.
struct Int8Dots {
  static constexpr float OFFSET = 8.f;
  using Acc = __m512i;  // at most g * 15 * 127 * 4 per lane: exact for any group size in use
  static void zero(Acc& a) { a = _mm512_setzero_si512(); }
  template <int R>
  static void step(const uint8_t* p, const Job& j, int64_t x_at, Acc (&acc)[R][4]) {
    alignas(64) static const uint8_t idx_bytes[2][64] = {  // lane n: byte n of inputs k, k+1, k+2, k+3
#define Q(i) uint8_t(i), uint8_t(32 + (i)), uint8_t(64 + (i)), uint8_t(96 + (i))
        {Q(0), Q(1), Q(2), Q(3), Q(4), Q(5), Q(6), Q(7), Q(8), Q(9), Q(10), Q(11), Q(12), Q(13), Q(14), Q(15)},
        {Q(16), Q(17), Q(18), Q(19), Q(20), Q(21), Q(22), Q(23), Q(24), Q(25), Q(26), Q(27), Q(28), Q(29), Q(30), Q(31)},
#undef Q
    };
    const __m512i idx0 = _mm512_load_si512(idx_bytes[0]), idx1 = _mm512_load_si512(idx_bytes[1]);
    const __m512i nib = _mm512_set1_epi8(0x0F);
    const __m512i a = _mm512_loadu_si512(p), b = _mm512_loadu_si512(p + 64);  // inputs k, k+1; k+2, k+3
    const __m512i alo = _mm512_and_si512(a, nib), blo = _mm512_and_si512(b, nib);
    const __m512i ahi = _mm512_and_si512(_mm512_srli_epi16(a, 4), nib);
    const __m512i bhi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
    const __m512i w4[4] = {  // q of 16 columns x 4 inputs each
        _mm512_permutex2var_epi8(alo, idx0, blo), _mm512_permutex2var_epi8(alo, idx1, blo),
        _mm512_permutex2var_epi8(ahi, idx0, bhi), _mm512_permutex2var_epi8(ahi, idx1, bhi)};
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) {
      int32_t quad;  // xq_k .. xq_k+3
      std::memcpy(&quad, j.xq + x_at + r * j.K, sizeof quad);
      const __m512i xp = _mm512_set1_epi32(quad);
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) acc[r][s] = _mm512_dpbusd_epi32(acc[r][s], w4[s], xp);
    }
  }
  // dx sum_k xq_k q_k, fp32
  static __m512 dot(const Acc& a, const Job& j, int64_t i) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(j.dx[i]));
  }
};

// Columns n0..n0+63 of rows m0..m0+R-1 of one job, with dot products D.
template <int R, class D>
void block_rows(const Job& j, int64_t n0, int64_t m0, int64_t g, const uint8_t* next, int64_t next_bytes) {
  const int64_t K = j.K, groups = K / g;
  const uint8_t* w = j.w + n0 * K / 2;  // this block's [K, 32]
  const uint8_t* end = w + K * 32;  // past it, prefetch from the start of the thread's next block
  // at most a block ahead: a block's start is then fetched while the one before it runs
  const int64_t ahead_bytes = std::min(prefetch, K * 32);
  __m512 y[R][4];
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < 4; ++s) y[r][s] = _mm512_setzero_ps();
  for (int64_t gi = 0; gi < groups; ++gi) {
    typename D::Acc acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int s = 0; s < 4; ++s) D::zero(acc[r][s]);
    const uint8_t* wg = w + gi * g * 32;
    for (int64_t k = 0; k < g; k += 4) {
      const uint8_t* p = wg + k * 32;
      if (ahead_bytes) {
        prefetch_ahead(p, ahead_bytes, end, next, next_bytes);
        prefetch_ahead(p + 64, ahead_bytes, end, next, next_bytes);
      }
      D::template step<R>(p, j, m0 * K + gi * g + k, acc);
    }
    const uint32_t* sz = j.sz + gi * j.N + n0;
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      const __m512i v = _mm512_loadu_si512(sz + 16 * s);
      const __m512 sc = bf16_lo(v);
      const __m512 c = _mm512_fnmadd_ps(_mm512_set1_ps(D::OFFSET), sc, bf16_hi(v));  // zero - OFFSET s
      for (int r = 0; r < R; ++r) {
        const int64_t i = (m0 + r) * groups + gi;
        y[r][s] = _mm512_fmadd_ps(sc, D::dot(acc[r][s], j, i), _mm512_fmadd_ps(c, _mm512_set1_ps(j.xsum[i]), y[r][s]));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < 4; ++s)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(j.y + (m0 + r) * j.N + n0 + 16 * s),
                          (__m256i)_mm512_cvtneps_pbh(y[r][s]));
}

template <class D>
void block_all_rows(const Job& j, int64_t n0, int64_t g, const uint8_t* next, int64_t next_bytes) {
  int64_t m = 0;
  for (; m + 2 <= j.M; m += 2) block_rows<2, D>(j, n0, m, g, next, next_bytes);
  if (m < j.M) block_rows<1, D>(j, n0, m, g, next, next_bytes);
}

void run_block(const Job& j, int64_t n0, int64_t g, const uint8_t* next, int64_t next_bytes) {
  if (dots == INT8)
    block_all_rows<Int8Dots>(j, n0, g, next, next_bytes);
  else
    block_all_rows<Bf16Dots>(j, n0, g, next, next_bytes);
}

struct Input {  // what the kernels read of one x besides x itself
  std::vector<float> sum;  // [M, K/g]: sum of x (BF16), of dx xq (INT8)
  std::vector<float> dx;   // [M, K/g] (INT8)
  std::vector<int8_t> q;   // [M, K] (INT8)
};

// fp32 of 16 bf16 values
inline __m512 bf16x16(const uint16_t* p) {
  return bf16_lo(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}

// Per group of g inputs of each row, in one fixed order: the fp32 sum (BF16), or the int8
// quantisation and its sum (INT8).
Input prepare(const at::Tensor& x, int64_t g) {
  const int64_t M = x.size(0), K = x.size(1), n = M * (K / g);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  Input in;
  in.sum.resize(n);
  if (dots == BF16) {
    for (int64_t i = 0; i < n; ++i) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t k = 0; k < g; k += 16) a = _mm512_add_ps(a, bf16x16(xp + i * g + k));
      in.sum[i] = _mm512_reduce_add_ps(a);
    }
    return in;
  }
  in.dx.resize(n);
  in.q.resize(M * K);
  for (int64_t i = 0; i < n; ++i) {
    __m512 top = _mm512_setzero_ps();
    for (int64_t k = 0; k < g; k += 16) top = _mm512_max_ps(top, _mm512_abs_ps(bf16x16(xp + i * g + k)));
    const float amax = _mm512_reduce_max_ps(top);
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m512i total = _mm512_setzero_si512();
    for (int64_t k = 0; k < g; k += 16) {
      const __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(bf16x16(xp + i * g + k), inv),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(in.q.data() + i * g + k), _mm512_cvtsepi32_epi8(q));
      total = _mm512_add_epi32(total, q);
    }
    in.dx[i] = amax / 127.f;
    in.sum[i] = in.dx[i] * float(_mm512_reduce_add_epi32(total));
  }
  return in;
}

void check(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, int64_t g) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "int4_mm: x must be contiguous bf16 [M, K]");
  const int64_t K = x.size(1);
  TORCH_CHECK(g >= 16 && g % 16 == 0 && K % g == 0, "int4_mm: K must be a multiple of the group size, a multiple of 16");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 2 && w.size(1) == K / 2 &&
                  w.size(0) % BLOCK == 0,
              "int4_mm: the packed weight must be contiguous uint8 [N, K/2], N a multiple of 64");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3 && sz.size(0) == K / g &&
                  sz.size(1) == w.size(0) && sz.size(2) == 2,
              "int4_mm: scale_zeros must be contiguous bf16 [K/g, N, 2]");
}

}  // namespace

namespace moe_edge {

// torch.cat([xs[e] @ W_e^T for e]) along rows, [sum of rows, N]; one x is shared by all.
at::Tensor int4_mm_cat(at::TensorList xs, at::TensorList ws, at::TensorList szs, int64_t g) {
  const size_t E = ws.size();
  TORCH_CHECK(E > 0 && szs.size() == E && (xs.size() == E || xs.size() == 1),
              "int4_mm_cat: one x (shared) or one per weight, one scale_zeros per weight");
  int64_t rows = 0;
  for (size_t e = 0; e < E; ++e) {
    const at::Tensor& x = xs[xs.size() == 1 ? 0 : e];
    check(x, ws[e], szs[e], g);
    TORCH_CHECK(ws[e].size(0) == ws[0].size(0), "int4_mm_cat: the weights must have one output width");
    rows += x.size(0);
  }
  const int64_t N = ws[0].size(0);
  at::Tensor out = at::empty({rows, N}, xs[0].options());
  std::vector<Input> inputs;
  inputs.reserve(E);
  std::vector<Job> jobs;
  std::vector<int64_t> cost{0};  // prefix sums of K x row pairs per block (bytes / 32), to split the work evenly
  int64_t row = 0;
  for (size_t e = 0; e < E; ++e) {
    const at::Tensor& x = xs[xs.size() == 1 ? 0 : e];
    const int64_t M = x.size(0), K = x.size(1);
    if (e == 0 || xs.size() > 1) inputs.push_back(prepare(x, g));
    const Input& in = inputs.back();
    jobs.push_back({ws[e].data_ptr<uint8_t>(), reinterpret_cast<const uint32_t*>(szs[e].data_ptr()),
                    reinterpret_cast<const uint16_t*>(x.data_ptr()), in.q.data(), in.dx.data(), in.sum.data(),
                    reinterpret_cast<uint16_t*>(out.data_ptr()) + row * N, M, N, K});
    row += M;
    for (int64_t b = 0; b < N / BLOCK; ++b) cost.push_back(cost.back() + K * ((M + 1) / 2));
  }
  const int64_t tasks = int64_t(cost.size()) - 1, total = cost.back();
  if (tasks == 0) return out;
  std::vector<int64_t> first_block(E + 1, 0);  // task index of each job's first block
  for (size_t e = 0; e < E; ++e) first_block[e + 1] = first_block[e] + jobs[e].N / BLOCK;
  // a parallel region costs a few microseconds: small calls (the demo's 128x128) run inline
  const int64_t parts = total * 32 < SERIAL_BYTES ? 1 : std::min<int64_t>(at::get_num_threads(), tasks);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      // the tasks that start within this part's share of the cost
      int64_t t = std::lower_bound(cost.begin(), cost.end(), total * p / parts) - cost.begin();
      const int64_t t_end = p + 1 == parts ? tasks : std::lower_bound(cost.begin(), cost.end(), total * (p + 1) / parts) - cost.begin();
      auto block = [&](int64_t t) {  // job and first column of task t
        const size_t e = std::upper_bound(first_block.begin(), first_block.end(), t) - first_block.begin() - 1;
        return std::make_pair(&jobs[e], (t - first_block[e]) * BLOCK);
      };
      for (; t < t_end; ++t) {
        const auto [job, n0] = block(t);
        const uint8_t* next = nullptr;
        int64_t next_bytes = 0;
        if (t + 1 < t_end) {
          const auto [job1, n1] = block(t + 1);
          next = job1->w + n1 * job1->K / 2;
          next_bytes = job1->K * 32;
        }
        run_block(*job, n0, g, next, next_bytes);
      }
    }
  });
  return out;
}

void configure(int64_t variant, int64_t prefetch_bytes) {
  TORCH_CHECK(variant == BF16 || variant == INT8, "configure: dot products 0 (bf16) or 1 (int8)");
  TORCH_CHECK(prefetch_bytes >= 0, "configure: prefetch bytes must be >= 0");
  dots = variant;
  prefetch = prefetch_bytes;
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, int64_t g) {
  return int4_mm_cat({x}, {w}, {sz}, g);
}

// x [M, D] permuted for one layer's input order (act-order), or as it is.
at::Tensor ordered(const at::Tensor& x, const std::optional<at::Tensor>& perm) {
  return perm.has_value() ? at::index_select(x, 1, *perm) : x.contiguous();
}

// E int4 MLPs with fused gate+up on one input x [M, D] (bf16): rows e*M.. of the result are
// MLP e's output, bf16 [E*M, D]. The same ATen ops, on the same shapes, as
// quant/qlinear.py's QuantMLP.run (E = 1) and run_experts (M = 1) run from Python, so the
// same bits: gate+up of all E in one int4_mm_cat, silu(gate in `dtype`) * up, cast to bf16,
// then each MLP's down projection on its rows in a second int4_mm_cat. What it saves is the
// Python between those ops (~15 us a call while the weights stream through the caches).
at::Tensor mlps(const at::Tensor& x, at::TensorList gate_up, at::TensorList gate_up_sz,
                const c10::List<std::optional<at::Tensor>>& gate_up_perm, int64_t gate_up_group,
                at::TensorList down, at::TensorList down_sz,
                const c10::List<std::optional<at::Tensor>>& down_perm, int64_t down_group,
                at::ScalarType dtype) {
  const size_t E = gate_up.size();
  TORCH_CHECK(E > 0 && gate_up_sz.size() == E && gate_up_perm.size() == E && down.size() == E &&
                  down_sz.size() == E && down_perm.size() == E,
              "mlps: one gate_up, down, scale_zeros and perm per MLP");
  const int64_t M = x.size(0), I = gate_up[0].size(0) / 2;
  bool permuted = false;
  for (size_t e = 0; e < E; ++e) permuted = permuted || gate_up_perm.get(e).has_value();
  std::vector<at::Tensor> xs{x.contiguous()};  // shared by all, or one per MLP in its order
  if (permuted) {
    xs.clear();
    for (size_t e = 0; e < E; ++e) xs.push_back(ordered(x, gate_up_perm.get(e)));
  }
  const at::Tensor gu = int4_mm_cat(xs, gate_up, gate_up_sz, gate_up_group);  // [E*M, 2I]
  const at::Tensor h = at::mul(at::silu(gu.narrow(1, 0, I).to(dtype)), gu.narrow(1, I, I)).to(at::kBFloat16);
  std::vector<at::Tensor> hs;
  for (size_t e = 0; e < E; ++e) hs.push_back(ordered(h.narrow(0, e * M, M), down_perm.get(e)));
  return int4_mm_cat(hs, down, down_sz, down_group);
}


}  // namespace moe_edge

namespace {

// One decode step of attention over a bf16 KV cache: out[h] = softmax(q[h] K^T scale) V, one
// query row per head, keys and values of head h / (H/K) (GQA), fp32 accumulation. Reads the
// cache once at its 16-bit width; PyTorch's CPU SDPA on bf16 inputs runs 2-4x slower than on
// fp32 for one query row, and upcasting the cache each step costs more than the attention.
void attend_head(const float* q, const uint16_t* k, const uint16_t* v, int64_t S, int64_t D,
                 int64_t k_step, int64_t v_step, float scale, float* p, float* out) {
  float top = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    const uint16_t* kr = k + s * k_step;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512i kw = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kr + d)));
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), bf16_lo(kw), acc);
    }
    p[s] = _mm512_reduce_add_ps(acc) * scale;
    top = std::max(top, p[s]);
  }
  float total = 0.f;
  for (int64_t s = 0; s < S; ++s) total += (p[s] = std::exp(p[s] - top));
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    const uint16_t* vr = v + s * v_step;
    const __m512 w = _mm512_set1_ps(p[s] / total);
    for (int64_t d = 0; d < D; d += 16) {
      const __m512i vw = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vr + d)));
      _mm512_storeu_ps(out + d, _mm512_fmadd_ps(w, bf16_lo(vw), _mm512_loadu_ps(out + d)));
    }
  }
}

}  // namespace

namespace moe_edge {

// q fp32 [1, H, 1, D]; k, v bf16 [1, K, S, D] (views into a longer cache: any head and
// position strides, unit stride along D); D a multiple of 16. -> fp32 [1, H, 1, D].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1 && q.size(2) == 1 && q.scalar_type() == at::kFloat,
              "decode_attention: q must be fp32 [1, H, 1, D]");
  TORCH_CHECK(k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 && k.sizes() == v.sizes()
              && k.size(0) == 1 && k.size(3) == q.size(3) && k.stride(3) == 1 && v.stride(3) == 1,
              "decode_attention: k and v must be bf16 [1, K, S, D] with unit stride along D");
  const int64_t H = q.size(1), D = q.size(3), K = k.size(1), S = k.size(2);
  TORCH_CHECK(D % 16 == 0 && H % K == 0 && S > 0, "decode_attention: D % 16, H % K and S > 0");
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty_like(qc);
  const float* qp = qc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  const int64_t group = H / K;
  at::parallel_for(0, H, S * D * 4 > SERIAL_BYTES ? 1 : H, [&](int64_t h0, int64_t h1) {
    std::vector<float> p(S);
    for (int64_t h = h0; h < h1; ++h)
      attend_head(qp + h * D, kp + (h / group) * k.stride(1), vp + (h / group) * v.stride(1), S, D,
                  k.stride(2), v.stride(2), float(scale), p.data(), op + h * D);
  });
  return out;
}

}  // namespace moe_edge

TORCH_LIBRARY(moe_edge, m) {
  m.def("int4_mm(Tensor x, Tensor w, Tensor scale_zeros, int group) -> Tensor");
  m.def("int4_mm_cat(Tensor[] xs, Tensor[] ws, Tensor[] scale_zeros, int group) -> Tensor");
  m.def("mlps(Tensor x, Tensor[] gate_up, Tensor[] gate_up_scale_zeros, Tensor?[] gate_up_perm, int gate_up_group, "
        "Tensor[] down, Tensor[] down_scale_zeros, Tensor?[] down_perm, int down_group, ScalarType dtype) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("configure(int dots, int prefetch) -> ()");
}

TORCH_LIBRARY_IMPL(moe_edge, CatchAll, m) {
  m.impl("configure", &moe_edge::configure);
}

TORCH_LIBRARY_IMPL(moe_edge, CPU, m) {
  m.impl("int4_mm", &moe_edge::int4_mm);
  m.impl("int4_mm_cat", &moe_edge::int4_mm_cat);
  m.impl("mlps", &moe_edge::mlps);
  m.impl("decode_attention", &moe_edge::decode_attention);
}
