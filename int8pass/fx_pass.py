"""The FX pass: find every linear whose weight is a constant of a Dynamo graph and rewrite it to llmint8::linear.

Matched forms (torch-level, as Dynamo records them, and their aten spellings):
  linear(x, W, b?)                     F.linear, torch._C._nn.linear, aten.linear
  mm / matmul / @ (x, W')              W' = W.t(), W.T, W.transpose(0, 1), W.permute(1, 0), ...: W is [N, K]
                                       W' = W itself: W is stored [in, out] (GPT-2 Conv1D)
  addmm(b, x, W')                      same weight forms, alpha = beta = 1
x may have any leading dims (views around the mm are left as they are). Everything not rewritten is left
untouched; every linear-like op on a 2-D weight gets a LayerRecord saying what happened and why.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from int8pass import dynamo_api, process_memory
from int8pass import rules
from int8pass.int8_weight import Int8Weight
from int8pass.layer_names import GraphNames
from int8pass.lowering import cpu_linear, inductor_api
from int8pass.options import Options
from int8pass.report import CompileReport, LayerRecord, log

aten = torch.ops.aten

LINEAR_FUNCTIONS = {dynamo_api.TRACED_LINEAR, torch.nn.functional.linear, aten.linear.default}
MM_FUNCTIONS = {torch.mm, torch.matmul, operator.matmul, aten.mm.default, aten.matmul.default}
MM_METHODS = {"mm", "matmul", "__matmul__"}
ADDMM_FUNCTIONS = {torch.addmm, aten.addmm.default}
TRANSPOSE_FUNCTIONS = {torch.t, torch.transpose, torch.permute, aten.t.default, aten.transpose.int, aten.permute.default}
TRANSPOSE_METHODS = {"t", "transpose", "permute"}


@dataclass
class LinearMatch:
    node: fx.Node  # the node that computes the linear's output
    op: str
    x: fx.Node
    weight: fx.Node  # the 2-D tensor the weight comes from (placeholder, get_attr or computed)
    chain: list[fx.Node]  # transpose nodes between `weight` and the matmul
    stored_transposed: bool  # weight holds [K, N] (in, out) rather than [N, K]
    bias: fx.Node | None
    problem: str = ""  # a structural reason not to rewrite (alpha/beta, bias shape)


def argument(node: fx.Node, index: int, name: str, default=None):
    """A call node's argument, given by position or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_transpose_2d(node: fx.Node) -> bool:
    """True when `node` swaps the two dims of a 2-D tensor."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        return True
    is_method = node.op == "call_method" and node.target in TRANSPOSE_METHODS
    if not (is_method or (node.op == "call_function" and node.target in TRANSPOSE_FUNCTIONS)):
        return False
    dims = [d for d in node.args[1:] if not isinstance(d, fx.Node)]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    dims += list(node.kwargs.get("dims", ())) + [node.kwargs[k] for k in ("dim0", "dim1") if k in node.kwargs]
    if name in ("t", "t.default") or node.target in (torch.t, aten.t.default):
        return not dims
    if "permute" in str(name):
        return [d % 2 for d in dims] == [1, 0]
    return len(dims) == 2 and dims[0] % 2 != dims[1] % 2


def _weight_source(operand: fx.Node) -> tuple[fx.Node, list[fx.Node], int]:
    """Walk back through transposes: (source node, transpose nodes, number of transposes)."""
    chain = []
    while isinstance(operand, fx.Node) and _is_transpose_2d(operand):
        chain.append(operand)
        operand = operand.args[0]
    return operand, chain, len(chain)


def match_linear(node: fx.Node) -> LinearMatch | None:
    if node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
        x, w, bias = argument(node, 0, "input"), argument(node, 1, "weight"), argument(node, 2, "bias")
        source, chain, flips = _weight_source(w)
        return LinearMatch(node, "linear", x, source, chain, flips % 2 == 1, bias)
    is_mm = (node.op == "call_function" and node.target in MM_FUNCTIONS) or (
        node.op == "call_method" and node.target in MM_METHODS
    )
    is_addmm = (node.op == "call_function" and node.target in ADDMM_FUNCTIONS) or (
        node.op == "call_method" and node.target == "addmm"
    )
    if not (is_mm or is_addmm):
        return None
    offset = 1 if is_addmm else 0
    x, w = node.args[offset], node.args[offset + 1] if len(node.args) > offset + 1 else None
    if not isinstance(w, fx.Node):
        return None
    source, chain, flips = _weight_source(w)
    match = LinearMatch(node, "addmm" if is_addmm else _mm_name(node), x, source, chain, flips % 2 == 0, None)
    if is_addmm:
        match.bias = node.args[0]
        if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("beta", 1) != 1 or len(node.args) > 3:
            match.problem = "addmm with alpha or beta other than 1"
    return match


def _mm_name(node: fx.Node) -> str:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return "matmul" if "matmul" in name else "mm"


def example_value(node) -> torch.Tensor | None:
    """The tensor Dynamo (or a fake-tensor pass) recorded for a node, or None."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


