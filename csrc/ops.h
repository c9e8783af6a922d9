// Declarations of the C++ ops bound in bindings.cpp.
#pragma once

#include <cstdint>

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

}  // namespace magicseg
