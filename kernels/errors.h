// The one exception type that kernels and launchers throw. The bindings turn it into pyalexnet.KernelError,
// so a failed launch, a CUDA error or an emulator check surfaces in Python naming the kernel and the place.
#pragma once
#include <stdexcept>
#include <string>

namespace pa {

struct KernelError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

}  // namespace pa
