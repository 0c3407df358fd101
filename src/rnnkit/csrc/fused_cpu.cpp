// The time loops of the fused CPU backend's LSTM and GRU (rnnkit/backends/fused.py), in C++.
//
// The Python loops pay the interpreter and one dispatch per elementwise op, ten or more per step;
// here a step is one GEMM and one pass over its gates. Layout and conventions are the Python
// backend's, so the two paths share everything around the loops: gates in the order
// (o, i, f, g), the g rows of the weights doubled so that tanh(a) = 2 sigmoid(2a) - 1 and one
// sigmoid covers the whole gate row, the activated gates written over the pre-activations, masks
// (T, N) with false where a sequence has ended (its state is then frozen).
//
// Built and loaded by rnnkit/backends/cext.py; every entry point is also run by the tests against
// the Python loops and torch.nn.LSTM.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
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

// oneDNN's inner product (torch's float32 mm goes to a BLAS that stops at AVX2 on AMD processors;
// see rnnkit/backends/gemm.py): a @ w^T.
Tensor onednn_linear(const Tensor& a, const Tensor& w) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::string_view,
                                     c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  return op.call(a, w, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

Tensor linear(const Tensor& a, const Tensor& w, bool onednn) {
  return onednn ? onednn_linear(a, w) : at::mm(a, w.t());
}

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

// exp for float32 without branches, so the loops below vectorize: Cody-Waite range reduction and
// a degree-5 polynomial (Cephes' expf), within 2 ulp. Inputs are clamped to the normal range.
inline float exp_(float x) {
  x = std::min(std::max(x, -87.0f), 87.0f);  // e^87 keeps 1 / (1 + e^87) a normal float
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

inline double exp_(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + exp_(-x));
}

template <typename T>
inline T tanh_(T x) {
  return T(2) * sigmoid(x + x) - T(1);
}

// Rows n0..n1 of one forward step: pre holds the pre-activations (g doubled), G receives the
// activations, c/tc/h the new cell, tanh(cell) and output. Frozen rows keep the previous state.
template <typename T, bool kAdd>
void forward_rows(const T* __restrict pre, T* __restrict G, const T* __restrict c_prev, const T* __restrict h_prev,
                  T* __restrict c, T* __restrict tc, T* __restrict h, const bool* mask, int64_t n0, int64_t n1,
                  int64_t H) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* __restrict p = pre + n * 4 * H;
    T* __restrict g = G + n * 4 * H;
    const T* __restrict cp = c_prev + n * H;
    T* __restrict cn = c + n * H;
    T* __restrict tcn = tc + n * H;
    T* __restrict hn = h + n * H;
    for (int64_t j = 0; j < H; ++j) {
      const T o = sigmoid(kAdd ? p[j] + g[j] : p[j]);
      const T i = sigmoid(kAdd ? p[H + j] + g[H + j] : p[H + j]);
      const T f = sigmoid(kAdd ? p[2 * H + j] + g[2 * H + j] : p[2 * H + j]);
      const T gg = T(2) * sigmoid(kAdd ? p[3 * H + j] + g[3 * H + j] : p[3 * H + j]) - T(1);
      const T cc = f * cp[j] + i * gg;
      const T t = tanh_(cc);
      g[j] = o;
      g[H + j] = i;
      g[2 * H + j] = f;
      g[3 * H + j] = gg;
      cn[j] = cc;
      tcn[j] = t;
      hn[j] = o * t;
    }
    if (mask != nullptr && !mask[n]) {
      std::memcpy(cn, cp, H * sizeof(T));
      std::memcpy(hn, h_prev + n * H, H * sizeof(T));
    }
  }
}

