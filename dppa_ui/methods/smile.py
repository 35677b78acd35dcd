"""SMILE: zero-shot Sparse MIxture of Low-rank Experts (Tang et al. 2024, arXiv 2408.10174, Sec. 4).

SMILE does not merge: it upscales. Every linear layer inside the blocks becomes the base layer plus
one low-rank expert per fine-tune, behind a router that needs no data and no training.

For a linear layer with base weight W_0 (out x in, bias b_0) and fine-tune i's weight W_i:
  delta       Δ_i = W_i − W_0 = U_i Σ_i V_iᵀ (SVD, singular values descending)
  expert i    its rank-k truncation U_i[:, :k] Σ_i[:k] V_i[:, :k]ᵀ (k = `rank_of_expert`, "full" =
              min(out, in), which reproduces Δ_i up to float rounding) plus its bias delta b_i − b_0
              (as FusionBench's module path, SmileMoELinear, builds it; its config path adds the
              base bias once more)
  router      logit r_i(x) = ‖V_i[:, :k_r]ᵀ x‖₂ (k_r = `rank_of_router`): how much of x lies in the
              input subspace the fine-tune changed most. The singular values are not used.
  routing     p = softmax(r) over all experts; the K = `num_experts_per_tok` largest are kept and
              renormalised to sum to 1 (the others get 0)
  output      y = W_0 x + b_0 + Σ_{i in top-K} p_i / Σ_{j in top-K} p_j · (expert_i(x))
Routing is per token and per layer. These are the paper's equations as FusionBench implements
them (fusion_bench/models/smile_moe: gate = stacked V_iᵀ, L2 norm per expert, softmax, top-k,
renormalise; experts stored as U and ΣVᵀ). With one expert its weight is 1.

Layers are stored in nn.Linear orientation (out x in) whatever the source: a transformers Conv1D
(GPT-2 style, weight in x out) is transposed on the way in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv1d_class():
    """transformers' Conv1D (GPT-2 style projections), or None when transformers lacks it."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:       # pragma: no cover - every supported transformers has it
        return None
    return Conv1D


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an nn.Linear or Conv1D in Linear orientation (out x in)."""
    conv = conv1d_class()
    if conv is not None and isinstance(module, conv):
        return module.weight.t()
    return module.weight


def is_projection(module: nn.Module) -> bool:
    conv = conv1d_class()
    return isinstance(module, nn.Linear) or (conv is not None and isinstance(module, conv))


@torch.no_grad()
def expert_factors(delta: torch.Tensor, rank_of_expert: int | None, rank_of_router: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From one SVD of Δ (out x in, float32): (U_k (out x k), Σ_k V_kᵀ (k x in), router V_{k_r}ᵀ
    (k_r x in)). `rank_of_expert` None = full rank, min(out, in)."""
    full = min(delta.shape)
    k = full if rank_of_expert is None else rank_of_expert
    if not 1 <= k <= full or not 1 <= rank_of_router <= full:
        raise ValueError(f"ranks ({k}, router {rank_of_router}) must be between 1 and {full} for a "
                         f"{tuple(delta.shape)} matrix")
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return u[:, :k].contiguous(), (s[:k, None] * vh[:k]).contiguous(), vh[:rank_of_router].contiguous()


