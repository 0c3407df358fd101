// The time loops of the fused CPU backend's LSTM and GRU (rnnkit/backends/fused.py), in C++.
//
// The Python loops pay the interpreter and one dispatch per elementwise op, ten or more per step,
// and a library GEMM per step; here each thread runs every step for its rows of the batch, in
// register-blocked tiles finished by their gates (see "Register-blocked time loops" below). The
// LSTM's loops take the weights in torch's layout (gates i, f, g, o) and pack them themselves;
// the GRU's follow the Python loops' conventions (the n rows of the weights doubled so that
// tanh(a) = 2 sigmoid(2a) - 1). Activated gates are kept for the backward; masks (T, N) are false
// where a sequence has ended (its state is then frozen).
//
// Built and loaded by rnnkit/backends/cext.py; every entry point is also run by the tests against
// the Python loops and torch.nn.LSTM.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__SSE__)
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

// Workers of torch's thread pool do not inherit the caller's flush-to-zero mode (it is per thread):
// each parallel chunk sets it for itself when the caller flushes, and restores it.
class Flush {
 public:
  explicit Flush(bool on) {
#if defined(__SSE__)
    if (on) {
      saved_ = _mm_getcsr();
      _mm_setcsr(saved_ | 0x8040u);  // FTZ and DAZ
      set_ = true;
    }
#else
    (void)on;
#endif
  }
  ~Flush() {
#if defined(__SSE__)
    if (set_) _mm_setcsr(saved_);
#endif
  }
  Flush(const Flush&) = delete;
  Flush& operator=(const Flush&) = delete;

 private:
  unsigned int saved_ = 0;
  bool set_ = false;
};

// fn(std::true_type) or fn(std::false_type): a runtime flag as a template argument of the row loops.
template <typename F>
void with_flag(bool flag, const F& fn) {
  if (flag)
    fn(std::true_type{});
  else
    fn(std::false_type{});
}

void check(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "rnnkit fused kernels: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "rnnkit fused kernels: ", name, " has dtype ", t.scalar_type(),
              ", expected ", like.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "rnnkit fused kernels: ", name, " must be on the CPU");
}

// check() for a (T, N, *) tensor the loops read with its own step and row strides (a batch-first
// input or outputs' gradient, read where it lies): only its last dimension must be contiguous.
void check_strided(const Tensor& t, const Tensor& like, const char* name, const char* shape, const char* last) {
  TORCH_CHECK(t.dim() == 3 && t.scalar_type() == like.scalar_type() && t.device().is_cpu() &&
                  (t.stride(2) == 1 || t.size(2) <= 1),
              "rnnkit fused kernels: ", name, " must be a ", shape, "CPU tensor of G's dtype whose ", last,
              " are contiguous");
}

// Sizes, so that a wrong call is an error rather than a write past a buffer's end.
void expect(const Tensor& t, const char* name, std::vector<int64_t> sizes) {
  TORCH_CHECK(t.sizes() == c10::IntArrayRef(sizes), "rnnkit fused kernels: ", name, " has shape ", t.sizes(),
              ", expected ", c10::IntArrayRef(sizes));
}

// T, N and H of a call, from G (T, N, gates * H) and a (T, N, H) tensor of it, once both are checked.
std::array<int64_t, 3> sizes(const Tensor& G, const Tensor& states, int64_t gates, const char* name) {
  check(G, G, "G");
  TORCH_CHECK(G.dim() == 3 && states.dim() == 3, "rnnkit fused kernels: G and ", name, " must be (T, N, *)");
  const int64_t T = G.size(0), N = G.size(1), H = states.size(2);
  expect(G, "G", {T, N, gates * H});
  expect(states, name, {T, N, H});
  return {T, N, H};
}

void check_masks(const Tensor& masks, int64_t full, int64_t T, int64_t N) {
  TORCH_CHECK(full >= T || (masks.scalar_type() == at::kBool && masks.is_contiguous() && masks.dim() == 2 &&
                            masks.size(0) == T && masks.size(1) == N),
              "rnnkit fused kernels: masks must be contiguous (T, N) bool");
}

const bool* mask_row(const Tensor& masks, int64_t t, int64_t full) {
  return t >= full ? masks.data_ptr<bool>() + t * masks.size(1) : nullptr;
}

// ---- Register-blocked time loops -------------------------------------------------------------
//
// A step's recurrent product is small (at H 128, B 128: 128 x 128 times 128 x 512) and a library
// GEMM pays a call, a parallel split and a barrier for each, then the gates take another pass over
// memory. Here each thread owns a block of the batch's rows for the whole sequence (rows do not
// interact across the recurrence, so no thread waits for another between steps), the weights are
// packed once per call into panels that stay in cache, and each tile of the product is finished by
// its gates while it is still in registers. Vectors are GCC's vector extensions: AVX-512, AVX2 or
// SSE as the build's -march=native allows, always vectorised whatever the compiler's cost model.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kPass = 4;  // 32 vector registers: 6 rows x 4 vectors of accumulators and 4 operands
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kPass = 2;  // AVX or AVX2, 16 registers: 6 x 2 accumulators, 2 operands, the broadcast
#else
constexpr int kVecBytes = 16;
constexpr int kPass = 2;
#endif
constexpr int64_t kDepth = 128;  // rows of a and b at a time in a product a^T b (see at_b_block)
constexpr int kRows = 6;  // rows of a tile (measured on Zen 3: 6 x 2 in registers 87 GFLOP/s a core,
                          // 3 x 4 with operands from memory 69)

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVecBytes)));
  typedef T unaligned __attribute__((vector_size(kVecBytes), aligned(alignof(T)), may_alias));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> Int;
  typedef Int ints __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / sizeof(T);
};
template <typename T>
using V = typename Vec<T>::type;

template <typename T>
inline V<T> splat(T x) {
  return V<T>{} + x;
}

// n lanes from p (the rest zero), or store n lanes to p: n < W where a row's units run out. With
// AVX-512 a masked load or store: a copy through memory made the compiler spill every stored
// vector to the stack first, whatever n (measured: a fifth of a traced cell's backward loop).
template <typename T>
inline V<T> load(const T* p, int n = Vec<T>::W) {
  if (n == Vec<T>::W) return *reinterpret_cast<const typename Vec<T>::unaligned*>(p);
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>)
    return reinterpret_cast<V<T>>(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p));
  else
    return reinterpret_cast<V<T>>(_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p));
#else
  V<T> v = {};
  std::memcpy(&v, p, n * sizeof(T));
  return v;
#endif
}

template <typename T>
inline void store(T* p, V<T> v, int n = Vec<T>::W) {
  if (n == Vec<T>::W) {
    *reinterpret_cast<typename Vec<T>::unaligned*>(p) = v;
    return;
  }
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>)
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), reinterpret_cast<__m512>(v));
  else
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), reinterpret_cast<__m512d>(v));
#else
  std::memcpy(p, &v, n * sizeof(T));
#endif
}

// x clamped to [lo, hi]: one min and one max (a comparison and a blend each, written with ?:, and
// the copies that came with them, were a fifth of the forward's activation code). x goes second:
// where either operand is NaN these instructions return the second, so a NaN stays NaN.
inline V<float> vclamp(V<float> x, float lo, float hi) {
#if defined(__AVX512F__)
  const __m512 v = _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), reinterpret_cast<__m512>(x)));
  return reinterpret_cast<V<float>>(v);
#elif defined(__AVX__)
  const __m256 v = _mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), reinterpret_cast<__m256>(x)));
  return reinterpret_cast<V<float>>(v);
#else
  x = x < splat(lo) ? splat(lo) : x;
  return x > splat(hi) ? splat(hi) : x;
#endif
}

// exp for float32 lane by lane without branches: Cody-Waite range reduction and a degree-5
// polynomial (Cephes' expf), within 2 ulp. Inputs are clamped to [-87, 87]: e^87 keeps 1 / (1 + e^87)
// a normal float (and the reciprocal's Newton step away from inf x 0), and below -87 the reduction
// itself breaks down (from about -1e13 it gave infinities); with AVX-512, scalef applies the power
// of two, else the exponent's bits do.
inline V<float> vexp(V<float> x) {
  using F = V<float>;
  x = vclamp(x, -87.0f, 87.0f);
  const F n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  F r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  F p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F y = p * r * r + r + 1.0f;
#if defined(__AVX512F__)
  return reinterpret_cast<F>(_mm512_scalef_ps(reinterpret_cast<__m512>(y), reinterpret_cast<__m512>(n)));
#else
  const auto bits = (__builtin_convertvector(n, Vec<float>::ints) + 127) << 23;
  return y * reinterpret_cast<F>(bits);  // the same bits as floats (a vector cast, no aliasing)
#endif
}

inline V<double> vexp(V<double> x) {  // float64 is for checking gradients: exact, not fast
  for (int l = 0; l < Vec<double>::W; ++l) x[l] = std::exp(x[l]);
  return x;
}

// 1 / d for d >= 1: the processor's estimate and Newton steps, within an ulp or two and exactly 1
// for d = 1 (so a saturated gate is exactly 1, as with a division), where a division costs several
// times as much and fused multiply-adds keep the steps that accurate: AVX-512's estimate has 14
// bits and one step makes 28, AVX's and SSE's 12 and need two; elsewhere (without FMA the steps
// drifted past the tests' float32 tolerance in an SSE build), and in float64, a division.
inline V<float> vrecip(V<float> d) {
#if defined(__AVX512F__) || ((defined(__AVX__) || defined(__SSE__)) && defined(__FMA__))
#if defined(__AVX512F__)
  const V<float> r = reinterpret_cast<V<float>>(_mm512_rcp14_ps(reinterpret_cast<__m512>(d)));
#else
#if defined(__AVX__)
  V<float> r = reinterpret_cast<V<float>>(_mm256_rcp_ps(reinterpret_cast<__m256>(d)));
#else
  V<float> r = reinterpret_cast<V<float>>(_mm_rcp_ps(reinterpret_cast<__m128>(d)));
#endif
  r = r * (2.0f - d * r);
#endif
  return r * (2.0f - d * r);
#else  // no estimate instruction (AArch64, say) or no FMA: a division
  return 1.0f / d;
#endif
}

inline V<double> vrecip(V<double> d) { return 1.0 / d; }

template <typename T>
inline V<T> vsigmoid(V<T> x) {
  return vrecip(T(1) + vexp(-x));
}

template <typename T>
inline V<T> vtanh(V<T> x) {
  return T(2) * vsigmoid<T>(x + x) - T(1);
}

// s[r][v] += sum over k of a[r lda + k ak] b[k][v] for v < P: R rows of a (by default k runs along
// a row: ak 1) times P vectors of a panel b whose rows are NV vectors long. R and P are
// compile-time, so the sums and operands live in registers.
template <typename T, int R, int NV, int P>
inline void tile_k(const T* __restrict a, int64_t lda, const T* __restrict b, int64_t K, V<T> (&s)[R][P],
                   int64_t ak) {
  constexpr int W = Vec<T>::W;
  for (int64_t k = 0; k < K; ++k, b += NV * W, a += ak) {
    V<T> bv[P];
    for (int v = 0; v < P; ++v) bv[v] = load(b + v * W);
    for (int r = 0; r < R; ++r) {
      const T x = a[r * lda];
      for (int v = 0; v < P; ++v) s[r][v] += x * bv[v];
    }
  }
}

// acc[r][V0 + v] += sum over k of a[r lda + k ak] b[k][V0 + v] for v < P: tile_k() on vectors V0 ..
// V0 + P - 1 of a packed panel b (K x NV vectors), the sums taken from acc and put back.
template <typename T, int R, int NV, int V0, int P>
inline void tile_pass(const T* __restrict a, int64_t lda, const T* __restrict b, int64_t K,
                      V<T> (&acc)[kRows][4], int64_t ak) {
  V<T> s[R][P];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < P; ++v) s[r][v] = acc[r][V0 + v];
  tile_k<T, R, NV, P>(a, lda, b + V0 * Vec<T>::W, K, s, ak);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < P; ++v) acc[r][V0 + v] = s[r][v];
}

// acc[r][v] += sum over k of a[r][k] b[k][v] for v < NV, in passes of kPass vectors (a's strides as
// tile_pass() takes them).
template <typename T, int R, int NV, int V0 = 0>
inline void tile(const T* a, int64_t lda, const T* b, int64_t K, V<T> (&acc)[kRows][4], int64_t ak = 1) {
  constexpr int P = std::min(kPass, NV - V0);
  tile_pass<T, R, NV, V0, P>(a, lda, b, K, acc, ak);
  if constexpr (V0 + P < NV) tile<T, R, NV, V0 + P>(a, lda, b, K, acc, ak);
}

// tile() for rows < kRows rows: the row count as a template argument.
template <typename T, int NV, int R = kRows>
inline void tile_rows(int rows, const T* a, int64_t lda, const T* b, int64_t K, V<T> (&acc)[kRows][4],
                      int64_t ak = 1) {
  if constexpr (R > 1) {
    if (rows < R) return tile_rows<T, NV, R - 1>(rows, a, lda, b, K, acc, ak);
  }
  tile<T, R, NV>(a, lda, b, K, acc, ak);
}

