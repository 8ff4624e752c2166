// Each op in csrc/<op>/ defines one bind_<op>() that adds its functions to the module.
#pragma once
#include <torch/extension.h>

void bind_selective_scan(pybind11::module_& m);
void bind_cross_selective_scan(pybind11::module_& m);
void bind_memory_attention(pybind11::module_& m);
