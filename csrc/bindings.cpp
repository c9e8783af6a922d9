// The one place where C++ ops are registered with Python. Each op lives in its own file
// and is declared in ops.h; this file only describes the Python-facing signatures.
#include <pybind11/pybind11.h>

#include "ops.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "magicseg-engine C++ mask operations";

  m.def("build_info", []() {
    py::dict info;
#ifdef MAGICSEG_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["compiler"] = MAGICSEG_COMPILER;
    info["max_threads"] = magicseg::default_num_threads();
    return info;
  }, "How this extension was built: CUDA ops compiled or not, compiler, default thread count.");

  m.def("rle_encode", &magicseg::rle_encode, py::arg("masks"), py::arg("num_threads") = 0,
        "COCO compressed RLE counts (list of bytes) of a (N, H, W) bool/uint8 mask array.");
  m.def("rle_decode", &magicseg::rle_decode, py::arg("counts"), py::arg("h"), py::arg("w"),
        py::arg("num_threads") = 0,
        "(N, h, w) uint8 masks from a list of N COCO counts bytes of (h, w) masks.");
  m.def("rle_area", &magicseg::rle_area, py::arg("counts"), py::arg("sizes"),
        "Foreground pixel count (int64) of each COCO counts bytes; sizes[i] is its (h, w).");

  m.def("remove_small_regions", &magicseg::remove_small_regions, py::arg("masks"),
        py::arg("min_area"), py::arg("connectivity") = 8, py::arg("num_threads") = 0,
        "(N, H, W) uint8 masks without foreground components smaller than min_area pixels.");
  m.def("fill_small_holes", &magicseg::fill_small_holes, py::arg("masks"), py::arg("max_area"),
        py::arg("connectivity") = 8, py::arg("num_threads") = 0,
        "(N, H, W) uint8 masks with holes (background not touching the border) of at most "
        "max_area pixels filled; holes use the connectivity complementary to the foreground's.");
  m.def("masks_to_boxes", &magicseg::masks_to_boxes, py::arg("masks"), py::arg("num_threads") = 0,
        "(N, 4) int32 boxes (x0, y0, x1, y1), ends exclusive; -1s for an empty mask.");
  m.def("mask_areas", &magicseg::mask_areas, py::arg("masks"), py::arg("num_threads") = 0,
        "(N,) int64 foreground pixel counts of a (N, H, W) bool/uint8 mask array.");
  m.def("merge_label_map", &magicseg::merge_label_map, py::arg("masks"), py::arg("scores"),
        py::arg("valid"), py::arg("rule") = "score", py::arg("num_threads") = 0,
        "(B, H, W) uint8 label map (0 background, c + 1 class c) from (B, C, H, W) masks; "
        "overlaps go to the higher score ('score') or the smaller mask ('smaller').");
}