// Rows n0..n1 of one backward step. G holds the step's activations, tc its tanh(c) (or, when
// null, c itself to take tanh of), c_prev the cell before it. dh holds the outputs' gradient on
// entry; rec, when given, the recurrent part, which is added in, so that dh leaves holding
// d loss / d h_t in full. dc is d loss / d c_t from above on entry and d loss / d c_{t-1} on exit
// (plus gc_prev, the gradient of the outputs' c_{t-1}, when given). dG receives the gates'
// pre-activation gradients.
template <typename T, bool kHaveTanh, bool kAdd>
void backward_rows(const T* __restrict G, const T* __restrict tc_or_c, const T* __restrict c_prev,
                   T* __restrict dh, const T* __restrict rec, T* __restrict dc, const T* __restrict gc_prev,
                   T* __restrict dG, const bool* mask, int64_t n0, int64_t n1, int64_t H) {
  for (int64_t n = n0; n < n1; ++n) {
    T* __restrict d = dG + n * 4 * H;
    T* __restrict dcn = dc + n * H;
    T* __restrict dhn = dh + n * H;
    if (kAdd) {
      const T* __restrict r = rec + n * H;
      for (int64_t j = 0; j < H; ++j) dhn[j] += r[j];
    }
    if (mask == nullptr || mask[n]) {
      const T* __restrict g = G + n * 4 * H;
      const T* __restrict tcn = tc_or_c + n * H;
      const T* __restrict cp = c_prev + n * H;
      for (int64_t j = 0; j < H; ++j) {
        const T o = g[j], i = g[H + j], f = g[2 * H + j], gg = g[3 * H + j];
        const T t = kHaveTanh ? tcn[j] : tanh_(tcn[j]);
        const T dhv = dhn[j];
        const T dcv = dcn[j] + dhv * o * (T(1) - t * t);
        d[j] = dhv * t * o * (T(1) - o);
        d[H + j] = dcv * gg * i * (T(1) - i);
        d[2 * H + j] = dcv * cp[j] * f * (T(1) - f);
        d[3 * H + j] = dcv * i * (T(1) - gg * gg);
        dcn[j] = dcv * f;
      }
    } else {  // frozen: no gradient into the gates, dc passes through unchanged
      std::memset(d, 0, 4 * H * sizeof(T));
    }
    if (gc_prev != nullptr) {
      const T* __restrict gc = gc_prev + n * H;
      for (int64_t j = 0; j < H; ++j) dcn[j] += gc[j];
    }
  }
}

// GRU with torch's maths (the reset gate after the recurrent product), gates (r, z, n), the n
// rows of the weights doubled so that tanh(a) = 2 sigmoid(2a) - 1. Rows n0..n1 of one forward
// step: hh is h_{t-1} W_hh^T (n rows doubled), or null for a zero state, bh the recurrent bias
// (zero but for 2 b_hn); G holds the input projections and receives the activations (r, z, n),
// s2 receives the n block of hh + bh (2 S, which the backward needs), h the state the backward
// keeps and out the same values, for the caller (who may then edit them in place).
template <typename T, bool kProduct>
void gru_forward_rows(const T* __restrict hh, const T* __restrict bh, T* __restrict G, T* __restrict s2,
                      const T* __restrict h_prev, T* __restrict h, T* __restrict out, const bool* mask, int64_t n0,
                      int64_t n1, int64_t H) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* __restrict p = kProduct ? hh + n * 3 * H : nullptr;
    T* __restrict g = G + n * 3 * H;
    T* __restrict sn = s2 + n * H;
    const T* __restrict hp = h_prev + n * H;
    T* __restrict hn = h + n * H;
    T* __restrict on = out + n * H;
    for (int64_t j = 0; j < H; ++j) {
      const T hr = (kProduct ? p[j] : T(0)) + bh[j];
      const T hz = (kProduct ? p[H + j] : T(0)) + bh[H + j];
      const T hs = (kProduct ? p[2 * H + j] : T(0)) + bh[2 * H + j];
      const T r = sigmoid(g[j] + hr);
      const T z = sigmoid(g[H + j] + hz);
      const T nn = T(2) * sigmoid(g[2 * H + j] + r * hs) - T(1);
      g[j] = r;
      g[H + j] = z;
      g[2 * H + j] = nn;
      sn[j] = hs;
      const T hv = nn + z * (hp[j] - nn);
      hn[j] = hv;
      on[j] = hv;
    }
    if (mask != nullptr && !mask[n]) {
      std::memcpy(hn, hp, H * sizeof(T));
      std::memcpy(on, hp, H * sizeof(T));
    }
  }
}

