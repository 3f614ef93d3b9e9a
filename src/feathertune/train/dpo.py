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

import math

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
        stats = dict(zip(STATS, ((chosen > rejected).sum().item(), (chosen - rejected).sum().item(),
                                 policy[:pairs].sum().item(), policy[pairs:].sum().item())))
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


BASE_LOSS = math.log(2)  # the base is the reference: every reward is 0 and every pair's loss −log σ(0)


@torch.no_grad()
def validation_scores(model: nn.Module, batches, beta: float, compare_base: bool = True) -> dict[str, float]:
    """The validation pairs' mean DPO loss and preference accuracy, and the base's, from one pass:
    the reference's log-probabilities are the base's, so the base costs no forward of its own."""
    was_training = model.training
    model.eval()
    loss = right = base_right = total = 0.0
    try:
        for inputs in batches:
            policy, reference = sequence_logps(model, inputs), reference_logps(model, inputs)
            pairs = policy.shape[0] // 2
            losses, _, _ = dpo_losses(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], beta)
            loss += losses.sum().item()
            right += (policy[:pairs] > policy[pairs:]).sum().item()
            base_right += (reference[:pairs] > reference[pairs:]).sum().item()
            total += pairs
    finally:
        model.train(was_training)
    scores = {"eval_loss": loss / max(total, 1), "preference_accuracy": right / max(total, 1)}
    if compare_base:
        scores.update(base_eval_loss=BASE_LOSS, base_preference_accuracy=base_right / max(total, 1))
    return scores
