// What graphcap's CPU attention kernels share: how they accept q/k/v rows and how they pick a head size.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

namespace graphcap_cpu {

// Heads of one token must be packed ([H, D] rows), but rows may be strided: q/k/v are often views of qkv.
inline at::Tensor packed_rows(const at::Tensor& x) {
  return (x.stride(2) == 1 && x.stride(1) == x.size(2)) ? x : x.contiguous();
}

// Calls run(std::integral_constant<int, D>{}) with D the head size for the common sizes (loops over the
// head fully unrolled), or D = 0 for any other size (read at run time).
template <typename Run>
void dispatch_head_dim(int64_t head_dim, const Run& run) {
  switch (head_dim) {
    case 16: run(std::integral_constant<int, 16>{}); break;
    case 32: run(std::integral_constant<int, 32>{}); break;
    case 64: run(std::integral_constant<int, 64>{}); break;
    case 128: run(std::integral_constant<int, 128>{}); break;
    default: run(std::integral_constant<int, 0>{});
  }
}

}  // namespace graphcap_cpu
