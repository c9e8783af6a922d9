// COCO run-length encoding of binary masks, byte-compatible with pycocotools.
//
// A mask is read in column-major order as alternating runs of 0s and 1s, the first run
// being 0s (possibly empty). Each run length becomes a signed integer written 5 bits per
// character, least significant group first: character = '0' + group, plus 0x20 while more
// groups follow; bit 0x10 of the last group is the sign. From the fourth run on, the
// integer written is the difference to the run two places before, which keeps the
// numbers (and so the strings) short for smooth shapes.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <pybind11/stl.h>

#include "ops.h"
#include "parallel.h"

namespace py = pybind11;

namespace magicseg {
namespace {

// Square tiles for gathering a strided mask into column-major order: a tile's source rows
// and destination columns both stay in L1, whatever the input strides.
constexpr int64_t kTile = 64;

// Longest value accepted when decoding: 12 groups are 60 bits, far beyond any H*W.
constexpr int kMaxGroups = 12;

// Copies an (h, w) mask with byte strides (sh, sw) into h*w column-major bytes of 0/1.
void gather_column_major(const uint8_t* src, int64_t sh, int64_t sw, int64_t h, int64_t w,
                         uint8_t* dst) {
  if (sh == 1) {  // columns already contiguous (pycocotools' own layout): no tiling needed
    for (int64_t j = 0; j < w; ++j) {
      const uint8_t* col = src + j * sw;
      for (int64_t i = 0; i < h; ++i) dst[j * h + i] = col[i] != 0;
    }
    return;
  }
  for (int64_t i0 = 0; i0 < h; i0 += kTile) {
    const int64_t i1 = std::min(h, i0 + kTile);
    for (int64_t j0 = 0; j0 < w; j0 += kTile) {
      const int64_t j1 = std::min(w, j0 + kTile);
      for (int64_t i = i0; i < i1; ++i) {
        const uint8_t* row = src + i * sh;
        for (int64_t j = j0; j < j1; ++j) dst[j * h + i] = row[j * sw] != 0;
      }
    }
  }
}

// First index >= pos in bits[0, n) whose byte is not `value` (0 or 1), or n.
int64_t run_end(const uint8_t* bits, int64_t pos, int64_t n, uint8_t value) {
  const uint64_t same = value ? 0x0101010101010101ull : 0;
  // Runs in real masks are long, so compare 8 pixels at a time before going byte-wise.
  while (pos + 8 <= n) {
    uint64_t word;
    std::memcpy(&word, bits + pos, 8);
    if (word != same) break;
    pos += 8;
  }
  while (pos < n && bits[pos] == value) ++pos;
  return pos;
}

void put_value(std::string& out, int64_t x) {
  for (;;) {
    int c = static_cast<int>(x & 0x1f);
    x >>= 5;  // arithmetic shift: what is left of a negative number is all 1 bits
    // Stop once the rest is pure sign extension of the group's top bit.
    const bool more = (c & 0x10) ? x != -1 : x != 0;
    if (more) c |= 0x20;
    out.push_back(static_cast<char>('0' + c));
    if (!more) return;
  }
}

// Writes run lengths one by one, delta-coding from the fourth run on.
struct CountsWriter {
  std::string out;
  int64_t prev2 = 0, prev1 = 0, k = 0;

