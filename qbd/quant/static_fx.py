"""Static int8 through torch.ao FX graph mode: prepare_fx(get_default_qconfig_mapping(engine))
-> calibrate -> convert_fx, on the fbgemm or qnnpack quantized engine. The fallback for when
torchao PT2E breaks on a torch/torchao pair (deprecated API, kept tested).

The default qconfigs fold BatchNorm into the convs (fusion), quantize activations to quint8 per
tensor (HistogramObserver; reduce_range on fbgemm) and weights to qint8 (per output channel on
fbgemm, per tensor on qnnpack). The deployed graph runs torch.ao quantized modules
(quantized::conv2d, quantized::linear, quantized::add_relu kernels).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import fx, nn

from qbd.quant.engine import EngineBound, quantized_engine
from qbd.quant.static_flow import LayerStats, StaticFlow, StaticPart, example_batch, weight_grid_stats
from qbd.quant.surrogate import fake_quant_ste
from qbd.quant.warnings import ignoring_known_warnings

BACKEND = "torch.ao FX graph mode (prepare_fx / convert_fx), quantized modules"

_QRANGE = {torch.quint8: (0, 255), torch.qint8: (-128, 127), torch.qint32: (-(2**31), 2**31 - 1)}


def _fx_fake_quant(x, scale, zero_point, dtype):
    # Signature of torch.quantize_per_tensor as FX reference graphs call it.
    quant_min, quant_max = _QRANGE[dtype]
    return fake_quant_ste(x, float(scale), int(zero_point), quant_min, quant_max)


def _reference_layers(reference: nn.Module) -> dict[str, nn.Module]:
    """Reference conv/linear modules by the name of the layer they replace: a fused
    ConvReLU2d / LinearReLU at "3.conv1" holds its conv as child "0"."""
    from torch.ao.nn.intrinsic import _FusedModule
    from torch.ao.nn.quantized.reference.modules.utils import ReferenceQuantizedModule

    layers = {}
    for name, module in reference.named_modules():
        if isinstance(module, _FusedModule) and isinstance(module[0], ReferenceQuantizedModule):
            layers[name] = module[0]
        elif isinstance(module, ReferenceQuantizedModule) and name.rpartition(".")[0] not in layers:
            layers[name] = module
    return layers


def _float_layer(ref: nn.Module) -> nn.Module:
    """A plain float conv/linear with the reference module's quantize-dequantized weight, so
    the twin never touches quantized tensors at run time."""
    with ignoring_known_warnings():
        weight = ref.get_weight().detach()
    if isinstance(ref, nn.Conv2d):
        layer = nn.Conv2d(
            ref.in_channels,
            ref.out_channels,
            ref.kernel_size,
            ref.stride,
            ref.padding,
            ref.dilation,
            ref.groups,
            ref.bias is not None,
            ref.padding_mode,
        )
    elif isinstance(ref, nn.Linear):
        layer = nn.Linear(ref.in_features, ref.out_features, ref.bias is not None)
    else:
        raise NotImplementedError(f"no float twin for reference module {type(ref).__name__}")
    with torch.no_grad():
        layer.weight.copy_(weight)
        if ref.bias is not None:
            layer.bias.copy_(ref.bias.detach())
    return layer.eval()


def fx_ste_twin(reference: fx.GraphModule) -> fx.GraphModule:
    """Straight-through twin of an FX reference graph: reference layers become float layers
    with the dequantized weights, torch.quantize_per_tensor becomes fake quantization with the
    same qparams, and the .dequantize() calls that read it become the identity."""
    memo: dict[int, object] = {id(ref): _float_layer(ref) for ref in _reference_layers(reference).values()}
    twin = copy.deepcopy(reference, memo)
    graph = twin.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.quantize_per_tensor:
            node.target = _fx_fake_quant
        elif node.op == "call_method" and node.target == "dequantize":
            if getattr(node.args[0], "target", None) is not _fx_fake_quant:
                raise NotImplementedError(f"dequantize of a non-activation in {node.format_node()}")
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    leftovers = [n.format_node() for n in graph.nodes if "quantize" in str(n.target) and n.target is not _fx_fake_quant]
    if leftovers:
        raise NotImplementedError(f"no straight-through rewrite for {leftovers}")
    graph.lint()
    twin.recompile()
    return twin


def _kernel_ops(deployed: nn.Module) -> list[str]:
    """The quantized conv/linear modules (fused ConvReLU2d subclasses quantized Conv2d)."""
    quantized = (torch.ao.nn.quantized.Conv2d, torch.ao.nn.quantized.Linear)
    return [f"{type(m).__module__}.{type(m).__qualname__}" for m in deployed.modules() if isinstance(m, quantized)]


def quantize_part(part: nn.Module, inputs: Sequence[torch.Tensor], engine: str) -> StaticPart:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx, prepare_fx

    example = example_batch(inputs[0])
    # FX swaps submodules for quantized modules but traces a root nn.Linear into a functional
    # call; nesting the part keeps every layer a module (named "0.<name>" inside).
    nested = nn.Sequential(copy.deepcopy(part))
    with quantized_engine(engine), ignoring_known_warnings(), torch.no_grad():
        prepared = prepare_fx(nested, get_default_qconfig_mapping(engine), (example,))
        for x in inputs:
            prepared(x)
        reference = convert_to_reference_fx(copy.deepcopy(prepared))
        deployed = convert_fx(prepared)
    layers: list[LayerStats] = []
    for name, ref in _reference_layers(reference).items():
        scale, zero_point = ref.weight_scale, ref.weight_zero_point
        name = name.partition(".")[2]  # drop the nesting "0"
        layers.append(
            weight_grid_stats(name, ref.weight, scale, zero_point, ref.weight_quant_min, ref.weight_quant_max)
        )

    def twin() -> nn.Module:
        return fx_ste_twin(reference)

    return StaticPart(
        deployed=EngineBound(deployed, engine), twin=twin, layers=layers, kernel_ops=_kernel_ops(deployed)
    )


FLOW = StaticFlow(BACKEND, quantize_part)
