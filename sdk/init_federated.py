"""Federated LoRA-SB initialisation without pooled data (DESIGN §1.2): the maths, no transport.

Client k holds G_k, the sum of the task-loss gradients of every adapted W0 over its own
init examples; the server wants the first step's rank-r SVD for G = Σ G_k without seeing any G_k.

`lora-sb-federated` (two-pass randomized range finder, about one FedIT round of traffic):
pass 0: clients send Y_k = G_k Ω (Ω: seeded Gaussian d_in × k, k = r + oversample); the server
sets Q = orth(Σ Y_k). Pass 1: clients send Z_k = Qᵀ G_k; the server forms G̃ = Q·Σ Z_k (= G when
k ≥ rank G) and sets B, A, R from the rank-r SVD of an estimate of the first step. sign() is not
linear, so the sketch cannot carry −η·sign(G); the estimate is either `sign-factored`
(default): −η·G̃ normalised by its row and column norms, Adafactor's factored second moment,
which equals −η·sign(G) when G has rank one; or `gradient`: −G̃ scaled to entry RMS η.

`lora-sb-federated-exact`: clients send G_k once (one full-weight upload); the server applies
−η·sign(Σ G_k) and the SVD: the central `lora-sb` init on the union of the clients' examples.

Sums are exact and order-independent (`fedsb.accumulate.ExactSum`), so any transport and any
arrival order give bit-identical factors. Optional DP: clients clip their whole reply to a norm
C; the server adds N(0, (σC)²) to every summed entry from a seeded generator.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import torch
from torch import nn

from .accumulate import ExactSum
from .adapter import LoraSBLayer, lora_layers
from .config import JobConfig
from .init import HeadProbe, base_gradient_sums, best_rank_approximation, set_factors_from_svd
from .training import Encoded, sequential_batches

FEDERATED_INITS = ("lora-sb-federated", "lora-sb-federated-exact")
SKETCH, EXACT = FEDERATED_INITS
PASSES = {SKETCH: 2, EXACT: 1}
SIGN_FACTORED, GRADIENT = "sign-factored", "gradient"  # the sketch's estimate of the first step
INIT_BATCH = 16  # examples per backward pass, as the central init

State = dict[str, torch.Tensor]


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every adapted layer, in the orientation of `nn.Linear`."""
    return {
        name: (layer.lora_B.weight.shape[0], layer.lora_A.weight.shape[1])
        for name, layer in lora_layers(model).items()
    }


def sketch_columns(requested: int, d_out: int, d_in: int) -> int:
    """Columns k of a layer's sketch: r + oversample, at most min(d_out, d_in) (then exact)."""
    return max(1, min(requested, d_out, d_in))


def gaussian_sketch(name: str, d_in: int, cols: int, seed: int) -> torch.Tensor:
    """Ω (d_in × cols, float64) of one layer; clients rebuild it from the published seed."""
    generator = torch.Generator().manual_seed(
        (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
    )
    return torch.randn(d_in, cols, generator=generator, dtype=torch.float64)


def local_init_indices(examples: int, count: int, seed: int, client_id: str) -> torch.Tensor:
    """A client's init examples: the first `count` of a seeded permutation of its data."""
    generator = torch.Generator().manual_seed(
        (seed * 7919 + zlib.crc32(client_id.encode())) % 2**63
    )
    return torch.randperm(examples, generator=generator)[: min(count, examples)].sort().values


def local_gradient_sums(
    model: nn.Module, data: Encoded, job: JobConfig, client_id: str
) -> tuple[State, int]:
    """A client's G_k over its share ⌈init_samples / clients⌉ of the init examples, and the count."""
    count = math.ceil(job.adapter.init_samples / job.federation.clients)
    local = data.select(local_init_indices(len(data), count, job.seed, client_id))
    probe = HeadProbe.of(job.lora_config())
    return base_gradient_sums(model, sequential_batches(local, INIT_BATCH), len(local), probe)


def range_sketch(grads: Mapping[str, torch.Tensor], cols: int, seed: int) -> State:
    """Pass 0 reply: Y_k = G_k Ω of every layer (float32, d_out × k)."""
    out = {}
    for name, g in grads.items():
        d_out, d_in = g.shape
        omega = gaussian_sketch(name, d_in, sketch_columns(cols, d_out, d_in), seed)
        out[name] = (g.double() @ omega).float()
    return out


def projection(grads: Mapping[str, torch.Tensor], bases: Mapping[str, torch.Tensor]) -> State:
    """Pass 1 reply: Z_k = Qᵀ G_k of every layer (float32, k × d_in)."""
    return {name: (bases[name].double().T @ g.double()).float() for name, g in grads.items()}


def clip_to_norm(state: Mapping[str, torch.Tensor], max_norm: float | None) -> State:
    """Scale all tensors together so that their joint Frobenius norm is at most `max_norm`."""
    if max_norm is None:
        return dict(state)
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in state.values()))
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: (t.double() * factor).float() for k, t in state.items()}


