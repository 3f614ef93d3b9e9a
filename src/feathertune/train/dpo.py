"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model"), eq. 7:

    L_DPO = −log σ( β·[log π(y_w|x) − log π_ref(y_w|x)] − β·[log π(y_l|x) − log π_ref(y_l|x)] )

for a prompt x, its preferred answer y_w and the other y_l; log π(y|x) is the sum of the answer
tokens' log-probabilities (the prompt's carry none). r(x, y) = β·(log π(y|x) − log π_ref(y|x)) is
the implicit reward, and the metrics are its accuracy (r_w > r_l) and margin (r_w − r_l).

The reference policy is the model the tuning starts from. With an adapter that is the same model
with the adapter disabled (`adapters.disabled`): no second copy of the base in memory. Full and
partial fine-tuning keep the frozen original beside each trained tensor already, so the same
switch gives their reference too. The reference answers as at inference (eval mode, no dropout) and
without a gradient.

A batch holds its B pairs as 2B rows, the B preferred answers first (`data.collate`), so both
answers of every pair go through the model in one forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from feathertune.adapters import disabled
from feathertune.loss import sequence_logps

STATS = ("reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected")  # per pair, in metrics.jsonl


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
               reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 7 per pair, from (B,) answer log-probabilities; returns (losses, chosen rewards, rejected
    rewards), each (B,)."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def dpo_loss_sum(model: nn.Module, inputs: dict[str, torch.Tensor], beta: float, *, sparse_head: bool = True,
                 mask_free_attention: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ over the batch's pairs of L_DPO, and the sums of the STATS (divide by the pairs for means)."""
    options = {"sparse_head": sparse_head, "mask_free_attention": mask_free_attention}
    policy = sequence_logps(model, inputs, **options)  # (2B,)
    reference = reference_logps(getattr(model, "module", model), inputs, **options)  # DDP wraps the model
    pairs = policy.shape[0] // 2
    losses, chosen, rejected = dpo_losses(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], beta)
    with torch.no_grad():
        stats = {"reward_accuracy": (chosen > rejected).sum().item(), "reward_margin": (chosen - rejected).sum().item(),
                 "logps_chosen": policy[:pairs].sum().item(), "logps_rejected": policy[pairs:].sum().item()}
    return losses.sum(), stats


@torch.no_grad()
def reference_logps(model: nn.Module, inputs: dict[str, torch.Tensor], **options) -> torch.Tensor:
    """(2B,) the answers' log-probabilities under π_ref: the model with its adapters off, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with disabled(model):
            return sequence_logps(model, inputs, **options)
    finally:
        model.train(was_training)


@torch.no_grad()
def preference_accuracy(model: nn.Module, batches) -> float:
    """The share of pairs to whose preferred answer the model gives the higher log-probability
    (in eval mode; restored after). `batches`: collated preference batches (2B rows each)."""
    was_training = model.training
    model.eval()
    right = total = 0
    try:
        for inputs in batches:
            logps = sequence_logps(model, inputs)
            pairs = logps.shape[0] // 2
            right += int((logps[:pairs] > logps[pairs:]).sum())
            total += pairs
    finally:
        model.train(was_training)
    return right / max(total, 1)
