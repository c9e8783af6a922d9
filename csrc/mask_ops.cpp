// Cleanup and merging of binary masks: removing small connected components, filling small
// holes, bounding boxes, areas, and merging per-class masks into one label map.
//
// Every op reads its bool/uint8 input through its strides without copying it, treats any
// nonzero byte as foreground, and works over the batch on up to num_threads threads with the
// GIL released.
//
// Connected components are found on runs: each row is cut into maximal runs of equal pixels,
// and a run is joined (union-find) with every run of the same value in the row above that it
// touches. A component's area is the sum of its runs' lengths. The row scans are linear in
// pixels and read 16 pixels at a time; the labelling is linear in runs, and mask-like
// shapes have only a few runs per row.
//
// Connectivity: `connectivity` is that of the foreground, 8 (default: pixels that share an
// edge or a corner) or 4 (an edge only). Holes are background components taken with the
// complementary connectivity, 4 for an 8-connected foreground and 8 for a 4-connected one,
// so that what separates a hole from the outside is exactly a closed foreground component:
// with an 8-connected foreground, a ring closed only through diagonal steps still encloses its
// hole. (scikit-image's remove_small_holes uses one connectivity for both and also fills small
// background regions that touch the border; here a region touching the border is never a
// hole.)
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "ops.h"
#include "parallel.h"

namespace py = pybind11;

namespace magicseg {
namespace {

// Square tiles for gathering a mask whose rows are not contiguous: a tile's source and
// destination lines both stay in L1, whatever the input strides.
constexpr int64_t kTile = 64;

// Rows of one image painted per work item by merge_label_map, so that a batch of one large
// image still keeps every thread busy.
constexpr int64_t kMergeRows = 32;

// A (N, H, W) mask batch as read by the ops: base pointer and byte strides.
struct Masks3 {
  const uint8_t* base;
  int64_t n, h, w;
  int64_t sn, sh, sw;
  const uint8_t* mask(int64_t i) const { return base + i * sn; }
};

void check_mask_dtype(const py::array& masks) {
  const char kind = masks.dtype().kind();
  if (masks.itemsize() != 1 || (kind != 'b' && kind != 'u' && kind != 'i'))
    throw py::value_error("masks must be bool or uint8, got dtype " +
                          std::string(py::str(masks.dtype())));
}

Masks3 masks3(const py::array& masks) {
  if (masks.ndim() != 3)
    throw py::value_error("masks must have shape (N, H, W), got ndim=" +
                          std::to_string(masks.ndim()));
  check_mask_dtype(masks);
  return {static_cast<const uint8_t*>(masks.data()),
          masks.shape(0), masks.shape(1), masks.shape(2),
          masks.strides(0), masks.strides(1), masks.strides(2)};
}

bool connectivity_is_8(int connectivity) {
  if (connectivity != 4 && connectivity != 8)
    throw py::value_error("connectivity must be 4 or 8, got " + std::to_string(connectivity));
  return connectivity == 8;
}

// Calls on_run(start, end) for each maximal run [start, end) of bytes equal to `value` in
// row[0, w), a row of 0/1 bytes. Run boundaries are found several bytes at a time: with SSE2,
// comparing 16 bytes with the same 16 shifted by one gives a bit per byte where the row
// changes value; otherwise a word XOR itself shifted by one byte does the same for 8 bytes.
// Either way the scan costs one step per 16 (or 8) pixels plus one per run boundary.
template <typename OnRun>
void for_each_run(const uint8_t* row, int64_t w, uint8_t value, OnRun on_run) {
  if (w <= 0) return;
  int64_t start = row[0] == value ? 0 : -1;  // start of the run being read, -1 outside one
  auto boundary = [&](int64_t j) {
    if (start < 0) {
      start = j;
    } else {
      on_run(start, j);
      start = -1;
    }
  };
  int64_t j = 1;  // row[j] is compared with row[j - 1]
#if defined(__SSE2__)
  for (; j + 16 <= w; j += 16) {
    const __m128i here = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j));
    const __m128i before = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j - 1));
    unsigned changes = ~static_cast<unsigned>(_mm_movemask_epi8(_mm_cmpeq_epi8(here, before))) & 0xffffu;
    for (; changes; changes &= changes - 1) boundary(j + __builtin_ctz(changes));
  }
#elif defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  for (; j + 8 <= w; j += 8) {
    uint64_t here, before;
    std::memcpy(&here, row + j, 8);  // byte k of the row is bits 8k..8k+7
    std::memcpy(&before, row + j - 1, 8);
    for (uint64_t changes = here ^ before; changes; changes &= changes - 1)
      boundary(j + (__builtin_ctzll(changes) >> 3));
  }
