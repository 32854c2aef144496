"""Latent interventions at evaluation: the same weights and greedy decoding, only what enters the latent slots changes.

Do the latent tokens carry anything? Studies of latent visual reasoning in 2026 (Token Replacement Test, arXiv
2605.21642; "What's holding back latent visual reasoning?", 2605.18445) replace the latents with zeros, noise, other
items' latents or the boundary markers alone and find most of the gain kept. ``mirage-rl eval --latent_intervention
...`` measures it on any checkpoint with latent tokens:

============  =========================================================================================================
``none``      the model's own latents (plain ``eval``); its pass records them, the reference of every paired test
``zero``      zero vectors
``noise``     Gaussian vectors scaled to the norm of the latent the model would have fed at that slot (seeded per item)
``mean``      the mean of the ``none`` pass's latents at that slot index (all items, all blocks)
``swap``      the latents another test item of the same level produced in the ``none`` pass (a seeded derangement within
              each level; same block and slot; that item's first block when it has fewer, zeros when it made none)
``oracle``    the stage-1 targets: this item's helper image (``Task.oracle_image``) through the frozen vision tower,
              pooled into k vectors (``latent.helper_targets`` with the checkpoint's ``compress``); every block gets them.
              For VSP planning the helper image draws the solution: it measures whether the model *reads* its latents,
              not a fair accuracy
``pad``       the ``<|latent_pad|>`` embedding (the dummy-latent control at test time)
``skip``      no latent block: ``<|latent_start|>`` is suppressed (every task here boxes its answer after the block,
              so the answer format allows it), the model answers directly
============  =========================================================================================================

Paired statistics against ``none`` (same items): the accuracy difference, the exact McNemar p-value (two-sided
binomial test on the discordant pairs) and a percentile bootstrap 95 % interval (seeded).
"""

from __future__ import annotations

import math
import random

import torch

INTERVENTIONS = ("none", "zero", "noise", "mean", "swap", "oracle", "pad", "skip")
BOOTSTRAP = 2000


def check_names(names: list[str]) -> list[str]:
    """``names`` with ``none`` first (added when missing: the reference), duplicates dropped. Raises ``ValueError``
    naming an unknown one and the known ones."""
    unknown = [n for n in names if n not in INTERVENTIONS]
    if unknown:
        raise ValueError(f"latent_intervention: unknown {unknown}; known: {list(INTERVENTIONS)}")
    return ["none"] + [n for n in dict.fromkeys(names) if n != "none"]


def derangement(levels: list, seed: int = 0) -> list[int]:
    """A permutation ``p`` of ``range(len(levels))`` with ``p[i] != i`` and ``levels[p[i]] == levels[i]`` (a seeded
    shuffle within each level, rotated by one: a cycle, so no item keeps its own). A level of one item maps to
    itself (nothing to swap with: said in the report as ``swap_fixed_points``)."""
    rng = random.Random(seed)
    out = list(range(len(levels)))
    groups: dict = {}
    for i, lv in enumerate(levels):
        groups.setdefault(lv, []).append(i)
    for members in groups.values():
        order = members[:]
        rng.shuffle(order)
        for a, b in zip(order, order[1:] + order[:1]):
            out[a] = b
    return out


