"""ExecuTorch programs of a fedsb model with only R (and `modules_to_save`) trainable.

Writes, in `out_dir`: `fedsb_train.pte` (the joint forward-backward program: method
`forward(input_ids, attention_mask, labels) → (loss, logits, gradients…, parameters…)`, as
`TrainingModule` expects), `fedsb_infer.pte` (method `forward(input_ids, attention_mask,
*trainable) → logits`: the trainable tensors are inputs, so the latest global R serves
without a new export), optionally `fedsb_weights.ptd` (the frozen weights of both programs)
and `fedsb_executorch.json` (which program parameter is which `fedsb.trainable_state`
tensor, its learning-rate group and the file names). Batch size and sequence length are
dynamic. `xnnpack=True` lowers both programs to the XNNPACK delegate.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from fedsb.config import JobConfig
from fedsb.errors import ConfigError

from .adapter_dir import model_for_export
from .onnx import check_trainable, num_labels
from .training_graph import (
    GRAPH_PREFIX,
    InferenceGraph,
    TrainingGraph,
    example_inputs,
    is_lora_parameter,
)

MANIFEST = "fedsb_executorch.json"
TRAINING_PROGRAM = "fedsb_train.pte"
INFERENCE_PROGRAM = "fedsb_infer.pte"
WEIGHTS_NAME = "fedsb_weights"  # → fedsb_weights.ptd with external_weights
WEIGHTS_DATA = WEIGHTS_NAME + ".ptd"
METHOD = "forward"
# Upper bounds of the dynamic dimensions: ExecuTorch plans activation memory for them.
MAX_BATCH = 32
MAX_SEQ_LEN = 64

# Identity copies that XNNPACK cannot take as a partition's output (pass-through error):
# eval-mode dropout becomes `clone`, and autograd saves softmax/tanh outputs via `alias`.
_IDENTITY_OPS = (torch.ops.aten.clone.default, torch.ops.aten.alias.default)


@dataclass(frozen=True)
class ExecuTorchArtifacts:
    """Paths of everything `to_executorch` wrote."""

    out_dir: Path
    training_program: Path
    inference_program: Path
    weights: Path | None  # the .ptd with the frozen weights, or None if they are in the .pte
    manifest: Path


class JointGraph(TrainingGraph):
    """`TrainingGraph` with detached logits: `_export_forward_backward` needs a lone loss."""

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = super().forward(input_ids, attention_mask, labels)
        return loss, logits.detach()


class StatefulInferenceGraph(InferenceGraph):
    """(input_ids, attention_mask, *trainable) → logits: R and head come in as inputs."""

    def __init__(self, model: nn.Module, trainable: Sequence[str]) -> None:
        super().__init__(model)
        self.trainable = [name.removeprefix(GRAPH_PREFIX) for name in trainable]

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *trainable: torch.Tensor
    ) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "return_dict": True}
        params = dict(zip(self.trainable, trainable, strict=True))
        out = torch.func.functional_call(self.model, params, (), inputs, strict=False)
        return out.logits  # (B, num_labels)


def to_executorch(
    source: nn.Module | str | Path,
    out_dir: str | Path,
    *,
    job: JobConfig | None = None,
    xnnpack: bool = False,
    external_weights: bool = False,
    max_batch: int = MAX_BATCH,
    max_seq_len: int = MAX_SEQ_LEN,
) -> ExecuTorchArtifacts:
    """Export a fedsb-adapted model (or a saved adapter folder) as ExecuTorch programs.

    `source` is a model prepared by `fedsb.apply_lora_sb` (R and `modules_to_save`
    trainable) or an adapter folder written by `fedsb simulate`; `job` checks that folder.
    The model is not changed (a copy is exported with eager attention, which ExecuTorch
    can differentiate). The programs take batches of 1..`max_batch` sequences of
    2..`max_seq_len` tokens; activation memory is planned for the largest.
    """
    if max_batch < 2 or max_seq_len < 2:
        raise ConfigError(
            f"max_batch and max_seq_len must be at least 2, got {max_batch}, {max_seq_len}"
        )
    import_executorch()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, extra = model_for_export(source, job, out)
    names = check_trainable(InferenceGraph(model))
    model = exportable_copy(model, batched_linears=xnnpack)
    vocab = int(getattr(model.config, "vocab_size", 100))
    positions = int(getattr(model.config, "max_position_embeddings", max_seq_len))
    dims = (
        Dim("batch", min=1, max=max_batch),
        Dim("sequence", min=2, max=min(positions, max_seq_len)),
    )
    with quiet_export():
        training = lower(export_joint(JointGraph(model), vocab, dims), xnnpack)
        inference = lower(
            export_inference(StatefulInferenceGraph(model, list(names)), vocab, dims), xnnpack
        )
    weights = out / WEIGHTS_DATA if external_weights else None
    write_program(training, out / TRAINING_PROGRAM, external_weights, frozen_only=True)
    write_program(inference, out / INFERENCE_PROGRAM, external_weights, frozen_only=False)
    limits = {"max_batch": max_batch, "max_seq_len": dims[1].max}
    manifest = write_manifest(out, model, names, xnnpack, weights, extra | limits)
    return ExecuTorchArtifacts(
        out, out / TRAINING_PROGRAM, out / INFERENCE_PROGRAM, weights, manifest
    )


def import_executorch() -> None:
    """A one-line error if ExecuTorch is not installed."""
    try:
        import executorch.exir  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"ExecuTorch export needs executorch: pip install 'fedsb[executorch]' ({err})"
        ) from None


class BatchedLinear(nn.Linear):
    """`nn.Linear` computed as one `bmm`, for XNNPACK training programs.

    A training program takes its weights as inputs, and XNNPACK delegates `addmm`/`mm` only
    with constant weights: the frozen linears (forward and backward) ran on the portable
    kernels, 89% of a step. It delegates `bmm` with any operands: 38× faster on one layer.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(1, -1, self.in_features)
        out = torch.bmm(flat, self.weight.t().unsqueeze(0)).reshape(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias


def exportable_copy(model: nn.Module, *, batched_linears: bool = False) -> nn.Module:
    """A deep copy in eval mode with eager attention (SDPA's backward has no ExecuTorch kernel).

    `batched_linears` turns every `nn.Linear` into a `BatchedLinear` (same parameters and
    names), for XNNPACK.
    """
    clone = copy.deepcopy(model).eval()
    set_attention = getattr(clone, "set_attn_implementation", None)
    if callable(set_attention):
        set_attention("eager")
    if batched_linears:
        for module in clone.modules():
            if type(module) is nn.Linear:
                module.__class__ = BatchedLinear
    return clone


def export_joint(graph: JointGraph, vocab_size: int, dims: tuple[Dim, Dim]) -> ExportedProgram:
    """torch.export → joint forward-backward graph (loss is output 0) without identity copies."""
    from torch.export.experimental import _export_forward_backward

    batch, seq = dims
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    ep = torch.export.export(
        graph,
        example_inputs(min(4, batch.max), min(16, seq.max), vocab_size),
        dynamic_shapes=shapes | {"labels": {0: batch}},
        strict=False,
    )
    joint = _export_forward_backward(ep, joint_loss_index=0)
    remove_identity_copies(joint)
    return joint


def export_inference(
    graph: StatefulInferenceGraph, vocab_size: int, dims: tuple[Dim, Dim]
) -> ExportedProgram:
    """torch.export of the logits graph with the trainable tensors as trailing inputs."""
    batch, seq = dims
    params = dict(graph.model.named_parameters())
    trainable = tuple(params[n].detach().clone() for n in graph.trainable)
    ids, mask, _ = example_inputs(min(4, batch.max), min(16, seq.max), vocab_size)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, (None,) * len(trainable))  # *trainable
    return torch.export.export(graph, (ids, mask, *trainable), dynamic_shapes=shapes, strict=False)


