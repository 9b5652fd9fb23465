"""Static int8 through torchao PT2E: torch.export -> prepare_pt2e(X86InductorQuantizer) ->
calibrate -> convert_pt2e, then lowered to oneDNN int8 kernels (onednn.qconv_pointwise,
onednn.qconv2d_pointwise.binary, onednn.qlinear_pointwise) by inductor's freezing passes, the
same lowering torchao's lower_pt2e_quantized_to_x86 does, without compiling C++.

X86InductorQuantizer's default config: weights int8 per output channel symmetric, activations
uint8 per tensor affine (HistogramObserver), BatchNorm folded into the preceding conv.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import fx, nn

from qbd.config import ConfigError
from qbd.quant.static_flow import LayerStats, StaticFlow, StaticPart, example_batch, weight_grid_stats
from qbd.quant.surrogate import channels_last_input, pt2e_ste_twin
from qbd.quant.warnings import TORCHAO_ENUM_CONSTANT, ignoring_known_log

BACKEND = "torchao PT2E X86InductorQuantizer, lowered to oneDNN int8 kernels"
_COMPUTE_OPS = ("conv", "linear", "addmm", "mm")  # op names that do the layer's math


class OneDNNInt8(nn.Module):
    """Runs the lowered oneDNN int8 graph. Its state is the reference int8 graph (convert_pt2e
    output: int8 weights, scales, zero points, float biases), which is what state_dict(),
    deepcopy and the surrogate use. The lowered graph holds oneDNN-packed weights (opaque
    tensors that cannot be copied or saved) and is never trained or mutated, so copies share it.
    CPU only."""

    def __init__(self, reference: fx.GraphModule, lowered: fx.GraphModule) -> None:
        super().__init__()
        self.reference = reference
        object.__setattr__(self, "_lowered", lowered)  # deliberately not a registered submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._lowered(x)

    def __deepcopy__(self, memo: dict[int, object]) -> OneDNNInt8:
        twin = OneDNNInt8(copy.deepcopy(self.reference, memo), self._lowered)
        twin.training = self.training
        return twin

    def lowered_ops(self) -> list[str]:
        return [str(n.target) for n in self._lowered.graph.nodes if n.op == "call_function"]

    def pool_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activation the lowered graph's global average pool reads (the dequantized int8 output
        of the last conv block), computed by the lowered graph itself: what a defense that reads the
        activations before the pool (AC, SS) must see of the deployed model. LookupError when the
        graph ends in no global mean over H and W."""
        gm = self.__dict__.get("_pool_input_graph")
        if gm is None:
            gm = truncate_before_global_mean(self._lowered)
            object.__setattr__(self, "_pool_input_graph", gm)  # derived from the shared lowered graph
        return gm(x)