// fn(std::integral_constant<int, n>) for n from 1 to Max: a run-time count as a compile-time constant.
template <int Max, typename F>
inline void with_count(int n, const F& fn) {
  if constexpr (Max > 1) {
    if (n < Max) return with_count<Max - 1>(n, fn);
  }
  fn(std::integral_constant<int, Max>{});
}

// with_count() for a tile's rows (1 to kRows).
template <typename F>
inline void with_rows(int rows, const F& fn) {
  with_count<kRows>(rows, fn);
}

// A forward tile's pre-activations, acc[r][v] for R rows and NV vectors: init's NV vectors (null:
// zero), plus a1's rows (lda1 apart) times panel b1 (K1 x NV vectors), plus a2's times b2 (K2 rows);
// a null a1 or a2 adds nothing. The sums stay in registers from init to the last product: through
// tile() they went to memory between the parts, and zeroing the array first was a memset a tile.
// Measured at T28 I28 H128 B128 on a Zen 5, both builds loaded in one process and run alternately,
// 2026-12-03: the LSTM forward 8-11% faster (H128 and H256), the traced cells' 7%, the GRU's 2.5-5%.
template <typename T, int R, int NV, int V0 = 0>
inline void gate_tile(const T* init, const T* a1, int64_t lda1, const T* b1, int64_t K1, const T* a2, int64_t lda2,
                      const T* b2, int64_t K2, V<T> (&acc)[kRows][4]) {
  constexpr int W = Vec<T>::W, P = std::min(kPass, NV - V0);
  V<T> s[R][P];
  for (int v = 0; v < P; ++v) {
    const V<T> b = init != nullptr ? load(init + (V0 + v) * W) : V<T>{};
    for (int r = 0; r < R; ++r) s[r][v] = b;
  }
  if (a1 != nullptr) tile_k<T, R, NV, P>(a1, lda1, b1 + V0 * W, K1, s, 1);
  if (a2 != nullptr) tile_k<T, R, NV, P>(a2, lda2, b2 + V0 * W, K2, s, 1);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < P; ++v) acc[r][V0 + v] = s[r][v];
  if constexpr (V0 + P < NV) gate_tile<T, R, NV, V0 + P>(init, a1, lda1, b1, K1, a2, lda2, b2, K2, acc);
}

// Weights packed for tile(): panel p holds, for every k, the width values of units u < width,
// where unit(p, u) gives that unit's weights as up to three runs of (pointer, length) that together
// make its K values (a null pointer: a padding unit, zero). The panels are 64-byte aligned
// (torch's CPU allocator), so tile()'s loads are aligned ones in practice.
template <typename T, typename F>
Tensor pack(const Tensor& like, int64_t panels, int64_t width, int64_t K, const F& unit) {
  Tensor out = at::empty({panels, K, width}, like.options());
  T* o = out.data_ptr<T>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t u = 0; u < width; ++u) {
        int64_t k = 0;
        for (const auto& [src, len] : unit(p, u)) {
          if (src == nullptr) break;
          for (int64_t i = 0; i < len; ++i, ++k) o[(p * K + k) * width + u] = src[i];
        }
        for (; k < K; ++k) o[(p * K + k) * width + u] = T(0);
      }
  });
  return out;
}

template <typename T>
using Runs = std::array<std::pair<const T*, int64_t>, 3>;

// Weights packed for tile() from a matrix's rows: out[p][k][u] = row(k)[p width + u], zero from
// unit n on; each k copies runs of a row (W^T of a row-major W, without transposing it first).
template <typename T, typename F>
Tensor pack_rows(const Tensor& like, int64_t panels, int64_t width, int64_t K, int64_t n, const F& row) {
  Tensor out = at::empty({panels, K, width}, like.options());
  T* o = out.data_ptr<T>();
  at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t len = std::clamp<int64_t>(n - p * width, 0, width);
        T* dst = o + (p * K + k) * width;
        std::memcpy(dst, row(k) + p * width, len * sizeof(T));
        std::fill(dst + len, dst + width, T(0));
      }
  });
  return out;
}

// How many blocks over_row_blocks() splits N rows into: one per thread, no more than N / kRows
// (rounded up).
int64_t row_blocks(int64_t N) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + kRows - 1) / kRows));
}

// fn(block, n0, n1) over the row_blocks(N) blocks of the batch's rows, one per thread, each thread
// flushing denormals when the caller does. The rows are split evenly, so a block may end in a short
// tile: split by whole tiles, the slowest thread (which sets the pace) had a tile more at N 64 (36
// rows against 28).
template <typename F>
void over_row_blocks(int64_t N, bool flush, const F& fn) {
  const int64_t blocks = row_blocks(N);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    Flush f(flush);
    for (int64_t b = b0; b < b1; ++b) fn(b, N * b / blocks, N * (b + 1) / blocks);
  });
}

// All steps of the forward for rows n0..n1. wp: the weights packed by blocks of W units, each
// panel (K, 4 gates x W) with K = Ix + H: a unit's input weights, its bias where the layer has one
// (Ix = I + 1), then its recurrent weights. A tile of a step's gates starts from the bias and adds
// the products of x_t's rows, where they lie, and h_{t-1}'s; the rest as lstm_forward_steps says.
// G null: the gates are not kept (inference: no backward reads them, and their stores were a
// seventh of the forward). cs holds cslots steps, step t's cells in slot t % cslots: T, or two
// without a graph when only the last step's are wanted.
template <typename T>
void lstm_forward_rows(T* G, T* hs, T* cs, T* tcs, bool keep, const T* x, int64_t x_t, int64_t x_n, int64_t I,
                       int64_t Ix, const T* h0, const T* c0, const T* wp, const Tensor& masks, int64_t full,
                       bool h0_zero, int64_t T_, int64_t N, int64_t H, int64_t n0, int64_t n1, int64_t cslots) {
  constexpr int W = Vec<T>::W;
  const int64_t panels = (H + W - 1) / W, H4 = 4 * H, K = Ix + H;
  for (int64_t t = 0; t < T_; ++t) {
    const T* hp = t == 0 ? h0 : hs + (t - 1) * N * H;
    const T* cp = t == 0 ? c0 : cs + (t - 1) % cslots * N * H;
    const T* xt = x + t * x_t;
    T* g = G == nullptr ? nullptr : G + t * N * H4;
    T* c = cs + t % cslots * N * H;
    T* tc = keep ? tcs + t * N * H : nullptr;
    T* h = hs + t * N * H;
    const bool* m = mask_row(masks, t, full);
    const bool product = !(t == 0 && h0_zero);  // the usual zero initial state needs no product
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t j = p * W;
      const int w = static_cast<int>(std::min<int64_t>(W, H - j));
      const T* panel = wp + p * K * 4 * W;
      for (int64_t r0 = n0; r0 < n1; r0 += kRows)
        with_rows(static_cast<int>(std::min<int64_t>(kRows, n1 - r0)), [&](auto R) {
        constexpr int rows = decltype(R)::value;
        V<T> acc[kRows][4];
        gate_tile<T, rows, 4>(Ix > I ? panel + I * 4 * W : nullptr, xt + r0 * x_n, x_n, panel, I,
                              product ? hp + r0 * H : nullptr, H, panel + Ix * 4 * W, H, acc);
        for (int r = 0; r < rows; ++r) {
          const int64_t n = r0 + r;
          T* gn = g == nullptr ? nullptr : g + n * H4 + j;
          // The next step's lines of these gates, asked for (to write) a step ahead: G is larger than
          // L2, and its lines come from L3 as they are first written (forward 2-3% faster, interleaved
          // A/B of two builds, T28 H128 B128, Zen 5, 2026-12-03).
          if (gn != nullptr && t + 1 < T_)
            for (int k = 0; k < 4; ++k) __builtin_prefetch(gn + N * H4 + k * H, 1, 2);
          const V<T> i = vsigmoid<T>(acc[r][0]);
          const V<T> f = vsigmoid<T>(acc[r][1]);
          const V<T> gg = vtanh<T>(acc[r][2]);
          const V<T> o = vsigmoid<T>(acc[r][3]);
          const int64_t at = n * H + j;
          const V<T> cv = f * load(cp + at, w) + i * gg;
          const V<T> tv = vtanh<T>(cv);
          if (gn != nullptr) {
            store(gn, i, w);
            store(gn + H, f, w);
            store(gn + 2 * H, gg, w);
            store(gn + 3 * H, o, w);
          }
          if (keep) store(tc + at, tv, w);
          if (m != nullptr && !m[n]) {  // a sequence that has ended keeps its state
            store(c + at, load(cp + at, w), w);
            store(h + at, load(hp + at, w), w);
          } else {
            store(c + at, cv, w);
            store(h + at, o * tv, w);
          }
        }
      });
    }
  }
}

// tile_rows() with the number of vectors per row (1 to 4) chosen at run time.
template <typename T>
inline void tile_vectors(int nv, int rows, const T* a, int64_t lda, const T* b, int64_t K, V<T> (&acc)[kRows][4],
                         int64_t ak = 1) {
  switch (nv) {
    case 1: return tile_rows<T, 1>(rows, a, lda, b, K, acc, ak);
    case 2: return tile_rows<T, 2>(rows, a, lda, b, K, acc, ak);
    case 3: return tile_rows<T, 3>(rows, a, lda, b, K, acc, ak);
    default: return tile_rows<T, 4>(rows, a, lda, b, K, acc, ak);
  }
}

// A product a^T b whose a is made of parts side by side (an LSTM's [x_t, 1, h_{t-1}], each where it
// lies): part p is cols columns with row stride lda (0 with one column of ones: b's column sums),
// rows row .. row + cols - 1 of the product.
struct Part {
  int64_t lda, cols, row;
};

// depth rows of the operands of a^T b: a's parts at a[p] (null: zeros, nothing to add), b's at b.
template <typename T>
struct Rows {
  std::array<const T*, 3> a;
  const T* b;
  int64_t depth;
};

// out (.., Nc) = (or +=, unless fresh) a^T b over the rows of each of segs (at most kDepth in all),
// in blocks of 4W columns: the weight gradient of a few steps' rows. b's rows
// of each block of columns are first copied to panel (kDepth x 4W): they are often a power of two
// apart (4H floats), and read in place, a block's lines fall into a few sets of the L1 cache and
// evict each other. The columns past the last whole vector go one by one.
template <typename T>
void at_b_block(const Rows<T>* segs, int nsegs, const std::array<Part, 3>& parts, int nparts, int64_t ldb, T* out,
                int64_t Nc, bool fresh, T* panel) {
  constexpr int W = Vec<T>::W;
  const int64_t nvec = Nc / W;
  for (int64_t q = 0; q < (Nc + 4 * W - 1) / (4 * W); ++q) {
    const int64_t j = q * 4 * W;
    const int nv = static_cast<int>(std::clamp<int64_t>(nvec - q * 4, 0, 4));
    for (int p = 0; p < nparts; ++p)
      for (int64_t c = 0; c < parts[p].cols; ++c)
        for (int64_t col = j + nv * W; col < std::min(Nc, j + 4 * W); ++col) {
          T* o = out + (parts[p].row + c) * Nc + col;
          T sum = fresh ? T(0) : *o;
          for (int i = 0; i < nsegs; ++i)
            for (int64_t m = 0; segs[i].a[p] != nullptr && m < segs[i].depth; ++m)
              sum += segs[i].a[p][m * parts[p].lda + c] * segs[i].b[m * ldb + col];
          *o = sum;
        }
    if (nv == 0) continue;
    T* dst = panel;
    for (int i = 0; i < nsegs; ++i)
      for (int64_t m = 0; m < segs[i].depth; ++m, dst += nv * W)
        std::memcpy(dst, segs[i].b + m * ldb + j, nv * W * sizeof(T));
    for (int p = 0; p < nparts; ++p)
      for (int64_t c0 = 0; c0 < parts[p].cols; c0 += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, parts[p].cols - c0));
        T* o = out + (parts[p].row + c0) * Nc + j;
        V<T> acc[kRows][4] = {};
        if (!fresh)
          for (int r = 0; r < rows; ++r)
            for (int v = 0; v < nv; ++v) acc[r][v] = load(o + r * Nc + v * W);
        const T* b = panel;
        for (int i = 0; i < nsegs; b += segs[i].depth * nv * W, ++i)
          if (segs[i].a[p] != nullptr) tile_vectors<T>(nv, rows, segs[i].a[p] + c0, 1, b, segs[i].depth, acc, parts[p].lda);
        for (int r = 0; r < rows; ++r)
          for (int v = 0; v < nv; ++v) store(o + r * Nc + v * W, acc[r][v]);
      }
  }
}