  void add(int64_t run) {
    put_value(out, k > 2 ? run - prev2 : run);
    prev2 = prev1;
    prev1 = run;
    ++k;
  }
};

std::string encode_column_major(const uint8_t* bits, int64_t n) {
  CountsWriter writer;
  int64_t start = 0;
  uint8_t value = 0;
  // The body runs at least once: an empty mask still gets its one (empty) run of 0s, as
  // in pycocotools.
  do {
    const int64_t end = run_end(bits, start, n, value);
    writer.add(end - start);
    start = end;
    value ^= 1;
  } while (start < n);
  return std::move(writer.out);
}

struct EncodeScratch {
  std::vector<uint8_t> bytes;
  std::vector<uint32_t> per_column;
  std::vector<int64_t> offsets, boundaries;
};

// Encodes an (h, w) mask whose pixels within a row are contiguous (row stride sh) without
// transposing it. In column-major order a run starts at (i, j) where the pixel differs from
// the one before it: (i-1, j), or (h-1, j-1) when i == 0. Comparing whole rows finds these
// boundaries with contiguous, vectorisable reads; a counting sort by column then puts them
// in column-major order.
std::string encode_rows(const uint8_t* src, int64_t sh, int64_t h, int64_t w, EncodeScratch& s) {
  s.bytes.resize(static_cast<size_t>(h * w));
  s.per_column.assign(static_cast<size_t>(w), 0);
  uint32_t* per_column = s.per_column.data();
  for (int64_t i = 0; i < h; ++i) {
    const uint8_t* row = src + i * sh;
    uint8_t* changed = s.bytes.data() + i * w;
    if (i == 0) {
      const uint8_t* last = src + (h - 1) * sh;
      if (w > 0) changed[0] = row[0] != 0;  // the first run is 0s by definition
      for (int64_t j = 1; j < w; ++j) changed[j] = (row[j] != 0) != (last[j - 1] != 0);
    } else {
      const uint8_t* above = row - sh;
      for (int64_t j = 0; j < w; ++j) changed[j] = (row[j] != 0) != (above[j] != 0);
    }
    for (int64_t j = 0; j < w; ++j) per_column[j] += changed[j];
  }
  s.offsets.resize(static_cast<size_t>(w) + 1);
  s.offsets[0] = 0;
  for (int64_t j = 0; j < w; ++j) s.offsets[j + 1] = s.offsets[j] + per_column[j];
  s.boundaries.resize(static_cast<size_t>(s.offsets[w]));
  int64_t* next = s.offsets.data();  // advances to the end of each column's slot
  for (int64_t i = 0; i < h; ++i) {
    const uint8_t* changed = s.bytes.data() + i * w;
    for (int64_t j = 0; j < w; j = run_end(changed, j + 1, w, 0))
      if (changed[j]) s.boundaries[next[j]++] = j * h + i;
  }
  CountsWriter writer;
  int64_t start = 0;
  for (const int64_t b : s.boundaries) {
    writer.add(b - start);
    start = b;
  }
  writer.add(h * w - start);
  return std::move(writer.out);
}

[[noreturn]] void bad_counts(int64_t index, const std::string& why) {
  throw std::invalid_argument("counts[" + std::to_string(index) + "]: " + why);
}

int64_t get_value(std::string_view s, size_t& pos, int64_t index) {
  uint64_t x = 0;
  for (int shift = 0; shift < 5 * kMaxGroups; shift += 5) {
    if (pos >= s.size()) bad_counts(index, "string ends in the middle of a run length");
    const int c = static_cast<unsigned char>(s[pos]) - '0';
    if (c < 0 || c > 63)
      bad_counts(index, "invalid character " + std::to_string(static_cast<unsigned char>(s[pos])) +
                            " at offset " + std::to_string(pos) + " (expected '0'..'o')");
    ++pos;
    x |= static_cast<uint64_t>(c & 0x1f) << shift;
    if (!(c & 0x20)) {
      if (c & 0x10) x |= ~uint64_t{0} << (shift + 5);  // sign-extend a negative delta
      return static_cast<int64_t>(x);
    }
  }
  bad_counts(index, "run length longer than " + std::to_string(kMaxGroups) + " characters");
}

// Calls on_run(start, length, is_foreground) for each run of counts string s, checking
// that s is well formed and that its runs cover exactly `total` pixels.
template <typename OnRun>
void for_each_run(std::string_view s, int64_t total, int64_t index, OnRun on_run) {
  int64_t prev2 = 0, prev1 = 0, covered = 0;
  size_t pos = 0;
  for (int64_t k = 0; pos < s.size(); ++k) {
    int64_t run = get_value(s, pos, index);
    if (k > 2) run += prev2;
    if (run < 0) bad_counts(index, "run " + std::to_string(k) + " has negative length");
    if (run > total - covered)
      bad_counts(index, "runs cover more than h*w = " + std::to_string(total) + " pixels");
    on_run(covered, run, (k & 1) != 0);
    covered += run;
    prev2 = prev1;
    prev1 = run;
  }
  if (covered != total)
    bad_counts(index, "runs cover " + std::to_string(covered) + " pixels, expected h*w = " +
                          std::to_string(total));
}

// Decodes one counts string straight into a C-contiguous (h, w) mask. A run that starts at
// (i, j) with i > 0 flips the pixel relative to the one above it, so marking those flips and
// then XOR-ing each row into the next rebuilds the mask with contiguous row operations;
// row 0 is taken from the run that covers the top of each column.
void decode_rows(std::string_view counts, int64_t h, int64_t w, int64_t index, uint8_t* out,
                 std::vector<uint8_t>& top) {
  if (h == 0 || w == 0) {
    for_each_run(counts, 0, index, [](int64_t, int64_t, bool) {});
    return;
  }
  std::memset(out, 0, static_cast<size_t>(h * w));
  top.assign(static_cast<size_t>(w), 0);
  for_each_run(counts, h * w, index, [&](int64_t start, int64_t len, bool fg) {
    // An empty run flips twice at the same place, which correctly cancels out.
    if (start % h != 0) out[(start % h) * w + start / h] ^= 1;
    for (int64_t j = (start + h - 1) / h; j * h < start + len; ++j) top[j] = fg;
  });
  std::memcpy(out, top.data(), static_cast<size_t>(w));
  for (int64_t i = 1; i < h; ++i) {
    uint8_t* row = out + i * w;
    const uint8_t* above = row - w;
    for (int64_t j = 0; j < w; ++j) row[j] ^= above[j];
  }
}

// Views of the counts bytes, valid while `counts` holds its items; taken with the GIL so
// the threads that read them never touch Python objects.
std::vector<std::string_view> counts_views(const py::list& counts, std::vector<py::bytes>& keep) {
  std::vector<std::string_view> views;
  views.reserve(counts.size());
  keep.reserve(counts.size());
  for (size_t i = 0; i < counts.size(); ++i) {
    py::handle item = counts[i];
    if (!py::isinstance<py::bytes>(item))
      throw py::type_error("counts[" + std::to_string(i) + "] must be bytes, got " +
                           std::string(py::str(py::type::of(item).attr("__name__"))));
    keep.push_back(py::reinterpret_borrow<py::bytes>(item));
    char* data = nullptr;
    Py_ssize_t size = 0;
    PyBytes_AsStringAndSize(item.ptr(), &data, &size);
    views.emplace_back(data, static_cast<size_t>(size));
  }
  return views;
}

void check_size(int64_t h, int64_t w) {
  if (h < 0 || w < 0)
    throw py::value_error("mask size must be non-negative, got h=" + std::to_string(h) +
                          ", w=" + std::to_string(w));
}

}  // namespace

py::list rle_encode(const py::array& masks, int num_threads) {
  if (masks.ndim() != 3)
    throw py::value_error("masks must have shape (N, H, W), got ndim=" +
                          std::to_string(masks.ndim()));
  const char kind = masks.dtype().kind();
  if (masks.itemsize() != 1 || (kind != 'b' && kind != 'u' && kind != 'i'))
    throw py::value_error("masks must be bool or uint8, got dtype " +
                          std::string(py::str(masks.dtype())));
  const int64_t n = masks.shape(0), h = masks.shape(1), w = masks.shape(2);
  const int64_t sn = masks.strides(0), sh = masks.strides(1), sw = masks.strides(2);
  const auto* base = static_cast<const uint8_t*>(masks.data());

  std::vector<std::string> out(static_cast<size_t>(n));
  {
    py::gil_scoped_release release;
    parallel_for<EncodeScratch>(n, num_threads, [&](int64_t i, EncodeScratch& scratch) {
      const uint8_t* mask = base + i * sn;
      if (sw == 1 && sh != 1) {
        out[i] = encode_rows(mask, sh, h, w, scratch);
      } else {
        scratch.bytes.resize(static_cast<size_t>(h * w));
        gather_column_major(mask, sh, sw, h, w, scratch.bytes.data());
        out[i] = encode_column_major(scratch.bytes.data(), h * w);
      }
    });
  }
  py::list result(n);
  for (int64_t i = 0; i < n; ++i) result[i] = py::bytes(out[i]);
  return result;
}

py::array_t<uint8_t> rle_decode(const py::list& counts, int64_t h, int64_t w, int num_threads) {
  check_size(h, w);
  std::vector<py::bytes> keep;
  const std::vector<std::string_view> views = counts_views(counts, keep);
  const int64_t n = static_cast<int64_t>(views.size());
  py::array_t<uint8_t> result({n, h, w});
  uint8_t* out = result.mutable_data();
  {
    py::gil_scoped_release release;
    parallel_for<std::vector<uint8_t>>(n, num_threads, [&](int64_t i, std::vector<uint8_t>& top) {
      decode_rows(views[i], h, w, i, out + i * h * w, top);
    });
  }
  return result;
}

py::array_t<int64_t> rle_area(const py::list& counts, const py::list& sizes) {
  if (sizes.size() != counts.size())
    throw py::value_error("got " + std::to_string(counts.size()) + " counts but " +
                          std::to_string(sizes.size()) + " sizes");
  std::vector<int64_t> totals;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const auto hw = sizes[i].cast<std::pair<int64_t, int64_t>>();
    check_size(hw.first, hw.second);
    totals.push_back(hw.first * hw.second);
  }
  std::vector<py::bytes> keep;
  const std::vector<std::string_view> views = counts_views(counts, keep);
  py::array_t<int64_t> result(static_cast<py::ssize_t>(views.size()));
  int64_t* area = result.mutable_data();
  {
    py::gil_scoped_release release;
    for (size_t i = 0; i < views.size(); ++i) {
      area[i] = 0;
      for_each_run(views[i], totals[i], static_cast<int64_t>(i),
                   [&](int64_t, int64_t len, bool fg) { area[i] += fg ? len : 0; });
    }
  }
  return result;
}

}  // namespace magicseg
