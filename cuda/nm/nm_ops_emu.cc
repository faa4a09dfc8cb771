// The CUDA targets' handlers and kernels (cuda/nm/nm_ops.cu) compiled as host
// C++ against the SIMT emulator: the JaxsparseEmu* handler symbols that
// _cuda_emu registers as CPU targets (JAXSPARSE_EMULATE_CUDA=1).
#include "cuda/nm/nm_ops.cu"