// For rows n0..n1 of a backward step, in tiles of kRows rows and nv W units (of H): the tile's
// product of rows of a (row stride K; none when a is null) and a panel of wp (K x nv W: a block of
// nv W columns of W_hh or W_ih as pack_rows() lays it out), then fn(n, u, w, sum) for each row n
// and vector of units u .. u + w - 1 (w < W where a row of H units ends).
template <typename T, typename F>
void over_unit_tiles(const T* a, const T* wp, int64_t K, int64_t H, int64_t n0, int64_t n1, const F& fn,
                     int nv = 4) {
  const int64_t width = nv * Vec<T>::W;
  for (int64_t q = 0; q < (H + width - 1) / width; ++q)
    for (int64_t r0 = n0; r0 < n1; r0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, n1 - r0));
      V<T> acc[kRows][4] = {};
      if (a != nullptr) tile_vectors<T>(nv, rows, a + r0 * K, K, wp + q * K * width, K, acc);
      for (int r = 0; r < rows; ++r)
        for (int v = 0; v < nv; ++v) {
          const int64_t u = q * width + v * Vec<T>::W;
          if (u >= H) break;
          fn(r0 + r, u, static_cast<int>(std::min<int64_t>(Vec<T>::W, H - u)), acc[r][v]);
        }
    }
}

// What the LSTM backward's rows read and write (see lstm_backward_steps).
template <typename T>
struct LSTMBackward {
  const T *G, *cs, *c0, *tcc, *gc, *gh, *wp, *wx;
  T *P, *DH, *dc, *carry, *dx;
  int64_t N, H, I, lo, hi, steps, full;
  int64_t gh_t, gh_n;  // gh's strides: the outputs' gradient as the caller has it (batch-first, say)
  int nvx;  // vectors per row in a tile of the input gradient (I may be far below 4W)
  const Tensor* masks;
  // For the weight gradient (x null: none), the rows [x_t, 1, h_{t-1}]: x (T, N, xI) with strides
  // x_t and x_n, the 1 where Ix > xI, hs (T, N, H) and h0 (N, H); dw, (K, 4H) partial sums for each
  // block of rows (K = Ix + H).
  const T *x, *hs, *h0;
  int64_t x_t, x_n, xI, Ix;
  T* dw;
};

// Steps hi-1 down to lo of the backward for rows n0..n1. wp: W_hh's columns packed by blocks of 4W
// hidden units, each panel (4H, 4W); wx, when the input's gradient is asked for, W_ih's by blocks
// of nvx W inputs. Step t first takes the recurrent part of its dh from step t+1's gate gradients,
// one tile at a time, and finishes those units' gates while the tile is in registers; step t+1's
// input gradient is a product of the same rows. Gates in torch's order (i, f, g, o).
template <typename T, bool kHaveTanh>
void lstm_backward_rows(const LSTMBackward<T>& a, int64_t block, int64_t n0, int64_t n1) {
  const int64_t N = a.N, H = a.H, H4 = 4 * H;
  const V<T> one = splat(T(1));
  alignas(64) T panel[kDepth * 4 * Vec<T>::W];
  // The block's dW += [x, 1, h]^T dG for steps t .. t + steps - 1 (all still in cache), in groups of up to
  // kDepth rows: each group reads and writes the partial sums once (at batch 32 two threads had 16
  // rows a step, and a step at a time the sums' traffic took longer than the products).
  const int64_t rows = n1 - n0, group = std::max<int64_t>(1, kDepth / std::max<int64_t>(1, rows));
  // a = [x_t, 1 (with a bias), h_{t-1}], its rows copied side by side (K apart) for each group: read
  // where they lie, the outputs' rows are H floats apart, for the usual widths a power of two whose
  // lines share a few sets of the L1 cache and evict each other (the backward 3.5% faster packed,
  // interleaved A/B of two builds, T28 H128 B128, Zen 5, 2026-12-03; the traced cells' backward,
  // packed alike, measured 1.5-2% slower, so it reads its rows in place).
  const int64_t K = a.Ix + H;
  std::vector<T> apack(a.x == nullptr ? 0 : kDepth * K);
  const std::array<Part, 3> packed{{{K, K, 0}, {0, 0, 0}, {0, 0, 0}}};
  auto weight_grads = [&](int64_t t, int64_t steps) {
    if (a.x == nullptr) return;
    T* out = a.dw + block * K * H4;
    std::array<Rows<T>, kDepth> segs;
    for (int64_t m0 = n0; m0 < n1; m0 += kDepth) {
      const int64_t depth = std::min(kDepth, n1 - m0);
      int nsegs = 0;
      T* dst = apack.data();
      for (int64_t s = t + steps - 1; s >= t; --s) {
        const T* hp = s == 0 ? a.h0 : a.hs + (s - 1) * N * H;  // null: a zero state
        const T* xs = a.x + s * a.x_t + m0 * a.x_n;
        segs[nsegs++] = {{dst, nullptr, nullptr}, a.P + ((s - a.lo) * N + m0) * H4, depth};
        for (int64_t m = 0; m < depth; ++m, dst += K) {
          std::memcpy(dst, xs + m * a.x_n, a.xI * sizeof(T));
          if (a.Ix > a.xI) dst[a.xI] = T(1);
          if (hp == nullptr) std::fill(dst + a.Ix, dst + K, T(0));
          else std::memcpy(dst + a.Ix, hp + (m0 + m) * H, H * sizeof(T));
        }
      }
      const bool fresh = a.hi == a.steps && t + steps == a.hi && m0 == n0;  // the block's first rows
      at_b_block<T>(segs.data(), nsegs, packed, 1, H4, out, H4, fresh, panel);
    }
  };
  auto input_grads = [&](const T* dg, int64_t s) {  // dx of step s from its gate gradients dg
    if (a.dx == nullptr) return;
    over_unit_tiles(dg, a.wx, H4, a.I, n0, n1, [&](int64_t n, int64_t u, int w, V<T> sum) {
      store(a.dx + (s * N + n) * a.I + u, sum, w);
    }, a.nvx);
  };
  for (int64_t t = a.hi - 1; t >= a.lo; --t) {
    const int64_t j = t - a.lo;
    const bool rec = t < a.hi - 1;
    const T* above = rec ? a.P + (j + 1) * N * H4 : nullptr;
    // DH holds two steps, this one's dh and the step above's: only the rows of a sequence that ended
    // there read it (their dh passes straight down), and the chunk's end (the carry); so a step is
    // kept only where it has a mask (with none, steps t < full, nothing reads it)
    const T* dh_above = rec ? a.DH + ((j + 1) & 1) * N * H : nullptr;
    const bool* m_above = rec ? mask_row(*a.masks, t + 1, a.full) : nullptr;
    const bool* m = mask_row(*a.masks, t, a.full);
    const T* g = a.G + t * N * H4;
    const T* tcp = kHaveTanh ? a.tcc + j * N * H : a.cs + t * N * H;
    const T* cp = t == 0 ? a.c0 : a.cs + (t - 1) * N * H;
    const T* gcp = (a.gc != nullptr && t > 0) ? a.gc + (t - 1) * N * H : nullptr;
    T* dh = a.DH + (j & 1) * N * H;
    T* d = a.P + j * N * H4;
    T* dc = a.dc;
    const T* ghp = a.gh != nullptr ? a.gh + j * a.gh_t : nullptr;
    const T* carry_in = !rec && a.hi < a.steps ? a.carry : nullptr;  // the chunk above's d loss / d h_{hi-1}
    over_unit_tiles(above, a.wp, H4, H, n0, n1, [&](int64_t n, int64_t u, int w, V<T> rec_dh) {
      const int64_t at = n * H + u;
      V<T> dhv = rec_dh;
      if (ghp != nullptr) dhv += load(ghp + n * a.gh_n + u, w);
      if (carry_in != nullptr) dhv += load(carry_in + at, w);
      if (m_above != nullptr && !m_above[n]) dhv += load(dh_above + at, w);  // its dh passed straight down
      if (m != nullptr) store(dh + at, dhv, w);
      V<T> dcv = load(dc + at, w);
      T* dn = d + n * H4 + u;
      if (t > a.lo) {  // the step below's gates, cell states and outputs' gradient, into L2 meanwhile
        const T* below = g - N * H4 + n * H4 + u;  // (backward 3-5% faster, measured as above)
        for (int k = 0; k < 4; ++k) __builtin_prefetch(below + k * H, 0, 2);
        if (t > 1) __builtin_prefetch(a.cs + (t - 2) * N * H + at, 0, 2);
        if (ghp != nullptr) __builtin_prefetch(ghp - a.gh_t + n * a.gh_n + u, 0, 2);
      }
      if (m == nullptr || m[n]) {
        const T* gn = g + n * H4 + u;
        const V<T> i = load(gn, w), f = load(gn + H, w), gg = load(gn + 2 * H, w), o = load(gn + 3 * H, w);
        const V<T> tv = kHaveTanh ? load(tcp + at, w) : vtanh<T>(load(tcp + at, w));
        dcv += dhv * o * (one - tv * tv);
        store(dn, dcv * gg * i * (one - i), w);
        store(dn + H, dcv * load(cp + at, w) * f * (one - f), w);
        store(dn + 2 * H, dcv * i * (one - gg * gg), w);
        store(dn + 3 * H, dhv * tv * o * (one - o), w);
        dcv *= f;
      } else {  // frozen: no gradient into the gates, dc passes through unchanged
        for (int k = 0; k < 4; ++k) store(dn + k * H, V<T>{}, w);
      }
      if (gcp != nullptr) dcv += load(gcp + at, w);
      store(dc + at, dcv, w);
    });
    const int64_t done = a.hi - t;  // steps of this call whose gate gradients are in
    if (done % group == 0 || t == a.lo) weight_grads(t, done % group == 0 ? group : done % group);
    if (rec) input_grads(above, t + 1);
  }
  input_grads(a.P, a.lo);
  if (a.lo == 0) return;
  // The step below starts the next chunk: d loss / d h_{lo-1} through the recurrence.
  const bool* m = mask_row(*a.masks, a.lo, a.full);
  over_unit_tiles(a.P, a.wp, H4, H, n0, n1, [&](int64_t n, int64_t u, int w, V<T> rec_dh) {
    const int64_t at = n * H + u;
    store(a.carry + at, m != nullptr && !m[n] ? rec_dh + load(a.DH + at, w) : rec_dh, w);
  });
}

// All steps of the forward. x (T, N, I) holds the inputs (any strides but the features': a
// batch-first input is read in place), w_ih (4H, I), w_hh (4H, H) and bias (4H, optional) the
// weights in torch's layout (gates i, f, g, o); G (T, N, 4H) receives the activated gates (i, f,
// g, o), or, absent, the gates are not kept (inference); hs and cs (T, N, H) the outputs and cells
// (cs (2, N, H) without G: every step's cells in slot t % 2, the last in slot (T - 1) % 2), tcs
// (T, N, H), when given, every step's tanh(c).
void forward_steps(const std::optional<Tensor>& G_, Tensor hs, Tensor cs, const std::optional<Tensor>& tcs,
                   const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                   const std::optional<Tensor>& bias, const Tensor& masks, int64_t full, bool h0_zero, bool flush) {
  const Tensor& G = G_ ? *G_ : hs;  // what the others' dtype and device are checked against
  for (const auto& [t, name] : {std::pair{hs, "hs"}, {cs, "cs"}, {h0, "h0"}, {c0, "c0"}, {w_ih, "w_ih"},
                                {w_hh, "w_hh"}})
    check(t, G, name);
  for (const auto& [t, name] : {std::pair{bias, "bias"}, {tcs, "tcs"}})
    if (t) check(*t, G, name);
  const auto [T, N, H] = G_ ? sizes(G, hs, 4, "hs") : sizes(hs, hs, 1, "hs");
  check_strided(x, G, "x", "(T, N, I) ", "features");
  const int64_t I = x.size(2), Ix = I + (bias ? 1 : 0);
  expect(x, "x", {T, N, I});
  const int64_t cslots = !G_ && !tcs && cs.dim() == 3 && cs.size(0) == 2 ? 2 : T;
  expect(cs, "cs", {cslots, N, H});
  if (tcs) expect(*tcs, "tcs", {T, N, H});
  expect(h0, "h0", {N, H});
  expect(c0, "c0", {N, H});
  expect(w_ih, "w_ih", {4 * H, I});
  expect(w_hh, "w_hh", {4 * H, H});
  if (bias) expect(*bias, "bias", {4 * H});
  check_masks(masks, full, T, N);
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "lstm_forward_steps", [&] {
    using R = Runs<scalar_t>;
    constexpr int W = Vec<scalar_t>::W;
    const scalar_t* wi = w_ih.data_ptr<scalar_t>();
    const scalar_t* wh = w_hh.data_ptr<scalar_t>();
    const scalar_t* b = bias ? bias->data_ptr<scalar_t>() : nullptr;
    // Panel p: units p W .. p W + W - 1 of the four gates, each unit's input weights, bias, then
    // recurrent weights.
    const Tensor wp = pack<scalar_t>(G, (H + W - 1) / W, 4 * W, Ix + H, [&](int64_t p, int64_t u) {
      const int64_t j = p * W + u % W, row = (u / W) * H + j;
      if (j >= H) return R{};
      if (b == nullptr) return R{{{wi + row * I, I}, {wh + row * H, H}}};
      return R{{{wi + row * I, I}, {b + row, 1}, {wh + row * H, H}}};
    });
    over_row_blocks(N, flush, [&](int64_t, int64_t n0, int64_t n1) {
      lstm_forward_rows<scalar_t>(G_ ? G.data_ptr<scalar_t>() : nullptr, hs.data_ptr<scalar_t>(), cs.data_ptr<scalar_t>(),
                                  tcs ? tcs->data_ptr<scalar_t>() : nullptr, tcs.has_value(), x.data_ptr<scalar_t>(),
                                  x.stride(0), x.stride(1), I, Ix, h0.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(),
                                  wp.data_ptr<scalar_t>(), masks, full, h0_zero, T, N, H, n0, n1, cslots);
    });
  });
}

