// Exact top-n selection and tail statistics over rows of float32 logits: the CPU hot path of the truncation
// samplers. llmgraft/kernels/truncation.py holds the definitions, and the torch path this must equal.
//
// Per row:
// 1. A lower bound on the n-th largest value from the maxima of G >= 4n groups of tokens (vertical vector
//    maxima, no shuffles): any value with at least n maxima at or above it, found by bisection on counts.
// 2. One filtering pass: a vector compare against the bound lets almost every token through without scalar
//    work; the indices of the ~n tokens above it are compressed into a buffer (cut back to n whenever it
//    fills), then sorted as 64-bit keys (value order, then index).
// 3. With statistics, a second pass sums, over the tail (every token outside the selection), e = exp(t)
//    and e * t with t = x - m, m the row maximum: float32 terms (a polynomial exp), double sums.
// Rows are split over up to `threads` OpenMP threads.
//
// Plain C ABI, loaded with ctypes: no Python or torch headers, so it builds in about a second. Built with
// -march=native: the loops are AVX-512 or AVX2+FMA intrinsics where the CPU has them, else scalar code with
// the same results (llmgraft_top_n_vectorized() tells the caller, which then prefers torch).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define LLMGRAFT_AVX2 1
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Ascending keys = descending values, then ascending indices (a deterministic order for ties).
inline uint64_t key_of(float value, int64_t index) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint32_t ascending = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(~ascending) << 32) | static_cast<uint32_t>(index);
}
inline int64_t index_of(uint64_t key) { return static_cast<int64_t>(key & 0xffffffffu); }

// Tail terms are exp(t) * 2^kScaleBits, rescaled in double at the end: in float32 they then stay normal
// down to t = -156 (not -87) and keep their digits in strongly peaked rows.
constexpr int kScaleBits = 100;
constexpr float kLowest = -156.0f;
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

// exp(t) * 2^kScaleBits for kLowest <= t <= 0 (Cephes' range reduction and polynomial, ~2 ulp).
inline float exp_scaled(float t) {
  const float k = std::floor(t * kLog2e + 0.5f);
  float r = t - k * kLn2Hi;
  r = r - k * kLn2Lo;
  float p = kP0;
  p = p * r + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  p = p * r + kP5;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + kScaleBits + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

#ifdef __AVX512F__
inline __m512 exp_scaled16(__m512 t) {
  const __m512 k = _mm512_roundscale_ps(_mm512_fmadd_ps(t, _mm512_set1_ps(kLog2e), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Hi), t);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(kScaleBits + 127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}
#endif

#ifdef LLMGRAFT_AVX2
inline __m256 exp_scaled8(__m256 t) {
  const __m256 k = _mm256_floor_ps(_mm256_fmadd_ps(t, _mm256_set1_ps(kLog2e), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Hi), t);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(kScaleBits + 127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// For each 8-bit mask, the lanes whose bit is set, in order: AVX2 has no compress instruction.
struct CompressTable {
  alignas(32) int32_t lanes[256][8];
  CompressTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int k = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (mask >> lane & 1) lanes[mask][k++] = lane;
      for (; k < 8; ++k) lanes[mask][k] = 0;
    }
  }
};
const CompressTable kCompress;
#endif

// Number of maxima >= bound (vector compares, no data-dependent branches).
int64_t count_at_least(const std::vector<float>& maxima, float bound) {
  int64_t count = 0;
#ifdef __AVX512F__
  const __m512 b = _mm512_set1_ps(bound);
  for (size_t c = 0; c < maxima.size(); c += 16)
    count += __builtin_popcount(_mm512_cmp_ps_mask(_mm512_loadu_ps(maxima.data() + c), b, _CMP_GE_OQ));
#elif defined(LLMGRAFT_AVX2)
  const __m256 b = _mm256_set1_ps(bound);
  for (size_t c = 0; c < maxima.size(); c += 8)
    count += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(maxima.data() + c), b, _CMP_GE_OQ)));
#else
  for (float m : maxima) count += m >= bound;
#endif
  return count;
}

