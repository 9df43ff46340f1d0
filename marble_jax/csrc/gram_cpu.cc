// The float32 Gram matrix of K-row operands, as an XLA FFI handler for the CPU (marble_jax/gram_kernel.py).
//
//   out[i, j] = sum over the operands x_o [K, n_o] (row-major float32) of <x_o[i, :], x_o[j, :]>,  out [K, K] float32
//
// One pass over the operands. Their columns are cut into blocks of kBlock columns (a K x kBlock block stays in
// cache); per block, register tiles of up to kTile x kTile row pairs accumulate, for each pair, kLanes independent
// float32 partial sums (one GCC vector: vectorised by construction, no -ffast-math, no reordering by the
// compiler). Each block's partial sums are then added to the pair's running kLanes sums. At the end of a part, the
// lanes of each pair are summed in a fixed binary tree and the parts' sums added in part order: the result is
// bitwise reproducible on a machine (the parts are a function of the sizes and the core count only).
//
// Rounding: every product a_c b_c passes through at most
//   h = kBlock / kLanes (its lane within a block) + blocks_in_part (the running sums; an operand's last n % kLanes
//       columns, zero-padded to kLanes, are one more block) + log2(kLanes) (the lane tree) + parts - 1
// additions, so |error| <= gamma_{h + 1} sum_c |a_c b_c| with gamma_m = m u / (1 - m u),
// u = 2^-24 (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., sec. 3.1; a fused multiply-add
// rounds once where a product and a sum would round twice).
//
// Threads: for K * columns >= kMinThreadedValues, the blocks are split into parts of equal block counts, as many
// as std::thread::hardware_concurrency() (at most kMaxParts); the parts run as tasks on XLA's intra-op thread
// pool, the calling thread taking parts too, so that the call finishes even when no pool thread is free.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 512;
constexpr int64_t kMinThreadedValues = int64_t{1} << 20;
constexpr int64_t kMaxParts = 16;
#if defined(__AVX512F__)
constexpr int kTile = 4;  // 16 accumulators + 8 loads, one zmm register each: the 32 registers
#else
constexpr int kTile = 2;  // a 64-byte vector is 2 ymm (AVX2, 16 registers) or 4 NEON registers (32)
#endif

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

// A run of columns of one operand: row r starts at base + r * stride; cols is a multiple of kLanes.
struct Block {
  const float* base;
  int64_t stride;
  int64_t cols;
};

// Adds, for the row pairs (i0 + p, j0 + q) of one tile, the block's kLanes partial sums to sums[(i0 + p) K + j0 + q].
// kDiag: a tile on the diagonal (i0 == j0), of which only the pairs q >= p are computed.
template <int RI, int RJ, bool kDiag>
void TileBlock(const Block& b, int64_t i0, int64_t j0, int64_t k, Vec* sums) {
  Vec acc[RI][RJ] = {};
  const float* a[RI];
  const float* c[RJ];
  for (int p = 0; p < RI; ++p) a[p] = b.base + (i0 + p) * b.stride;
  for (int q = 0; q < RJ; ++q) c[q] = b.base + (j0 + q) * b.stride;
  for (int64_t col = 0; col < b.cols; col += kLanes) {
    Vec va[RI];
    Vec vc[RJ];
    for (int p = 0; p < RI; ++p) va[p] = Load(a[p] + col);
    for (int q = 0; q < RJ; ++q) vc[q] = kDiag ? va[q] : Load(c[q] + col);
    for (int p = 0; p < RI; ++p)
      for (int q = kDiag ? p : 0; q < RJ; ++q) acc[p][q] += va[p] * vc[q];
  }
  for (int p = 0; p < RI; ++p)
    for (int q = kDiag ? p : 0; q < RJ; ++q) sums[(i0 + p) * k + j0 + q] += acc[p][q];
}

using TileFn = void (*)(const Block&, int64_t, int64_t, int64_t, Vec*);

template <int RI, int RJ>
constexpr TileFn OffDiagonal() {
  return &TileBlock<RI, RJ, false>;
}

template <int R>
constexpr TileFn Diagonal() {
  return &TileBlock<R, R, true>;
}

// kOffDiagonal[ri - 1][rj - 1], kDiagonal[r - 1]: the tile functions by tile size (edge tiles are smaller).
#if defined(__AVX512F__)
constexpr TileFn kOffDiagonal[kTile][kTile] = {
    {OffDiagonal<1, 1>(), OffDiagonal<1, 2>(), OffDiagonal<1, 3>(), OffDiagonal<1, 4>()},
    {OffDiagonal<2, 1>(), OffDiagonal<2, 2>(), OffDiagonal<2, 3>(), OffDiagonal<2, 4>()},
    {OffDiagonal<3, 1>(), OffDiagonal<3, 2>(), OffDiagonal<3, 3>(), OffDiagonal<3, 4>()},
    {OffDiagonal<4, 1>(), OffDiagonal<4, 2>(), OffDiagonal<4, 3>(), OffDiagonal<4, 4>()},
};
constexpr TileFn kDiagonal[kTile] = {Diagonal<1>(), Diagonal<2>(), Diagonal<3>(), Diagonal<4>()};
#else
constexpr TileFn kOffDiagonal[kTile][kTile] = {
    {OffDiagonal<1, 1>(), OffDiagonal<1, 2>()},
    {OffDiagonal<2, 1>(), OffDiagonal<2, 2>()},
};
constexpr TileFn kDiagonal[kTile] = {Diagonal<1>(), Diagonal<2>()};
#endif