void lstm_forward_steps(Tensor G, Tensor hs, Tensor cs, const std::optional<Tensor>& tcs, const Tensor& x,
                        const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                        const std::optional<Tensor>& bias, const Tensor& masks, int64_t full, bool h0_zero,
                        bool flush) {
  forward_steps(G, hs, cs, tcs, x, h0, c0, w_ih, w_hh, bias, masks, full, h0_zero, flush);
}

// Steps hi-1 down to lo of the backward, gates in torch's order (i, f, g, o). P (hi - lo, N, 4H)
// receives their gate gradients (it may be G's rows lo..hi-1: each step reads a row's gates before it
// writes their gradients there); DH (2, N, H) is scratch for two steps' d loss / d h_t; gh (hi - lo,
// N, H), optional and with any strides but contiguous units, is these steps' outputs' gradient; tcc
// (hi - lo, N, H) their tanh(c), or undefined to recompute it from cs; dc (N, H) is d loss / d
// c_{hi-1} on entry and d loss / d c_{lo-1} on exit (dc0 when lo == 0); gc (T, N, H), optional, is the
// gradient of every step's c; carry (N, H) holds d loss / d h_{hi-1} through the recurrence on entry
// when hi < T (from the chunk above) and receives d loss / d h_{lo-1} when lo > 0; w_hh (4H, H); dx
// (T, N, I), when given, receives these steps' input gradient, with w_ih (4H, I). dW, when given
// with the forward's x (T, N, I; strided as there), hs and h0 (none: a zero state), receives the weight gradient
// [x_t, 1, h_{t-1}]^T dG_t (the 1 with a bias: K = I + 1 + H) of these steps: (blocks, K, 4H), one
// block of partial sums for each block of rows, started by the call with hi == T, added on by later
// chunks and, with sum_blocks, summed into dW[0] by the call with lo == 0.
void lstm_backward_steps(const Tensor& G, const Tensor& cs, const Tensor& c0, const std::optional<Tensor>& tcc,
                         Tensor P, Tensor DH, Tensor dc, const std::optional<Tensor>& gc,
                         const std::optional<Tensor>& gh, Tensor carry, const Tensor& w_hh,
                         const std::optional<Tensor>& dx, const std::optional<Tensor>& w_ih, const Tensor& masks,
                         int64_t full, int64_t lo, int64_t hi, bool flush, const std::optional<Tensor>& x,
                         const std::optional<Tensor>& hs, const std::optional<Tensor>& h0,
                         const std::optional<Tensor>& dW, bool sum_blocks) {
  for (const auto& [t, name] : {std::pair{cs, "cs"}, {c0, "c0"}, {P, "P"}, {DH, "DH"}, {dc, "dc"}, {carry, "carry"},
                                {w_hh, "w_hh"}})
    check(t, G, name);
  for (const auto& [t, name] : {std::pair{tcc, "tcc"}, {gc, "gc"}, {dx, "dx"}, {w_ih, "w_ih"}})
    if (t) check(*t, G, name);
  if (gh) check_strided(*gh, G, "gh", "", "units");
  const auto [T, N, H] = sizes(G, cs, 4, "cs");
  TORCH_CHECK(0 <= lo && lo < hi && hi <= T, "rnnkit fused kernels: bad step range");
  const int64_t n = hi - lo;
  expect(c0, "c0", {N, H});
  if (tcc) expect(*tcc, "tcc", {n, N, H});
  TORCH_CHECK(P.dim() == 3 && P.size(0) >= n && P.size(1) == N && P.size(2) == 4 * H,
              "rnnkit fused kernels: P must be (at least hi - lo, N, 4H), got ", P.sizes());
  TORCH_CHECK(DH.dim() == 3 && DH.size(0) >= 2 && DH.size(1) == N && DH.size(2) == H,
              "rnnkit fused kernels: DH must be (2, N, H), got ", DH.sizes());
  expect(dc, "dc", {N, H});
  if (gc) expect(*gc, "gc", {T, N, H});
  if (gh) expect(*gh, "gh", {n, N, H});
  expect(carry, "carry", {N, H});
  expect(w_hh, "w_hh", {4 * H, H});
  TORCH_CHECK(dx.has_value() == w_ih.has_value(), "rnnkit fused kernels: dx and w_ih come together");
  const int64_t I = dx ? dx->size(2) : 0;
  if (dx) {
    TORCH_CHECK(I > 0, "rnnkit fused kernels: dx needs at least one input");
    expect(*dx, "dx", {T, N, I});
    expect(*w_ih, "w_ih", {4 * H, I});
  }
  check_masks(masks, full, T, N);
  TORCH_CHECK(x.has_value() == dW.has_value() && hs.has_value() == dW.has_value() && (dW || !h0),
              "rnnkit fused kernels: x, hs and dW come together (and h0 only with them)");
  const int64_t K = dW ? dW->size(1) : 0, blocks = row_blocks(N);
  if (dW) {
    for (const auto& [t, name] : {std::pair{*hs, "hs"}, {*dW, "dW"}})
      check(t, G, name);
    check_strided(*x, G, "x", "(T, N, I) ", "features");
    TORCH_CHECK(x->dim() == 3 && x->size(0) == T && x->size(1) == N,
                "rnnkit fused kernels: x must be (T, N, I), got ", x->sizes());
    expect(*hs, "hs", {T, N, H});
    if (h0) {
      check(*h0, G, "h0");
      expect(*h0, "h0", {N, H});
    }
    TORCH_CHECK(dW->dim() == 3 && dW->size(0) >= blocks && dW->size(2) == 4 * H &&
                    (K == x->size(2) + H || K == x->size(2) + 1 + H),
                "rnnkit fused kernels: dW must be (at least ", blocks, " blocks, I (+ 1 with a bias) + H, 4H), got ",
                dW->sizes());
  }
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "lstm_backward_steps", [&] {
    constexpr int W = Vec<scalar_t>::W;
    const int64_t H4 = 4 * H;
    const scalar_t* wh = w_hh.data_ptr<scalar_t>();
    const Tensor wp = pack_rows<scalar_t>(G, (H + 4 * W - 1) / (4 * W), 4 * W, H4, H,
                                          [&](int64_t k) { return wh + k * H; });
    const int nvx = static_cast<int>(std::min<int64_t>(4, (I + W - 1) / W));
    Tensor wx;
    if (dx) {
      const scalar_t* wi = w_ih->data_ptr<scalar_t>();
      wx = pack_rows<scalar_t>(G, (I + nvx * W - 1) / (nvx * W), nvx * W, H4, I, [&](int64_t k) { return wi + k * I; });
    }
    auto ptr = [](const std::optional<Tensor>& t) { return t ? t->data_ptr<scalar_t>() : nullptr; };
    const LSTMBackward<scalar_t> args{G.data_ptr<scalar_t>(), cs.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(),
                                      ptr(tcc), ptr(gc), ptr(gh), wp.data_ptr<scalar_t>(),
                                      dx ? wx.data_ptr<scalar_t>() : nullptr, P.data_ptr<scalar_t>(),
                                      DH.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(), carry.data_ptr<scalar_t>(),
                                      ptr(dx), N, H, I, lo, hi, T, full,
                                      gh ? gh->stride(0) : 0, gh ? gh->stride(1) : 0, nvx, &masks,
                                      ptr(x), ptr(hs), ptr(h0), x ? x->stride(0) : 0, x ? x->stride(1) : 0,
                                      x ? x->size(2) : 0, K - H, ptr(dW)};
    with_flag(tcc.has_value(), [&](auto have_tanh) {
      over_row_blocks(N, flush, [&](int64_t block, int64_t n0, int64_t n1) {
        lstm_backward_rows<scalar_t, decltype(have_tanh)::value>(args, block, n0, n1);
      });
    });
    if (dW && sum_blocks && lo == 0 && blocks > 1) {  // the blocks' partial sums into the first
      scalar_t* w = dW->data_ptr<scalar_t>();
      const int64_t size = K * 4 * H;
      at::parallel_for(0, size, 4096, [&](int64_t i0, int64_t i1) {
        Flush f(flush);
        for (int64_t b = 1; b < blocks; ++b)
          for (int64_t i = i0; i < i1; ++i) w[i] += w[b * size + i];
      });
    }
  });
}

// dst[j][k] (rows ld apart) = the sum over blocks of src[b bstride + k n + j], for k < rows and j < n:
// the blocks' partial sums of a weight gradient added and transposed into torch's layout in one pass,
// a tile at a time (a pass to add them and torch's transposing copies took ~150 us a call at T28 H128
// B128, about 5 times as long).
template <typename T>
void sum_transposed(const T* src, int64_t blocks, int64_t bstride, int64_t rows, int64_t n, T* dst, int64_t ld,
                    bool flush) {
  constexpr int64_t kTile = 16;
  at::parallel_for(0, (n + kTile - 1) / kTile, 4, [&](int64_t q0, int64_t q1) {
    Flush f(flush);
    T tile[kTile][kTile];
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t j0 = q * kTile, nj = std::min(kTile, n - j0);
      for (int64_t k0 = 0; k0 < rows; k0 += kTile) {
        const int64_t nk = std::min(kTile, rows - k0);
        for (int64_t k = 0; k < nk; ++k) {
          const T* row = src + (k0 + k) * n + j0;
          for (int64_t j = 0; j < nj; ++j) tile[k][j] = row[j];
          for (int64_t b = 1; b < blocks; ++b)
            for (int64_t j = 0; j < nj; ++j) tile[k][j] += row[b * bstride + j];
        }
        for (int64_t j = 0; j < nj; ++j)
          for (int64_t k = 0; k < nk; ++k) dst[(j0 + j) * ld + k0 + k] = tile[k][j];
      }
    }
  });
}


// Whether h (contiguous) is all zeros: the usual initial state, whose step needs no recurrent product.
bool all_zero(const Tensor& h) {
  bool zero = true;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "all_zero", [&] {
    const scalar_t* p = h.data_ptr<scalar_t>();
    for (int64_t i = 0, n = h.numel(); i < n && zero; ++i) zero = p[i] == scalar_t(0);
  });
  return zero;
}

// t as the loops read it: any strides but a contiguous last dimension (a batch-first input, an
// outputs' gradient sliced from a batch-first output: read in place).
Tensor rows_in_place(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// A state as the loops read it: contiguous, or zeros (N, H) where the caller has none.
Tensor state_or_zeros(const std::optional<Tensor>& s, const Tensor& like, int64_t N, int64_t H) {
  return s ? s->contiguous() : at::zeros({N, H}, like.options());
}

// The forward in one call (what fused._LSTMFunction runs, and fused.lstm_sequence without a graph;
// lstm_forward_steps says the rest): G, hs, cs and, with keep_tc, every step's tanh(c), made here.
// h0 and c0 absent: the zero state. Torch's two biases are added here; b_hh absent: b_ih is the
// whole bias (or there is none). Without keep_gates (inference, where nothing reads them) G is not
// made: undefined (None) in its place; without keep_cells too, cs is the last step's cells alone
// (1, N, H), the loop keeping two steps.
std::vector<Tensor> lstm_forward(const Tensor& x, const std::optional<Tensor>& h0, const std::optional<Tensor>& c0,
                                 const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                 const std::optional<Tensor>& b_hh, const Tensor& masks, int64_t full, bool keep_tc,
                                 bool flush, bool keep_gates, bool keep_cells) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) > 0 && w_hh.dim() == 2,
              "rnnkit fused kernels: x must be (T > 0, N, I) and w_hh (4H, H)");
  TORCH_CHECK(b_ih || !b_hh, "rnnkit fused kernels: b_hh comes with b_ih");
  TORCH_CHECK(keep_cells || !(keep_gates || keep_tc), "rnnkit fused kernels: a backward needs every step's cells");
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  const auto opts = x.options();
  std::optional<Tensor> G;
  if (keep_gates) G = at::empty({T, N, 4 * H}, opts);
  const int64_t cslots = keep_cells ? T : std::min<int64_t>(T, 2);
  Tensor hs = at::empty({T, N, H}, opts), cs = at::empty({cslots, N, H}, opts);
  std::optional<Tensor> tcs;
  if (keep_tc) tcs = at::empty({T, N, H}, opts);
  const Tensor h = state_or_zeros(h0, x, N, H), c = state_or_zeros(c0, x, N, H);
  std::optional<Tensor> bias;
  if (b_ih) bias = b_hh ? at::add(*b_ih, *b_hh) : b_ih->contiguous();
  forward_steps(G, hs, cs, tcs, rows_in_place(x), h, c, w_ih.contiguous(), w_hh.contiguous(), bias, masks, full,
                !h0 || all_zero(h), flush);
  std::vector<Tensor> out{G ? *G : Tensor(), hs, keep_cells ? cs : cs.narrow(0, (T - 1) % cslots, 1)};
  if (tcs) out.push_back(*tcs);
  return out;
}

