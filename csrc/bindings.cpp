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
}