def remove_identity_copies(ep: ExportedProgram) -> None:
    """Bypass `clone`/`alias` nodes feeding other ops (graph outputs keep theirs)."""
    graph = ep.graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _IDENTITY_OPS:
            continue
        source = node.args[0]
        if node.target == torch.ops.aten.clone.default and not is_contiguous(source):
            continue  # a real copy: later views need its contiguous layout
        for user in [u for u in node.users if u.op != "output"]:
            user.replace_input_with(node, source)
        if not node.users:
            graph.erase_node(node)
    ep.graph_module.recompile()


def is_contiguous(node: Any) -> bool:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and value.is_contiguous()


def lower(ep: ExportedProgram, xnnpack: bool) -> Any:
    """Edge dialect, with XNNPACK partitions if asked (an `EdgeProgramManager`)."""
    from executorch.exir import EdgeCompileConfig, to_edge, to_edge_transform_and_lower

    config = EdgeCompileConfig(_check_ir_validity=False)  # joint graphs hold non-core ops
    if not xnnpack:
        return to_edge(ep, compile_config=config)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return to_edge_transform_and_lower(
        ep, partitioner=[XnnpackPartitioner()], compile_config=config
    )


def write_program(edge: Any, path: Path, external_weights: bool, *, frozen_only: bool) -> None:
    """Serialise to `.pte`; with `external_weights` the frozen weights go to fedsb_weights.ptd."""
    from executorch.exir import ExecutorchBackendConfig

    config = ExecutorchBackendConfig(
        external_constants=weights_tagger(edge.exported_program(), frozen_only)
        if external_weights
        else False
    )
    with quiet_export():
        program = edge.to_executorch(config)
    path.write_bytes(program.buffer)
    if external_weights:
        program.write_tensor_data_to_file(str(path.parent))


