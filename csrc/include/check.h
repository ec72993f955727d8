// Input checks at the binding boundary (after flash-attention's CHECK_* macros): a bad argument is a
// ValueError that names it, never a crash inside a kernel.
#pragma once
#include <pybind11/pybind11.h>
#include <string>

#define VCF_CHECK(cond, msg)                                   \
  do {                                                         \
    if (!(cond)) throw pybind11::value_error(std::string(msg)); \
  } while (0)