def truncate_before_global_mean(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule on the same (frozen, packed) attributes as `gm` that returns the input of its
    last global average pool (`aten.mean.dim` over the two spatial dims): the nodes after it are
    dropped, nothing is recomputed differently. LookupError when there is no such node."""
    means = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.mean.dim
             and sorted(int(d) % 4 for d in n.args[1]) == [2, 3]]
    if not means:
        raise LookupError("the lowered int8 graph has no global average pool (aten.mean over H and W)")
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(gm.graph, env, return_output_node=False)
    graph.output(env[means[-1].args[0]])
    truncated = fx.GraphModule(gm, graph)
    truncated.graph.eliminate_dead_code()  # the pool and everything after it
    truncated.recompile()
    return truncated


# torch's structured-trace channel (TORCH_TRACE / tlparse): always at DEBUG, never propagates, and
# torch builds and logs an event for every export step whenever the logger has any handler.
TRACE_LOGGER = "torch.__trace"


@contextmanager
def torch_trace_to_torch_only() -> Iterator[None]:
    """Inside the body, torch.__trace keeps only torch's own handler (the TORCH_TRACE file).
    pytest attaches its log capture to every non-propagating logger, so without this a failing
    int8-static cell printed hundreds of `DEBUG torch.__trace` lines (and every export paid for
    building them); the detached handlers come back afterwards."""
    from torch._logging._internal import LazyTraceHandler

    logger = logging.getLogger(TRACE_LOGGER)
    foreign = [h for h in logger.handlers if not isinstance(h, LazyTraceHandler)]
    for h in foreign:
        logger.removeHandler(h)
    try:
        yield
    finally:
        for h in foreign:
            logger.addHandler(h)


def _batch_dim() -> tuple[dict[int, object]]:
    return ({0: torch.export.Dim("batch")},)


def _export(module: nn.Module, example: torch.Tensor, strict: bool = False) -> torch.export.ExportedProgram:
    return torch.export.export(module, (example,), dynamic_shapes=_batch_dim(), strict=strict)


def _lower_to_onednn(reference: fx.GraphModule, example: torch.Tensor) -> fx.GraphModule:
    """torchao.quantization.pt2e.lowering.lower_pt2e_quantized_to_x86, except that the batch
    dimension stays dynamic (the public helper re-exports with static shapes)."""
    from torch._export.utils import _is_cia_op
    from torch._inductor.constant_folding import constant_fold
    from torch._inductor.fx_passes.freezing_patterns import freezing_passes

    decomps = {op: fn for op, fn in torch.export.default_decompositions().items() if _is_cia_op(op)}
    lowered = _export(reference, example).run_decompositions(decomps).module()
    graph = lowered.graph
    for node in list(graph.nodes):  # aten.t -> permute, so the qlinear pattern matches
        if node.target == torch.ops.aten.t.default:
            with graph.inserting_before(node):
                permute = graph.call_function(torch.ops.aten.permute.default, args=(node.args[0], [1, 0]))
            node.replace_all_uses_with(permute)
            graph.erase_node(node)
    graph.lint()
    lowered.recompile()
    freezing_passes(lowered, (example,))
    constant_fold(lowered)
    return lowered


def _drop_unused_tensors(gm: fx.GraphModule) -> fx.GraphModule:
    """convert_pt2e leaves the float weights it replaced by int8 constants as attributes; drop
    them so that the state dict (and model_bytes) is the int8 model, not int8 + float."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [k for k in gm.state_dict(keep_vars=True) if k not in used]:
        owner, _, leaf = name.rpartition(".")
        delattr(gm.get_submodule(owner), leaf)
    return gm


def _parameters_to_buffers(gm: fx.GraphModule) -> None:
    for name, p in list(gm.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        module = gm.get_submodule(owner)
        delattr(module, leaf)
        module.register_buffer(leaf, p.detach())


def _weight_stats(prepared: fx.GraphModule) -> list[LayerStats]:
    """One entry per observed weight: prepare_pt2e has already folded BatchNorm into the conv
    weight, and convert_pt2e quantizes it with this observer's qparams."""
    stats = []
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not node.args or getattr(node.args[0], "op", None) != "get_attr":
            continue
        observer = prepared.get_submodule(node.target)
        target = node.args[0].target  # "3.conv1.weight" (a BN-folded conv weight) or "weight"
        w = functools.reduce(getattr, target.split("."), prepared)
        scale, zero_point = observer.calculate_qparams()
        name = target.rpartition(".")[0]
        stats.append(weight_grid_stats(name, w, scale, zero_point, observer.quant_min, observer.quant_max))
    return stats


# X86InductorQuantizer (torchao 0.18) groups the call sites of one module instance into one
# partition and refuses it: a single nn.ReLU reused in a block (torchvision's BasicBlock) fails.
_SHARED_MODULE_ERROR = "Input partition has more than one output node"


def _prepare(prepare_pt2e, exported: fx.GraphModule, quantizer: object) -> fx.GraphModule:
    try:
        return prepare_pt2e(exported, quantizer)
    except ValueError as e:
        if str(e) != _SHARED_MODULE_ERROR:
            raise
        raise ConfigError(
            f"torchao X86InductorQuantizer cannot annotate this model ({e}: a module instance called at"
            " several places, e.g. one nn.ReLU reused in a residual block); use engine 'fbgemm' (torch.ao FX)"
        ) from e


def quantize_part(part: nn.Module, inputs: Sequence[torch.Tensor], engine: str) -> StaticPart:
    del engine  # PT2E lowers to oneDNN whatever torch.backends.quantized.engine says
    try:
        with ignoring_known_log(TORCHAO_ENUM_CONSTANT):
            from torchao.quantization.pt2e import allow_exported_model_train_eval
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("torchao"):
            raise
        raise ConfigError(
            "int8-static with engine x86 needs torchao, a dependency of qbd that this environment lacks"
            " (pip install torchao); engine fbgemm or qnnpack runs the torch.ao FX flow without it"
        ) from e

    example = example_batch(inputs[0])
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    with torch.no_grad(), torch_trace_to_torch_only():
        prepared = _prepare(prepare_pt2e, _export(part, example).module(), quantizer)
        for x in inputs:
            prepared(x)
        layers = _weight_stats(prepared)
        reference = _drop_unused_tensors(convert_pt2e(prepared))
        lowered = _lower_to_onednn(reference, example)
    allow_exported_model_train_eval(reference)
    # Inference-only graphs. The float biases convert_pt2e leaves as Parameters become buffers
    # (nothing here is trainable; code that looks for trainable parameters must find none), and
    # the lowered graph's stop requiring grad, or its output would require grad through ops
    # without autograd kernels while no gradient reaches the input.
    _parameters_to_buffers(reference)
    for p in lowered.parameters():
        p.requires_grad_(False)
    deployed = OneDNNInt8(reference, lowered)
    compute = [
        op for op in deployed.lowered_ops() if any(k in op.rpartition(".")[0].split(".")[-1] for k in _COMPUTE_OPS)
    ]

    def twin() -> nn.Module:
        return allow_exported_model_train_eval(channels_last_input(pt2e_ste_twin(reference)))

    return StaticPart(deployed=deployed, twin=twin, layers=layers, kernel_ops=compute)


FLOW = StaticFlow(BACKEND, quantize_part)