#endif
  for (; j < w; ++j)
    if (row[j] != row[j - 1]) boundary(j);
  if (start >= 0) on_run(start, w);
}

// First index in [a, b) of a nonzero byte of p, or b.
int64_t first_nonzero(const uint8_t* p, int64_t a, int64_t b) {
  while (a + 8 <= b) {
    uint64_t word;
    std::memcpy(&word, p + a, 8);
    if (word) break;
    a += 8;
  }
  while (a < b && !p[a]) ++a;
  return a;
}

// Last index in [a, b) of a nonzero byte of p, or a - 1.
int64_t last_nonzero(const uint8_t* p, int64_t a, int64_t b) {
  while (b - 8 >= a) {
    uint64_t word;
    std::memcpy(&word, p + b - 8, 8);
    if (word) break;
    b -= 8;
  }
  while (b > a && !p[b - 1]) --b;
  return b - 1;
}

int64_t count_nonzero(const uint8_t* p, int64_t n) {
  // 32-bit partial sums vectorise better than one 64-bit counter.
  constexpr int64_t kBlock = int64_t{1} << 20;
  int64_t total = 0;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t j1 = std::min(n, j0 + kBlock);
    uint32_t c = 0;
    for (int64_t j = j0; j < j1; ++j) c += p[j] != 0;
    total += c;
  }
  return total;
}

// Copies an (h, w) mask with byte strides (sh, sw) into h*w row-major bytes of 0/1.
void gather_rows(const uint8_t* src, int64_t sh, int64_t sw, int64_t h, int64_t w,
                 uint8_t* dst) {
  if (sw == 1) {
    for (int64_t i = 0; i < h; ++i) {
      const uint8_t* row = src + i * sh;
      uint8_t* out = dst + i * w;
      for (int64_t j = 0; j < w; ++j) out[j] = row[j] != 0;
    }
    return;
  }
  for (int64_t i0 = 0; i0 < h; i0 += kTile) {
    const int64_t i1 = std::min(h, i0 + kTile);
    for (int64_t j0 = 0; j0 < w; j0 += kTile) {
      const int64_t j1 = std::min(w, j0 + kTile);
      for (int64_t j = j0; j < j1; ++j) {
        const uint8_t* col = src + j * sw;
        for (int64_t i = i0; i < i1; ++i) dst[i * w + j] = col[i * sh] != 0;
      }
    }
  }
}

// Runs of one value in a row-major image, and their components.
struct Runs {
  std::vector<int64_t> start, end;  // columns [start, end) of each run, rows in order
  std::vector<int64_t> row_begin;   // runs of row i are [row_begin[i], row_begin[i + 1])
  std::vector<int64_t> parent;      // after label_runs: the component's first run
  std::vector<int64_t> area;        // per first run: the component's pixel count
  std::vector<uint8_t> border;      // per first run: whether the component touches the border
};

// Root of x. Unions always hang the higher root under the lower one, so parent[x] <= x.
int64_t find_root(int64_t* parent, int64_t x) {
  while (parent[x] != x) {
    parent[x] = parent[parent[x]];  // path halving
    x = parent[x];
  }
  return x;
}

