"""Float inference form of a model: BN folded into the preceding convolution (Jacob eq. 14, eval form).

This is the fair float baseline for latency: the same folding any deployment applies.
"""

from __future__ import annotations

import copy

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from qat.quant.prepare import trace


def fold_batch_norm(model: nn.Module) -> fx.GraphModule:
    """Return an eval-mode copy of ``model`` with every conv -> BN pair folded into one conv."""
    gm = trace(copy.deepcopy(model).eval())
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (src.op != "call_module" or not isinstance(modules[src.target], nn.Conv2d) or len(src.users) != 1):
            continue
        fused = fuse_conv_bn_eval(modules[src.target], modules[node.target])
        gm.add_submodule(src.target, fused)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
