"""graphcap's custom ops: out-style/in-place torch.library ops with CPU reference implementations and fake
implementations, so Dynamo traces them as opaque `auto_functionalized` nodes the compilation passes can fuse.

Importing this package registers every op.
"""

from graphcap.ops import fused_ops, norm_ops, quant_ops

__all__ = ["fused_ops", "norm_ops", "quant_ops"]
