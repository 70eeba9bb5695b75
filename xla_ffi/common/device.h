// JSPARSE_HD marks functions that run on the host and, under nvcc, on the device too.
#pragma once

#ifdef __CUDACC__
#define JSPARSE_HD __host__ __device__
#else
#define JSPARSE_HD
#endif