// The backward in one call (what fused._LSTMFunction runs), from the last step in chunks of `chunk`
// steps, each by lstm_backward_steps, which writes the gate gradients over G. Returns the gradients of
// x, h0, c0, w_ih, w_hh and the bias, in torch's layouts, each undefined (None) where need (a bit per
// gradient, in that order) does not ask for it. gh and gc: the outputs' and cells' gradients, or none.
std::vector<Tensor> lstm_backward(const Tensor& G, const Tensor& cs, const Tensor& hs, const Tensor& x,
                                  const std::optional<Tensor>& h0, const std::optional<Tensor>& c0,
                                  const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& tcs,
                                  const std::optional<Tensor>& gh, const std::optional<Tensor>& gc,
                                  const Tensor& masks, int64_t full, int64_t chunk, int64_t need, bool has_bias,
                                  bool flush) {
  TORCH_CHECK(G.dim() == 3 && G.size(0) > 0 && G.size(2) % 4 == 0 && chunk > 0,
              "rnnkit fused kernels: G must be (T > 0, N, 4H) and chunk positive");
  const int64_t T = G.size(0), N = G.size(1), H4 = G.size(2), H = H4 / 4, I = w_ih.size(1);
  const bool need_x = need & 1, need_h0 = need & 2, need_c0 = need & 4, need_wih = need & 8, need_whh = need & 16;
  const bool need_b = (need & 32) && has_bias, need_w = need_wih || need_whh || need_b;
  const int64_t Ix = I + (has_bias ? 1 : 0);
  const auto opts = G.options();
  Tensor DH = at::empty({2, N, H}, opts), carry = at::empty({N, H}, opts);
  Tensor dc = gc ? gc->select(0, T - 1).clone(at::MemoryFormat::Contiguous) : at::zeros({N, H}, opts);
  std::optional<Tensor> dx, w_in, dW, xw, hsw, h0w;
  if (need_x) {
    dx = at::empty({T, N, I}, opts);
    w_in = w_ih.contiguous();
  }
  const Tensor c = state_or_zeros(c0, G, N, H), whh = w_hh.contiguous();
  if (need_w) {
    // An empty batch has no rows to start the sums: zeros, as the gradient of nothing is.
    dW = N > 0 ? at::empty({row_blocks(N), Ix + H, H4}, opts) : at::zeros({1, Ix + H, H4}, opts);
    xw = rows_in_place(x);
    hsw = hs;
    if (h0) {
      const Tensor h = h0->contiguous();
      if (!all_zero(h)) h0w = h;  // none: a zero state adds nothing to W_hh's gradient
    }
  }
  std::optional<Tensor> gcc;
  if (gc) gcc = gc->contiguous();
  for (int64_t hi = T; hi > 0; hi -= chunk) {
    const int64_t lo = std::max<int64_t>(0, hi - chunk);
    std::optional<Tensor> tcc, ghc;
    if (tcs) tcc = tcs->slice(0, lo, hi);
    if (gh) ghc = rows_in_place(gh->slice(0, lo, hi));
    lstm_backward_steps(G, cs, c, tcc, G.slice(0, lo, hi), DH, dc, gcc, ghc, carry, whh, dx, w_in, masks, full, lo,
                        hi, flush, xw, hsw, h0w, dW, false);
  }
  // The weight gradients in torch's layouts, tensors of their own: a view would keep every block's
  // partial sums alive with the gradient (torch.autograd.grad, hooks), and AccumulateGrad would copy a
  // transposed one anyway.
  Tensor dwih = need_wih ? at::empty({H4, I}, opts) : Tensor(), dwhh = need_whh ? at::empty({H4, H}, opts) : Tensor();
  Tensor db = need_b ? at::empty({H4}, opts) : Tensor();
  if (need_w) {
    // the blocks the loops filled: as many as when dW was made, unless torch's thread count changed
    // meanwhile (another thread's set_num_threads), which would leave some unwritten
    TORCH_CHECK(N == 0 || row_blocks(N) == dW->size(0),
                "rnnkit fused kernels: torch's thread count changed during an LSTM backward");
    const int64_t blocks = dW->size(0), K = Ix + H;
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "lstm_weight_grads", [&] {
      const scalar_t* w = dW->data_ptr<scalar_t>();
      const int64_t bstride = K * H4;
      if (need_wih) sum_transposed<scalar_t>(w, blocks, bstride, I, H4, dwih.data_ptr<scalar_t>(), I, flush);
      if (need_b) sum_transposed<scalar_t>(w + I * H4, blocks, bstride, 1, H4, db.data_ptr<scalar_t>(), 1, flush);
      if (need_whh) sum_transposed<scalar_t>(w + Ix * H4, blocks, bstride, H, H4, dwhh.data_ptr<scalar_t>(), H, flush);
    });
  }
  return {need_x ? *dx : Tensor(), need_h0 ? at::mm(G.select(0, 0), whh) : Tensor(), need_c0 ? dc : Tensor(),
          dwih, dwhh, db};
}

// GRU with torch's maths (the reset gate after the recurrent product), gates (r, z, n), the n
// rows of the weights doubled so that tanh(a) = 2 sigmoid(2a) - 1. All steps of the forward for
// rows n0..n1: G (T, N, 3H) holds the input projections and receives the activations (r, z, n);
// S2 receives the n block of h_{t-1} W_hh^T + b_h (2 S, which the backward needs), hs the states
// the backward keeps and out the same values, for the caller (who may then edit them in place).
// wp: W_hh packed by blocks of W units, each panel (H, 3 gates x W); bh the recurrent bias (zero
// but for 2 b_hn).
template <typename T>
void gru_forward_rows(T* G, T* S2, T* hs, T* out, const T* h0, const T* wp, const T* bh, const Tensor& masks,
                      int64_t full, bool h0_zero, int64_t T_, int64_t N, int64_t H, int64_t n0, int64_t n1) {
  constexpr int W = Vec<T>::W;
  const int64_t panels = (H + W - 1) / W, H3 = 3 * H;
  for (int64_t t = 0; t < T_; ++t) {
    const T* hp = t == 0 ? h0 : hs + (t - 1) * N * H;
    const bool* m = mask_row(masks, t, full);
    const bool product = !(t == 0 && h0_zero);  // the usual zero initial state needs no product
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t j = p * W;
      const int w = static_cast<int>(std::min<int64_t>(W, H - j));
      const V<T> br = load(bh + j, w), bz = load(bh + H + j, w), bn = load(bh + 2 * H + j, w);
      for (int64_t r0 = n0; r0 < n1; r0 += kRows)
        with_rows(static_cast<int>(std::min<int64_t>(kRows, n1 - r0)), [&](auto R) {
        constexpr int rows = decltype(R)::value;
        V<T> acc[kRows][4];
        gate_tile<T, rows, 3>(nullptr, nullptr, 0, nullptr, 0, product ? hp + r0 * H : nullptr, H, wp + p * H * 3 * W, H,
                              acc);
        for (int r = 0; r < rows; ++r) {
          const int64_t n = r0 + r, at = n * H + j;
          T* gn = G + (t * N + n) * H3 + j;
          const V<T> rv = vsigmoid<T>(load(gn, w) + acc[r][0] + br);
          const V<T> zv = vsigmoid<T>(load(gn + H, w) + acc[r][1] + bz);
          const V<T> s2 = acc[r][2] + bn;
          const V<T> nv = T(2) * vsigmoid<T>(load(gn + 2 * H, w) + rv * s2) - T(1);
          const V<T> hpv = load(hp + at, w);
          store(gn, rv, w);
          store(gn + H, zv, w);
          store(gn + 2 * H, nv, w);
          store(S2 + t * N * H + at, s2, w);
          const V<T> hv = m != nullptr && !m[n] ? hpv : nv + zv * (hpv - nv);  // ended: the state is kept
          store(hs + t * N * H + at, hv, w);
          store(out + t * N * H + at, hv, w);
        }
      });
    }
  }
}

// All steps of the GRU backward for rows n0..n1, from the last. DH (T, N, H) holds the outputs'
// gradient and is overwritten with d loss / d h_t in full; DGi, DGh (T, N, 3H) receive the
// gradients of the input projection (r, z, n) and of h W_hh^T + b (r, z, S); dh0 (N, H) receives
// the part of d loss / d h_0 that bypasses the products. wp: W_hh packed by blocks of 4W hidden
// units, each panel (3H, 4W). Step t takes the recurrent part of its dh from step t+1's DGh.
template <typename T>
void gru_backward_rows(const T* G, const T* S2, const T* hs, const T* h0, T* DH, T* DGi, T* DGh, T* dh0,
                       const T* wp, const Tensor& masks, int64_t full, int64_t T_, int64_t N, int64_t H, int64_t n0,
                       int64_t n1) {
  const int64_t H3 = 3 * H;
  const V<T> one = splat(T(1));
  for (int64_t t = T_ - 1; t >= 0; --t) {
    const bool rec = t < T_ - 1;
    const T* above = rec ? DGh + (t + 1) * N * H3 : nullptr;
    const bool* m = mask_row(masks, t, full);
    const T* hp = t == 0 ? h0 : hs + (t - 1) * N * H;
    T* below = t == 0 ? dh0 : DH + (t - 1) * N * H;
    over_unit_tiles(above, wp, H3, H, n0, n1, [&](int64_t n, int64_t u, int w, V<T> rec_dh) {
      const int64_t at = n * H + u;
      T* dhp = DH + t * N * H + at;
      const V<T> d = load(dhp, w) + rec_dh;
      store(dhp, d, w);
      T* di = DGi + (t * N + n) * H3 + u;
      T* dr = DGh + (t * N + n) * H3 + u;
      if (m != nullptr && !m[n]) {  // ended: h_t = h_{t-1}, so dh passes straight down
        for (int k = 0; k < 3; ++k) {
          store(di + k * H, V<T>{}, w);
          store(dr + k * H, V<T>{}, w);
        }
        store(below + at, load(below + at, w) + d, w);
        return;
      }
      const T* gn = G + (t * N + n) * H3 + u;
      const V<T> rv = load(gn, w), zv = load(gn + H, w), nv = load(gn + 2 * H, w);
      const V<T> da_n = d * (one - zv) * (one - nv * nv);
      const V<T> da_z = d * (load(hp + at, w) - nv) * zv * (one - zv);
      const V<T> da_r = da_n * T(0.5) * load(S2 + t * N * H + at, w) * rv * (one - rv);
      store(di, da_r, w);
      store(di + H, da_z, w);
      store(di + 2 * H, da_n, w);
      store(dr, da_r, w);
      store(dr + H, da_z, w);
      store(dr + 2 * H, da_n * rv, w);
      store(below + at, load(below + at, w) + d * zv, w);
    });
  }
}

// All steps of a GRU forward. G (T, N, 3H) holds the input projections (n rows doubled, the input
// biases included) and receives the activations; S2 (T, N, H) receives 2 S per step, hs the outputs.
// whh is W_hh with its n rows doubled, bh the recurrent bias (zero but for 2 b_hn).
void gru_forward_steps(Tensor G, Tensor S2, Tensor hs, Tensor out, const Tensor& h0, const Tensor& whh,
                       const Tensor& bh, const Tensor& masks, int64_t full, bool h0_zero, bool flush) {
  for (const auto& [t, name] :
       {std::pair{S2, "S2"}, {hs, "hs"}, {out, "out"}, {h0, "h0"}, {whh, "whh"}, {bh, "bh"}})
    check(t, G, name);
  const auto [T, N, H] = sizes(G, hs, 3, "hs");
  expect(S2, "S2", {T, N, H});
  expect(out, "out", {T, N, H});
  expect(h0, "h0", {N, H});
  expect(whh, "whh", {3 * H, H});
  expect(bh, "bh", {3 * H});
  check_masks(masks, full, T, N);
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "gru_forward_steps", [&] {
    using R = Runs<scalar_t>;
    constexpr int W = Vec<scalar_t>::W;
    const scalar_t* wh = whh.data_ptr<scalar_t>();
    const Tensor wp = pack<scalar_t>(G, (H + W - 1) / W, 3 * W, H, [&](int64_t p, int64_t u) {
      const int64_t j = p * W + u % W;  // unit j of gate u / W
      return j < H ? R{{{wh + ((u / W) * H + j) * H, H}}} : R{};
    });
    over_row_blocks(N, flush, [&](int64_t, int64_t n0, int64_t n1) {
      gru_forward_rows<scalar_t>(G.data_ptr<scalar_t>(), S2.data_ptr<scalar_t>(), hs.data_ptr<scalar_t>(),
                                 out.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), wp.data_ptr<scalar_t>(),
                                 bh.data_ptr<scalar_t>(), masks, full, h0_zero, T, N, H, n0, n1);
    });
  });
}

