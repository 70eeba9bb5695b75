// Conversions between the feature dtypes (float32, bfloat16, float16) and float32 accumulators.
// Rounding is to nearest even, as XLA's convert does, so FFI and reference outputs round alike.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace jsparse {

// Storage types: XLA passes bfloat16 and float16 as 16-bit patterns.
struct BFloat16 {
  uint16_t bits;
};
struct Float16 {
  uint16_t bits;
};

inline float ToFloat(float x) { return x; }

inline float ToFloat(BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float ToFloat(Float16 x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  uint32_t exponent = (x.bits >> 10) & 0x1fu;
  uint32_t mantissa = x.bits & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {  // inf or nan
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // signed zero
    bits = sign;
  } else {  // subnormal: normalize
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
T FromFloat(float x);

template <>
inline float FromFloat<float>(float x) {
  return x;
}

template <>
inline BFloat16 FromFloat<BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((bits >> 16) | 0x40u)};  // nan
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return {static_cast<uint16_t>(bits >> 16)};
}

template <>
inline Float16 FromFloat<Float16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u)};  // nan
  if (magnitude >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (magnitude >= 0x38800000u) {  // normal half: rebias exponent, round the 13 dropped bits
    const uint32_t rounded = magnitude - 0x38000000u + 0xfffu + ((magnitude >> 13) & 1u);
    return {static_cast<uint16_t>(sign | (rounded >> 13))};
  }
  if (magnitude < 0x33000000u) return {sign};  // below half the smallest subnormal: zero
  // Subnormal half: shift the mantissa (with its implicit bit) into place, rounding to even.
  const uint32_t exponent = magnitude >> 23;
  const uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - exponent;  // 14..24
  const uint32_t half = 1u << (shift - 1);
  const uint32_t remainder = mantissa & ((1u << shift) - 1);
  uint32_t result = mantissa >> shift;
  if (remainder > half || (remainder == half && (result & 1u))) ++result;
  return {static_cast<uint16_t>(sign | result)};
}

// Rows of n values to and from float32. float32 rows are plain copies, done with memcpy, which
// the C library vectorizes for the CPU at hand (this file is compiled for baseline x86-64).
template <typename T>
inline void ToFloatRow(const T* src, int64_t n, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = ToFloat(src[j]);
  }
}

template <typename T>
inline void FromFloatRow(const float* src, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = FromFloat<T>(src[j]);
  }
}

}  // namespace jsparse