class ConstantInputs:
    """Which nodes of a Dynamo graph are constants: parameters and buffers of the compiled module."""

    def __init__(self, gm: fx.GraphModule, example_inputs, names: GraphNames):
        self.gm = gm
        self.names = names
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.by_node = {n: e for n, e in zip(placeholders, example_inputs)}

    def tensor(self, node: fx.Node) -> torch.Tensor | None:
        """The real tensor behind a constant node, or None for graph inputs and computed values."""
        if node.op == "get_attr":
            value = getattr(self.gm, node.target, None)
            return value if isinstance(value, torch.Tensor) else None
        if node.op != "placeholder":
            return None
        value = self.by_node.get(node)
        if isinstance(value, torch.nn.Parameter):
            return value
        if isinstance(value, torch.Tensor) and (found := self.names.tree(node)) is not None and found[0].holds(value):
            return value  # a registered buffer
        return None


@dataclass
class Candidate:
    match: LinearMatch
    weight: torch.Tensor  # the parameter or buffer (an Int8Weight once quantized)
    record: LayerRecord


def rewrite_linears(gm: fx.GraphModule, example_inputs, options: Options, report: CompileReport) -> None:
    """Rewrite eligible linears of `gm` in place to llmint8::linear; fill `report`.

    A floating-point weight becomes an Int8Weight where it lives (the module's parameter object itself, see
    dynamo_api.swap_into), one weight at a time, so its floating-point storage is freed before the next one is
    quantized. Int8 weights (an earlier graph, int8pass.from_pretrained) are used as they are. The rewritten graph
    reads each weight's codes and scales from the weight, a graph input, on every call.
    """
    names = GraphNames(gm)
    constants = ConstantInputs(gm, example_inputs, names)
    candidates: list[Candidate] = []
    kept: list[Candidate] = []  # linears on constant weights that stay in floating point
    seen_weights: set[int] = set()
    for node in list(gm.graph.nodes):
        match = match_linear(node)
        if match is None:
            continue
        param = constants.tensor(match.weight) if isinstance(match.weight, fx.Node) else None
        weight_value = param if param is not None else example_value(match.weight)
        if weight_value is None or weight_value.dim() != 2:
            continue
        if param is None and match.op != "linear" and match.weight.op != "placeholder":
            continue  # an activation x activation product (attention), not a linear layer
        name, weight_name = names.describe(match.weight, param, node) if param is not None else ("", match.weight.name)
        n, k = (weight_value.shape[1], weight_value.shape[0]) if match.stored_transposed else weight_value.shape
        nbytes = weight_value.numel() * weight_value.element_size()
        record = LayerRecord(
            name=name,
            weight=weight_name,
            op=match.op,
            out_features=int(n),
            in_features=int(k),
            dtype=str(weight_value.dtype).replace("torch.", ""),
            rewritten=False,
            reason="",
            weight_bytes_before=nbytes,
            weight_bytes_after=weight_value.int8_nbytes if isinstance(weight_value, Int8Weight) else nbytes,
        )
        if id(weight_value) in seen_weights:  # a shared weight's bytes count once, on its first consumer
            record.weight_bytes_before = record.weight_bytes_after = 0
        seen_weights.add(id(weight_value))
        report.layers.append(record)
        record.reason = _skip_reason(match, param, record, options)
        if not record.reason:
            _check_outlier_weights(param, record, options)
            candidates.append(Candidate(match, param, record))
        elif param is not None:
            kept.append(Candidate(match, param, record))

    read_in_fp = _read_in_floating_point(candidates)
    rewritten: list[tuple[fx.Node, Int8Weight, str]] = []
    for candidate in candidates:
        # matched again: an earlier rewrite may have replaced this linear's input node
        match, record, weight = match_linear(candidate.match.node), candidate.record, candidate.weight
        if not isinstance(weight, Int8Weight):
            keep = rules.keeps_original(options, id(weight) in read_in_fp)
            report.released_bytes += _quantize_in_place(match.weight, weight, match.stored_transposed, keep, options)
            if record.weight_bytes_before:
                record.weight_bytes_after = weight.int8_nbytes
        if weight.transposed != match.stored_transposed:
            record.reason = "int8 weight quantized along its other dim (it is used both as W and as W^T)"
            continue
        rewritten.append((_replace(gm, match, weight, options, record.name), weight, record.name))
        record.rewritten = True
    report.linear_groups = group_shared_inputs(gm.graph, rewritten)
    if options.cpu_fp_linears == "auto":
        report.fp_linears_on_cpu_kernel = run_kept_linears_on_cpu_kernel(gm.graph, kept)
    if read_in_fp:
        log.debug("llmint8 graph %d: %d int8 weights are also read in floating point (they keep their original)",
                  report.graph_id, len(read_in_fp))
    gm.graph.lint()
    gm.recompile()


