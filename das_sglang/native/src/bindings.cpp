#include <nanobind/nanobind.h>
#include "suffix_index.h"
namespace nb = nanobind;
NB_MODULE(_suffix, m) {
  nb::class_<das::SuffixIndex>(m, "SuffixIndex")
      .def(nb::init<int>(), nb::arg("max_depth") = 64)
      .def_prop_ro("max_depth", &das::SuffixIndex::max_depth);
}