class SmileLinear(nn.Module):
    """A linear layer (base weight, bias) plus E low-rank experts and their zero-shot router.

    Parameters: weight (out, in), bias (out) or None, expert_u (E, out, k), expert_v (E, k, in)
    (= Σ_k V_kᵀ), expert_bias (E, out) or None, router (E, k_r, in).
    `force_expert` (an int) routes every token to that expert with weight 1 (for analysis and
    tests); `trace` (a list) receives (top-K expert indices, their weights) of every forward."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, expert_u: torch.Tensor,
                 expert_v: torch.Tensor, router: torch.Tensor, expert_bias: torch.Tensor | None = None,
                 num_experts_per_tok: int = 1):
        super().__init__()
        n = expert_u.shape[0]
        if not 1 <= num_experts_per_tok <= n:
            raise ValueError(f"num_experts_per_tok = {num_experts_per_tok} must be between 1 and the {n} expert(s)")
        self.out_features, self.in_features = weight.shape
        self.num_experts, self.num_experts_per_tok = n, num_experts_per_tok
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.expert_u = nn.Parameter(expert_u, requires_grad=False)
        self.expert_v = nn.Parameter(expert_v, requires_grad=False)
        self.expert_bias = None if expert_bias is None else nn.Parameter(expert_bias, requires_grad=False)
        self.router = nn.Parameter(router, requires_grad=False)
        self.force_expert: int | None = None
        self.trace: list | None = None

    @property
    def rank_of_expert(self) -> int:
        return self.expert_u.shape[2]

    @property
    def rank_of_router(self) -> int:
        return self.router.shape[1]

    def router_logits(self, h: torch.Tensor) -> torch.Tensor:
        """r_i(x) = ‖V_iᵀ x‖₂ for the N rows of h (N x in): (N, E)."""
        return torch.einsum("nd,ekd->nek", h, self.router.to(h.dtype)).norm(dim=2)

    def routing(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-K expert indices, renormalised softmax weights), each (N, K), from (N, E) logits."""
        n = logits.shape[0]
        if self.force_expert is not None:
            idx = torch.full((n, 1), int(self.force_expert), dtype=torch.long, device=logits.device)
            w = torch.ones(idx.shape, dtype=logits.dtype, device=logits.device)
            if self.trace is not None:
                self.trace.append((idx.cpu(), w.float().cpu()))
            return idx, w
        p = torch.softmax(logits.float(), dim=-1)
        w, idx = p.topk(self.num_experts_per_tok, dim=-1)
        if self.trace is not None:
            self.trace.append((idx.detach().cpu(), (w / w.sum(dim=-1, keepdim=True)).detach().cpu()))
        return idx, (w / w.sum(dim=-1, keepdim=True)).to(logits.dtype)

    def experts_out(self, h: torch.Tensor) -> torch.Tensor:
        """Every expert on every row of h: U_e (Σ_e V_eᵀ h) + its bias delta, (E, N, out)."""
        z = torch.matmul(torch.matmul(h, self.expert_v.transpose(1, 2)), self.expert_u.transpose(1, 2))
        return z if self.expert_bias is None else z + self.expert_bias.unsqueeze(1)

    def mixture(self, h, logits: torch.Tensor, dtype) -> torch.Tensor:
        """Σ over the top-K experts of weight x expert output, (N, out). The experts run densely
        (the unselected ones get weight 0): with a handful of low-rank experts one batched product
        is far cheaper than gathering each expert's tokens."""
        idx, w = self.routing(logits)
        dense = torch.zeros(logits.shape[0], self.num_experts, dtype=dtype, device=logits.device)
        dense.scatter_(1, idx, w.to(dtype))
        return torch.einsum("ne,eno->no", dense, self.experts_out(h).to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        h = x.reshape(-1, self.in_features)
        return y + self.mixture(h, self.router_logits(h), y.dtype).view(y.shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, experts={self.num_experts}, "
                f"top_k={self.num_experts_per_tok}, rank_of_expert={self.rank_of_expert}, "
                f"rank_of_router={self.rank_of_router}")


@torch.no_grad()
def smile_linear(base: nn.Module, deltas: list[torch.Tensor], bias_deltas: list[torch.Tensor] | None,
                 rank_of_expert: int | None, rank_of_router: int, num_experts_per_tok: int) -> SmileLinear:
    """The SMILE layer for one projection: `base` an nn.Linear or Conv1D (its weight and bias are
    kept as they are), `deltas` each fine-tune's weight delta in Linear orientation (out x in)."""
    factors = [expert_factors(d, rank_of_expert, rank_of_router) for d in deltas]
    w = linear_weight(base).detach().float().contiguous()
    b = None if base.bias is None else base.bias.detach().float().clone()
    eb = None if bias_deltas is None else torch.stack([d.float() for d in bias_deltas])
    return SmileLinear(w.clone(), b, torch.stack([f[0] for f in factors]), torch.stack([f[1] for f in factors]),
                       torch.stack([f[2] for f in factors]), eb, num_experts_per_tok)


class SmileEmbedding(SmileLinear):
    """An input embedding upscaled the same way (ours; the paper upscales linear layers only).

    An embedding is the linear map W = Eᵀ (hidden x vocab) applied to the one-hot vector of the
    token, so every formula above holds with x = one-hot(t): V_iᵀ x is column t of V_iᵀ and the
    router sends a token to the fine-tunes that changed its embedding most. `weight` stays in
    Embedding orientation (vocab x hidden); the experts are in Linear orientation."""

    def __init__(self, weight, expert_u, expert_v, router, num_experts_per_tok: int = 1,
                 padding_idx: int | None = None):
        super().__init__(weight.t(), None, expert_u, expert_v, router, None, num_experts_per_tok)
        self.weight = nn.Parameter(weight, requires_grad=False)       # vocab x hidden, as nn.Embedding
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = F.embedding(ids, self.weight, self.padding_idx)
        flat = ids.reshape(-1)
        logits = self.router[:, :, flat].norm(dim=1).t()                      # ‖V_iᵀ one-hot(t)‖₂: (N, E)
        return y + self.mixture(flat, logits, y.dtype).view(y.shape)

    def experts_out(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.expert_u, self.expert_v[:, :, tokens]).transpose(1, 2)


@torch.no_grad()
def smile_embedding(base: nn.Embedding, deltas: list[torch.Tensor], rank_of_expert: int | None, rank_of_router: int,
                    num_experts_per_tok: int) -> SmileEmbedding:
    """The SMILE embedding: `deltas` each fine-tune's embedding delta (vocab x hidden)."""
    factors = [expert_factors(d.t(), rank_of_expert, rank_of_router) for d in deltas]
    return SmileEmbedding(base.weight.detach().float().clone(), torch.stack([f[0] for f in factors]),
                          torch.stack([f[1] for f in factors]), torch.stack([f[2] for f in factors]),
                          num_experts_per_tok, base.padding_idx)