// Finds the components of the pixels equal to `value` (0 or 1) in the (h, w) row-major 0/1
// image img, 8-connected if conn8 else 4-connected, and fills all of s (see Runs).
void label_runs(const uint8_t* img, int64_t h, int64_t w, uint8_t value, bool conn8, Runs& s) {
  s.start.clear();
  s.end.clear();
  s.parent.clear();
  s.row_begin.clear();
  // A run [a, b) touches a run [c, d) of the row above when they share a column (4-connected)
  // or a column or a corner (8-connected): c < b + touch && a < d + touch.
  const int64_t touch = conn8 ? 1 : 0;
  int64_t* parent = nullptr;
  for (int64_t i = 0; i < h; ++i) {
    const uint8_t* row = img + i * w;
    const int64_t begin = static_cast<int64_t>(s.start.size());
    s.row_begin.push_back(begin);
    for_each_run(row, w, value, [&](int64_t a, int64_t b) {
      s.start.push_back(a);
      s.end.push_back(b);
      s.parent.push_back(static_cast<int64_t>(s.parent.size()));
    });
    if (i == 0) continue;
    const int64_t end = static_cast<int64_t>(s.start.size());
    const int64_t above_begin = s.row_begin[i - 1];
    parent = s.parent.data();
    int64_t p = above_begin;
    for (int64_t k = begin; k < end; ++k) {
      // Runs above that end left of run k cannot touch it nor any later run of this row.
      while (p < begin && s.end[p] + touch <= s.start[k]) ++p;
      for (int64_t q = p; q < begin && s.start[q] < s.end[k] + touch; ++q) {
        const int64_t a = find_root(parent, q), b = find_root(parent, k);
        if (a < b) parent[b] = a;
        else if (b < a) parent[a] = b;
      }
    }
  }
  const int64_t runs = static_cast<int64_t>(s.start.size());
  s.row_begin.push_back(runs);
  parent = s.parent.data();
  // parent[k] < k is already final when k is reached, so one pass makes every run point
  // straight at its root.
  for (int64_t k = 0; k < runs; ++k) parent[k] = parent[parent[k]];
  s.area.assign(static_cast<size_t>(runs), 0);
  s.border.assign(static_cast<size_t>(runs), 0);
  for (int64_t i = 0; i < h; ++i) {
    const bool edge_row = i == 0 || i == h - 1;
    for (int64_t k = s.row_begin[i]; k < s.row_begin[i + 1]; ++k) {
      const int64_t r = parent[k];
      s.area[r] += s.end[k] - s.start[k];
      s.border[r] |= edge_row || s.start[k] == 0 || s.end[k] == w;
    }
  }
}

// Sets every run of img whose component satisfies pick(root) to `value`.
template <typename Pick>
void paint_runs(uint8_t* img, int64_t h, int64_t w, const Runs& s, uint8_t value, Pick pick) {
  for (int64_t i = 0; i < h; ++i)
    for (int64_t k = s.row_begin[i]; k < s.row_begin[i + 1]; ++k)
      if (pick(s.parent[k]))
        std::memset(img + i * w + s.start[k], value, static_cast<size_t>(s.end[k] - s.start[k]));
}

// (x0, y0, x1, y1), ends exclusive, of the nonzero bytes of an (h, w) mask whose rows are
// contiguous (row stride sh); (-1, -1, -1, -1) when there are none.
std::array<int64_t, 4> box_of_rows(const uint8_t* src, int64_t sh, int64_t h, int64_t w) {
  int64_t y0 = 0;
  while (y0 < h && first_nonzero(src + y0 * sh, 0, w) == w) ++y0;
  if (y0 == h) return {-1, -1, -1, -1};
  int64_t y1 = h;
  while (first_nonzero(src + (y1 - 1) * sh, 0, w) == w) --y1;
  // Each row only needs looking at left of the leftmost and right of the rightmost pixel
  // found so far, which for solid shapes is a few bytes per row.
  int64_t x0 = w, x1 = 0;
  for (int64_t i = y0; i < y1; ++i) {
    const uint8_t* row = src + i * sh;
    if (x0 > 0) x0 = std::min(x0, first_nonzero(row, 0, x0));
    if (x1 < w) x1 = std::max(x1, last_nonzero(row, x1, w) + 1);
  }
  return {x0, y0, x1, y1};
}

std::array<int64_t, 4> box_of(const uint8_t* src, int64_t sh, int64_t sw, int64_t h, int64_t w) {
  if (sw == 1) return box_of_rows(src, sh, h, w);
  if (sh == 1) {  // columns contiguous: the box of the transposed mask, transposed back
    const auto t = box_of_rows(src, sw, w, h);
    return {t[1], t[0], t[3], t[2]};
  }
  int64_t x0 = w, y0 = h, x1 = 0, y1 = 0;
  for (int64_t i = 0; i < h; ++i) {
    const uint8_t* row = src + i * sh;
    for (int64_t j = 0; j < w; ++j) {
      if (row[j * sw]) {
        x0 = std::min(x0, j);
        x1 = std::max(x1, j + 1);
        y0 = std::min(y0, i);
        y1 = i + 1;
      }
    }
  }
  if (y1 == 0) return {-1, -1, -1, -1};
  return {x0, y0, x1, y1};
}

int64_t area_of(const uint8_t* src, int64_t sh, int64_t sw, int64_t h, int64_t w) {
  if (sh == w * sw && sw == 1) return count_nonzero(src, h * w);
  int64_t total = 0;
  if (sw == 1) {
    for (int64_t i = 0; i < h; ++i) total += count_nonzero(src + i * sh, w);
  } else if (sh == 1) {
    for (int64_t j = 0; j < w; ++j) total += count_nonzero(src + j * sw, h);
  } else {
    for (int64_t i = 0; i < h; ++i)
      for (int64_t j = 0; j < w; ++j) total += src[i * sh + j * sw] != 0;
  }
  return total;
}