// A value strictly below the n-th largest of x (admitting "> bound" keeps every top-n token), or -inf.
// The maxima of G >= 4n groups give one: n distinct groups hold a token >= their n-th largest maximum. That
// is found approximately, by bisection on counts (a sort or nth_element here would cost a branch
// misprediction per element): any value with at least n maxima at or above it is a valid bound.
float lower_bound(const float* x, int64_t vocab, int64_t n, std::vector<float>& maxima) {
  const int64_t groups = (4 * n + 15) / 16 * 16;
  if (vocab < 8 * groups) return -kInf;  // groups too small to save anything
  maxima.assign(groups, -kInf);
  const int64_t full = vocab / groups;
#ifdef __AVX512F__
  for (int64_t c = 0; c < groups; c += 16) {
    __m512 best = _mm512_set1_ps(-kInf);
    for (int64_t r = 0; r < full; ++r) best = _mm512_max_ps(best, _mm512_loadu_ps(x + r * groups + c));
    _mm512_storeu_ps(maxima.data() + c, best);
  }
#elif defined(LLMGRAFT_AVX2)
  for (int64_t c = 0; c < groups; c += 8) {
    __m256 best = _mm256_set1_ps(-kInf);
    for (int64_t r = 0; r < full; ++r) best = _mm256_max_ps(best, _mm256_loadu_ps(x + r * groups + c));
    _mm256_storeu_ps(maxima.data() + c, best);
  }
#else
  for (int64_t r = 0; r < full; ++r)
    for (int64_t c = 0; c < groups; ++c) maxima[c] = std::max(maxima[c], x[r * groups + c]);
#endif
  for (int64_t c = 0; c < vocab - full * groups; ++c) maxima[c] = std::max(maxima[c], x[full * groups + c]);
  float low = kInf, high = -kInf;
  for (float m : maxima) {
    if (std::isfinite(m)) {
      low = std::min(low, m);
      high = std::max(high, m);
    }
  }
  // NaN, +inf or too few finite maxima: admit everything (NaN and +inf rows are redone by the caller).
  if (!(low <= high) || count_at_least(maxima, low) < n || count_at_least(maxima, kInf) > 0) return -kInf;
  for (int step = 0; step < 14 && low < high; ++step) {  // invariant: >= n maxima are >= low
    const float middle = low + (high - low) * 0.5f;
    if (middle <= low) break;
    if (count_at_least(maxima, middle) >= n) low = middle; else high = middle;
  }
  return std::nextafter(low, -kInf);
}

struct Workspace {
  std::vector<int32_t> candidates;
  std::vector<uint64_t> keys;
  std::vector<float> maxima;
};

// Keep the n best candidates (by key); return the n-th largest value (the new admission threshold).
float cut(const float* x, std::vector<int32_t>& candidates, int64_t count, int64_t n, Workspace& ws) {
  ws.keys.resize(count);
  for (int64_t k = 0; k < count; ++k) ws.keys[k] = key_of(x[candidates[k]], candidates[k]);
  std::nth_element(ws.keys.begin(), ws.keys.begin() + (n - 1), ws.keys.end());
  for (int64_t k = 0; k < n; ++k) candidates[k] = static_cast<int32_t>(index_of(ws.keys[k]));
  return x[index_of(ws.keys[n - 1])];
}

void select_row(const float* x, int64_t vocab, int64_t n, Workspace& ws, float* out_value,
                int64_t* out_index) {
  const int64_t capacity = std::max<int64_t>(4 * n, 256);
  std::vector<int32_t>& candidates = ws.candidates;
  candidates.resize(capacity + 16);
  int64_t count = 0;
  float threshold = lower_bound(x, vocab, n, ws.maxima);
  bool unordered = false;
  int64_t j = 0;
#ifdef __AVX512F__
  // Branch-free admission: the indices of the tokens above the threshold are compressed and stored.
  __m512 bound = _mm512_set1_ps(threshold);
  __m512i lane_index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i sixteen = _mm512_set1_epi32(16);
  __mmask16 nan_seen = 0;
  for (; j + 16 <= vocab; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    nan_seen |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __mmask16 above = _mm512_cmp_ps_mask(v, bound, _CMP_GT_OQ);
    // Compress in a register and store all 16 lanes (the buffer has room): a compressing store to
    // memory is microcoded and slow on some CPUs (AMD Zen 4).
    _mm512_storeu_si512(candidates.data() + count, _mm512_maskz_compress_epi32(above, lane_index));
    count += __builtin_popcount(above);
    lane_index = _mm512_add_epi32(lane_index, sixteen);
    if (count >= capacity) {
      threshold = cut(x, candidates, count, n, ws);
      count = n;
      bound = _mm512_set1_ps(threshold);
    }
  }
  unordered = nan_seen != 0;
#elif defined(LLMGRAFT_AVX2)
  __m256 bound = _mm256_set1_ps(threshold);
  __m256i lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i eight = _mm256_set1_epi32(8);
  int nan_seen = 0;
  for (; j + 8 <= vocab; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    nan_seen |= _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const int above = _mm256_movemask_ps(_mm256_cmp_ps(v, bound, _CMP_GT_OQ));
    const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.lanes[above]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(candidates.data() + count),
                        _mm256_permutevar8x32_epi32(lane_index, order));
    count += __builtin_popcount(above);
    lane_index = _mm256_add_epi32(lane_index, eight);
    if (count >= capacity) {
      threshold = cut(x, candidates, count, n, ws);
      count = n;
      bound = _mm256_set1_ps(threshold);
    }
  }
  unordered = nan_seen != 0;
