// The two passes of the MGDA step over K-row float32 operands, as XLA FFI handlers for the CPU
// (marble_jax/cpu_kernels.py):
//
//   gram_f32:    out[i, j] = sum over the operands x_o [K, n_o] (row-major) of <x_o[i, :], x_o[j, :]>,  out [K, K]
//   combine_f32: y_o[c] = sum_k coefficients[k] x_o[k, c],  y_o [n_o], one result per operand
//
// Gram: one pass over the operands. Their columns are cut into blocks of BlockColumns(K) columns (a K-row block of
// at most kBlockBytes, in L2); per block, register tiles of up to kTile x kTile row pairs accumulate, for each pair,
// kLanes independent float32 partial sums (one GCC vector: vectorised by construction, no -ffast-math, no
// reordering by the compiler). Each block's partial sums are then added to the pair's running kLanes sums. At the
// end of a part, the lanes of each pair are summed in a fixed binary tree and the parts' sums added in part order:
// the result is bitwise reproducible, whatever the core count (the parts are a function of the sizes only).
//
// Rounding: every product a_c b_c passes through at most
//   h = BlockColumns(K) / kLanes (its lane within a block) + blocks_in_part (the running sums; an operand's last
//       n % kLanes columns, zero-padded to kLanes, are one more block) + log2(kLanes) (the lane tree) + parts - 1
// additions, so |error| <= gamma_{h + 1} sum_c |a_c b_c| with gamma_m = m u / (1 - m u),
// u = 2^-24 (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., sec. 3.1; a fused multiply-add
// rounds once where a product and a sum would round twice).
//
// Combination: each result value is c_0 x_0 then K - 1 multiply-adds in row order (|error| <= gamma_K sum_k |c_k
// x_k|), so it does not depend on the threads. Its results are fresh buffers: see AdviseHugePages.
//
// Threads: for K * columns >= kMinThreadedValues, the work is split into tasks (the Gram's blocks into kMaxParts
// parts of equal block counts, fewer when there are fewer blocks; the combination's columns into chunks of
// kCombineChunk) that std::thread::hardware_concurrency() threads take in turn on XLA's intra-op thread pool, the
// calling thread taking tasks too, so that a call finishes even when no pool thread is free.

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <sys/mman.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 4096;
constexpr int64_t kMinThreadedValues = int64_t{1} << 20;
constexpr int64_t kMaxParts = 16;
#if defined(__AVX512F__)
constexpr int kTile = 5;  // 25 accumulators + 5 row loads + 1: 31 of the 32 zmm registers (fastest measured: 89
                          // GFLOP/s a core against 60 at 4 x 4 and 37 at 6 x 4, where the compiler spills)
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

// The next block's cache lines, fetched into L2 a few at a time while the tiles of this block run: the first tiles
// over a block otherwise wait on memory for its rows, and the later ones compute with memory idle. Single-threaded,
// K = 16, 5e6 columns: 19.8 ms against 26.8 ms without; at K <= kTile (one tile per block, few streams) the hardware
// prefetcher is faster alone (K = 5: 3.1 against 3.4 ms; K = 3: 1.7 against 2.5 ms), so only for K > kTile.
struct Prefetch {
  const char* base = nullptr;  // the next block's row 0
  int64_t stride = 0;          // bytes between its rows
  int64_t lines_per_row = 1;   // 64-byte lines per row of the block
  int64_t line = 0;            // the next line to fetch, row-major over the block's rows
  int64_t end = 0;             // the last line (exclusive) this tile fetches
};
constexpr int64_t kLine = 64;
constexpr int kPrefetchPerStep = 2;  // lines per kLanes columns of a tile (1 and 3 were slower)

inline void PrefetchStep(Prefetch& pf) {
  for (int s = 0; s < kPrefetchPerStep && pf.line < pf.end; ++s, ++pf.line)
    __builtin_prefetch(pf.base + pf.line / pf.lines_per_row * pf.stride + pf.line % pf.lines_per_row * kLine, 0, 2);
}

// Adds, for the row pairs (i0 + p, j0 + q) of one tile, the block's kLanes partial sums to sums[(i0 + p) K + j0 + q].
// kDiag: a tile on the diagonal (i0 == j0), of which only the pairs q >= p are computed.
template <int RI, int RJ, bool kDiag>
void TileBlock(const Block& b, int64_t i0, int64_t j0, int64_t k, Vec* sums, Prefetch& pf) {
  Vec acc[RI][RJ] = {};
  const float* a = b.base + i0 * b.stride;
  const float* c = b.base + j0 * b.stride;
  for (int64_t col = 0; col < b.cols; col += kLanes) {
    PrefetchStep(pf);
    Vec va[RI];
    for (int p = 0; p < RI; ++p) va[p] = Load(a + p * b.stride + col);
    for (int q = 0; q < RJ; ++q) {
      const Vec vc = kDiag ? va[q] : Load(c + q * b.stride + col);
      for (int p = 0; p < (kDiag ? q + 1 : RI); ++p) acc[p][q] += va[p] * vc;
    }
  }
  for (int p = 0; p < RI; ++p)
    for (int q = kDiag ? p : 0; q < RJ; ++q) sums[(i0 + p) * k + j0 + q] += acc[p][q];
}

