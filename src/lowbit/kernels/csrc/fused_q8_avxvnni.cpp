// The int8-activation GEMV with AVX-VNNI (256-bit VEX vpdpbusd, no AVX-512): fused_q8_avx2.cpp compiled again
// for that target, its dot products in int32 (see that file's header).  A unit of its own so that the plain AVX2
// unit never holds an instruction a CPU without AVX-VNNI would fault on; chosen at run time (fused_ops.cpp, q8_isa).
#define LOWBIT_Q8_AVXVNNI 1
#include "fused_q8_avx2.cpp"