// Rows n0..n1 of one GRU backward step. dh holds the outputs' gradient of step t plus what the
// step above passed down directly (dh_{t+1} z_{t+1}); rec, when given, the recurrent product, added
// in. dgi receives the gradients of the input projection's pre-activations (r, z, n), dgh those of
// h W_hh^T + b (r, z, S); dh_below (step t-1's row of the outputs' gradient, or dh0's buffer) gets
// dh z added, the part of the gradient that bypasses the products.
template <typename T, bool kAdd>
void gru_backward_rows(const T* __restrict G, const T* __restrict s2, const T* __restrict h_prev,
                       T* __restrict dh, const T* __restrict rec, T* __restrict dgi, T* __restrict dgh,
                       T* __restrict dh_below, const bool* mask, int64_t n0, int64_t n1, int64_t H) {
  for (int64_t n = n0; n < n1; ++n) {
    T* __restrict dhn = dh + n * H;
    T* __restrict di = dgi + n * 3 * H;
    T* __restrict dr = dgh + n * 3 * H;
    T* __restrict below = dh_below + n * H;
    if (kAdd) {
      const T* __restrict q = rec + n * H;
      for (int64_t j = 0; j < H; ++j) dhn[j] += q[j];
    }
    if (mask != nullptr && !mask[n]) {  // frozen: h_t = h_{t-1}, so dh passes straight down
      std::memset(di, 0, 3 * H * sizeof(T));
      std::memset(dr, 0, 3 * H * sizeof(T));
      for (int64_t j = 0; j < H; ++j) below[j] += dhn[j];
      continue;
    }
    const T* __restrict g = G + n * 3 * H;
    const T* __restrict sn = s2 + n * H;
    const T* __restrict hp = h_prev + n * H;
    for (int64_t j = 0; j < H; ++j) {
      const T r = g[j], z = g[H + j], nn = g[2 * H + j];
      const T d = dhn[j];
      const T da_n = d * (T(1) - z) * (T(1) - nn * nn);
      const T da_z = d * (hp[j] - nn) * z * (T(1) - z);
      const T da_r = da_n * T(0.5) * sn[j] * r * (T(1) - r);
      di[j] = da_r;
      di[H + j] = da_z;
      di[2 * H + j] = da_n;
      dr[j] = da_r;
      dr[H + j] = da_z;
      dr[2 * H + j] = da_n * r;
      below[j] += d * z;
    }
  }
}

// Rows per parallel chunk: about 4,096 elements of state, so small batches stay on one thread.
int64_t grain(int64_t H) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, H)); }

// fn(n0, n1) over the batch's rows on torch's threads, each flushing denormals when the caller does.
template <typename F>
void over_rows(int64_t N, int64_t H, bool flush, const F& fn) {
  at::parallel_for(0, N, grain(H), [&](int64_t n0, int64_t n1) {
    Flush f(flush);
    fn(n0, n1);
  });
}

// fn(std::true_type) or fn(std::false_type): a runtime flag as a template argument of the row kernels.
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