// All steps of a GRU backward, from the last. DH (T, N, H) holds the outputs' gradient and is
// overwritten; DGi, DGh (T, N, 3H) receive the gradients of the input projection (r, z, n) and of
// h W_hh^T + b (r, z, S); dh0 (N, H, zeros on entry) receives the part of d loss / d h_0 that
// bypasses the products (the caller adds DGh[0] W_hh). w_hh is W_hh (3H, H), not doubled.
void gru_backward_steps(const Tensor& G, const Tensor& S2, const Tensor& hs, const Tensor& h0, Tensor DH,
                        Tensor DGi, Tensor DGh, Tensor dh0, const Tensor& w_hh, const Tensor& masks, int64_t full,
                        bool flush) {
  for (const auto& [t, name] : {std::pair{S2, "S2"}, {hs, "hs"}, {h0, "h0"}, {DH, "DH"}, {DGi, "DGi"},
                                {DGh, "DGh"}, {dh0, "dh0"}, {w_hh, "w_hh"}})
    check(t, G, name);
  const auto [T, N, H] = sizes(G, hs, 3, "hs");
  expect(S2, "S2", {T, N, H});
  expect(h0, "h0", {N, H});
  expect(DH, "DH", {T, N, H});
  expect(DGi, "DGi", {T, N, 3 * H});
  expect(DGh, "DGh", {T, N, 3 * H});
  expect(dh0, "dh0", {N, H});
  expect(w_hh, "w_hh", {3 * H, H});
  check_masks(masks, full, T, N);
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "gru_backward_steps", [&] {
    constexpr int W = Vec<scalar_t>::W;
    const scalar_t* wh = w_hh.data_ptr<scalar_t>();
    const Tensor wp = pack_rows<scalar_t>(G, (H + 4 * W - 1) / (4 * W), 4 * W, 3 * H, H,
                                          [&](int64_t k) { return wh + k * H; });
    over_row_blocks(N, flush, [&](int64_t, int64_t n0, int64_t n1) {
      gru_backward_rows<scalar_t>(G.data_ptr<scalar_t>(), S2.data_ptr<scalar_t>(), hs.data_ptr<scalar_t>(),
                                  h0.data_ptr<scalar_t>(), DH.data_ptr<scalar_t>(), DGi.data_ptr<scalar_t>(),
                                  DGh.data_ptr<scalar_t>(), dh0.data_ptr<scalar_t>(), wp.data_ptr<scalar_t>(), masks,
                                  full, T, N, H, n0, n1);
    });
  });
}

// ---- Traced cells: the recurrent product and a program of elementwise steps -------------------
//
// A user's cell traced by rnnkit/backends/traced.py: its products of the input and of one state
// by weights, and elementwise maths on their H-wide slices ("slots"), the states and per-unit
// parameter vectors. The input's share of every product (and the biases) is one GEMM before the
// loop (Z); here each step adds the recurrent state's product to the recurrent slots tile by tile
// and runs the program on the tile while it is in cache. The program is a list of instructions
// (op, destination, a, b) over registers of kRows vectors: slots first, then the old states, the
// parameter vectors and temporaries. The forward keeps the values the backward reads (Y); the
// backward runs the adjoint program Python derived from the forward's.
enum CellOp : int32_t {
  kAdd, kSub, kMul, kDiv, kNeg, kSigmoid, kTanh, kRelu, kExp, kAddC, kMulC, kRSubC, kPositive, kCopy, kZero, kDivC,
  kDSigmoid, kDTanh, kOps
};

// A register holds a tile: kRows rows by 4 vectors of units (the lane of row r, vector v is v kRows
// + r), so that each instruction's dispatch is paid once per 4 kRows vectors.
constexpr int kLanes = 4 * kRows;
template <typename T>
using Reg = V<T>[kLanes];

// Runs n instructions on the first L lanes of the registers; b of an instruction ending in C
// indexes consts.
template <typename T, int L>
void run_cell_program(const int32_t* code, int64_t n, const T* consts, Reg<T>* R) {
  for (int64_t i = 0; i < n; ++i, code += 4) {
    V<T>* d = R[code[1]];
    const V<T>* a = R[code[2]];
    const V<T>* b = R[code[3] < 0 ? 0 : code[3]];
    switch (code[0]) {
      case kAdd: for (int r = 0; r < L; ++r) d[r] = a[r] + b[r]; break;
      case kSub: for (int r = 0; r < L; ++r) d[r] = a[r] - b[r]; break;
      case kMul: for (int r = 0; r < L; ++r) d[r] = a[r] * b[r]; break;
      case kDiv: for (int r = 0; r < L; ++r) d[r] = a[r] / b[r]; break;
      case kNeg: for (int r = 0; r < L; ++r) d[r] = -a[r]; break;
      case kSigmoid: for (int r = 0; r < L; ++r) d[r] = vsigmoid<T>(a[r]); break;
      case kTanh: for (int r = 0; r < L; ++r) d[r] = vtanh<T>(a[r]); break;
      case kRelu: {
        const V<T> zero{};
        for (int r = 0; r < L; ++r) d[r] = a[r] > zero ? a[r] : zero;
        break;
      }
      case kExp: for (int r = 0; r < L; ++r) d[r] = vexp(a[r]); break;
      case kAddC: { const T c = consts[code[3]]; for (int r = 0; r < L; ++r) d[r] = a[r] + c; break; }
      case kMulC: { const T c = consts[code[3]]; for (int r = 0; r < L; ++r) d[r] = a[r] * c; break; }
      case kRSubC: { const T c = consts[code[3]]; for (int r = 0; r < L; ++r) d[r] = c - a[r]; break; }
      case kDivC: { const T c = consts[code[3]]; for (int r = 0; r < L; ++r) d[r] = c / a[r]; break; }
      case kPositive: {  // 1 where a > 0, else 0 (relu's derivative)
        const V<T> zero{}, one = splat(T(1));
        for (int r = 0; r < L; ++r) d[r] = a[r] > zero ? one : zero;
        break;
      }
      case kDSigmoid:  // a sigmoid's gradient a b (1 - b) from its output b and the output's gradient a
        for (int r = 0; r < L; ++r) d[r] = a[r] * b[r] * (T(1) - b[r]);
        break;
      case kDTanh:  // a tanh's: a (1 - b b)
        for (int r = 0; r < L; ++r) d[r] = a[r] * (T(1) - b[r] * b[r]);
        break;
      case kCopy: for (int r = 0; r < L; ++r) d[r] = a[r]; break;
      case kZero: for (int r = 0; r < L; ++r) d[r] = V<T>{}; break;
      default: break;
    }
  }
}

// run_cell_program() on a whole register (4 vectors of units: the backward's tiles) or on its first
// kRows lanes (one vector: the forward, whose tiles go panel by panel so that a panel of weights
// stays in L1 for all rows of the block; four panels at a time were 160 KB at H 128).
template <typename T>
void run_cell_program(const int32_t* code, int64_t n, const T* consts, Reg<T>* R, int vectors) {
  if (vectors == 1)
    run_cell_program<T, kRows>(code, n, consts, R);
  else
    run_cell_program<T, kLanes>(code, n, consts, R);
}

// A traced cell's shapes and programs: G slots (Gs recurrent ones first) of H units, S states
// (state kr feeds the product), P parameter vectors.
struct CellShape {
  int64_t T, N, H, G, Gs, S, P, kr, nregs;
};

void check_program(const Tensor& code, int64_t nregs, int64_t nconsts) {
  TORCH_CHECK(code.scalar_type() == at::kInt && code.is_contiguous() && code.dim() == 2 && code.size(1) == 4,
              "rnnkit fused kernels: a cell program must be contiguous (n, 4) int32");
  const int32_t* c = code.data_ptr<int32_t>();
  for (int64_t i = 0; i < code.size(0); ++i, c += 4) {
    TORCH_CHECK(c[0] >= 0 && c[0] < kOps && c[1] >= 0 && c[1] < nregs && c[2] >= 0 && c[2] < nregs,
                "rnnkit fused kernels: instruction ", i, " of a cell program is out of range");
    const bool scalar = c[0] == kAddC || c[0] == kMulC || c[0] == kRSubC || c[0] == kDivC;
    TORCH_CHECK(scalar ? (c[3] >= 0 && c[3] < nconsts) : (c[3] >= -1 && c[3] < nregs),
                "rnnkit fused kernels: operand b of instruction ", i, " of a cell program is out of range");
  }
}

// Forward panels: for unit vector p and pass q (up to four slots), (I + 1 + H, nv W) holding for
// column v W + w (slot 4q + v, unit p W + w; zero past H) the input weights wx, the bias b, then the
// recurrent weights ws (zero for slots past Gs).
template <typename T>
Tensor pack_cell_forward(const Tensor& wx, const Tensor& b, const Tensor& ws, int64_t H, int64_t G, int64_t Gs) {
  constexpr int W = Vec<T>::W;
  const int64_t I = wx.size(1), K = I + 1 + H, panels = (H + W - 1) / W, passes = (G + 3) / 4;
  Tensor out = at::zeros({panels, passes, K, 4 * W}, ws.options());
  const T *x = wx.data_ptr<T>(), *bb = b.data_ptr<T>(), *w = ws.data_ptr<T>();
  T* o = out.data_ptr<T>();
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t q = 0; q < passes; ++q) {
      const int64_t nv = std::min<int64_t>(4, G - 4 * q);
      T* panel = o + (p * passes + q) * K * 4 * W;
      for (int64_t v = 0; v < nv; ++v)
        for (int64_t u = 0; u < W && p * W + u < H; ++u) {
          const int64_t col = (4 * q + v) * H + p * W + u;
          T* at = panel + v * W + u;
          for (int64_t k = 0; k < I; ++k) at[k * nv * W] = x[col * I + k];
          at[I * nv * W] = bb[col];
          if (4 * q + v < Gs)
            for (int64_t k = 0; k < H; ++k) at[(I + 1 + k) * nv * W] = w[col * H + k];
        }
    }
  return out;
}

// Z (T, N, G H): the slots' pre-activations, kept only where the adjoint reads them (empty if not).
void check_cell(const CellShape& s, const Tensor& Z, const Tensor& S, const Tensor& S0, const Tensor& ws,
                const Tensor& pv, const Tensor& io, int64_t nio) {
  for (const auto& [t, name] : {std::pair{Z, "Z"}, {S0, "S0"}, {ws, "ws"}, {pv, "pv"}}) check(t, S, name);
  check(S, S, "S");
  if (Z.numel() > 0) expect(Z, "Z", {s.T, s.N, s.G * s.H});
  expect(S, "S", {s.S, s.T, s.N, s.H});
  expect(S0, "S0", {s.S, s.N, s.H});
  expect(ws, "ws", {s.Gs * s.H, s.H});
  expect(pv, "pv", {s.P, s.H});
  TORCH_CHECK(s.G >= 1 && s.Gs >= 0 && s.Gs <= s.G && s.S >= 1 && s.kr >= 0 && s.kr < s.S && s.P >= 0 &&
                  s.nregs >= s.G + s.S + s.P && s.nregs <= 256,
              "rnnkit fused kernels: inconsistent cell shape");
  TORCH_CHECK(io.scalar_type() == at::kInt && io.is_contiguous() && io.numel() == nio,
              "rnnkit fused kernels: a cell's register map must be ", nio, " int32");
  const int32_t* m = io.data_ptr<int32_t>();
  for (int64_t i = 0; i < nio; ++i)
    TORCH_CHECK(m[i] >= 0 && m[i] < s.nregs, "rnnkit fused kernels: a cell's register map is out of range");
}

// rows of a register's lanes to and from rows ld apart (w units each): a whole tile's shape as
// compile-time loops, the usual case, spares the lane loops their address arithmetic.
template <typename T>
inline void store_rows(T* dst, int64_t ld, const V<T>* lanes, int rows, int w, bool prefetch = false) {
  if (rows == kRows && w == Vec<T>::W) {
    for (int r = 0; r < kRows; ++r) store(dst + r * ld, lanes[r]);
  } else {
    for (int r = 0; r < rows; ++r) store(dst + r * ld, lanes[r], w);
  }
  if (prefetch)
    for (int r = 0; r < rows; ++r) __builtin_prefetch(dst + (r + kRows) * ld, 1);  // the next tile's rows
}

template <typename T>
inline void load_rows(V<T>* lanes, const T* src, int64_t ld, int rows, int w, bool prefetch = false) {
  if (rows == kRows && w == Vec<T>::W) {
    for (int r = 0; r < kRows; ++r) lanes[r] = load(src + r * ld);
  } else {
    for (int r = 0; r < rows; ++r) lanes[r] = load(src + r * ld, w);
  }
  if (prefetch)
    for (int r = 0; r < rows; ++r) __builtin_prefetch(src + (r + kRows) * ld);
}

// Step t's old states (S0 (S, N, H) at t 0, else step t - 1 of S (S, T, N, H)) into olds, and into
// reads those a program reads (flags), null for the others.
template <typename T>
void old_states(const CellShape& s, int64_t t, const T* S0d, const T* Sd, const int32_t* flags, const T** olds,
                const T** reads) {
  for (int64_t k = 0; k < s.S; ++k) {
    olds[k] = t == 0 ? S0d + k * s.N * s.H : Sd + (k * s.T + t - 1) * s.N * s.H;
    reads[k] = flags[k] ? olds[k] : nullptr;
  }
}