def _read_in_floating_point(candidates: list[Candidate]) -> set[int]:
    """Weights (by id) that something other than a rewritten linear reads: a tied embedding, a skipped consumer."""
    consumers: dict[fx.Node, set[fx.Node]] = {}  # weight node -> its rewritten linears and their transposes
    transposes: dict[fx.Node, set[fx.Node]] = {}
    weights: dict[fx.Node, torch.Tensor] = {}
    for candidate in candidates:
        match = candidate.match
        consumers.setdefault(match.weight, set()).update([match.node, *match.chain])
        transposes.setdefault(match.weight, set()).update(match.chain)
        weights[match.weight] = candidate.weight
    return {
        id(weights[node])
        for node, linear_nodes in consumers.items()
        if any(user not in linear_nodes for source in (node, *transposes[node]) for user in source.users)
    }


def _quantize_in_place(node: fx.Node, weight: torch.Tensor, transposed: bool, keep: bool, options: Options) -> int:
    """Turn the floating-point parameter `weight` into an Int8Weight, keeping the object; returns the fp bytes the
    model no longer holds (0 when the original is kept)."""
    int8 = Int8Weight.from_float(weight, threshold=rules.new_weight_threshold(options), transposed=transposed,
                                 keep_original=keep, block_size=rules.new_weight_block_size(options))
    replacement = torch.nn.Parameter(int8, requires_grad=False) if isinstance(weight, torch.nn.Parameter) else int8
    freed = 0 if keep else weight.numel() * weight.element_size()
    dynamo_api.swap_into(weight, replacement)
    del replacement  # the floating-point tensor, now; freed here unless something else holds it
    process_memory.return_freed_heap()  # and the quantization's temporaries: the next weight must not add to them
    fake = dynamo_api.fake_of(weight)
    if fake is not None and "example_value" in node.meta:
        node.meta["example_value"] = fake
    return freed


def _skip_reason(match: LinearMatch, param: torch.Tensor | None, record: LayerRecord, options: Options) -> str:
    """The rules (rules.weight_skip_reason), and what only the graph shows: is the weight a constant, does autograd
    need it, do the activation and the bias fit."""
    if param is None:
        if isinstance(match.weight, fx.Node) and match.weight.op == "call_method" and match.weight.target == "to_local":
            return ("a tensor-parallel DTensor weight (its local slice is computed in the graph): quantize it while "
                    "loading, int8pass.from_pretrained(path, tp_plan=...)")
        return "weight is not a constant of the graph (a graph input or a computed value)"
    if match.problem:
        return match.problem
    if torch.is_grad_enabled() and param.requires_grad:
        return "weight requires grad and grad mode is on (training/autograd keeps the fp linear)"
    if reason := rules.weight_skip_reason(record.name, param, record.in_features, options):
        return reason
    x_value = example_value(match.x)
    x_dtype = x_value.dtype if x_value is not None else None
    if x_dtype != param.dtype:
        return f"activation dtype {str(x_dtype).replace('torch.', '')} differs from weight dtype {record.dtype}"
    if x_value is not None and x_value.dim() == 0:
        return "activation is a scalar"
    bias_value = example_value(match.bias)
    if match.bias is not None and (bias_value is None or tuple(bias_value.shape) != (record.out_features,)):
        return "bias is not a vector of out_features"
    if bias_value is not None and bias_value.dtype != param.dtype:
        return "bias dtype differs from weight dtype"
    return ""