// Steps lo..hi-1 of the forward. G (T, N, 4H) holds the input projections of those steps (bias
// and doubled g rows included) and receives their activations; hs, cs (T, N, H) receive the
// outputs and cells; tcs is (T, N, H) to keep every step's tanh(c), or (1, N, H) scratch.
void lstm_forward_steps(Tensor G, Tensor hs, Tensor cs, Tensor tcs, const Tensor& h0, const Tensor& c0,
                        const Tensor& whh, const Tensor& masks, int64_t full, int64_t lo, int64_t hi, bool h0_zero,
                        bool onednn, bool flush) {
  for (const auto& [t, name] : {std::pair{hs, "hs"}, {cs, "cs"}, {tcs, "tcs"}, {h0, "h0"}, {c0, "c0"}, {whh, "whh"}})
    check(t, G, name);
  const auto [T, N, H] = sizes(G, hs, 4, "hs");
  expect(cs, "cs", {T, N, H});
  TORCH_CHECK(tcs.dim() == 3 && (tcs.size(0) == T || tcs.size(0) == 1) && tcs.size(1) == N && tcs.size(2) == H,
              "rnnkit fused kernels: tcs must be (T, N, H) or (1, N, H), got ", tcs.sizes());
  expect(h0, "h0", {N, H});
  expect(c0, "c0", {N, H});
  expect(whh, "whh", {4 * H, H});
  TORCH_CHECK(0 <= lo && lo <= hi && hi <= T, "rnnkit fused kernels: bad step range");
  check_masks(masks, full, T, N);
  const bool keep = tcs.size(0) == T;
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "lstm_forward_steps", [&] {
    for (int64_t t = lo; t < hi; ++t) {
      Tensor gt = G[t];
      const Tensor& h_prev = t == 0 ? h0 : hs[t - 1];
      const Tensor& c_prev = t == 0 ? c0 : cs[t - 1];
      // The recurrent product lands in a buffer of its own, and the activations add the input
      // projection as they read it (oneDNN's fused add costs a pass of its own); the usual zero
      // initial state needs no product: the activations then read the projection alone.
      const bool add = !(t == 0 && h0_zero);
      Tensor pre = add ? linear(h_prev, whh, onednn) : gt.clone();
      const scalar_t* p = pre.data_ptr<scalar_t>();
      scalar_t* g = gt.data_ptr<scalar_t>();
      const scalar_t* cp = c_prev.data_ptr<scalar_t>();
      const scalar_t* hp = h_prev.data_ptr<scalar_t>();
      scalar_t* c = cs.data_ptr<scalar_t>() + t * N * H;
      scalar_t* tc = tcs.data_ptr<scalar_t>() + (keep ? t : 0) * N * H;
      scalar_t* h = hs.data_ptr<scalar_t>() + t * N * H;
      const bool* m = mask_row(masks, t, full);
      with_flag(add, [&](auto k) {
        over_rows(N, H, flush, [&](int64_t n0, int64_t n1) {
          forward_rows<scalar_t, decltype(k)::value>(p, g, cp, hp, c, tc, h, m, n0, n1, H);
        });
      });
    }
  });
}

// Steps hi-1 down to lo of the backward. P (hi - lo, N, 4H) receives their gate gradients; DH
// (hi - lo, N, H) holds the outputs' gradient of those steps with the carry from step hi already
// added to its last row, and is overwritten with d loss / d h_t in full; tcc (hi - lo, N, H) their
// tanh(c), or undefined to recompute it from cs; dc (N, H) is d loss / d c_{hi-1} on entry and
// d loss / d c_{lo-1} on exit (dc0 when lo == 0); gc (T, N, H), optional, is the gradient of every
// step's c; carry (N, H) receives d loss / d h_{lo-1} through the recurrence when lo > 0; whh_t is
// W_hh^T (H, 4H), contiguous.
void lstm_backward_steps(const Tensor& G, const Tensor& cs, const Tensor& c0, const std::optional<Tensor>& tcc,
                         Tensor P, const Tensor& DH, Tensor dc, const std::optional<Tensor>& gc, Tensor carry,
                         const Tensor& whh_t, const Tensor& masks, int64_t full, int64_t lo, int64_t hi, bool onednn,
                         bool flush) {
  for (const auto& [t, name] : {std::pair{cs, "cs"}, {c0, "c0"}, {P, "P"}, {DH, "DH"}, {dc, "dc"}, {carry, "carry"},
                                {whh_t, "whh_t"}})
    check(t, G, name);
  if (tcc) check(*tcc, G, "tcc");
  if (gc) check(*gc, G, "gc");
  const auto [T, N, H] = sizes(G, cs, 4, "cs");
  TORCH_CHECK(0 <= lo && lo < hi && hi <= T, "rnnkit fused kernels: bad step range");
  const int64_t n = hi - lo;
  expect(c0, "c0", {N, H});
  if (tcc) expect(*tcc, "tcc", {n, N, H});
  TORCH_CHECK(P.dim() == 3 && P.size(0) >= n && P.size(1) == N && P.size(2) == 4 * H,
              "rnnkit fused kernels: P must be (at least hi - lo, N, 4H), got ", P.sizes());
  TORCH_CHECK(DH.dim() == 3 && DH.size(0) >= n && DH.size(1) == N && DH.size(2) == H,
              "rnnkit fused kernels: DH must be (at least hi - lo, N, H), got ", DH.sizes());
  expect(dc, "dc", {N, H});
  if (gc) expect(*gc, "gc", {T, N, H});
  expect(carry, "carry", {N, H});
  expect(whh_t, "whh_t", {H, 4 * H});
  check_masks(masks, full, T, N);
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "lstm_backward_steps", [&] {
    scalar_t* dcp = dc.data_ptr<scalar_t>();
    Tensor rec;  // the recurrent part of d loss / d h_t, from the step above (a product of its own)
    for (int64_t t = hi - 1; t >= lo; --t) {
      const int64_t j = t - lo;
      const bool* m = mask_row(masks, t, full);
      const scalar_t* g = G.data_ptr<scalar_t>() + t * N * 4 * H;
      const scalar_t* tc = tcc ? tcc->data_ptr<scalar_t>() + j * N * H : cs.data_ptr<scalar_t>() + t * N * H;
      const scalar_t* cp = t == 0 ? c0.data_ptr<scalar_t>() : cs.data_ptr<scalar_t>() + (t - 1) * N * H;
      scalar_t* dhp = DH.data_ptr<scalar_t>() + j * N * H;
      const scalar_t* rp = rec.defined() ? rec.data_ptr<scalar_t>() : nullptr;
      const scalar_t* gcp = (gc && t > 0) ? gc->data_ptr<scalar_t>() + (t - 1) * N * H : nullptr;
      Tensor pj = P[j];
      scalar_t* d = pj.data_ptr<scalar_t>();
      with_flag(tcc.has_value(), [&](auto have_tanh) {
        with_flag(rp != nullptr, [&](auto add) {
          over_rows(N, H, flush, [&](int64_t n0, int64_t n1) {
            backward_rows<scalar_t, decltype(have_tanh)::value, decltype(add)::value>(g, tc, cp, dhp, rp, dcp, gcp,
                                                                                      d, m, n0, n1, H);
          });
        });
      });
      if (t == 0) break;
      rec = linear(pj, whh_t, onednn);
      if (m != nullptr) {  // frozen rows pass their dh straight down
        scalar_t* r = rec.data_ptr<scalar_t>();
        for (int64_t n = 0; n < N; ++n)
          if (!m[n])
            for (int64_t k = 0; k < H; ++k) r[n * H + k] += dhp[n * H + k];
      }
      if (j == 0) carry.copy_(rec);  // the step below starts the next chunk
    }
  });
}