// Loads a tile's registers: slots (from z, when not null), old states (those of olds not null: the
// ones the program reads) and parameter vectors, at rows r0 .. r0 + rows - 1 and the nvec vectors
// of units from u0.
template <typename T>
void load_cell_tile(const CellShape& s, Reg<T>* R, const T* z, const T* const* olds, const T* pv, int64_t r0,
                    int rows, int64_t u0, int nvec) {
  constexpr int W = Vec<T>::W;
  const int64_t M = s.G * s.H;
  for (int v = 0; v < nvec; ++v) {
    const int64_t u = u0 + v * W;
    const int w = static_cast<int>(std::min<int64_t>(W, s.H - u));
    for (int64_t g = 0; g < s.G && z != nullptr; ++g) load_rows(R[g] + v * kRows, z + r0 * M + g * s.H + u, M, rows, w);
    for (int64_t k = 0; k < s.S; ++k)
      if (olds[k] != nullptr) load_rows(R[s.G + k] + v * kRows, olds[k] + r0 * s.H + u, s.H, rows, w);
    for (int64_t i = 0; i < s.P; ++i) {  // a parameter vector: the same in every row
      const V<T> x = load(pv + i * s.H + u, w);
      for (int r = 0; r < kRows; ++r) R[s.G + s.S + i][v * kRows + r] = x;
    }
  }
}

// All steps of a traced cell's forward. Z (T, N, G H) receives the slots' pre-activations, b +
// x_t wx^T (+ s_{t-1} ws^T for the Gs recurrent slots); S (S, T, N, H) every step's states, Y
// (T, N, saved, H) the values the backward reads; io the registers of the new states, then Y's.
void cell_forward_steps(Tensor Z, Tensor S, Tensor Y, const Tensor& x, const Tensor& S0, const Tensor& wx, const Tensor& b,
                        const Tensor& ws, const Tensor& pv, const Tensor& code, const Tensor& consts,
                        const Tensor& io, int64_t Gs, int64_t kr, int64_t nregs, const Tensor& masks, int64_t full,
                        bool s0_zero, bool flush, const Tensor& state_reads) {
  TORCH_CHECK(S.dim() == 4 && pv.dim() == 2 && wx.dim() == 2, "rnnkit fused kernels: S, pv or wx has the wrong rank");
  const CellShape s{S.size(1), S.size(2), S.size(3), S.size(3) ? wx.size(0) / S.size(3) : 0, Gs, S.size(0),
                    pv.size(0), kr, nregs};
  TORCH_CHECK(Y.dim() == 4, "rnnkit fused kernels: Y must be (T, N, saved, H)");
  const int64_t nsave = Y.size(2);
  check_cell(s, Z, S, S0, ws, pv, io, s.S + nsave);
  const bool keep_z = Z.numel() > 0;
  check_program(code, nregs, consts.numel());
  check_masks(masks, full, s.T, s.N);
  for (const auto& [t, name] : {std::pair{x, "x"}, {wx, "wx"}, {b, "b"}, {Y, "Y"}}) check(t, S, name);
  expect(Y, "Y", {s.T, s.N, nsave, s.H});
  TORCH_CHECK(x.dim() == 3 && x.size(0) == s.T && x.size(1) == s.N, "rnnkit fused kernels: x must be (T, N, I)");
  const int64_t I = x.size(2);
  expect(wx, "wx", {s.G * s.H, I});
  expect(b, "b", {s.G * s.H});
  TORCH_CHECK(state_reads.scalar_type() == at::kInt && state_reads.is_contiguous() && state_reads.numel() == s.S,
              "rnnkit fused kernels: state_reads must be one int32 per state");
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "cell_forward_steps", [&] {
    using T = scalar_t;
    constexpr int W = Vec<T>::W;
    const Tensor fwp = pack_cell_forward<T>(wx, b, ws, s.H, s.G, s.Gs);
    const Tensor kc = consts.to(S.scalar_type()).contiguous();
    const int64_t M = s.G * s.H, passes = (s.G + 3) / 4, panels = (s.H + W - 1) / W, K = I + 1 + s.H;
    // pointers once: data_ptr() checks the dtype on every call
    T *Sd = S.data_ptr<T>(), *Yd = Y.data_ptr<T>(), *Zd = keep_z ? Z.data_ptr<T>() : nullptr;
    const T *S0d = S0.data_ptr<T>(), *xd = x.data_ptr<T>(), *pvd = pv.data_ptr<T>(), *fwpd = fwp.data_ptr<T>(),
            *kcd = kc.data_ptr<T>();
    const int32_t* cd = code.data_ptr<int32_t>();
    over_row_blocks(s.N, flush, [&](int64_t, int64_t n0, int64_t n1) {
      std::vector<Reg<T>> regs(nregs);
      std::memset(static_cast<void*>(regs.data()), 0, nregs * sizeof(Reg<T>));
      std::vector<const T*> olds(s.S), reads(s.S);  // reads: the old states the program reads, else null
      const int32_t* outs = io.data_ptr<int32_t>();
      for (int64_t t = 0; t < s.T; ++t) {
        old_states(s, t, S0d, Sd, state_reads.data_ptr<int32_t>(), olds.data(), reads.data());
        T* z = keep_z ? Zd + t * s.N * M : nullptr;
        const T* xt = xd + t * s.N * I;
        const bool* m = mask_row(masks, t, full);
        const bool product = s.Gs > 0 && !(t == 0 && s0_zero);
        for (int64_t p = 0; p < panels; ++p)
          for (int64_t r0 = n0; r0 < n1; r0 += kRows) {
            const int rows = static_cast<int>(std::min<int64_t>(kRows, n1 - r0));
            const int64_t u = p * W;
            const int w = static_cast<int>(std::min<int64_t>(W, s.H - u));
            for (int64_t q = 0; q < passes; ++q) {  // the slots' pre-activations: b + x_t wx^T + s_{t-1} ws^T
              const int nv = static_cast<int>(std::min<int64_t>(4, s.G - 4 * q));
              const T* panel = fwpd + (p * passes + q) * K * 4 * W;
              V<T> acc[kRows][4];
              const T* h = product && 4 * q < s.Gs ? olds[kr] + r0 * s.H : nullptr;
              with_rows(rows, [&](auto R) {
                with_count<4>(nv, [&](auto NV) {
                  gate_tile<T, decltype(R)::value, decltype(NV)::value>(panel + I * nv * W, xt + r0 * I, I, panel, I, h,
                                                                        s.H, panel + (I + 1) * nv * W, s.H, acc);
                });
              });
              for (int r = 0; r < rows; ++r)
                for (int v = 0; v < nv; ++v) {
                  regs[4 * q + v][r] = acc[r][v];
                  if (keep_z) store(z + (r0 + r) * M + (4 * q + v) * s.H + u, acc[r][v], w);
                }
            }
            load_cell_tile<T>(s, regs.data(), nullptr, reads.data(), pvd, r0, rows, u, 1);
            run_cell_program<T>(cd, code.size(0), kcd, regs.data(), 1);
            for (int64_t k = 0; k < s.S; ++k) {
              T* dst = Sd + ((k * s.T + t) * s.N + r0) * s.H + u;
              store_rows(dst, s.H, regs[outs[k]], rows, w);
              for (int r = 0; m != nullptr && r < rows; ++r)  // a sequence that has ended keeps its state
                if (!m[r0 + r]) store(dst + r * s.H, load(olds[k] + (r0 + r) * s.H + u, w), w);
            }
            for (int64_t i = 0; i < nsave; ++i)
              store_rows(Yd + ((t * s.N + r0) * nsave + i) * s.H + u, nsave * s.H, regs[outs[s.S + i]], rows, w, true);
          }
      }
    });
  });
}

