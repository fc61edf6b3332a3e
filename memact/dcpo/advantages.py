"""Trajectory advantages for DCPO: one scalar per trajectory, normalised within its prompt's group.

The advantage is computed once per trajectory and only then broadcast to that trajectory's
segments, so a trajectory that was cut into many segments does not weigh more in the group
statistics (docs/design.md, section 4).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

NORMS = ("std", "none")
ESTIMATORS = ("grpo", "rloo")
CONTROLS = ("none", "shuffle", "reverse")


def group_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_ids: torch.Tensor | Sequence[Hashable],
    norm: str = "std",
    estimator: str = "grpo",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-normalised advantage of each trajectory.

    Args:
        rewards: [n_traj] scalar reward of each trajectory (reward units).
        group_ids: [n_traj] hashable id per trajectory; trajectories of the same prompt share it.
        norm: "std" divides by the group's sample standard deviation (Bessel-corrected,
            n - 1, as ``torch.std`` and the GRPO reference implementations use);
            "none" does not divide (Dr.GRPO).
        estimator: "grpo" uses the group mean as baseline, R_i - mean(R);
            "rloo" uses the mean of the *other* members, R_i - mean_{j != i} R_j.
        eps: added to the std before dividing.

    Returns:
        [n_traj] advantages, float (the rewards' float dtype, else float32). A group of one,
        or a group whose rewards are all equal, gets exactly 0: there is no signal to learn
        from, and rounding in mean/std must not turn 0/0 into noise or NaN.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    rewards_t = torch.as_tensor(rewards)
    if rewards_t.dim() != 1:
        raise ValueError(f"rewards must have shape [n_traj], got {tuple(rewards_t.shape)}")
    ids = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    if len(ids) != rewards_t.shape[0]:
        raise ValueError(f"group_ids must have length n_traj={rewards_t.shape[0]}, got {len(ids)}")
    out_dtype = rewards_t.dtype if rewards_t.is_floating_point() else torch.float32
    # float64 on CPU: a few hundred scalars, and the equal-reward check below wants exact values.
    r = rewards_t.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(r).all():
        raise ValueError("rewards must be finite")

    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(ids):
        members.setdefault(g, []).append(i)

    adv = torch.zeros_like(r)
    for idx in members.values():
        group = r[idx]
        n = group.numel()
        if n == 1 or bool((group == group[0]).all()):
            continue
        if estimator == "grpo":
            centred = group - group.mean()
        else:
            centred = group - (group.sum() - group) / (n - 1)
        if norm == "std":
            centred = centred / (group.std(unbiased=True) + eps)
        adv[idx] = centred
    return adv.to(device=rewards_t.device, dtype=out_dtype)


def broadcast_to_segments(
    traj_adv: torch.Tensor, seg_traj_index: torch.Tensor | Sequence[int]
) -> torch.Tensor:
    """Give every segment its trajectory's advantage.

    Args:
        traj_adv: [n_traj] advantage per trajectory (from ``group_advantages``).
        seg_traj_index: [n_seg] index into ``traj_adv`` of each segment's trajectory.

    Returns:
        [n_seg] advantage per segment.
    """
    if traj_adv.dim() != 1:
        raise ValueError(f"traj_adv must have shape [n_traj], got {tuple(traj_adv.shape)}")
    index = torch.as_tensor(seg_traj_index, dtype=torch.long, device=traj_adv.device)
    if index.dim() != 1:
        raise ValueError(f"seg_traj_index must have shape [n_seg], got {tuple(index.shape)}")
    n_traj = traj_adv.shape[0]
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_traj):
        raise ValueError(f"seg_traj_index values must lie in [0, {n_traj}), got {index.tolist()}")
    return traj_adv[index]


def control_advantages(
    traj_adv: torch.Tensor, group_ids: Sequence[Hashable], mode: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The advantages of a control run (``dcpo.control``), from the real ones.

    Args:
        traj_adv: [n_traj] advantages from :func:`group_advantages`.
        group_ids: [n_traj] prompt id of each trajectory.
        mode: "none" (returned as they are), "shuffle" (a random permutation within each
            group: the same values, so the same update size, on trajectories they do not
            belong to) or "reverse" (the sign flipped).
        generator: the permutations' randomness (seed it for reproducible runs).

    Returns:
        [n_traj] advantages.
    """
    if mode not in CONTROLS:
        raise ValueError(f"mode must be one of {CONTROLS}, got {mode!r}")
    if len(group_ids) != traj_adv.shape[0]:
        raise ValueError(f"group_ids must have length n_traj={traj_adv.shape[0]}, got {len(group_ids)}")
    if mode == "none":
        return traj_adv
    if mode == "reverse":
        return -traj_adv
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(group_ids):
        members.setdefault(g, []).append(i)
    out = traj_adv.clone()
    for idx in members.values():
        perm = torch.randperm(len(idx), generator=generator)
        out[idx] = traj_adv[[idx[j] for j in perm.tolist()]]
    return out