// All steps of a GRU forward. G (T, N, 3H) holds the input projections (n rows doubled, the input
// biases included) and receives the activations; S2 (T, N, H) receives 2 S per step, hs the outputs.
// whh is W_hh with its n rows doubled, bh the recurrent bias (zero but for 2 b_hn).
void gru_forward_steps(Tensor G, Tensor S2, Tensor hs, Tensor out, const Tensor& h0, const Tensor& whh,
                       const Tensor& bh, const Tensor& masks, int64_t full, bool h0_zero, bool onednn, bool flush) {
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
    const scalar_t* b = bh.data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      const Tensor& h_prev = t == 0 ? h0 : hs[t - 1];
      const bool product = !(t == 0 && h0_zero);
      Tensor hh = product ? linear(h_prev, whh, onednn) : Tensor();
      const scalar_t* p = product ? hh.data_ptr<scalar_t>() : nullptr;
      scalar_t* g = G.data_ptr<scalar_t>() + t * N * 3 * H;
      scalar_t* s2 = S2.data_ptr<scalar_t>() + t * N * H;
      const scalar_t* hp = h_prev.data_ptr<scalar_t>();
      scalar_t* h = hs.data_ptr<scalar_t>() + t * N * H;
      scalar_t* o = out.data_ptr<scalar_t>() + t * N * H;
      const bool* m = mask_row(masks, t, full);
      with_flag(product, [&](auto k) {
        over_rows(N, H, flush, [&](int64_t n0, int64_t n1) {
          gru_forward_rows<scalar_t, decltype(k)::value>(p, b, g, s2, hp, h, o, m, n0, n1, H);
        });
      });
    }
  });
}

