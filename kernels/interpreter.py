"""What protloc's Triton kernels need to know about Triton's interpreter (TRITON_INTERPRET=1).

The interpreter runs a kernel as Python over numpy arrays, one program at a time: that is how the
kernel tests run on machines without a GPU. `@triton.jit` reads TRITON_INTERPRET when it
decorates, i.e. when a kernel module is imported, so `INTERPRETED` is fixed at import too.

`loop_bound`: a `for` loop whose bound is a runtime value (a kernel argument, or a value loaded
from memory) wraps the bound in it. Compiled, it is the identity. Interpreted, a runtime scalar
is a 1-element numpy array, and Triton 3.6's interpreter turns a loop bound into a Python int
with `int(array)`, which numpy refuses for arrays with a dimension since 2.4 (TypeError: only
0-dimensional arrays can be converted to Python scalars); Triton 3.9's squeezes the array first.
Handing `range` a Python int works with either (tests pass with Triton 3.6 and 3.9, numpy 2.3
and 2.4), and the compiled code is the same as with the bare bound (PTX compared, Triton 3.6, 3.9).
"""

import os

import triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

if INTERPRETED:

    def loop_bound(x):
        """A runtime scalar (a 1-element array under the interpreter) -> a Python int."""
        return int(x.handle.data.item())

else:

    @triton.jit
    def loop_bound(x):
        return x