using TileFn = void (*)(const Block&, int64_t, int64_t, int64_t, Vec*, Prefetch&);

// kOffDiagonal[ri - 1][rj - 1], kDiagonal[r - 1]: the tile functions by tile size (edge tiles are smaller).
template <int... R>
constexpr std::array<TileFn, sizeof...(R)> DiagonalTable(std::integer_sequence<int, R...>) {
  return {&TileBlock<R + 1, R + 1, true>...};
}
template <int RI, int... RJ>
constexpr std::array<TileFn, sizeof...(RJ)> OffDiagonalRow(std::integer_sequence<int, RJ...>) {
  return {&TileBlock<RI, RJ + 1, false>...};
}
template <int... RI>
constexpr std::array<std::array<TileFn, kTile>, sizeof...(RI)> OffDiagonalTable(std::integer_sequence<int, RI...>) {
  return {OffDiagonalRow<RI + 1>(std::make_integer_sequence<int, kTile>())...};
}
constexpr auto kDiagonal = DiagonalTable(std::make_integer_sequence<int, kTile>());
constexpr auto kOffDiagonal = OffDiagonalTable(std::make_integer_sequence<int, kTile>());

// All the row pairs i <= j of one block, tile by tile; for K > kTile, each tile also prefetches its share of `next`'s
// lines (nullptr: no next block).
void BlockGram(const Block& b, int64_t k, Vec* sums, const Block* next) {
  const int64_t groups = (k + kTile - 1) / kTile, tiles = groups * (groups + 1) / 2;
  Prefetch pf;
  int64_t lines = 0;
  if (next != nullptr && k > kTile) {
    pf.base = reinterpret_cast<const char*>(next->base);
    pf.stride = next->stride * static_cast<int64_t>(sizeof(float));
    pf.lines_per_row = next->cols * static_cast<int64_t>(sizeof(float)) / kLine;
    lines = k * pf.lines_per_row;
  }
  int64_t tile = 0;
  for (int64_t i0 = 0; i0 < k; i0 += kTile) {
    const int ri = static_cast<int>(std::min<int64_t>(kTile, k - i0));
    pf.end = lines * ++tile / tiles;
    kDiagonal[ri - 1](b, i0, i0, k, sums, pf);
    for (int64_t j0 = i0 + kTile; j0 < k; j0 += kTile) {
      const int rj = static_cast<int>(std::min<int64_t>(kTile, k - j0));
      pf.end = lines * ++tile / tiles;
      kOffDiagonal[ri - 1][rj - 1](b, i0, j0, k, sums, pf);
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

// Runs task(0), ..., task(tasks - 1) on `workers` threads (workers - 1 tasks on XLA's intra-op pool, and the
// caller, which also takes tasks so that the call finishes when no pool thread is free); returns when all are done.
// Which thread runs a task is not fixed: each task must write only its own outputs.
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, int64_t workers, std::function<void(int64_t)> task) {
  struct Shared {
    std::function<void(int64_t)> task;
    int64_t tasks;
    std::atomic<int64_t> next{0};
    std::mutex mutex;
    std::condition_variable all_done;
    int64_t done = 0;
  };
  auto shared = std::make_shared<Shared>();
  shared->task = std::move(task);
  shared->tasks = tasks;
  auto take = [shared] {
    for (int64_t t; (t = shared->next.fetch_add(1)) < shared->tasks;) {
      shared->task(t);
      std::lock_guard<std::mutex> lock(shared->mutex);
      if (++shared->done == shared->tasks) shared->all_done.notify_all();
    }
  };
  for (int64_t w = 1; w < std::min(workers, tasks); ++w) pool.Schedule([take] { take(); });
  take();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->all_done.wait(lock, [&] { return shared->done == shared->tasks; });
}

int64_t Threads() { return std::max<int64_t>(1, std::min<int64_t>(std::thread::hardware_concurrency(), kMaxParts)); }

using Matrix = ffi::Buffer<ffi::F32, 2>;

// Columns per block for K rows: a K x block float32 block of at most kBlockBytes (in L2; from it the tiles read
// each row ceil(K / kTile) times), a multiple of kLanes, at most kBlock. Each row is then read from memory in runs
// of block columns: with 16 rows, 16 KiB runs took 0.85x the time of 2 KiB runs (hardware prefetch follows few
// streams at a time).
constexpr int64_t kBlockBytes = int64_t{256} << 10;

int64_t BlockColumns(int64_t k) {
  return std::max<int64_t>(kLanes, std::min<int64_t>(kBlock, kBlockBytes / (4 * k) / kLanes * kLanes));
}

ffi::Error GramImpl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::Result<Matrix> out) {
  const int64_t k = out->dimensions()[0];
  if (out->dimensions()[1] != k) return ffi::Error::InvalidArgument("gram_f32: the result must be [K, K]");
  const int64_t block = BlockColumns(k);
  std::vector<Block> blocks;
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
    for (int64_t start = 0; start < whole; start += block) blocks.push_back({data + start, n, std::min(block, whole - start)});
    if (whole < n) {
      float* tail = tails.data() + o * k * kLanes;
      for (int64_t r = 0; r < k; ++r) std::memcpy(tail + r * kLanes, data + r * n + whole, (n - whole) * sizeof(float));
      blocks.push_back({tail, kLanes, kLanes});
    }
  }
  const int64_t count = static_cast<int64_t>(blocks.size());
  const int64_t parts = values < kMinThreadedValues ? 1 : std::max<int64_t>(1, std::min(kMaxParts, count));
  // Part p sums blocks [p count / parts, (p + 1) count / parts) into part_gram[p] (upper triangle).
  std::vector<float> part_gram(parts * k * k, 0.0f);
  ParallelFor(pool, parts, Threads(), [&](int64_t p) {
    std::vector<Vec> sums(k * k, Vec{});
    const int64_t first = p * count / parts, last = (p + 1) * count / parts;
    for (int64_t i = first; i < last; ++i) BlockGram(blocks[i], k, sums.data(), i + 1 < last ? &blocks[i + 1] : nullptr);
    float* gram = part_gram.data() + p * k * k;
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = i; j < k; ++j) gram[i * k + j] = LaneSum(sums[i * k + j]);
  });
  float* g = out->typed_data();
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = i; j < k; ++j) {
      float s = part_gram[i * k + j];
      for (int64_t p = 1; p < parts; ++p) s += part_gram[p * k * k + i * k + j];
      g[i * k + j] = s;
      g[j * k + i] = s;
    }
  return ffi::Error::Success();
}