#endif
  for (; j < vocab; ++j) {
    const float v = x[j];
    if (v != v) {
      unordered = true;
    } else if (v > threshold) {
      candidates[count++] = static_cast<int32_t>(j);
      if (count >= capacity) {
        threshold = cut(x, candidates, count, n, ws);
        count = n;
        }
    }
  }
  std::vector<uint64_t>& keys = ws.keys;
  keys.resize(count);
  for (int64_t k = 0; k < count; ++k) keys[k] = key_of(x[candidates[k]], candidates[k]);
  if (count > n) {
    std::nth_element(keys.begin(), keys.begin() + (n - 1), keys.end());
    keys.resize(n);
  }
  std::sort(keys.begin(), keys.end());
  for (int64_t k = 0; k < static_cast<int64_t>(keys.size()); ++k) {
    out_index[k] = index_of(keys[k]);
    out_value[k] = x[out_index[k]];
  }
  // Fewer than n tokens above -inf (rows masked by earlier processors): complete with -inf tokens, lowest
  // indices first. (A row of only -inf comes back with -inf first, which the caller treats as a bad row.)
  int64_t filled = static_cast<int64_t>(keys.size());
  for (int64_t k = 0; filled < n && k < vocab; ++k) {
    if (x[k] == -kInf) {
      out_index[filled] = k;
      out_value[filled++] = -kInf;
    }
  }
  if (unordered) out_value[0] = NAN;  // the caller applies the bad-logit policy to such rows
}

// Over the tail (tokens outside the selection): R = sum e and W = sum e * t, t = x - m, e = exp(t).
// The tail is every x below the n-th largest value plus the unselected copies of that value.
void tail_row(const float* x, int64_t vocab, int64_t n, const float* top, bool weighted, double* out) {
  const float m = top[0];
  const float low = top[n - 1];
  int64_t low_selected = 0;
  for (int64_t k = 0; k < n; ++k) low_selected += top[k] == low;
  double mass = 0.0, weight = 0.0;
  int64_t low_total = 0;
  int64_t j = 0;
#ifdef __AVX512F__
  // float32 sums over 256 tokens (16 per lane), then added up in double: the sums keep the terms' own
  // ~1e-7 relative precision at any vocabulary size.
  const __m512 vm = _mm512_set1_ps(m), vlow = _mm512_set1_ps(low), vlowest = _mm512_set1_ps(kLowest);
  __m512d mass_d = _mm512_setzero_pd(), weight_d = _mm512_setzero_pd();
  while (j < vocab) {
    __m512 mass_f = _mm512_setzero_ps(), weight_f = _mm512_setzero_ps();
    for (int block = 0; block < 16 && j < vocab; ++block, j += 16) {
      const __mmask16 lanes = vocab - j >= 16 ? 0xffff : static_cast<__mmask16>((1u << (vocab - j)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(lanes, x + j);
      const __m512 t = _mm512_sub_ps(v, vm);
      const __mmask16 tail = _mm512_mask_cmp_ps_mask(lanes, v, vlow, _CMP_LT_OQ) &
                             _mm512_cmp_ps_mask(t, vlowest, _CMP_GE_OQ);
      low_total += __builtin_popcount(_mm512_mask_cmp_ps_mask(lanes, v, vlow, _CMP_EQ_OQ));
      const __m512 tc = _mm512_max_ps(t, vlowest);
      const __m512 e = exp_scaled16(tc);
      mass_f = _mm512_mask_add_ps(mass_f, tail, mass_f, e);
      weight_f = _mm512_mask3_fmadd_ps(e, tc, weight_f, tail);
    }
    mass_d = _mm512_add_pd(mass_d, _mm512_cvtps_pd(_mm512_castps512_ps256(mass_f)));
    mass_d = _mm512_add_pd(mass_d, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(mass_f), 1))));
    weight_d = _mm512_add_pd(weight_d, _mm512_cvtps_pd(_mm512_castps512_ps256(weight_f)));
    weight_d = _mm512_add_pd(weight_d, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(weight_f), 1))));
  }
  mass = _mm512_reduce_add_pd(mass_d);
  weight = _mm512_reduce_add_pd(weight_d);
