// The V:N:M CUDA targets' handlers and kernels (cuda/vnm/vnm_ops.cu) compiled
// as host C++ against the SIMT emulator: the JaxsparseEmu* handler symbols
// that _cuda_emu registers as CPU targets (jaxsparse_emu_vnm_*).
#include "cuda/vnm/vnm_ops.cu"
