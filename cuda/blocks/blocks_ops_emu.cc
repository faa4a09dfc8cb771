// The 1xN block CUDA targets' handlers and kernels (cuda/blocks/blocks_ops.cu)
// compiled as host C++ against the SIMT emulator: the JaxsparseEmu* handler
// symbols that _cuda_emu registers as CPU targets (jaxsparse_emu_blocks_*).
#include "cuda/blocks/blocks_ops.cu"
