// Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC11): a counter-based
// generator. Output = a pure function of (counter, key), so any element's random number is computed
// independently, in any order, on any backend, and a mask is reproducible bit for bit on the CPU emulator and
// on the GPU. pyalexnet/reference.py holds the same function in NumPy; tests check both against Random123's
// known-answer vectors.
#pragma once

#include "common.cuh"

namespace pa {

struct Philox4 {
    unsigned v[4];
};

__device__ __forceinline__ Philox4 philox4x32_10(Philox4 ctr, unsigned key0, unsigned key1) {
    constexpr unsigned M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;  // round multipliers
    constexpr unsigned W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;  // key schedule (golden ratio, sqrt(3) - 1)
    for (int round = 0; round < 10; ++round) {
        const unsigned hi0 = __umulhi(M0, ctr.v[0]), lo0 = M0 * ctr.v[0];
        const unsigned hi1 = __umulhi(M1, ctr.v[2]), lo1 = M1 * ctr.v[2];
        ctr = Philox4{{hi1 ^ ctr.v[1] ^ key0, lo1, hi0 ^ ctr.v[3] ^ key1, lo0}};
        key0 += W0;
        key1 += W1;
    }
    return ctr;
}

}  // namespace pa