class LatentIntervention:
    """The ``latent_fn`` of :func:`mirage_rl.generation.generate` for one intervention over one evaluation.

    Call :meth:`for_items` with the global item indices of each batch before decoding it. ``own``: the ``none``
    pass's latents per item (``(S_i, H)`` float32, k per block); ``oracle``: per item ``(k, H)`` float32;
    ``pad``: the ``(H,)`` pad embedding.
    """

    def __init__(self, name: str, k: int, own: list[torch.Tensor] | None = None, levels: list | None = None,
                 oracle: list[torch.Tensor] | None = None, pad: torch.Tensor | None = None, seed: int = 0):
        self.name, self.k, self.seed = name, k, seed
        self.own, self.oracle, self.pad = own, oracle, pad
        self.items: list[int] = []
        if name == "mean":
            flat = [(j % k, v) for o in own for j, v in enumerate(o)]
            if not flat:
                raise ValueError("latent intervention 'mean': the none pass produced no latent block")
            self.mean = torch.stack([torch.stack([v for s, v in flat if s == t]).mean(0) if any(s == t for s, _ in flat)
                                     else torch.zeros_like(flat[0][1]) for t in range(k)])
        if name == "swap":
            self.partner = derangement(levels, seed)

    def for_items(self, items: list[int]) -> LatentIntervention:
        self.items = list(items)
        return self

    def __call__(self, z: torch.Tensor, slot: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        rows = []
        for r, (i, t, b) in enumerate(zip(self.items, slot.tolist(), block.tolist())):
            rows.append(self._one(z[r], i, t, b))
        return torch.stack(rows).to(z.device, z.dtype)

    def _one(self, z: torch.Tensor, item: int, t: int, b: int) -> torch.Tensor:
        if self.name == "zero":
            return torch.zeros_like(z)
        if self.name == "noise":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + item * 1009 + b * 31 + t)
            e = torch.randn(z.shape, generator=g)
            return (e / e.norm() * z.float().norm().cpu()).to(z.device)
        if self.name == "pad":
            return self.pad.to(z.device, z.dtype)
        if self.name == "mean":
            return self.mean[t].to(z.device, z.dtype)
        if self.name == "oracle":
            return self.oracle[item][t].to(z.device, z.dtype)
        if self.name == "swap":
            other = self.own[self.partner[item]]
            if len(other) == 0:
                return torch.zeros_like(z)
            j = b * self.k + t if (b + 1) * self.k <= len(other) else t
            return other[j].to(z.device, z.dtype)
        return z


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: ``b``, ``c`` the discordant pairs (right only under the reference, right only
    under the intervention); ``2 * P(X <= min(b, c))`` for ``X ~ Binomial(b + c, 1/2)``, at most 1."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(reference: list[bool], other: list[bool], seed: int = 0) -> dict:
    """Paired comparison on the same items: ``diff`` (accuracy of ``other`` minus ``reference``), ``mcnemar_p``,
    ``ci95`` (percentile bootstrap of the difference over items, ``BOOTSTRAP`` resamples) and the discordant counts
    ``b`` (reference right, other wrong) and ``c`` (the reverse). Raises ``ValueError`` on lists of other lengths."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"paired: {len(reference)} and {len(other)} samples; the same items are needed")
    n = len(reference)
    d = [int(o) - int(r) for r, o in zip(reference, other)]
    b = sum(r and not o for r, o in zip(reference, other))
    c = sum(o and not r for r, o in zip(reference, other))
    rng = random.Random(seed)
    boots = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(BOOTSTRAP))
    return {"diff": sum(d) / n, "mcnemar_p": mcnemar_p(b, c), "ci95": [boots[int(0.025 * BOOTSTRAP)],
                                                                       boots[int(0.975 * BOOTSTRAP) - 1]],
            "b": b, "c": c}


def geometry(own: list[torch.Tensor], oracle: list[torch.Tensor], k: int, answers: list | None = None) -> dict:
    """How the ``none`` latents relate to the oracles (items with at least one block; the first block):
    ``cos_to_oracle`` per slot (mean cosine of a latent to its own item's target), ``retrieval_top1`` (share of items
    whose latents, flattened over the k slots, are nearer by cosine to their own oracle than to every other item's)
    with ``retrieval_chance`` = 1 / items, ``collapse`` (mean pairwise cosine between different items' latents) beside
    ``oracle_collapse`` (the same among their oracles: the targets' own informativeness), ``oracle_specific_share``
    (sum ||t_i - mean t||^2 / sum ||t_i||^2: the share of the targets' energy that is item-specific), ``items``.

    With ``answers`` (one hashable per item, e.g. the shortest plan): ``nn_same_answer`` / ``oracle_nn_same_answer``,
    the share of items whose nearest other item (by cosine of the latents / of the targets) has the same answer, beside
    ``same_answer_chance`` (the mean share of other items with the same answer): whether the latents, and the targets
    themselves, encode the answer (retrieval among targets, issue 21 section 3)."""
    idx = [i for i, o in enumerate(own) if len(o) >= k]
    if len(idx) < 2:
        return {"items": len(idx)}
    lat = torch.stack([own[i][:k] for i in idx]).float()        # (N, k, H)
    tgt = torch.stack([oracle[i] for i in idx]).float()         # (N, k, H)
    cos_slot = torch.nn.functional.cosine_similarity(lat, tgt, dim=-1).mean(0)
    a = torch.nn.functional.normalize(lat.flatten(1), dim=-1)
    o = torch.nn.functional.normalize(tgt.flatten(1), dim=-1)
    sim = a @ o.T
    top1 = (sim.argmax(1) == torch.arange(len(idx))).float().mean()
    off = ~torch.eye(len(idx), dtype=torch.bool)
    centred = tgt - tgt.mean(0, keepdim=True)
    out = {"items": len(idx), "cos_to_oracle": [round(float(x), 4) for x in cos_slot],
           "retrieval_top1": float(top1), "retrieval_chance": 1 / len(idx),
           "collapse": float((a @ a.T)[off].mean()), "oracle_collapse": float((o @ o.T)[off].mean()),
           "oracle_specific_share": float(centred.pow(2).sum() / tgt.pow(2).sum())}
    if answers is not None:
        ans = [answers[i] for i in idx]
        same = torch.tensor([[x == y for y in ans] for x in ans]) & off

        def nn_same(flat):
            nn = (flat @ flat.T).masked_fill(~off, -2.0).argmax(1)
            return float(same[torch.arange(len(idx)), nn].float().mean())

        out.update({"nn_same_answer": nn_same(a), "oracle_nn_same_answer": nn_same(o),
                    "same_answer_chance": float(same.float().sum(1).mean() / (len(idx) - 1))})
    return out