def _check_outlier_weights(weight: torch.Tensor, record: LayerRecord, options: Options) -> None:
    """outlier_weights="original" multiplies the outlier columns by the floating-point weight: an int8 weight made
    without keeping it (from_pretrained, quantize_) has none, and silently using the codes would not be what was
    asked. Checked before this graph changes any weight."""
    if options.outlier_weights == "original" and isinstance(weight, Int8Weight) and weight.original is None:
        raise ValueError(
            f"llmint8 option outlier_weights='original': the int8 weight of {record.name or record.weight} was made "
            "without its floating-point values; quantize it with keep_fp_weights=True (or outlier_weights='original'), "
            "or compile with outlier_weights='dequantized'")


def _replace(gm, match: LinearMatch, weight: Int8Weight, options: Options, layer: str) -> fx.Node:
    """Replace the matched linear by llmint8::linear (or block_linear) on the weight's codes; returns the new node."""
    graph = gm.graph
    node = match.node
    with graph.inserting_before(node):
        scale = graph.call_function(getattr, (match.weight, "scale"))
        codes = graph.call_function(getattr, (match.weight, "codes"))
        outlier_weight = None
        if options.outlier_weights == "original":
            outlier_weight = graph.call_function(getattr, (match.weight, "original"))
            if match.stored_transposed:
                outlier_weight = graph.call_method("t", (outlier_weight,))
        threshold = options.threshold if options.threshold is not None else weight.threshold
        if options.stats:
            graph.call_function(torch.ops.llmint8.record_outliers.default, (match.x, threshold, layer))
        if weight.block_size:
            new = graph.call_function(
                torch.ops.llmint8.block_linear.default,
                (match.x, codes, scale, match.bias, weight.block_size, threshold),
            )
        else:
            sums = graph.call_function(getattr, (match.weight, "code_sums"))
            new = graph.call_function(
                torch.ops.llmint8.linear.default, (match.x, codes, scale, match.bias, threshold, outlier_weight, sums),
            )
    _substitute(graph, match, new)
    return new


def _substitute(graph: fx.Graph, match: LinearMatch, new: fx.Node) -> None:
    """Put `new` in the matched linear's place: its users and metadata, then drop the linear and the transposes of
    its weight that nothing else reads."""
    new.meta.update(match.node.meta)
    match.node.replace_all_uses_with(new)
    graph.erase_node(match.node)
    for transpose in match.chain:
        if not transpose.users:
            graph.erase_node(transpose)


def _runs_on_cpu_fp_kernel(match: LinearMatch, weight: torch.Tensor) -> bool:
    """Whether a linear kept in floating point is what llmint8::cpu_fp_linear computes, and a call it is for: a
    contiguous bf16/fp16 CPU weight [N, K] with nothing to differentiate, an activation of its dtype with a static
    count of at most FP_LINEAR_MAX_ROWS rows, no bias or a vector of its dtype."""
    x, bias = example_value(match.x), example_value(match.bias)
    if (match.problem or match.stored_transposed or isinstance(weight, Int8Weight) or weight.device.type != "cpu"
            or weight.dtype not in cpu_linear.FP_LINEAR_DTYPES or not weight.is_contiguous()
            or (torch.is_grad_enabled() and weight.requires_grad)):
        return False
    if x is None or x.dim() == 0 or x.dtype != weight.dtype or x.device.type != "cpu" or _takes_a_gradient(match.x):
        return False
    # only static sizes are compared: a symbolic one would add a guard after Dynamo has finished tracing
    if not all(type(size) is int for size in x.shape) or x.numel() // max(x.shape[-1], 1) > cpu_linear.FP_LINEAR_MAX_ROWS:
        return False
    if match.bias is not None and (bias is None or bias.dtype != weight.dtype or tuple(bias.shape) != (weight.shape[0],)
                                   or _takes_a_gradient(match.bias)):
        return False
    return cpu_linear.available()


