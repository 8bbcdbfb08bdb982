// torchmem._native's stack functions: capture settings, the walk, and reading
// interned stacks back (bind_stacks(m) inside NB_MODULE, module.cpp).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "frame_walk.hpp"
#include "stack_capture.hpp"

namespace nb = nanobind;
using namespace torchmem;

void bind_stacks(nb::module_& m) {
  m.def("resolve_stack", [](uint32_t id) {
    std::vector<std::tuple<std::string, int, std::string>> out;
    for (const FrameInfo& f : stack_table().resolve(id))
      out.emplace_back(f.filename, f.lineno, f.function);
    return out;
  }, "Frames of an interned stack, innermost first: (filename, lineno, function).");
  m.def("stack_frames_since", [](uint32_t first) {
    std::vector<std::tuple<std::string, int, std::string>> out;
    for (const FrameInfo& f : stack_table().frames_since(first))
      out.emplace_back(f.filename, f.lineno, f.function);
    return out;
  });
  m.def("set_skip_prefixes", &set_skip_prefixes);
  m.def("set_stack_capture", &set_stack_capture, nb::arg("enabled"), nb::arg("depth"));
  m.def("capture_stack", &capture_python_stack, nb::arg("max_depth"));
  m.def("stack_walk", [](std::optional<bool> on) {  // None: only ask
    return (on ? set_interpreter_frames(*on) : interpreter_frames_readable())
        ? "interpreter frames" : "frame objects"; }, nb::arg("interpreter") = nb::none());
}