// out[j] = label where mask[j] is nonzero. The pointers never overlap (out is a fresh
// array), and saying so, plus a select written as bit operations, lets the loop vectorise.
void blend_row(uint8_t* __restrict out, const uint8_t* __restrict mask, int64_t w, uint8_t label) {
  for (int64_t j = 0; j < w; ++j) {
    const uint8_t take = static_cast<uint8_t>(-static_cast<uint8_t>(mask[j] != 0));
    out[j] = static_cast<uint8_t>((label & take) | (out[j] & ~take));
  }
}

void check_threshold(const char* name, int64_t value) {
  if (value < 0)
    throw py::value_error(std::string(name) + " must be >= 0, got " + std::to_string(value));
}

}  // namespace

py::array_t<uint8_t> remove_small_regions(const py::array& masks, int64_t min_area,
                                          int connectivity, int num_threads) {
  const Masks3 m = masks3(masks);
  check_threshold("min_area", min_area);
  const bool conn8 = connectivity_is_8(connectivity);
  py::array_t<uint8_t> result({m.n, m.h, m.w});
  uint8_t* out = result.mutable_data();
  {
    py::gil_scoped_release release;
    parallel_for<Runs>(m.n, num_threads, [&](int64_t i, Runs& s) {
      uint8_t* img = out + i * m.h * m.w;
      gather_rows(m.mask(i), m.sh, m.sw, m.h, m.w, img);
      if (min_area <= 1) return;  // every component has at least one pixel
      label_runs(img, m.h, m.w, 1, conn8, s);
      paint_runs(img, m.h, m.w, s, 0, [&](int64_t r) { return s.area[r] < min_area; });
    });
  }
  return result;
}

py::array_t<uint8_t> fill_small_holes(const py::array& masks, int64_t max_area,
                                      int connectivity, int num_threads) {
  const Masks3 m = masks3(masks);
  check_threshold("max_area", max_area);
  // Holes take the connectivity complementary to the foreground's (see the file comment).
  const bool holes_conn8 = !connectivity_is_8(connectivity);
  py::array_t<uint8_t> result({m.n, m.h, m.w});
  uint8_t* out = result.mutable_data();
  {
    py::gil_scoped_release release;
    parallel_for<Runs>(m.n, num_threads, [&](int64_t i, Runs& s) {
      uint8_t* img = out + i * m.h * m.w;
      gather_rows(m.mask(i), m.sh, m.sw, m.h, m.w, img);
      if (max_area <= 0 || m.h < 3 || m.w < 3) return;  // no room for a hole
      label_runs(img, m.h, m.w, 0, holes_conn8, s);
      paint_runs(img, m.h, m.w, s, 1,
                 [&](int64_t r) { return !s.border[r] && s.area[r] <= max_area; });
    });
  }
  return result;
}

py::array_t<int32_t> masks_to_boxes(const py::array& masks, int num_threads) {
  const Masks3 m = masks3(masks);
  if (m.h > std::numeric_limits<int32_t>::max() || m.w > std::numeric_limits<int32_t>::max())
    throw py::value_error("masks of " + std::to_string(m.h) + "x" + std::to_string(m.w) +
                          " pixels do not fit int32 box coordinates");
  py::array_t<int32_t> result({m.n, int64_t{4}});
  int32_t* out = result.mutable_data();
  {
    py::gil_scoped_release release;
    parallel_for<char>(m.n, num_threads, [&](int64_t i, char&) {
      const auto box = box_of(m.mask(i), m.sh, m.sw, m.h, m.w);
      for (int k = 0; k < 4; ++k) out[i * 4 + k] = static_cast<int32_t>(box[k]);
    });
  }
  return result;
}

py::array_t<int64_t> mask_areas(const py::array& masks, int num_threads) {
  const Masks3 m = masks3(masks);
  py::array_t<int64_t> result(static_cast<py::ssize_t>(m.n));
  int64_t* out = result.mutable_data();
  {
    py::gil_scoped_release release;
    parallel_for<char>(m.n, num_threads, [&](int64_t i, char&) {
      out[i] = area_of(m.mask(i), m.sh, m.sw, m.h, m.w);
    });
  }
  return result;
}