def run_kept_linears_on_cpu_kernel(graph: fx.Graph, kept: list[Candidate]) -> list[str]:
    """Replace the linears kept in bf16/fp16 that run a few rows on the CPU by llmint8::cpu_fp_linear (option
    cpu_fp_linears): PyTorch's bf16 matmul reorders the weight for oneDNN on every call, which halved its rate on an
    output head at decode (lowering/cpu_fp_linear_kernels.h). Returns their layer names (or weights' names)."""
    names = []
    for candidate in kept:
        match = match_linear(candidate.match.node)  # matched again: a rewrite may have replaced its input node
        if match is None or not _runs_on_cpu_fp_kernel(match, candidate.weight):
            continue
        with graph.inserting_before(match.node):
            new = graph.call_function(torch.ops.llmint8.cpu_fp_linear.default, (match.x, match.weight, match.bias))
        _substitute(graph, match, new)
        names.append(candidate.record.name or candidate.record.weight)
    if names:
        log.debug("llmint8: %d linears kept in floating point run llmint8::cpu_fp_linear: %s", len(names), names)
    return names


def _takes_a_gradient(node) -> bool:
    """Whether autograd could send a gradient to this input: grad mode is on and it requires grad."""
    value = example_value(node)
    return torch.is_grad_enabled() and value is not None and value.requires_grad


def group_shared_inputs(graph: fx.Graph, linears: list[tuple[fx.Node, Int8Weight, str]]) -> list[list[str]]:
    """Replace llmint8::linear nodes that multiply the same input node with the same threshold by one
    llmint8::linear_group at the first of them (lowering/linear_group.py: on CPU the input is quantized once and the
    weights are streamed in one kernel call), and llmint8::block_linear nodes that do so with the same block size by
    one llmint8::block_linear_group. Its value is each member's, bit for bit. Left alone: outlier_weights="original",
    and linears through which a gradient could flow (a group has no autograd formula). A group has all its members
    with a bias or none, and with code sums or none. None under Inductor's C++ wrapper, which calls an op returning
    Tensor[] back through Python and each linear's own op through the dispatcher. Returns each group's layer names."""
    if inductor_api.cpp_wrapper():
        return []
    position = {node: index for index, node in enumerate(graph.nodes)}
    groups: dict[tuple, list[tuple[fx.Node, str]]] = {}
    for node, weight, name in linears:
        x, bias = node.args[0], node.args[3]
        if node.target is torch.ops.llmint8.linear.default:
            _x, _codes, _scale, _bias, threshold, outlier_weight, _sums = node.args
            if outlier_weight is not None:
                continue
            key = (node.target, x, threshold, bias is None, weight.code_sums is None)
        elif node.target is torch.ops.llmint8.block_linear.default:
            _x, _codes, _scale, _bias, block_size, threshold = node.args
            key = (node.target, x, (block_size, threshold), bias is None, True)
        else:
            continue
        if not (_takes_a_gradient(x) or _takes_a_gradient(bias)):
            groups.setdefault(key, []).append((node, name))
    names = []
    for (target, x, config, _, no_sums), members in groups.items():
        members.sort(key=lambda member: position[member[0]])
        first = members[0][0]
        # a bias is read at the first member: one computed after it keeps its linear out of the group
        members = [(node, name) for node, name in members
                   if node.args[3] is None or position[node.args[3]] < position[first]]
        if len(members) < 2:
            continue
        nodes = [node for node, _ in members]
        block = target is torch.ops.llmint8.block_linear.default
        for node in nodes[1:]:  # the members' weight reads (getattr nodes of their own) move up to the first
            for read in (node.args[1], node.args[2]) if block else (node.args[1], node.args[2], node.args[6]):
                first.prepend(read)
        codes, scales = [node.args[1] for node in nodes], [node.args[2] for node in nodes]
        biases = [node.args[3] for node in nodes] if nodes[0].args[3] is not None else []
        with graph.inserting_before(first):
            if block:
                group = graph.call_function(torch.ops.llmint8.block_linear_group.default,
                                            (x, codes, scales, biases, *config))
            else:
                group = graph.call_function(torch.ops.llmint8.linear_group.default, (
                    x, codes, scales, biases, config, [] if no_sums else [node.args[6] for node in nodes]))
        group.meta["example_value"] = [example_value(node) for node in nodes]
        with graph.inserting_before(first):
            outputs = [graph.call_function(operator.getitem, (group, index)) for index in range(len(nodes))]
        for node, output in zip(nodes, outputs):
            output.meta.update(node.meta)
            node.replace_all_uses_with(output)
            sums = None if block else node.args[6]
            graph.erase_node(node)
            if sums is not None and not sums.users:  # read for nothing: the weights have no code sums
                graph.erase_node(sums)
        names.append([name for _, name in members])
    return names