// All steps of a GRU backward, from the last. DH (T, N, H) holds the outputs' gradient and is
// overwritten; DGi, DGh (T, N, 3H) receive the gradients of the input projection (r, z, n) and of
// h W_hh^T + b (r, z, S); dh0 (N, H, zeros on entry) receives the part of d loss / d h_0 that
// bypasses the products (the caller adds DGh[0] W_hh). whh_t is W_hh^T (H, 3H), contiguous.
void gru_backward_steps(const Tensor& G, const Tensor& S2, const Tensor& hs, const Tensor& h0, Tensor DH,
                        Tensor DGi, Tensor DGh, Tensor dh0, const Tensor& whh_t, const Tensor& masks, int64_t full,
                        bool onednn, bool flush) {
  for (const auto& [t, name] : {std::pair{S2, "S2"}, {hs, "hs"}, {h0, "h0"}, {DH, "DH"}, {DGi, "DGi"},
                                {DGh, "DGh"}, {dh0, "dh0"}, {whh_t, "whh_t"}})
    check(t, G, name);
  const auto [T, N, H] = sizes(G, hs, 3, "hs");
  expect(S2, "S2", {T, N, H});
  expect(h0, "h0", {N, H});
  expect(DH, "DH", {T, N, H});
  expect(DGi, "DGi", {T, N, 3 * H});
  expect(DGh, "DGh", {T, N, 3 * H});
  expect(dh0, "dh0", {N, H});
  expect(whh_t, "whh_t", {H, 3 * H});
  check_masks(masks, full, T, N);
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "gru_backward_steps", [&] {
    Tensor rec;
    for (int64_t t = T - 1; t >= 0; --t) {
      const bool* m = mask_row(masks, t, full);
      const scalar_t* g = G.data_ptr<scalar_t>() + t * N * 3 * H;
      const scalar_t* s2 = S2.data_ptr<scalar_t>() + t * N * H;
      const scalar_t* hp = t == 0 ? h0.data_ptr<scalar_t>() : hs.data_ptr<scalar_t>() + (t - 1) * N * H;
      scalar_t* dh = DH.data_ptr<scalar_t>() + t * N * H;
      const scalar_t* rp = rec.defined() ? rec.data_ptr<scalar_t>() : nullptr;
      scalar_t* di = DGi.data_ptr<scalar_t>() + t * N * 3 * H;
      Tensor dgh = DGh[t];
      scalar_t* dr = dgh.data_ptr<scalar_t>();
      scalar_t* below = t == 0 ? dh0.data_ptr<scalar_t>() : DH.data_ptr<scalar_t>() + (t - 1) * N * H;
      with_flag(rp != nullptr, [&](auto add) {
        over_rows(N, H, flush, [&](int64_t n0, int64_t n1) {
          gru_backward_rows<scalar_t, decltype(add)::value>(g, s2, hp, dh, rp, di, dr, below, m, n0, n1, H);
        });
      });
      if (t > 0) rec = linear(dgh, whh_t, onednn);
    }
  });
}

}  // namespace

TORCH_LIBRARY(rnnkit_cpu, m) {
  m.def(
      "lstm_forward_steps(Tensor(a!) G, Tensor(b!) hs, Tensor(c!) cs, Tensor(d!) tcs, Tensor h0, Tensor c0, "
      "Tensor whh, Tensor masks, int full, int lo, int hi, bool h0_zero, bool onednn, bool flush) -> ()");
  m.def(
      "lstm_backward_steps(Tensor G, Tensor cs, Tensor c0, Tensor? tcc, Tensor(a!) P, Tensor DH, Tensor(b!) dc, "
      "Tensor? gc, Tensor(c!) carry, Tensor whh_t, Tensor masks, int full, int lo, int hi, bool onednn, "
      "bool flush) -> ()");
}

TORCH_LIBRARY_FRAGMENT(rnnkit_cpu, m) {
  m.def(
      "gru_forward_steps(Tensor(a!) G, Tensor(b!) S2, Tensor(c!) hs, Tensor(d!) out, Tensor h0, Tensor whh, "
      "Tensor bh, Tensor masks, int full, bool h0_zero, bool onednn, bool flush) -> ()");
  m.def(
      "gru_backward_steps(Tensor G, Tensor S2, Tensor hs, Tensor h0, Tensor(a!) DH, Tensor(b!) DGi, "
      "Tensor(c!) DGh, Tensor(d!) dh0, Tensor whh_t, Tensor masks, int full, bool onednn, bool flush) -> ()");
}

TORCH_LIBRARY_IMPL(rnnkit_cpu, CPU, m) {
  m.impl("gru_forward_steps", &gru_forward_steps);
  m.impl("gru_backward_steps", &gru_backward_steps);
  m.impl("lstm_forward_steps", &lstm_forward_steps);
  m.impl("lstm_backward_steps", &lstm_backward_steps);
}