// All the row pairs i <= j of one block, tile by tile.
void BlockGram(const Block& b, int64_t k, Vec* sums) {
  for (int64_t i0 = 0; i0 < k; i0 += kTile) {
    const int ri = static_cast<int>(std::min<int64_t>(kTile, k - i0));
    kDiagonal[ri - 1](b, i0, i0, k, sums);
    for (int64_t j0 = i0 + kTile; j0 < k; j0 += kTile) {
      const int rj = static_cast<int>(std::min<int64_t>(kTile, k - j0));
      kOffDiagonal[ri - 1][rj - 1](b, i0, j0, k, sums);
    }
  }
}

// The lanes of v summed in a fixed binary tree (log2(kLanes) additions per lane).
float LaneSum(Vec v) {
  float s[kLanes];
  std::memcpy(s, &v, sizeof(Vec));
  for (int64_t width = kLanes / 2; width >= 1; width /= 2)
    for (int64_t l = 0; l < width; ++l) s[l] += s[l + width];
  return s[0];
}

// The work of one call: the blocks, their split into parts, each part's [K, K] upper-triangle sums.
struct Work {
  int64_t k;
  std::vector<Block> blocks;
  std::vector<int64_t> part_start;  // part p holds blocks [part_start[p], part_start[p + 1])
  std::vector<float> part_gram;     // [parts, K, K], upper triangle
  std::atomic<int64_t> next_part{0};
  std::mutex mutex;
  std::condition_variable all_done;
  int64_t parts_done = 0;

  int64_t parts() const { return static_cast<int64_t>(part_start.size()) - 1; }

  void RunPart(int64_t part) {
    std::vector<Vec> sums(k * k, Vec{});
    for (int64_t i = part_start[part]; i < part_start[part + 1]; ++i) BlockGram(blocks[i], k, sums.data());
    float* gram = part_gram.data() + part * k * k;
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = i; j < k; ++j) gram[i * k + j] = LaneSum(sums[i * k + j]);
  }

  // Takes parts until none is left; the caller and the pool's tasks all run this.
  void TakeParts() {
    for (int64_t part; (part = next_part.fetch_add(1)) < parts();) {
      RunPart(part);
      std::lock_guard<std::mutex> lock(mutex);
      if (++parts_done == parts()) all_done.notify_all();
    }
  }
};

using Matrix = ffi::Buffer<ffi::F32, 2>;

int64_t PartCount(int64_t values, int64_t blocks) {
  if (values < kMinThreadedValues) return 1;
  const int64_t threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
  return std::max<int64_t>(1, std::min({threads, kMaxParts, blocks}));
}

ffi::Error GramImpl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::Result<Matrix> out) {
  const int64_t k = out->dimensions()[0];
  if (out->dimensions()[1] != k) return ffi::Error::InvalidArgument("gram_f32: the result must be [K, K]");
  auto work = std::make_shared<Work>();
  work->k = k;
  // Each operand's last n % kLanes columns, zero-padded to kLanes columns: [operands, K, kLanes].
  std::vector<float> tails(args.size() * k * kLanes, 0.0f);
  int64_t values = 0;
  for (size_t o = 0; o < args.size(); ++o) {
    auto x = args.get<Matrix>(o);
    if (!x.has_value())
      return ffi::Error::InvalidArgument("gram_f32: operand " + std::to_string(o) + " is not a 2-D float32 array");
    const int64_t rows = x->dimensions()[0], n = x->dimensions()[1];
    if (rows != k)
      return ffi::Error::InvalidArgument("gram_f32: operand " + std::to_string(o) + " has " + std::to_string(rows) +
                                         " rows, the result " + std::to_string(k));
    const float* data = x->typed_data();
    values += k * n;
    const int64_t whole = n / kLanes * kLanes;
    for (int64_t start = 0; start < whole; start += kBlock)
      work->blocks.push_back({data + start, n, std::min(kBlock, whole - start)});
    if (whole < n) {
      float* tail = tails.data() + o * k * kLanes;
      for (int64_t r = 0; r < k; ++r) std::memcpy(tail + r * kLanes, data + r * n + whole, (n - whole) * sizeof(float));
      work->blocks.push_back({tail, kLanes, kLanes});
    }
  }
  const int64_t blocks = static_cast<int64_t>(work->blocks.size());
  const int64_t parts = PartCount(values, blocks);
  for (int64_t p = 0; p <= parts; ++p) work->part_start.push_back(p * blocks / parts);
  work->part_gram.assign(parts * k * k, 0.0f);

  for (int64_t t = 1; t < parts; ++t) pool.Schedule([work] { work->TakeParts(); });
  work->TakeParts();
  {
    std::unique_lock<std::mutex> lock(work->mutex);
    work->all_done.wait(lock, [&] { return work->parts_done == parts; });
  }

  float* g = out->typed_data();
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = i; j < k; ++j) {
      float s = work->part_gram[i * k + j];
      for (int64_t p = 1; p < parts; ++p) s += work->part_gram[p * k * k + i * k + j];
      g[i * k + j] = s;
      g[j * k + i] = s;
    }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MarbleGramF32, GramImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().RemainingArgs().Ret<Matrix>());