// All steps of a traced cell's backward, from the last. A (S, N, H) holds d loss / d final states on
// entry and receives d loss / d initial states; go (T, N, H, any step and row strides), when given,
// the outputs' (state 0's) gradient, gs (S, T, N, H), when given, every step's states' gradients.
// dpv (P, H) receives the parameter vectors' gradients, dwx (I + 1, G H)
// the sums of [x_t, 1]^T P_t (the input weights' and biases' gradients; x (T, N, I)), dws (H, Gs H)
// those of s_{t-1}^T P_t over the recurrent slots (the recurrent weights'). Y (T, N, saved, H): the
// forward's values the adjoint reads. dx (T, N, I), when given, receives the input's gradient from
// wx (G H, I). io: the adjoint's seeds (the new states' gradients), the
// registers holding the slots', old states' and parameter vectors' gradients, then Y's registers.
void cell_backward_steps(const Tensor& Z, const Tensor& S, const Tensor& Y, const Tensor& S0, Tensor A,
                         const std::optional<Tensor>& go, const std::optional<Tensor>& gs, Tensor dpv,
                         const Tensor& ws, const Tensor& pv, const Tensor& adjoint, const Tensor& consts, const Tensor& io,
                         int64_t Gs, int64_t kr, int64_t nregs, const Tensor& masks, int64_t full, bool flush,
                         const Tensor& x, Tensor dwx, Tensor dws, const Tensor& state_reads,
                         const std::optional<Tensor>& dx, const std::optional<Tensor>& wx) {
  TORCH_CHECK(dwx.dim() == 2 && S.dim() == 4 && pv.dim() == 2, "rnnkit fused kernels: dwx, S or pv has the wrong rank");
  const CellShape s{S.size(1), S.size(2), S.size(3), S.size(3) ? dwx.size(1) / S.size(3) : 0, Gs, S.size(0),
                    pv.size(0), kr, nregs};
  TORCH_CHECK(Y.dim() == 4, "rnnkit fused kernels: Y must be (T, N, saved, H)");
  const int64_t nsave = Y.size(2);
  check_cell(s, Z, S, S0, ws, pv, io, 2 * s.S + s.G + s.P + nsave);
  check(Y, S, "Y");
  expect(Y, "Y", {s.T, s.N, nsave, s.H});
  check(A, S, "A");
  check(dpv, S, "dpv");
  expect(A, "A", {s.S, s.N, s.H});
  TORCH_CHECK(dx.has_value() == wx.has_value(), "rnnkit fused kernels: dx and wx come together");
  expect(dpv, "dpv", {s.P, s.H});
  if (go) {
    check_strided(*go, S, "go", "(T, N, H) ", "units");
    expect(*go, "go", {s.T, s.N, s.H});
  }
  if (gs) {
    check(*gs, S, "gs");
    expect(*gs, "gs", {s.S, s.T, s.N, s.H});
  }
  check_program(adjoint, nregs, consts.numel());
  check(x, S, "x");
  check(dwx, S, "dwx");
  check(dws, S, "dws");
  TORCH_CHECK(x.dim() == 3 && x.size(0) == s.T && x.size(1) == s.N, "rnnkit fused kernels: x must be (T, N, I)");
  const int64_t I = x.size(2);
  expect(dwx, "dwx", {I + 1, s.G * s.H});
  expect(dws, "dws", {s.H, s.Gs * s.H});
  if (dx) {
    check(*dx, S, "dx");
    check(*wx, S, "wx");
    expect(*dx, "dx", {s.T, s.N, I});
    expect(*wx, "wx", {s.G * s.H, I});
  }
  check_masks(masks, full, s.T, s.N);
  TORCH_CHECK(state_reads.scalar_type() == at::kInt && state_reads.is_contiguous() && state_reads.numel() == s.S,
              "rnnkit fused kernels: state_reads must be one int32 per state");
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "cell_backward_steps", [&] {
    using T = scalar_t;
    constexpr int W = Vec<T>::W;
    const int64_t M = s.G * s.H, Ms = s.Gs * s.H, width = 4 * W, blocks4 = (s.H + width - 1) / width;
    const T* wsd = ws.data_ptr<T>();
    // panels of ws (Gs H, H) by blocks of 4W units: the recurrent state's gradient from the slots'
    const Tensor bwp = pack_rows<T>(S, blocks4, width, Ms, s.H, [&](int64_t k) { return wsd + k * s.H; });
    // panels of wx (G H, I) by blocks of nvx W inputs: the input's gradient from the slots'
    const int nvx = static_cast<int>(std::min<int64_t>(4, (I + W - 1) / W));
    const T* wxd = wx ? wx->data_ptr<T>() : nullptr;
    const Tensor wxpt = wx ? pack_rows<T>(S, (I + nvx * W - 1) / (nvx * W), nvx * W, M, I,
                                          [&](int64_t k) { return wxd + k * I; })
                           : Tensor();
    const T* wxp = wx ? wxpt.data_ptr<T>() : nullptr;
    T* dxd = dx ? dx->data_ptr<T>() : nullptr;
    const Tensor kc = consts.to(S.scalar_type()).contiguous();
    const int32_t* seeds = io.data_ptr<int32_t>();
    const int64_t blocks = row_blocks(s.N);
    // the slots' gradients, a ring of the steps the loop reads at once: the most a block's
    // weight-gradient group reads, and the step above (at T784 H256 B128 all of them were 400 MB)
    const int64_t fewest = s.N / blocks, R = std::min<int64_t>(s.T, kDepth / std::max<int64_t>(1, fewest) + 2);
    const Tensor Pbuf = at::empty({R, s.N, M}, S.options());
    // pointers once: data_ptr() checks the dtype on every call
    T *Ad = A.data_ptr<T>(), *Pd = Pbuf.data_ptr<T>();
    const T *Zd = Z.numel() > 0 ? Z.data_ptr<T>() : nullptr, *Sd = S.data_ptr<T>(), *S0d = S0.data_ptr<T>(),
            *Yd = Y.data_ptr<T>(), *xd = x.data_ptr<T>(), *pvd = pv.data_ptr<T>(), *bwpd = bwp.data_ptr<T>(),
            *kcd = kc.data_ptr<T>(), *god = go ? go->data_ptr<T>() : nullptr, *gsd = gs ? gs->data_ptr<T>() : nullptr;
    const int64_t go_t = go ? go->stride(0) : 0, go_n = go ? go->stride(1) : 0;
    const int32_t* ad = adjoint.data_ptr<int32_t>();
    const int32_t* dslots = seeds + s.S;
    const int32_t* dolds = dslots + s.G;
    const int32_t* dparams = dolds + s.S;
    const int32_t* saved = dparams + s.P;
    // partial sums by block of rows: dpv's, dwx's and dws's
    const Tensor parts = at::zeros({blocks, s.P, s.H}, S.options());
    // with every slot recurrent (the usual cell), one product [x_t, 1, s_{t-1}]^T P_t: b's panels are
    // copied once; else [x_t, 1]^T P_t and s_{t-1}^T P_t over the recurrent slots apart
    const bool one = Ms == M;
    const Tensor wparts = at::zeros({blocks, I + 1 + (one ? s.H : 0), M}, S.options());
    const Tensor sparts = at::zeros({blocks, s.H, one ? 0 : Ms}, S.options());
    const T ones = T(1);
    over_row_blocks(s.N, flush, [&](int64_t block, int64_t n0, int64_t n1) {
      std::vector<Reg<T>> regs(nregs);
      std::memset(static_cast<void*>(regs.data()), 0, nregs * sizeof(Reg<T>));
      std::vector<const T*> olds(s.S), reads(s.S);  // reads: the old states the program reads, else null
      T* dp = parts.data_ptr<T>() + block * s.P * s.H;
      alignas(64) T panel[kDepth * 4 * Vec<T>::W];
      // [x_t, 1, s_{t-1}]^T P_t for steps t .. t + steps - 1, in groups of up to kDepth rows (see
      // lstm_backward_rows: the partial sums' traffic is paid once a group)
      const int64_t rows_here = n1 - n0, group = std::max<int64_t>(1, kDepth / std::max<int64_t>(1, rows_here));
      const std::array<Part, 3> xparts{{{I, I, 0}, {0, 1, I}, {s.H, s.H, I + 1}}};
      const std::array<Part, 3> sparts_{{{s.H, s.H, 0}, {0, 0, 0}, {0, 0, 0}}};
      auto weight_grads = [&](int64_t t, int64_t steps) {
        std::array<Rows<T>, kDepth> xsegs, ssegs;
        for (int64_t m0 = n0; m0 < n1; m0 += kDepth) {
          const int64_t depth = std::min(kDepth, n1 - m0);
          int nsegs = 0;
          for (int64_t u = t; u < t + steps; ++u, ++nsegs) {
            const T* pu = Pd + ((u % R) * s.N + m0) * M;
            const T* su = (u == 0 ? S0d + kr * s.N * s.H : Sd + (kr * s.T + u - 1) * s.N * s.H);
            xsegs[nsegs] = {{xd + (u * s.N + m0) * I, &ones, su + m0 * s.H}, pu, depth};
            ssegs[nsegs] = {{su + m0 * s.H, nullptr, nullptr}, pu, depth};
          }
          at_b_block<T>(xsegs.data(), nsegs, xparts, one ? 3 : 2, M,
                        wparts.data_ptr<T>() + block * wparts.size(1) * M, M, false, panel);
          if (Ms > 0 && !one)
            at_b_block<T>(ssegs.data(), nsegs, sparts_, 1, M, sparts.data_ptr<T>() + block * s.H * Ms, Ms, false,
                          panel);
        }
      };
      // acc += rows r0.. of pt's recurrent slots times ws (the recurrent state's gradient) for units
      // q 4W ..; returns how many of the tile's vectors hold units
      auto recurrent = [&](const T* pt, int64_t r0, int rows, int64_t q, V<T> (&acc)[kRows][4]) {
        if (pt != nullptr && Ms > 0)  // whole panels (zero past H), as pack_rows() lays them out
          tile_rows<T, 4>(rows, pt + r0 * M, M, bwpd + q * Ms * width, Ms, acc);
        return static_cast<int>(std::min<int64_t>(4, (s.H - q * width + W - 1) / W));
      };
      for (int64_t t = s.T - 1; t >= 0; --t) {
        old_states(s, t, S0d, Sd, state_reads.data_ptr<int32_t>(), olds.data(), reads.data());
        const T* z = Zd != nullptr ? Zd + t * s.N * M : nullptr;
        const T* above = t + 1 < s.T ? Pd + ((t + 1) % R) * s.N * M : nullptr;
        T* pt = Pd + (t % R) * s.N * M;
        const bool* m = mask_row(masks, t, full);
        for (int64_t q = 0; q < blocks4; ++q)
          for (int64_t r0 = n0; r0 < n1; r0 += kRows) {
            const int rows = static_cast<int>(std::min<int64_t>(kRows, n1 - r0));
            V<T> acc[kRows][4] = {};
            const int nv = recurrent(above, r0, rows, q, acc);
            load_cell_tile<T>(s, regs.data(), z, reads.data(), pvd, r0, rows, q * width, nv);
            for (int v = 0; v < nv; ++v) {
              const int64_t u = q * width + v * W;
              const int w = static_cast<int>(std::min<int64_t>(W, s.H - u));
              for (int64_t k = 0; k < s.S; ++k) {
                V<T>* d = regs[seeds[k]] + v * kRows;
                load_rows(d, Ad + (k * s.N + r0) * s.H + u, s.H, rows, w, true);
                if (k == kr)
                  for (int r = 0; r < rows; ++r) d[r] += acc[r][v];
                if (k == 0 && god != nullptr)
                  for (int r = 0; r < rows; ++r) d[r] += load(god + t * go_t + (r0 + r) * go_n + u, w);
                if (gsd != nullptr)
                  for (int r = 0; r < rows; ++r) d[r] += load(gsd + ((k * s.T + t) * s.N + r0 + r) * s.H + u, w);
              }
              for (int64_t i = 0; i < nsave; ++i)
                load_rows(regs[saved[i]] + v * kRows, Yd + ((t * s.N + r0) * nsave + i) * s.H + u, nsave * s.H, rows, w,
                          true);
            }
            run_cell_program<T>(ad, adjoint.size(0), kcd, regs.data(), 4);
            for (int v = 0; v < nv; ++v) {
              const int64_t u = q * width + v * W;
              const int w = static_cast<int>(std::min<int64_t>(W, s.H - u));
              const int l0 = v * kRows;
              for (int64_t g = 0; g < s.G; ++g) store_rows(pt + r0 * M + g * s.H + u, M, regs[dslots[g]] + l0, rows, w);
              for (int64_t k = 0; k < s.S; ++k)
                store_rows(Ad + (k * s.N + r0) * s.H + u, s.H, regs[dolds[k]] + l0, rows, w);
              for (int r = 0; m != nullptr && r < rows; ++r) {
                const int64_t n = r0 + r;
                if (m[n]) continue;  // an ended sequence: no gradient into the slots, its state's passes through
                for (int64_t g = 0; g < s.G; ++g) store(pt + n * M + g * s.H + u, V<T>{}, w);
                for (int64_t k = 0; k < s.S; ++k) store(Ad + (k * s.N + n) * s.H + u, regs[seeds[k]][l0 + r], w);
              }
              for (int64_t i = 0; i < s.P; ++i) {
                V<T> sum = load(dp + i * s.H + u, w);
                for (int r = 0; r < rows; ++r)
                  if (m == nullptr || m[r0 + r]) sum += regs[dparams[i]][l0 + r];
                store(dp + i * s.H + u, sum, w);
              }
            }
          }
        if (dxd != nullptr)  // the input's gradient of step t: its slots' gradients times wx
          over_unit_tiles(pt, wxp, M, I, n0, n1, [&](int64_t n, int64_t u, int w, V<T> sum) {
            store(dxd + (t * s.N + n) * I + u, sum, w);
          }, nvx);
        const int64_t done = s.T - t;  // steps whose slots' gradients are in
        if (done % group == 0 || t == 0) weight_grads(t, done % group == 0 ? group : done % group);
      }
      // the initial recurrent state's share of the products of step 0
      for (int64_t q = 0; q < blocks4 && Ms > 0; ++q)
        for (int64_t r0 = n0; r0 < n1; r0 += kRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kRows, n1 - r0));
          V<T> acc[kRows][4] = {};
          const int nv = recurrent(Pd, r0, rows, q, acc);
          for (int r = 0; r < rows; ++r)
            for (int v = 0; v < nv; ++v) {
              const int64_t u = q * width + v * W;
              T* at = Ad + kr * s.N * s.H + (r0 + r) * s.H + u;
              const int w = static_cast<int>(std::min<int64_t>(W, s.H - u));
              store(at, load(at, w) + acc[r][v], w);
            }
        }
    });
    dpv.copy_(parts.sum(0));
    const Tensor wsum = wparts.sum(0);
    dwx.copy_(wsum.narrow(0, 0, I + 1));
    dws.copy_(one ? wsum.narrow(0, I + 1, s.H) : sparts.sum(0));
  });
}

}  // namespace

TORCH_LIBRARY(rnnkit_cpu, m) {
  m.def(
      "lstm_forward_steps(Tensor(a!) G, Tensor(b!) hs, Tensor(c!) cs, Tensor(d!)? tcs, Tensor x, "
      "Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor masks, int full, bool h0_zero, "
      "bool flush) -> ()");
  m.def(
      "lstm_backward_steps(Tensor G, Tensor cs, Tensor c0, Tensor? tcc, Tensor(a!) P, Tensor(e!) DH, Tensor(b!) dc, "
      "Tensor? gc, Tensor? gh, Tensor(c!) carry, Tensor w_hh, Tensor(d!)? dx, Tensor? w_ih, Tensor masks, int full, "
      "int lo, int hi, bool flush, Tensor? x=None, Tensor? hs=None, Tensor? h0=None, Tensor(f!)? dW=None, "
      "bool sum_blocks=True) -> ()");
  m.def(
      "lstm_forward(Tensor x, Tensor? h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor masks, int full, bool keep_tc, bool flush, bool keep_gates=True, bool keep_cells=True) -> Tensor[]");
  m.def(
      "lstm_backward(Tensor(a!) G, Tensor cs, Tensor hs, Tensor x, Tensor? h0, Tensor? c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? tcs, Tensor? gh, Tensor? gc, Tensor masks, int full, int chunk, int need, bool has_bias, "
      "bool flush) -> Tensor[]");
}

TORCH_LIBRARY_FRAGMENT(rnnkit_cpu, m) {
  m.def(
      "gru_forward_steps(Tensor(a!) G, Tensor(b!) S2, Tensor(c!) hs, Tensor(d!) out, Tensor h0, Tensor whh, "
      "Tensor bh, Tensor masks, int full, bool h0_zero, bool flush) -> ()");
  m.def(
      "gru_backward_steps(Tensor G, Tensor S2, Tensor hs, Tensor h0, Tensor(a!) DH, Tensor(b!) DGi, "
      "Tensor(c!) DGh, Tensor(d!) dh0, Tensor w_hh, Tensor masks, int full, bool flush) -> ()");
}

TORCH_LIBRARY_FRAGMENT(rnnkit_cpu, m) {
  m.def(
      "cell_forward_steps(Tensor(a!) Z, Tensor(b!) S, Tensor(c!) Y, Tensor x, Tensor S0, Tensor wx, Tensor b, Tensor ws, Tensor pv, "
      "Tensor code, Tensor consts, Tensor io, int Gs, int kr, int nregs, Tensor masks, int full, bool s0_zero, "
      "bool flush, Tensor state_reads) -> ()");
  m.def(
      "cell_backward_steps(Tensor Z, Tensor S, Tensor Y, Tensor S0, Tensor(a!) A, Tensor? go, Tensor? gs, "
      "Tensor(c!) dpv, Tensor ws, Tensor pv, Tensor adjoint, Tensor consts, Tensor io, int Gs, int kr, "
      "int nregs, Tensor masks, int full, bool flush, Tensor x, Tensor(d!) dwx, Tensor(e!) dws, Tensor state_reads, "
      "Tensor(f!)? dx=None, Tensor? wx=None) -> ()");
}

TORCH_LIBRARY_IMPL(rnnkit_cpu, CPU, m) {
  m.impl("cell_forward_steps", &cell_forward_steps);
  m.impl("cell_backward_steps", &cell_backward_steps);
  m.impl("gru_forward_steps", &gru_forward_steps);
  m.impl("gru_backward_steps", &gru_backward_steps);
  m.impl("lstm_forward_steps", &lstm_forward_steps);
  m.impl("lstm_backward_steps", &lstm_backward_steps);
  m.impl("lstm_forward", &lstm_forward);
  m.impl("lstm_backward", &lstm_backward);
}