def weights_tagger(ep: ExportedProgram, frozen_only: bool) -> Callable[[torch.fx.Node], str | None]:
    """Tags every constant for the .ptd except (in the training program) the trainable ones."""
    from torch.export.graph_signature import OutputKind

    trained = {
        spec.target for spec in ep.graph_signature.output_specs
        if spec.kind == OutputKind.GRADIENT_TO_PARAMETER
    }  # fmt: skip
    params = ep.graph_signature.inputs_to_parameters
    trainable = {node for node, fqn in params.items() if fqn in trained} if frozen_only else set()
    return lambda node: None if node.target in trainable else WEIGHTS_NAME


def write_manifest(
    out: Path,
    model: nn.Module,
    names: dict[str, str],
    xnnpack: bool,
    weights: Path | None,
    extra: dict[str, Any],
) -> Path:
    """fedsb_executorch.json: program name → state name and lr group of every trainable tensor."""
    manifest = {
        "format": "fedsb-executorch/1",
        "method": METHOD,
        "inputs": ["input_ids", "attention_mask", "labels"],
        "outputs": ["loss", "logits"],
        "inference_inputs": ["input_ids", "attention_mask", "*trainable (in the order below)"],
        "backend": "xnnpack" if xnnpack else "portable",
        "num_labels": num_labels(model),
        "trainable": [
            {
                "program": name,
                "state": state,
                "group": "lora" if is_lora_parameter(name) else "head",
                "shape": list(
                    dict(model.named_parameters())[name.removeprefix(GRAPH_PREFIX)].shape
                ),
            }
            for name, state in names.items()
        ],
        "files": {
            "training": TRAINING_PROGRAM,
            "inference": INFERENCE_PROGRAM,
            "weights": weights.name if weights else None,
        },
        **extra,
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(artifact_dir: str | Path) -> dict[str, Any]:
    """The manifest of an artifact folder; a one-line error if the folder is not one."""
    path = Path(artifact_dir) / MANIFEST
    if not path.is_file():
        raise ConfigError(
            f"{str(artifact_dir)!r} has no {MANIFEST}: export it with `fedsb export executorch`"
        )
    manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return manifest


@contextmanager
def quiet_export() -> Iterator[None]:
    """Silence the exporters' deprecation chatter (pytree, torchao) around export calls."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
