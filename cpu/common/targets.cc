#include "cpu/common/targets.h"

namespace jaxsparse {

std::vector<Target>& RegisteredTargets(TargetModule module) {
  // Function-local statics: constructed on first use, so registrars in any
  // translation unit may run first.
  static std::vector<Target> lists[3];
  return lists[static_cast<int>(module)];
}

}  // namespace jaxsparse