class SumOfReplies:
    """Exact, order-independent Σ of the clients' replies of one pass, layer by layer."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.sums = {name: ExactSum(shape) for name, shape in shapes.items()}
        self.examples = 0

    def add(self, state: Mapping[str, torch.Tensor], examples: int) -> None:
        for name, value in state.items():
            self.sums[name].add(value)
        self.examples += examples

    def result(self, noise_std: float = 0.0, seed: int = 0) -> dict[str, torch.Tensor]:
        """The float64 sums, plus seeded N(0, noise_std²) on every entry when noise_std > 0."""
        out = {name: acc.result() for name, acc in sorted(self.sums.items())}
        if noise_std > 0:
            generator = torch.Generator().manual_seed(seed)
            for value in out.values():
                value += noise_std * torch.randn(
                    value.shape, generator=generator, dtype=torch.float64
                )
        return out


def orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    """Q (float32, d_out × k) with orthonormal columns spanning Y = Σ Y_k."""
    q, _ = torch.linalg.qr(y.to(torch.float64))
    return q.float()  # what the clients receive, so the server uses exactly the same Q


def factors_from_projection(
    basis: torch.Tensor, z: torch.Tensor, rank: int, init_lr: float, step: str = SIGN_FACTORED
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, A, S) in float64: the rank-r SVD of the estimated first step from G̃ = QZ.

    `step` "gradient": −G̃ scaled to entry RMS η; "sign-factored": −η·factored_sign(G̃).
    `S` is the diagonal of R before the adapter's scaling s.
    """
    approx = basis.double() @ z.double()  # G̃ = Q Qᵀ G: the sketched gradient sum
    if step == SIGN_FACTORED:
        target = -init_lr * factored_sign(approx)
    else:
        norm = float(torch.linalg.matrix_norm(approx))
        target = -init_lr * math.sqrt(approx.numel()) / norm * approx if norm else approx
    u, s, vh = best_rank_approximation(target, rank)
    return u, vh, s


def factored_sign(g: torch.Tensor) -> torch.Tensor:
    """sign(G) approximated by G / √(row_i · col_j / ΣG²), Adafactor's factored second moment.

    Exact for a rank-one G (u vᵀ ↦ sign(u) sign(v)ᵀ); RMS-clipped to 1 as Adafactor clips its
    updates, so no entry class is blown up by a nearly empty row or column.
    """
    rows = g.square().sum(1, keepdim=True)
    cols = g.square().sum(0, keepdim=True)
    scale = (rows * cols).sqrt()
    m = torch.where(scale > 0, g * rows.sum().sqrt() / scale.clamp_min(1e-300), 0.0)
    return m / max(1.0, float(m.square().mean().sqrt()))


def set_factors(layer: LoraSBLayer, b: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> None:
    """B, A as given; R = diag(S)/s (the adapter's scaling), in the layer's dtype."""
    dtype = layer.lora_R.weight.dtype
    with torch.no_grad():
        layer.lora_B.weight.copy_(b.to(dtype))
        layer.lora_A.weight.copy_(a.to(dtype))
        layer.lora_R.weight.copy_(torch.diag(s / layer.scaling).to(dtype))


def set_sign_step_factors(layer: LoraSBLayer, grad_sum: torch.Tensor, init_lr: float) -> None:
    """The central `lora-sb` init from the exact gradient sum: SVD of −η·sign(G)."""
    target = -init_lr * torch.sign(grad_sum.float())  # float32, as the central init computes it
    set_factors_from_svd(layer, target, scale_r=True)


def reply_shapes(
    mode: str, pass_no: int, layers: Mapping[str, tuple[int, int]], cols: int
) -> dict[str, tuple[int, int]]:
    """The shape of every layer's tensor in a client's reply to pass `pass_no`."""
    if mode == EXACT:
        return dict(layers)
    if pass_no == 0:
        return {
            n: (d_out, sketch_columns(cols, d_out, d_in)) for n, (d_out, d_in) in layers.items()
        }
    return {n: (sketch_columns(cols, d_out, d_in), d_in) for n, (d_out, d_in) in layers.items()}


def client_reply(
    grads: Mapping[str, torch.Tensor],
    mode: str,
    pass_no: int,
    *,
    bases: Mapping[str, torch.Tensor],
    sketch_seed: int,
    sketch_cols: int,
    clip_norm: float | None,
) -> State:
    """What a client uploads in one pass: G_k (exact), Y_k = G_k Ω (pass 0), Z_k = Qᵀ G_k (pass 1)."""
    if mode == EXACT:
        reply = {name: g.float() for name, g in grads.items()}
    elif pass_no == 0:
        reply = range_sketch(grads, sketch_cols, sketch_seed)
    else:
        reply = projection(grads, bases)
    return clip_to_norm(reply, clip_norm)