py::array_t<uint8_t> merge_label_map(const py::array& masks, const DoubleArray& scores,
                                     const BoolArray& valid, const std::string& rule,
                                     int num_threads) {
  if (masks.ndim() != 4)
    throw py::value_error("masks must have shape (B, C, H, W), got ndim=" +
                          std::to_string(masks.ndim()));
  check_mask_dtype(masks);
  const int64_t nb = masks.shape(0), nc = masks.shape(1), h = masks.shape(2), w = masks.shape(3);
  const int64_t sb = masks.strides(0), sc = masks.strides(1), sh = masks.strides(2),
                sw = masks.strides(3);
  const auto* base = static_cast<const uint8_t*>(masks.data());
  if (nc > 254)
    throw py::value_error("at most 254 classes fit a uint8 label map, got C=" +
                          std::to_string(nc));
  const std::string bc = "(" + std::to_string(nb) + ", " + std::to_string(nc) + ")";
  auto check_bc = [&](const char* name, const py::array& arr) {
    if (arr.ndim() == 2 && arr.shape(0) == nb && arr.shape(1) == nc) return;
    std::string shape;
    for (py::ssize_t d = 0; d < arr.ndim(); ++d)
      shape += (d ? ", " : "") + std::to_string(arr.shape(d));
    if (arr.ndim() == 1) shape += ",";
    throw py::value_error(std::string(name) + " must have shape (B, C) = " + bc +
                          " to match masks, got (" + shape + ")");
  };
  check_bc("scores", scores);
  check_bc("valid", valid);
  const bool by_score = rule == "score";
  if (!by_score && rule != "smaller")
    throw py::value_error("rule must be 'score' or 'smaller', got '" + rule + "'");
  const double* score = scores.data();
  const bool* is_valid = valid.data();
  if (by_score)
    for (int64_t k = 0; k < nb * nc; ++k)
      if (is_valid[k] && std::isnan(score[k]))
        throw py::value_error("scores[" + std::to_string(k / nc) + ", " +
                              std::to_string(k % nc) + "] is NaN for a valid class");

  py::array_t<uint8_t> result({nb, h, w});
  uint8_t* out = result.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> area;
    if (!by_score) {
      area.assign(static_cast<size_t>(nb * nc), 0);
      parallel_for<char>(nb * nc, num_threads, [&](int64_t k, char&) {
        if (is_valid[k]) area[k] = area_of(base + (k / nc) * sb + (k % nc) * sc, sh, sw, h, w);
      });
    }
    // order[b * nc + 0 .. count[b]): image b's valid classes, the winner of any overlap first.
    std::vector<int64_t> order(static_cast<size_t>(nb * nc)), count(static_cast<size_t>(nb));
    for (int64_t b = 0; b < nb; ++b) {
      int64_t* first = order.data() + b * nc;
      int64_t* last = first;
      for (int64_t c = 0; c < nc; ++c)
        if (is_valid[b * nc + c]) *last++ = c;
      const int64_t k0 = b * nc;
      if (by_score)
        std::sort(first, last, [&](int64_t x, int64_t y) {
          return score[k0 + x] != score[k0 + y] ? score[k0 + x] > score[k0 + y] : x < y;
        });
      else
        std::sort(first, last, [&](int64_t x, int64_t y) {
          return area[k0 + x] != area[k0 + y] ? area[k0 + x] < area[k0 + y] : x < y;
        });
      count[b] = last - first;
    }
    // Each item paints kMergeRows rows of one image, classes from the weakest to the
    // strongest, so the last write to a pixel is the winner's (a branch-free blend per row).
    const int64_t blocks = (h + kMergeRows - 1) / kMergeRows;
    parallel_for<char>(nb * blocks, num_threads, [&](int64_t item, char&) {
      const int64_t b = item / blocks;
      const int64_t i0 = (item % blocks) * kMergeRows, i1 = std::min(h, i0 + kMergeRows);
      const int64_t* classes = order.data() + b * nc;
      for (int64_t i = i0; i < i1; ++i) {
        uint8_t* o = out + (b * h + i) * w;
        std::memset(o, 0, static_cast<size_t>(w));
        for (int64_t k = count[b] - 1; k >= 0; --k) {
          const int64_t c = classes[k];
          const auto label = static_cast<uint8_t>(c + 1);
          const uint8_t* row = base + b * sb + c * sc + i * sh;
          if (sw == 1)
            blend_row(o, row, w, label);
          else
            for (int64_t j = 0; j < w; ++j) o[j] = row[j * sw] ? label : o[j];
        }
      }
    });
  }
  return result;
}

}  // namespace magicseg
