// Turn a runtime bool into a compile-time constant. Every switch multiplies the
// number of kernel instantiations: each op counts its own in a comment.
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)        \
  [&] {                                           \
    if (COND) {                                   \
      constexpr bool CONST_NAME = true;           \
      return __VA_ARGS__();                       \
    } else {                                      \
      constexpr bool CONST_NAME = false;          \
      return __VA_ARGS__();                       \
    }                                             \
  }()
