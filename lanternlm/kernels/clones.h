// LANTERN_CLONES: a function compiled for AVX-512, AVX2 and baseline x86-64, GCC picking one at load
// (target_clones), for plain loops the compiler vectorises; nothing is compiled with -march=native.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define LANTERN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LANTERN_CLONES
#endif
