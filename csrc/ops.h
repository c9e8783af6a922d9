// Declarations of the C++ ops bound in bindings.cpp.
#pragma once

#include <cstdint>
#include <string>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace magicseg {

// Threads a batched op uses when the caller passes num_threads <= 0.
int default_num_threads();

// COCO compressed RLE (the `counts` bytes pycocotools writes) of each mask in a (N, H, W)
// bool/uint8 array, read through its strides. Any nonzero byte is foreground.
pybind11::list rle_encode(const pybind11::array& masks, int num_threads);

// Inverse of rle_encode for N counts strings of masks that are all (h, w): a (N, h, w)
// uint8 array of 0/1.
pybind11::array_t<uint8_t> rle_decode(const pybind11::list& counts, int64_t h, int64_t w,
                                      int num_threads);

// Foreground pixel count of each counts string; sizes[i] is the (h, w) of counts[i].
pybind11::array_t<int64_t> rle_area(const pybind11::list& counts, const pybind11::list& sizes);

// Arrays the ops take as values rather than masks: converted (and so copied if needed) to
// C-contiguous double / bool by pybind11, which is cheap for their (B, C) sizes.
using DoubleArray = pybind11::array_t<double, pybind11::array::c_style | pybind11::array::forcecast>;
using BoolArray = pybind11::array_t<bool, pybind11::array::c_style | pybind11::array::forcecast>;

// Mask cleanup and merging (mask_ops.cpp). Masks are (N, H, W) bool/uint8 arrays read through
// their strides; any nonzero byte is foreground. `connectivity` (4 or 8) is the foreground's;
// holes use the complementary one (8 -> 4, 4 -> 8).

// (N, H, W) uint8 0/1 masks without the foreground components of fewer than min_area pixels.
pybind11::array_t<uint8_t> remove_small_regions(const pybind11::array& masks, int64_t min_area,
                                                int connectivity, int num_threads);

// (N, H, W) uint8 0/1 masks with every hole (background component not touching the image
// border) of at most max_area pixels filled.
pybind11::array_t<uint8_t> fill_small_holes(const pybind11::array& masks, int64_t max_area,
                                            int connectivity, int num_threads);

// (N, 4) int32 boxes (x0, y0, x1, y1), ends exclusive; (-1, -1, -1, -1) for an empty mask.
pybind11::array_t<int32_t> masks_to_boxes(const pybind11::array& masks, int num_threads);

// (N,) int64 foreground pixel counts.
pybind11::array_t<int64_t> mask_areas(const pybind11::array& masks, int num_threads);

// (B, H, W) uint8 label map from (B, C, H, W) class masks: 0 is background, c + 1 class c.
// Only classes with valid[b, c] take part. Where masks overlap, rule "score" gives the pixel
// to the higher scores[b, c], rule "smaller" to the class whose whole mask is smaller; ties go
// to the lower class index. C <= 254.
pybind11::array_t<uint8_t> merge_label_map(const pybind11::array& masks, const DoubleArray& scores,
                                           const BoolArray& valid, const std::string& rule,
                                           int num_threads);

}  // namespace magicseg
