"""The CPU the kernels were compiled for (built as ``dbnode._target``).

Compiled without -march, so it loads on any CPU of the architecture: the
Python side reads it before loading ``dbnode._kernels``, whose vector code
would die of SIGILL on a CPU without the features listed here.
"""

cdef extern from *:
    const char* DBNODE_MARCH
    const char* DBNODE_CPU_FLAGS

MARCH = DBNODE_MARCH.decode()
CPU_FLAGS = tuple(DBNODE_CPU_FLAGS.decode().split())