#elif defined(LLMGRAFT_AVX2)
  const __m256 vm = _mm256_set1_ps(m), vlow = _mm256_set1_ps(low), vlowest = _mm256_set1_ps(kLowest);
  __m256d mass_d = _mm256_setzero_pd(), weight_d = _mm256_setzero_pd();
  while (j + 8 <= vocab) {
    __m256 mass_f = _mm256_setzero_ps(), weight_f = _mm256_setzero_ps();
    for (int block = 0; block < 32 && j + 8 <= vocab; ++block, j += 8) {
      const __m256 v = _mm256_loadu_ps(x + j);
      const __m256 t = _mm256_sub_ps(v, vm);
      const __m256 tail = _mm256_and_ps(_mm256_cmp_ps(v, vlow, _CMP_LT_OQ), _mm256_cmp_ps(t, vlowest, _CMP_GE_OQ));
      low_total += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(v, vlow, _CMP_EQ_OQ)));
      const __m256 tc = _mm256_max_ps(t, vlowest);
      const __m256 e = _mm256_and_ps(exp_scaled8(tc), tail);
      mass_f = _mm256_add_ps(mass_f, e);
      weight_f = _mm256_fmadd_ps(e, tc, weight_f);
    }
    mass_d = _mm256_add_pd(mass_d, _mm256_cvtps_pd(_mm256_castps256_ps128(mass_f)));
    mass_d = _mm256_add_pd(mass_d, _mm256_cvtps_pd(_mm256_extractf128_ps(mass_f, 1)));
    weight_d = _mm256_add_pd(weight_d, _mm256_cvtps_pd(_mm256_castps256_ps128(weight_f)));
    weight_d = _mm256_add_pd(weight_d, _mm256_cvtps_pd(_mm256_extractf128_ps(weight_f, 1)));
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, mass_d);
  mass = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  _mm256_store_pd(lanes, weight_d);
  weight = lanes[0] + lanes[1] + lanes[2] + lanes[3];
#endif
  for (; j < vocab; ++j) {
    const float v = x[j];
    const float t = v - m;
    if (v < low && t >= kLowest) {
      const float e = exp_scaled(t);
      mass += e;
      weight += static_cast<double>(e) * t;
    }
    low_total += v == low;
  }
  const double unit = std::ldexp(1.0, -kScaleBits);
  const int64_t extra = low_total - low_selected;  // unselected tokens equal to the n-th largest value
  if (extra > 0 && low > -kInf) {
    const double t_low = static_cast<double>(low) - static_cast<double>(m);
    mass += extra * std::exp(t_low) / unit;
    weight += extra * std::exp(t_low) / unit * t_low;
  }
  out[0] = mass * unit;
  out[1] = weighted ? weight * unit : 0.0;
}

void run_rows(const float* x, int64_t row_begin, int64_t row_end, int64_t vocab, int64_t stride, int64_t n,
              int statistics, float* out_value, int64_t* out_index, double* out_tail) {
  static thread_local Workspace ws;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* row = x + r * stride;
    float* top = out_value + r * n;
    select_row(row, vocab, n, ws, top, out_index + r * n);
    if (statistics > 0) {
      double* tail = out_tail + 2 * r;
      if (n >= vocab || !std::isfinite(top[0])) {
        tail[0] = tail[1] = 0.0;
      } else {
        tail_row(row, vocab, n, top, statistics > 1, tail);
      }
    }
  }
}

}  // namespace

extern "C" {

// Which loops this build runs: 2 AVX-512, 1 AVX2 with FMA, 0 scalar.
int llmgraft_top_n_vectorized() {
#if defined(__AVX512F__)
  return 2;
#elif defined(LLMGRAFT_AVX2)
  return 1;
#else
  return 0;
#endif
}

// x: rows x vocab float32 with row stride `stride` (elements), vocab < 2^31. Writes the n largest values of
// every row in descending order (ties: lowest index first) with their indices, and with statistics 1
// (mass) or 2 (mass and weighted) the tail sums [R, W] per row (float64, in units of exp(row maximum)). A
// row holding NaN comes back with NaN as its first value. Returns 0, or 1 on bad arguments.
int llmgraft_top_n(const float* x, int64_t rows, int64_t vocab, int64_t stride, int64_t n, int statistics,
                   float* out_value, int64_t* out_index, double* out_tail, int threads) {
  if (rows < 0 || vocab < 1 || vocab > 0x7fffffffLL || n < 1 || n > vocab || stride < vocab) return 1;
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows)));
  // OpenMP, so the rows run on the host's own (torch's) worker threads, which are awake after its last op.
#pragma omp parallel num_threads(workers) if (workers > 1)
  {
#ifdef _OPENMP
    const int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
#else
    const int64_t part = 0, parts = 1;
#endif
    run_rows(x, rows * part / parts, rows * (part + 1) / parts, vocab, stride, n, statistics, out_value,
             out_index, out_tail);
  }
  return 0;
}

}  // extern "C"
