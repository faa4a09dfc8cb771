// The int4 CUDA targets' handlers and kernels (cuda/int4/int4_ops.cu) compiled
// as host C++ against the SIMT emulator: the JaxsparseEmu* handler symbols
// that _cuda_emu registers as CPU targets (jaxsparse_emu_int4_*).
#include "cuda/int4/int4_ops.cu"