// Asks the kernel for transparent huge pages on the whole 2 MiB pages inside [data, data + bytes), before the first
// write: a fresh output of more than glibc's mmap threshold (32 MiB at most) is a new mapping, and faulting it in
// 4 KiB pages cost more than the writes (20 ms for 40 MB). Only a hint; ignored where THP is off.
void AdviseHugePages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

constexpr int64_t kCombineChunk = 1 << 14;  // columns per task of the combination

using Vector = ffi::Buffer<ffi::F32, 1>;

// y_o[c] = sum_k coefficients[k] x_o[k, c], the products added in k order (c_0 x_0 first, then one fused
// multiply-add per row): a fixed order, whatever the threads.
ffi::Error CombineImpl(ffi::ThreadPool pool, Vector coefficients, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  const int64_t k = coefficients.dimensions()[0];
  if (args.size() != rets.size())
    return ffi::Error::InvalidArgument("combine_f32: " + std::to_string(args.size()) + " operands but " +
                                       std::to_string(rets.size()) + " results");
  struct Chunk {
    const float* x;
    float* y;
    int64_t stride, start, cols;
  };
  std::vector<Chunk> chunks;
  int64_t values = 0;
  for (size_t o = 0; o < args.size(); ++o) {
    auto x = args.get<Matrix>(o);
    auto y = rets.get<Vector>(o);
    if (!x.has_value() || !y.has_value())
      return ffi::Error::InvalidArgument("combine_f32: operand " + std::to_string(o) + " is not a 2-D float32 array");
    const int64_t rows = x->dimensions()[0], n = x->dimensions()[1];
    if (rows != k || (*y)->dimensions()[0] != n)
      return ffi::Error::InvalidArgument("combine_f32: operand " + std::to_string(o) + " must be [" +
                                         std::to_string(k) + ", n] with an [n] result");
    values += k * n;
    AdviseHugePages((*y)->typed_data(), n * sizeof(float));
    for (int64_t start = 0; start < n; start += kCombineChunk)
      chunks.push_back({x->typed_data(), (*y)->typed_data(), n, start, std::min(kCombineChunk, n - start)});
  }
  const float* c = coefficients.typed_data();
  const int64_t count = static_cast<int64_t>(chunks.size());
  const int64_t workers = values < kMinThreadedValues ? 1 : Threads();
  ParallelFor(pool, count, workers, [&](int64_t t) {
    const Chunk& ch = chunks[t];
    float* y = ch.y + ch.start;
    const float* x = ch.x + ch.start;
    const int64_t whole = ch.cols / kLanes * kLanes;
    for (int64_t col = 0; col < whole; col += kLanes) {
      Vec acc = c[0] * Load(x + col);
      for (int64_t r = 1; r < k; ++r) acc += c[r] * Load(x + r * ch.stride + col);
      std::memcpy(y + col, &acc, sizeof(Vec));
    }
    for (int64_t col = whole; col < ch.cols; ++col) {
      float acc = c[0] * x[col];
      for (int64_t r = 1; r < k; ++r) acc += c[r] * x[r * ch.stride + col];
      y[col] = acc;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MarbleGramF32, GramImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().RemainingArgs().Ret<Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MarbleCombineF32, CombineImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Vector>().RemainingArgs().RemainingRets());
